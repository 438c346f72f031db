"""Error feedback for compressed pushes: what quantisation dropped is sent with the next step.

    feedback = ErrorFeedback()
    buf = feedback.compensated(path, g)             # g + the leaf's residual
    data = codecs.encode(buf, codecs.INT8, residual_out=buf)   # buf: the new residual
    ...push data (retries send the same bytes)...
    feedback.commit({path: buf})                    # once, after the push was answered

The residual of a leaf after a push is (g + r) - decode(encode(g + r)): the
server receives everything the worker meant to send, only a step late, so
the sum of what the server decoded over T steps differs from the sum of the
true gradients by the last residual alone -- at most half a quantisation step
(scale / 2 of its block), whatever T (without feedback the rounding errors of
every step add up). `OptimizerClient.push` keeps one `ErrorFeedback` per
worker id and commits the new residuals only once the push was answered (a
retried push re-sends the same bytes, and a push that failed changes nothing).
Memory: two float32 buffers of each encoded leaf (the committed residual, and
the one the next push fills), i.e. twice the model's size on the worker.

A restarted worker starts with zero residuals: what it drops is its last
push's rounding error, at most scale / 2 per element, i.e. one step's
quantisation error once -- never an error that grows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


class ErrorFeedback:
  """One float32 residual per leaf path (flat, row-major), zero until a push sets it."""

  def __init__(self):
    self.residuals: dict[str, np.ndarray] = {}
    self._spare: dict[str, np.ndarray] = {}  # last push's residual buffers, to be refilled

  def compensated(self, path: str, g: np.ndarray) -> np.ndarray:
    """g + the leaf's residual, as a flat float32 array of its own (a recycled buffer: the
    committed residual stays as it is until `commit`)."""
    g = np.asarray(g).reshape(-1)
    r = self.residuals.get(path)
    if r is not None and r.shape != g.shape:
      raise ValueError(f'leaf {path}: {g.size} elements, but its residual has {r.size} '
                       f'(the leaf changed shape)')
    out = self._spare.pop(path, None)
    if out is None or out.shape != g.shape:
      out = np.empty(g.shape, np.float32)
    if r is None:
      out[...] = g
    else:
      np.add(g, r, out=out, dtype=np.float32)
    return out

  def commit(self, residuals: Mapping[str, np.ndarray]) -> None:
    """The new residuals of a push that was answered (the old buffers are reused)."""
    for path, r in residuals.items():
      old = self.residuals.get(path)
      self.residuals[path] = r
      if old is not None and old is not r:
        self._spare[path] = old

  def reset(self) -> None:
    """Drops every residual (what a restarted worker starts with)."""
    self.residuals.clear()
    self._spare.clear()
