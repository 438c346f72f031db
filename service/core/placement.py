"""Where the model lives: the sharding rule, host buffers in the mesh's layout, transfers.

Knows nothing of gRPC or of the step's state machine (service/core/engine.py). The
rule (`partition_spec`) splits each leaf along one dimension over the whole
mesh; `layout_of` gives the matching host layout (service/core/layout.py), in which
the engine's gradient buffers are allocated and recycled (`BufferPool`);
`to_mesh` makes a global array of a host buffer, and `host_pieces` reads a
global array back, a chunk's worth at a time.

In a multi-process job the mesh spans every process's devices; each process
holds and moves only its own devices' blocks (`local_blocks`, `local_slice`,
`layout_of(..., blocks)`), and `host_pieces` reads only those.
"""

from __future__ import annotations

import ctypes
import math
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from service.core import layout

MESH_AXIS = 'x'


def make_mesh(count: int = 0, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """The server's 1-D mesh: the first `count` devices of each process (0: all of them).

  `devices`: default every process's (`jax.devices()`: a single process's own,
  or in a multi-process job the whole job's). The mesh is process-major, so
  that each process holds a contiguous run of every split leaf's blocks.
  """
  devices = sorted(devices if devices is not None else jax.devices(),
                   key=lambda d: (d.process_index, d.id))
  by_process: dict[int, list[jax.Device]] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  if count:
    short = {p: len(ds) for p, ds in by_process.items() if len(ds) < count}
    if short:
      p, n = next(iter(short.items()))
      raise ValueError(f'devices={count} but only {n} are available'
                       + (f' in process {p}' if len(by_process) > 1 else ''))
    devices = [d for ds in by_process.values() for d in ds[:count]]
  return jax.sharding.Mesh(np.array(devices), (MESH_AXIS,), axis_types=(AxisType.Auto,))


def local_blocks(mesh: jax.sharding.Mesh) -> range:
  """The positions along the mesh of this process's devices (contiguous: see make_mesh)."""
  here = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  return range(here[0], here[-1] + 1) if here else range(0)


def process_starts(shape: Sequence[int], pspec: P, mesh: jax.sharding.Mesh
                   ) -> Optional[tuple[int, tuple[int, ...]]]:
  """(split dimension, where each process's range of it starts) of a leaf split as
  `pspec`; None if it is not split (every process holds it whole)."""
  if MESH_AXIS not in pspec:
    return None
  dim = list(pspec).index(MESH_AXIS)
  step = shape[dim] // mesh.devices.size
  first: dict[int, int] = {}
  for i, d in enumerate(mesh.devices.flat):
    first.setdefault(d.process_index, i)
  return dim, tuple(first[p] * step for p in sorted(first))


def local_slice(shape: Sequence[int], pspec: P, blocks: range, axis_size: int
                ) -> tuple[slice, ...]:
  """The part of a leaf of `shape` split as `pspec` that mesh positions `blocks` hold."""
  index = [slice(None)] * len(shape)
  if MESH_AXIS in pspec:
    dim = list(pspec).index(MESH_AXIS)
    step = shape[dim] // axis_size
    index[dim] = slice(blocks.start * step, blocks.stop * step)
  return tuple(index)


def partition_spec(shape: Sequence[int], axis_size: int) -> P:
  """The one sharding rule: split the largest dimension the mesh size divides."""
  best = None
  for dim, size in enumerate(shape):
    if size % axis_size == 0 and size >= axis_size and (best is None or size > shape[best]):
      best = dim
  if best is None or axis_size == 1:
    return P()
  return P(*([None] * best + [MESH_AXIS]))


def layout_of(shape: Sequence[int], pspec: P, axis_size: int,
              blocks: Optional[range] = None) -> layout.LeafLayout:
  """The host layout of a leaf split as `pspec` (from `partition_spec`) says.

  `blocks`: the mesh positions whose blocks this host holds (default: all);
  the layout is then that of their slice of the leaf.
  """
  if MESH_AXIS not in pspec:
    return layout.LeafLayout(tuple(shape))
  blocks = range(axis_size) if blocks is None else blocks
  dim = list(pspec).index(MESH_AXIS)
  here = list(shape)
  here[dim] = shape[dim] // axis_size * len(blocks)
  return layout.LeafLayout(tuple(here), dim, len(blocks), blocks.start)


def to_mesh(host: np.ndarray, sharding: NamedSharding,
            lay: Optional[layout.LeafLayout] = None,
            shape: Optional[Sequence[int]] = None) -> jax.Array:
  """A global array of `shape` from a host buffer, each device taking only its block.

  `host` is the leaf row-major (then `shape` is its own), or in `lay`'s block
  layout (of the whole leaf, or of this process's slice of a leaf of `shape`),
  whose blocks are handed over as they are (on CPU, wrapped without a copy
  when aligned). `jax.make_array_from_callback` asks only for the blocks of
  this process's devices.
  """
  if lay is None:
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  dim = lay.dim
  return jax.make_array_from_callback(
      tuple(shape if shape is not None else lay.shape), sharding,
      lambda idx: lay.block(host, 0 if dim is None else (idx[dim].start or 0)))


def to_host(array: jax.Array) -> np.ndarray:
  """A host copy of a global array, assembled from its devices' blocks.

  Unlike `np.asarray(array)`, the copy is not cached on `array`: a pull must
  not leave a host copy of the params behind for as long as they are current.
  """
  out = np.empty(array.shape, array.dtype)
  done = set()
  for shard in array.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    if key not in done:
      done.add(key)
      out[shard.index] = np.asarray(shard.data)
  return out


def host_pieces(array: jax.Array, max_bytes: int) -> Iterator[np.ndarray]:
  """`array`'s elements in row-major order, as consecutive flat host arrays of <= ~max_bytes.

  Read from the devices' blocks (on CPU, read-only views of their memory; on
  an accelerator, host copies of the blocks), a band of rows at a time where
  the blocks split rows: on CPU no host copy of the leaf is made, so a pull
  costs memory of the order of a chunk. Use the
  pieces while the array cannot be donated (inside `Engine.reading`) and
  before the next one is asked for. A sharding other than one split
  dimension (never made here) falls back to `to_host`.
  """
  blocks = {}
  for shard in array.addressable_shards:
    blocks.setdefault(tuple(s.start or 0 for s in shard.index), shard)
  split = [d for d in range(array.ndim) if len({k[d] for k in blocks}) > 1]
  item = array.dtype.itemsize
  if array.ndim == 0:
    yield np.asarray(next(iter(blocks.values())).data).reshape(-1)
    return
  if len(blocks) == 1 or len(split) == 1:
    d = split[0] if split else 0
    ordered = [np.asarray(blocks[k].data) for k in sorted(blocks, key=lambda k: k[d])]
    outer = math.prod(array.shape[:d])
    if outer == 1 or len(ordered) == 1:  # the blocks follow each other in row-major order
      step = max(1, max_bytes // item)
      for b in ordered:
        flat = b.reshape(-1)
        for i in range(0, flat.size, step):
          yield flat[i:i + step]
      return
    rows = [b.reshape(outer, -1) for b in ordered]
    band = max(1, max_bytes // (sum(r.shape[1] for r in rows) * item))
    for i in range(0, outer, band):
      yield np.concatenate([r[i:i + band] for r in rows], axis=1).reshape(-1)
    return
  yield to_host(array).reshape(-1)


class BufferPool:
  """A model's gradient buffers, recycled, at most `limit` of them alive.

  Each buffer is one allocation holding every leaf, in given dtypes (float32,
  or a push's wire dtypes), in the mesh's block layout (`layout.host_buffers`).
  Fresh pages cost a kernel zeroing pass about as dear as receiving into them,
  so a buffer that falls idle (a push added to the sum, a push abandoned, a
  sum moved onto the mesh) is given back and kept for the next push rather
  than freed, as long as the buffers out and the idle ones stay within `limit`
  (max_inflight_pushes, which the engine's admission also bounds the buffers
  out by); an idle buffer of other dtypes is dropped when a new one is
  needed. An idle buffer may still be read by an update in flight (on CPU the
  mesh wraps its memory): it is handed out again only once its fence (that
  update's outputs) is computed.
  """

  def __init__(self, layouts: Sequence[layout.LeafLayout], limit: int):
    self._layouts = list(layouts)
    self._limit = limit
    self._out = 0  # buffers taken and not given back
    self._idle: list[tuple[tuple[np.dtype, ...], list[np.ndarray], tuple]] = []

  def take(self, dtypes: Optional[Sequence[np.dtype]] = None) -> list[np.ndarray]:
    """A buffer in `dtypes` (default float32), one array per leaf; give it back when done."""
    key = tuple(np.dtype(d) for d in dtypes) if dtypes is not None else (
        (np.dtype(np.float32),) * len(self._layouts))
    self._out += 1
    for i, (k, buffers, fence) in enumerate(self._idle):
      if k == key and all(x.is_ready() for x in fence):
        del self._idle[i]
        return buffers
    others = [i for i, (k, _, _) in enumerate(self._idle) if k != key]
    while self._out + len(self._idle) > self._limit and others:
      del self._idle[others.pop()]  # make room: drop an idle buffer of other dtypes
    if self._out + len(self._idle) <= self._limit or not self._idle:
      return layout.host_buffers(self._layouts, key)
    # All are being read: wait for the oldest update (the engine waits for
    # `fence_to_wait` first, without its lock, so that this returns at once).
    _, buffers, fence = self._idle.pop(0)
    jax.block_until_ready(fence)
    return buffers

  def fence_to_wait(self, dtypes: Optional[Sequence[np.dtype]] = None) -> Optional[tuple]:
    """What `take(dtypes)` would wait for now (None: it would not wait): the fence of the
    idle buffer it would hand out once that update is computed."""
    key = tuple(np.dtype(d) for d in dtypes) if dtypes is not None else (
        (np.dtype(np.float32),) * len(self._layouts))
    out = self._out + 1
    if any(k == key and all(x.is_ready() for x in fence) for k, _, fence in self._idle):
      return None
    others = sum(1 for k, _, _ in self._idle if k != key)
    idle = len(self._idle) - min(others, max(0, out + len(self._idle) - self._limit))
    if out + idle <= self._limit or not idle:
      return None
    return next(fence for k, _, fence in self._idle if k == key)

  def give(self, buffers: list[np.ndarray], fence: Sequence[jax.Array] = ()) -> None:
    """Takes back a buffer from `take` that fell idle (kept if within the limit).

    `fence`: arrays computed by whatever still reads the buffer; they must
    never be donated (a donated array cannot be waited on).
    """
    self._out -= 1
    if self._out + len(self._idle) < self._limit:
      self._idle.append((tuple(b.dtype for b in buffers), buffers[:], tuple(fence)))


def trim_heap() -> bool:
  """Returns the C allocator's free memory to the OS (glibc's malloc_trim); False elsewhere."""
  try:
    libc = ctypes.CDLL(None)
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):  # not glibc
    return False
