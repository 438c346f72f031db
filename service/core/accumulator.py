"""The step's gradient sum on the host: float32, in the mesh's block layout, recycled.

Why on the host: a push arrives in host memory anyway, and the first push of
a step (the only one, with one worker) becomes the sum as it is -- no copy,
no pass -- while later ones are added to it in place. With `ordered` (the
server's --ordered-sum), a step's pushes are held instead, and added when the
step is applied, in a fixed order (`rules.push_order`): float32 addition is
not associative, and the same pushes then give the same sum bit for bit,
whatever order they arrived in. Only the sum goes onto the mesh, once per
step; on a CPU mesh the devices wrap its blocks without a copy
(service/core/layout.py). Every model-sized gradient buffer, the pushes'
and the sum's, comes from one `placement.BufferPool`. A block-encoded push
(int8, int4) is decoded straight into the sum when it counts, on several
threads.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from service.core import layout, placement
from service.core.model import ModelPlan
from service.protocol import codecs

_RANGE = 1 << 22  # elements per piece of a leaf's add (16 MiB of float32)
_PARALLEL_MIN = 1 << 20  # below this many elements a push is added on the calling thread
_scratch = threading.local()  # per thread: its codecs.Scratch


def _ranges(a: np.ndarray, op: Callable, b: np.ndarray) -> list:
  """(elements, work) pieces applying op(a_piece, b_piece) over `a` and `b`, same layout."""
  x, y = a.reshape(-1), b.reshape(-1)
  return [(min(_RANGE, x.size - i),
           functools.partial(op, x[i:i + _RANGE], y[i:i + _RANGE]))
          for i in range(0, x.size, _RANGE)]


def add_jobs(a: np.ndarray, b: np.ndarray, weight: np.float32 = np.float32(1),
             write: bool = False) -> list:
  """(elements, work) jobs doing a += weight * b (a = weight * b if `write`), in float32;
  `a` and `b` in the same layout."""
  if write:
    op = lambda x, y: np.multiply(y, weight, out=x, dtype=np.float32)
  elif weight == 1:
    op = lambda x, y: np.add(x, y, out=x, dtype=np.float32)
  else:  # a piece-sized temporary at most
    op = lambda x, y: np.add(x, np.multiply(y, weight, dtype=np.float32), out=x)
  return _ranges(a, op, b)


_threads: Optional[concurrent.futures.ThreadPoolExecutor] = None
_threads_lock = threading.Lock()


def adding_threads() -> int:
  """How many threads add pushes into the sum: one per CPU this process may use, at most 4."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return min(4, cpus or 1)


def run_jobs(jobs: list) -> None:
  """Runs (elements, work) jobs on the process's adding threads (`adding_threads`), largest
  first so that the threads end together; small pushes on the calling thread."""
  global _threads  # pylint: disable=global-statement
  workers = adding_threads()
  if workers < 2 or sum(size for size, _ in jobs) < _PARALLEL_MIN:
    for _, work in jobs:
      work()
    return
  with _threads_lock:
    if _threads is None:
      _threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='add')
  for f in [_threads.submit(work) for _, work in sorted(jobs, key=lambda j: -j[0])]:
    f.result()


def decode_jobs(leaf: codecs.EncodedLeaf, view: np.ndarray, weight: np.float32,
                add: bool) -> list:
  """(elements, work) jobs decoding `leaf` into `view` (its wire-order float32 view of a
  buffer): view = weight * values, or view += weight * values. A job per received run."""
  return [(run[1].size, functools.partial(_decode_run, leaf, run, view, weight, add))
          for run in leaf.runs()]


def _decode_run(leaf: codecs.EncodedLeaf, run, view: np.ndarray, weight: np.float32,
                add: bool) -> None:
  """Decodes one run of an encoded leaf into its wire-order float32 `view` of the sum:
  view = weight * values, or view += weight * values."""
  scratch = getattr(_scratch, 'value', None)
  if scratch is None:
    scratch = _scratch.value = codecs.Scratch()
  for e0, values in leaf.values(run, scratch):
    if weight != 1:
      np.multiply(values, weight, out=values)
    layout.write(view, e0, values, add)


class _Held(NamedTuple):
  """A push held for an ordered sum: its place in the order, buffers, weight, encoded leaves."""
  order: tuple
  buffers: list[np.ndarray]
  num_examples: int
  encoded: dict[int, codecs.EncodedLeaf]


class Accumulator:
  """The example-weighted gradient sum of the current step, and the pool of buffers.

  `ordered`: hold the step's pushes and add them when the step is applied, in
  the order of their `order` keys (see `add`), instead of as they come.
  """

  def __init__(self, plan: ModelPlan, max_buffers: int, ordered: bool = False):
    self._plan = plan
    self.pool = placement.BufferPool(plan.layouts, max_buffers)
    self.ordered = ordered
    self._sum: Optional[list[np.ndarray]] = None  # float32, one array per leaf
    self._held: list[_Held] = []  # with `ordered`: the step's pushes, as they came
    self.weight = 0  # examples accumulated
    self._retiring: list[np.ndarray] = []  # the sum of the step being applied

  @property
  def held(self) -> int:
    """Model-sized buffers the step holds: its sum's (from its first push until it is
    applied) or, with `ordered`, one per push held."""
    return (self._sum is not None) + len(self._held)

  def holding(self) -> str:
    """What the step holds, in words ('' for nothing): for a busy push's error."""
    if self._held:
      n = len(self._held)
      return f"the step's {n} held push{'es' if n > 1 else ''} (ordered sum)"
    return "the step's sum" if self._sum is not None else ''

  def take_buffers(self, dtypes: Sequence[np.dtype]) -> list[np.ndarray]:
    """Host buffers for a push in its wire dtypes, in the mesh's block layout, recycled."""
    return self.pool.take(dtypes)

  def fence_to_take(self, dtypes: Sequence[np.dtype]) -> Optional[tuple]:
    """What `take_buffers(dtypes)` would wait for on the devices (None: nothing)."""
    return self.pool.fence_to_wait(dtypes)

  def fence_to_add(self, buffers: Sequence[np.ndarray], order: tuple = ()) -> Optional[tuple]:
    """What `add(buffers, ..., order=order)` (and, with `ordered`, applying the step
    after it) would wait for on the devices (None: nothing): a push that is not float32
    and starts the sum takes a float32 buffer for it."""
    if self.ordered:
      first = min([(h.order, h.buffers) for h in self._held] + [(order, buffers)],
                  key=lambda h: h[0])
      return self._fence_to_start(first[1])
    if self._sum is not None:
      return None
    return self._fence_to_start(buffers)

  def fence_to_apply(self) -> Optional[tuple]:
    """What `to_mesh()` would wait for on the devices (None: nothing): with `ordered`, a
    float32 buffer for the sum if the first push in the order is not float32."""
    if not self._held:
      return None
    return self._fence_to_start(min(self._held, key=lambda h: h.order).buffers)

  def _fence_to_start(self, buffers: Sequence[np.ndarray]) -> Optional[tuple]:
    """What starting the sum with `buffers` would wait for: a float32 buffer's fence,
    unless `buffers` are float32 and become the sum."""
    if all(b.dtype == np.float32 for b in buffers):
      return None
    return self.pool.fence_to_wait()

  def wire_views(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per buffer, the view a receiver writes the leaf's wire bytes into."""
    return [lay.wire_view(b) for lay, b in zip(self._plan.layouts, buffers)]

  def give_back(self, buffers: list[np.ndarray]) -> None:
    """A push's buffers that were not added (the push failed): kept for the next one."""
    self.pool.give(buffers)

  def add(self, buffers: list[np.ndarray], num_examples: int,
          encoded: Optional[Mapping[int, codecs.EncodedLeaf]] = None,
          order: tuple = ()) -> None:
    """sum += num_examples * push, consuming `buffers` (the list is emptied).

    The push: `buffers`, one per leaf in the wire dtypes, and `encoded`, the
    checked bytes of its block-encoded leaves (whose buffers are then unused),
    decoded here straight into the sum: no float32 copy of them is made.

    With `ordered`, the push is only held (its buffers and encoded leaves,
    one of the step's buffers: `held`); `to_mesh` adds the held pushes in the
    order of their `order` keys, each as below, so the sum is the same
    whatever order they came in.

    The first push of a step becomes the sum itself when its buffers are
    float32 (scaled in place unless its weight is 1; its encoded leaves
    decoded into them): no copy, no pass. Later pushes are added in place, a
    piece at a time, so no model-sized temporary is made. The work is cut
    into independent pieces (leaf ranges, encoded runs) that the process's
    adding threads share (`run_jobs`; NumPy lets go of the GIL in its loops).
    """
    if self.ordered:
      self._held.append(_Held(order, buffers[:], num_examples, dict(encoded or {})))
      buffers.clear()
    else:
      self._add(buffers, num_examples, encoded or {})
    self.weight += num_examples

  def _add(self, buffers: list[np.ndarray], num_examples: int,
           encoded: Mapping[int, codecs.EncodedLeaf]) -> None:
    """sum += num_examples * push, now (`add`'s work)."""
    n = np.float32(num_examples)
    layouts = self._plan.layouts
    jobs = []  # (elements, work)
    if self._sum is None and all(b.dtype == np.float32 for b in buffers):
      self._sum, first, adopted = buffers[:], True, True
      if n != 1:  # scaled in place
        jobs += [job for i, b in enumerate(buffers) if i not in encoded
                 for job in add_jobs(b, b, n, write=True)]
    else:
      first, adopted = self._sum is None, False
      if first:  # bfloat16 or float16 on the wire
        self._sum = self.pool.take()
      for i, (a, b) in enumerate(zip(self._sum, buffers)):
        if i in encoded:
          continue
        jobs += add_jobs(a, b, n, first)
    for i, leaf in encoded.items():
      jobs += decode_jobs(leaf, layouts[i].wire_view(self._sum[i], np.float32), n, not first)
    run_jobs(jobs)
    if not adopted:  # the push was added into the sum
      self.pool.give(buffers)
    buffers.clear()

  def _add_held(self) -> None:
    """With `ordered`: adds the held pushes into the sum, in the order of their keys (the
    first one in it becomes the sum if it is float32, as a first push does)."""
    held, self._held = sorted(self._held, key=lambda h: h.order), []
    for h in held:
      self._add(h.buffers, h.num_examples, h.encoded)

  def discard(self) -> None:
    """Drops the step's sum (a skipped step) and the pushes it holds; their buffers go back
    to the pool."""
    if self._sum is not None:
      self.pool.give(self._sum)
    for h in self._held:
      self.pool.give(h.buffers)
    self._sum, self._held, self.weight = None, [], 0

  def to_mesh(self) -> list[jax.Array]:
    """The sum as global arrays on the mesh; the host sum starts over empty.

    Each device gets its block of the host buffer (on CPU the mesh wraps the
    host memory without a copy). The host buffer goes back to the pool when
    `retire` is called with the step's outputs: until those are computed, the
    update may still read it. With `ordered`, the held pushes are added first.
    """
    if self._held:
      self._add_held()
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

