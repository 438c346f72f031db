"""The step's gradient sum on the host: float32, in the mesh's block layout, recycled.

Why on the host: a push arrives in host memory anyway, and the first push of
a step (the only one, with one worker) becomes the sum as it is -- no copy,
no pass -- while later ones are added to it in place. Only the sum goes onto
the mesh, once per step; on a CPU mesh the devices wrap its blocks without a
copy (service/core/layout.py). Every model-sized gradient buffer, the pushes'
and the sum's, comes from one `placement.BufferPool`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from service.core import placement
from service.core.model import ModelPlan


class Accumulator:
  """The example-weighted gradient sum of the current step, and the pool of buffers."""

  def __init__(self, plan: ModelPlan, max_buffers: int):
    self._plan = plan
    self.pool = placement.BufferPool(plan.layouts, max_buffers)
    self._sum: Optional[list[np.ndarray]] = None  # float32, one array per leaf
    self.weight = 0  # examples accumulated
    self._retiring: list[np.ndarray] = []  # the sum of the step being applied

  @property
  def held(self) -> bool:
    """Whether the sum holds a buffer (from the step's first push until it is applied)."""
    return self._sum is not None

  def take_buffers(self, dtypes: Sequence[np.dtype]) -> list[np.ndarray]:
    """Host buffers for a push in its wire dtypes, in the mesh's block layout, recycled."""
    return self.pool.take(dtypes)

  def wire_views(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per buffer, the view a receiver writes the leaf's wire bytes into."""
    return [lay.wire_view(b) for lay, b in zip(self._plan.layouts, buffers)]

  def give_back(self, buffers: list[np.ndarray]) -> None:
    """A push's buffers that were not added (the push failed): kept for the next one."""
    self.pool.give(buffers)

  def add(self, buffers: list[np.ndarray], num_examples: int) -> None:
    """sum += num_examples * buffers, consuming `buffers` (the list is emptied).

    The first push of a step becomes the sum itself when it is float32
    (scaled in place unless its weight is 1): no copy, no pass. Later pushes
    are added in place, leaf by leaf, so no model-sized temporary is made.
    """
    n = np.float32(num_examples)
    if self._sum is None and all(b.dtype == np.float32 for b in buffers):
      if n != 1:
        for b in buffers:
          b *= n
      self._sum = buffers[:]
    elif self._sum is None:  # bfloat16 or float16 on the wire
      self._sum = self.pool.take()
      for a, b in zip(self._sum, buffers):
        np.multiply(b, n, out=a, dtype=np.float32)
      self.pool.give(buffers)
    else:
      for a, b in zip(self._sum, buffers):
        if n == 1:
          np.add(a, b, out=a, dtype=np.float32)
        else:  # a leaf-sized temporary at most
          a += np.multiply(b, n, dtype=np.float32)
      self.pool.give(buffers)
    buffers.clear()
    self.weight += num_examples

  def discard(self) -> None:
    """Drops the step's sum (a skipped step); its buffer goes back to the pool."""
    if self._sum is not None:
      self.pool.give(self._sum)
    self._sum, self.weight = None, 0

  def to_mesh(self) -> list[jax.Array]:
    """The sum as global arrays on the mesh; the host sum starts over empty.

    Each device gets its block of the host buffer (on CPU the mesh wraps the
    host memory without a copy). The host buffer goes back to the pool when
    `retire` is called with the step's outputs: until those are computed, the
    update may still read it.
    """
    self._retiring, self._sum = self._sum, None
    self.weight = 0
    plan = self._plan
    return [placement.to_mesh(a, sh, lay, s.shape)
            for a, sh, lay, s in zip(self._retiring, plan.shardings, plan.layouts, plan.specs)]

  def retire(self, fence: Sequence[jax.Array]) -> None:
    """Returns the last step's sum to the pool, to be reused once `fence` is computed.

    `fence`: outputs of the step that reads the sum, never donated later (the
    trust ratios: the params are donated to the next step, and a donated array
    can no longer be waited on).
    """
    self.pool.give(self._retiring, fence)
    self._retiring = []

