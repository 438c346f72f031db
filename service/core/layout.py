"""Host buffers laid out as the mesh holds them: each device's block of a leaf contiguous.

Pure NumPy; knows nothing of gRPC or JAX. A leaf of shape S sharded along
dimension d over k devices is kept on the host as k contiguous blocks, block
b holding the slice [b*S[d]/k, (b+1)*S[d]/k) of dimension d, row-major inside
(an array of shape (k, *shard_shape)). For d = 0 that is simply the leaf's
row-major layout; for d > 0 the bytes of a row-major stream (the wire's order)
are scattered into the blocks as they arrive (`write`), a strided copy no
dearer than a plain one.

Why: each device's block is then one contiguous, 64-byte-aligned host array.
On CPU, `jax.make_array_from_callback` wraps such a block without copying it,
so the step's gradient sum goes onto the mesh for free (no second copy at the
step's peak, no fresh pages for the kernel to zero); on an accelerator each
block is one contiguous host-to-device transfer.

In a multi-process job a process holds only its own devices' blocks: the
layout of its slice of the leaf (`first` says where in the leaf it starts), and
the bytes it receives are that slice's, row-major.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from service.protocol.chunks import allocate


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """Where a leaf's elements live in its host buffer.

  Attributes:
    shape: the shape of what the host holds: the whole leaf, or in a
      multi-process job the slice of it that this process's devices hold.
    dim: the dimension split across the devices; None if every device holds
      the whole leaf (then there is one block).
    parts: the number of blocks the host holds (its devices along the split
      dimension), >= 1.
    first: the index of the host's first block among all of the leaf's blocks
      (0 in a single process).
  """
  shape: tuple[int, ...]
  dim: Optional[int] = None
  parts: int = 1
  first: int = 0

  def __post_init__(self):
    if self.dim is None:
      if self.parts != 1:
        raise ValueError(f'a leaf that is not split has 1 part, got {self.parts}')
    elif not 0 <= self.dim < len(self.shape) or self.shape[self.dim] % self.parts:
      raise ValueError(f'cannot split dimension {self.dim} of shape {self.shape} into '
                       f'{self.parts} parts')

  @property
  def block_shape(self) -> tuple[int, ...]:
    """The shape of one device's block."""
    if self.dim is None:
      return self.shape
    s = list(self.shape)
    s[self.dim] //= self.parts
    return tuple(s)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def contiguous(self) -> bool:
    """True when the blocked layout is the row-major one (nothing to scatter)."""
    return self.dim is None or self.parts == 1 or math.prod(self.shape[:self.dim]) == 1

  def wire_view(self, buffer: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """A view of `buffer` whose row-major order is the leaf's row-major byte order (uint8),
    or element order (`dtype`: the buffer's own).

    1-D (a plain view) when the layout is contiguous; otherwise 3-D:
    (rows before the split dimension, parts, bytes (elements) of one block's row).
    """
    raw = buffer.reshape(-1).view(dtype)
    if self.contiguous or self.size == 0:
      return raw
    outer = math.prod(self.shape[:self.dim])
    return raw.reshape(self.parts, outer, -1).transpose(1, 0, 2)

  def block(self, buffer: np.ndarray, start: int) -> np.ndarray:
    """The block of the device whose slice of the split dimension starts at `start` (an
    index into the whole leaf)."""
    if self.dim is None:
      return buffer.reshape(self.shape)
    return buffer[start // self.block_shape[self.dim] - self.first]

  def from_array(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """`x` (the leaf, row-major) in this layout (into `out` if given)."""
    out = np.empty((self.parts, *self.block_shape), x.dtype) if out is None else out
    write(self.wire_view(out), 0, np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    return out

  def to_array(self, buffer: np.ndarray) -> np.ndarray:
    """The leaf, row-major (a copy), from a buffer in this layout."""
    out = np.empty(self.shape, buffer.dtype)
    out.reshape(-1).view(np.uint8)[:] = self.wire_view(buffer).reshape(-1)
    return out


def write(dst: np.ndarray, start: int, src: np.ndarray, add: bool = False) -> None:
  """dst.flat[start:start + len(src)] = src (or += src), for a strided `dst`, without
  copying `dst`.

  `dst` is any (non-contiguous) view, addressed in its row-major order; `src`
  is 1-D. The range is cut into at most two partial rows per dimension and
  whole sub-arrays in between, each one NumPy assignment (or in-place add).
  """
  n = len(src)
  if dst.ndim == 1:
    if add:
      part = dst[start:start + n]
      np.add(part, src, out=part)
    else:
      dst[start:start + n] = src
    return
  inner = math.prod(dst.shape[1:])
  i, rem = divmod(start, inner)
  pos = 0
  if rem:
    pos = min(inner - rem, n)
    write(dst[i], rem, src[:pos], add)
    i += 1
  whole = (n - pos) // inner
  if whole:
    part, values = dst[i:i + whole], src[pos:pos + whole * inner].reshape((whole, *dst.shape[1:]))
    if add:
      np.add(part, values, out=part)
    else:
      part[...] = values
    pos += whole * inner
    i += whole
  if pos < n:
    write(dst[i], 0, src[pos:], add)


def host_buffers(layouts: Sequence[LeafLayout], dtypes: Sequence[np.dtype]) -> list[np.ndarray]:
  """Uninitialised buffers in `layouts` (one per leaf, shape (parts, *block_shape)), in ONE
  allocation (`service.protocol.chunks.allocate`): each leaf starts on a 64-byte
  boundary, and so does each block whose size is a multiple of 64 bytes.
  """
  dtypes = [np.dtype(d) for d in dtypes]
  raw = allocate([lay.size * dt.itemsize for lay, dt in zip(layouts, dtypes)])
  return [r.view(dt).reshape(lay.parts, *lay.block_shape)
          for r, lay, dt in zip(raw, layouts, dtypes)]
