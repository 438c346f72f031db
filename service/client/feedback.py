"""Error feedback for compressed pushes: what quantisation dropped is sent with the next step.

    feedback = ErrorFeedback()
    g_plus_r = feedback.compensated(path, g)        # g + the leaf's residual
    data = codecs.encode(g_plus_r, codecs.INT8)
    new_r = feedback.residual_of(g_plus_r, data, codecs.INT8)
    ...push data (retries send the same bytes)...
    feedback.commit({path: new_r})                  # once, after the push was answered

The residual of a leaf after a push is (g + r) - decode(encode(g + r)): the
server receives everything the worker meant to send, only a step late, so
the sum of what the server decoded over T steps differs from the sum of the
true gradients by the last residual alone -- at most half a quantisation step
(scale / 2 of its block), whatever T (without feedback the rounding errors of
every step add up). `OptimizerClient.push` keeps one `ErrorFeedback` per
worker id and commits the new residuals only once the push was answered (a
retried push re-sends the same bytes, and a push that failed changes nothing).

A restarted worker starts with zero residuals: what it drops is its last
push's rounding error, at most scale / 2 per element, i.e. one step's
quantisation error once -- never an error that grows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from service.protocol import codecs


class ErrorFeedback:
  """One float32 residual per leaf path (flat, row-major), zero until a push sets it."""

  def __init__(self):
    self.residuals: dict[str, np.ndarray] = {}

  def compensated(self, path: str, g: np.ndarray) -> np.ndarray:
    """g + the leaf's residual, as a new flat float32 array."""
    out = np.array(g, np.float32).reshape(-1)  # a copy: the caller's gradient stays as it is
    r = self.residuals.get(path)
    if r is not None:
      if r.shape != out.shape:
        raise ValueError(f'leaf {path}: {out.size} elements, but its residual has {r.size} '
                         f'(the leaf changed shape)')
      out += r
    return out

  @staticmethod
  def residual_of(sent: np.ndarray, data: np.ndarray, encoding: int) -> np.ndarray:
    """What the encoding of `sent` (flat float32) into `data` dropped: sent - decode(data)."""
    return sent - codecs.decode(data, sent.size, encoding)

  def commit(self, residuals: Mapping[str, np.ndarray]) -> None:
    """The new residuals of a push that was answered."""
    self.residuals.update(residuals)

  def reset(self) -> None:
    """Drops every residual (what a restarted worker starts with)."""
    self.residuals.clear()
