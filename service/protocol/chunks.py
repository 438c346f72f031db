"""Tensors in chunks: splitting leaves into a stream, and a receiver that checks one.

Pure NumPy and the generated messages; no gRPC calls, no JAX. The layout of a
stream (header specs, chunks in order, a commit with a checksum) is documented in
proto/lamb_sharded/v1/tensor.proto. A receiver checks a stream against its
header and hands each chunk's bytes to a `Sink`, which decides where they go:
`HostArrays` (row-major arrays, the client's pulls) or the server's buffers in
its mesh's block layout.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import sys
import threading
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from service.errors import InvalidArgument, DataLoss
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.protocol.checksum import MASK64, chunk_checksum
from service.protocol.specs import LeafSpec

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 3 << 20
MAX_MESSAGE_BYTES = 4 << 20
ALIGN = 64  # bytes; XLA's CPU runtime wraps host memory aligned to this without a copy

def clamp_chunk_bytes(requested: int) -> int:
  return DEFAULT_CHUNK_BYTES if requested <= 0 else min(max(requested, MIN_CHUNK_BYTES),
                                                        MAX_CHUNK_BYTES)




Leaves = Iterable[tuple[str, 'np.ndarray | Iterator[np.ndarray]']]


def _views(leaves: Leaves, chunk_bytes: int) -> Iterator[tuple[str, int, list[memoryview], int]]:
  """(path, offset, segments, size) of every chunk of `leaves`, in order: views, not copies.

  A leaf is an array, or an iterator over consecutive pieces of it (arrays
  whose elements, in order, are the leaf's in row-major order, e.g. its
  devices' blocks). Every chunk of a leaf but its last holds `chunk_bytes`
  bytes, whatever the pieces' sizes: a chunk's data is the concatenation of
  its `segments` (views into one or more pieces), `size` bytes in all.
  """
  for path, leaf in leaves:
    offset, segments, size = 0, [], 0
    for piece in (leaf if isinstance(leaf, collections.abc.Iterator) else (leaf,)):
      raw = memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
      start = 0
      while start < len(raw):
        take = min(chunk_bytes - size, len(raw) - start)
        segments.append(raw[start:start + take])
        size += take
        start += take
        if size == chunk_bytes:
          yield path, offset, segments, size
          offset, segments, size = offset + size, [], 0
    if size:
      yield path, offset, segments, size


def chunk_stream(leaves: Leaves, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 ) -> Iterator[tuple[str, int, bytes, int] | tensor_pb2.StreamCommit]:
  """Splits leaves into chunks (in order), then yields the StreamCommit.

  Chunks come as (path, offset, data, sequence) tuples rather than messages.

  Args:
    leaves: (path, leaf) pairs, in the order of the stream's header; a leaf is
      an array, or an iterator over consecutive pieces of it (see `_views`),
      already in its wire dtype.
    chunk_bytes: the most data bytes per chunk.
  """
  seq, total, checksum = 0, 0, 0
  for path, offset, segments, _ in _views(leaves, chunk_bytes):
    data = b''.join(segments)
    checksum = (checksum + chunk_checksum(data)) & MASK64
    total += len(data)
    yield path, offset, data, seq
    seq += 1
  yield tensor_pb2.StreamCommit(chunk_count=seq, total_bytes=total, checksum=checksum)


def chunk_messages(message_type, arrays, chunk_bytes: int):
  """The chunk messages, then the commit message, of a stream of `message_type`.

  `message_type` is a request or response with `chunk` and `commit` fields.
  """
  for item in chunk_stream(arrays, chunk_bytes):
    req = message_type()
    if isinstance(item, tensor_pb2.StreamCommit):
      req.commit.CopyFrom(item)
    else:
      c = req.chunk
      c.path, c.offset, c.data, c.sequence = item
    yield req


def _varint(n: int) -> bytes:
  out = bytearray()
  while n > 0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _len_field(number: int, length: int) -> bytes:
  """The key and length of a length-delimited field (its payload follows)."""
  return _varint(number << 3 | 2) + _varint(length)


def encoded_chunk_messages(message_type, leaves: Leaves, chunk_bytes: int) -> Iterator[bytes]:
  """`chunk_messages`, already serialized (for a call whose serializer passes bytes on).

  Each chunk's data is copied once, from the leaf straight into its message's
  bytes; building a message and serializing it copies the data three times
  (out of the array, into the message, into the serialization). The encoding
  is the protobuf wire format of `message_type` with its `chunk` field set
  (a TensorChunk with the data field last), so receivers parse it as usual.
  Leaves as for `chunk_stream` (arrays, or iterators of pieces).
  """
  chunk_field = message_type.DESCRIPTOR.fields_by_name['chunk'].number
  seq, total, checksum = 0, 0, 0
  path_fields: dict[str, bytes] = {}
  for path, off, segments, size in _views(leaves, chunk_bytes):
    path_field = path_fields.get(path)
    if path_field is None:
      path_field = path_fields[path] = _len_field(1, len(path.encode())) + path.encode()
    # proto3 leaves zero scalars out: offset (2) and sequence (4) are varints.
    head = (path_field + (_varint(2 << 3) + _varint(off) if off else b'')
            + (_varint(4 << 3) + _varint(seq) if seq else b'') + _len_field(3, size))
    message = b''.join((_len_field(chunk_field, len(head) + size), head, *segments))
    checksum = (checksum + chunk_checksum(memoryview(message)[len(message) - size:])) & MASK64
    total += size
    yield message
    seq += 1
  req = message_type()
  req.commit.CopyFrom(tensor_pb2.StreamCommit(chunk_count=seq, total_bytes=total,
                                              checksum=checksum))
  yield req.SerializeToString()


def allocate(nbytes: Sequence[int]) -> list[np.ndarray]:
  """Uninitialised uint8 buffers of the given sizes, in ONE allocation, each 64-byte aligned.

  One model-sized allocation is returned to the OS as a whole when its last
  array goes; many leaf-sized ones are recycled inside the allocator's
  per-thread arenas and keep the process's resident memory high.
  """
  total = sum(-(-n // ALIGN) * ALIGN for n in nbytes)
  return _cut(np.empty(total + ALIGN, np.uint8), nbytes)


def _cut(raw: np.ndarray, nbytes: Sequence[int]) -> list[np.ndarray]:
  """`allocate`'s buffers, cut out of its allocation `raw`."""
  views, off = [], -raw.ctypes.data % ALIGN
  for n in nbytes:
    views.append(raw[off:off + n])
    off += -(-n // ALIGN) * ALIGN
  return views


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A TensorChunk whose `data` is a view into the received message's bytes."""
  path: str
  offset: int
  data: memoryview
  sequence: int


@dataclasses.dataclass(frozen=True)
class ChunkMessage:
  """Stands in for a stream message of kind `chunk`: WhichOneof and `.chunk` as its own."""
  chunk: Chunk

  def WhichOneof(self, name: str) -> str:  # pylint: disable=invalid-name
    assert name == 'kind', name
    return 'chunk'


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  """A varint at buf[pos:]: (value, position after it). IndexError if truncated."""
  value = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7
    if shift > 63:
      raise ValueError('varint too long')


def _parse_chunk(buf: memoryview) -> Optional[Chunk]:
  """`buf` as a TensorChunk holding only fields of TensorChunk, each with its wire
  type; None for anything else (protobuf's own parser then decides)."""
  path, offset, data, sequence = '', 0, memoryview(b''), 0
  pos, end = 0, len(buf)
  try:
    while pos < end:
      key, pos = _read_varint(buf, pos)
      if key in (0x0A, 0x1A):  # path (1), data (3): length-delimited
        length, pos = _read_varint(buf, pos)
        if pos + length > end:
          return None
        if key == 0x0A:
          path = str(buf[pos:pos + length], 'utf-8')
        else:
          data = buf[pos:pos + length]
        pos += length
      elif key in (0x10, 0x20):  # offset (2), sequence (4): int64 varints
        value, pos = _read_varint(buf, pos)
        if value >> 64:
          return None
        value = value - (1 << 64) if value >= 1 << 63 else value
        if key == 0x10:
          offset = value
        else:
          sequence = value
      else:
        return None
  except (IndexError, ValueError):  # truncated, an overlong varint, a path not UTF-8
    return None
  return Chunk(path, offset, data, sequence)


def chunk_parser(message_type):
  """A deserializer of `message_type` streams that does not copy chunk data.

  For any message with a `chunk` field: the server's uploads (PushGradients,
  InitializeModel requests), the client's pulls (PullParameters responses).
  A message holding just a chunk becomes a ChunkMessage whose data is a view
  into the received bytes; protobuf would copy the data twice (parsing it,
  then reading the field). Every other message, and any chunk with fields or
  encodings TensorChunk does not have, is parsed by protobuf as usual.
  """
  key = message_type.DESCRIPTOR.fields_by_name['chunk'].number << 3 | 2
  parse = message_type.FromString

  def deserialize(raw: bytes):
    buf = memoryview(raw)
    if buf and buf[0] == key:
      try:
        length, pos = _read_varint(buf, 1)
      except (IndexError, ValueError):
        return parse(raw)
      if pos + length == len(buf):
        chunk = _parse_chunk(buf[pos:])
        if chunk is not None:
          return ChunkMessage(chunk)
    return parse(raw)
  return deserialize


class Sink(Protocol):
  """Where a `ChunkReceiver` puts the bytes of the leaves it checked."""

  def write(self, leaf: int, offset: int, data: np.ndarray) -> None:
    """Bytes `data` (uint8) of leaf number `leaf`, from byte `offset` of its row-major bytes."""

  def leaf_complete(self, leaf: int) -> None:
    """Every byte of leaf number `leaf` was written."""


class Recycler:
  """Allocations for `HostArrays`, reused once nothing outside holds them (a client's pulls).

  Writing a pull into fresh memory makes the kernel fault in and zero every
  page first: about as costly as receiving the bytes, and worse with several
  pulling threads in one process (they take turns on its memory map). A
  recycler keeps the last `keep` allocations and hands one out again when no
  array of it is alive any more (every array a pull returned is a view of its
  allocation, so holds a reference to it; anything that aliases the memory,
  e.g. a zero-copy `jax.device_put`, holds one too). `keep=2` serves a worker
  that holds step t's params while it pulls step t+1 (t-1's are free by
  then); it costs up to `keep` copies of the params while the worker holds
  none of them.
  """

  def __init__(self, keep: int = 2):
    self._keep = keep
    self._kept: list[np.ndarray] = []
    self._lock = threading.Lock()

  def allocate(self, nbytes: Sequence[int]) -> list[np.ndarray]:
    """As `allocate`, in a kept allocation of the same sizes if one is free."""
    sizes = tuple(nbytes)
    with self._lock:
      for i, (kept_sizes, raw) in enumerate(self._kept):
        # References: the list's tuple, `raw`, getrefcount's argument. Any view adds one.
        if kept_sizes == sizes and sys.getrefcount(raw) == 3:
          del self._kept[i]
          break
      else:
        raw = None
    views = allocate(sizes) if raw is None else _cut(raw, sizes)
    with self._lock:
      self._kept.append((sizes, views[0].base if views else np.empty(0, np.uint8)))
      del self._kept[:-self._keep]
    return views


class HostArrays:
  """A sink into row-major arrays of the specs' shapes and dtypes (one allocation: new, or
  a free one of `recycler`'s)."""

  def __init__(self, specs: Sequence[LeafSpec], recycler: Optional[Recycler] = None):
    nbytes = [s.nbytes for s in specs]
    raw = allocate(nbytes) if recycler is None else recycler.allocate(nbytes)
    self._bytes = raw
    self.arrays = [b.view(s.dtype).reshape(s.shape) for b, s in zip(raw, specs)]

  def write(self, leaf: int, offset: int, data: np.ndarray) -> None:
    self._bytes[leaf][offset:offset + len(data)] = data

  def leaf_complete(self, leaf: int) -> None:
    del leaf


class HostParts:
  """A sink that keeps only a part of each leaf: `slices[i]` (a range of at most one
  dimension) of leaf i's row-major bytes, into new row-major arrays of the parts.

  The bytes outside the parts are dropped as they arrive; no whole leaf is held.

  Example:
    >>> sink = HostParts([LeafSpec('x', (2, 4), np.dtype(np.float32))],
    ...                  [(slice(None), slice(2, 4))])
    >>> sink.write(0, 0, np.arange(8, dtype=np.float32).view(np.uint8))
    >>> sink.arrays[0].tolist()
    [[2.0, 3.0], [6.0, 7.0]]
  """

  def __init__(self, specs: Sequence[LeafSpec], slices: Sequence[tuple]):
    self._specs = list(specs)
    self._cuts = []  # per leaf: (row bytes: the split dimension's stride, its start, stop)
    shapes = []
    for s, index in zip(specs, slices):
      dims = [d for d, sl in enumerate(index) if sl != slice(None)]
      if not dims:
        self._cuts.append(None)
        shapes.append(s.shape)
        continue
      d = dims[0]
      start, stop, _ = index[d].indices(s.shape[d])
      stride = int(np.prod(s.shape[d + 1:], dtype=np.int64)) * s.dtype.itemsize
      self._cuts.append((stride, s.shape[d], start, stop))
      shapes.append(s.shape[:d] + (stop - start,) + s.shape[d + 1:])
    raw = allocate([int(np.prod(sh, dtype=np.int64)) * s.dtype.itemsize
                    for sh, s in zip(shapes, specs)])
    self._bytes = raw
    self.arrays = [b.view(s.dtype).reshape(sh) for b, s, sh in zip(raw, specs, shapes)]

  def write(self, leaf: int, offset: int, data: np.ndarray) -> None:
    cut = self._cuts[leaf]
    if cut is None:
      self._bytes[leaf][offset:offset + len(data)] = data
      return
    stride, rows, start, stop = cut
    kept = (stop - start) * stride  # bytes kept of each run of `rows` rows
    end = offset + len(data)
    row = offset // stride  # the row (of the split dimension, counted over the outer ones)
    while offset < end:
      outer, r = divmod(row, rows)
      row_end = min(end, (row + 1) * stride)
      if start <= r < stop:
        at = outer * kept + (r - start) * stride + offset - row * stride
        self._bytes[leaf][at:at + row_end - offset] = data[offset - end + len(data):
                                                           row_end - end + len(data)]
      offset, row = row_end, row + 1

  def leaf_complete(self, leaf: int) -> None:
    del leaf


class ChunkReceiver:
  """Checks a stream of chunks against its header and hands their bytes to a sink.

  Every violation of the stream's rules raises InvalidArgument (DataLoss for a
  checksum mismatch) naming the leaf or field; `finish` checks the commit.
  """

  def __init__(self, specs: Sequence[LeafSpec], what: str, sink: Optional[Sink] = None):
    """Args:
      specs: the stream's leaves (its header), in order.
      what: names the stream in error messages.
      sink: where the bytes go (default: `HostArrays(specs)`, then `receiver.sink.arrays`).
    """
    self._specs = list(specs)
    self._what = what
    self.sink = HostArrays(self._specs) if sink is None else sink
    self._leaf = 0
    self._offset = 0
    self._seq = 0
    self._total = 0
    self._checksum = 0
    self._skip_empty()

  @property
  def total_bytes(self) -> int:
    """Data bytes received so far."""
    return self._total

  def _skip_empty(self) -> None:
    while self._leaf < len(self._specs) and self._specs[self._leaf].nbytes == 0:
      self._complete_leaf()

  def _complete_leaf(self) -> None:
    self.sink.leaf_complete(self._leaf)
    self._leaf += 1
    self._offset = 0

  def add(self, chunk: tensor_pb2.TensorChunk | Chunk) -> None:
    w = self._what
    if chunk.sequence != self._seq:
      kind = 'duplicated' if chunk.sequence < self._seq else 'out of order'
      raise InvalidArgument(f'{w}: chunk of leaf {chunk.path} has sequence {chunk.sequence}, '
                            f'expected {self._seq} ({kind})')
    if self._leaf >= len(self._specs):
      raise InvalidArgument(f'{w}: chunk {chunk.sequence} of leaf {chunk.path} after all '
                            f'leaves were complete')
    spec = self._specs[self._leaf]
    if chunk.path != spec.path:
      known = any(s.path == chunk.path for s in self._specs)
      raise InvalidArgument(
          f'{w}: chunk {chunk.sequence} is for leaf {chunk.path}'
          f'{"" if known else " (not a leaf of the header)"}, expected leaf {spec.path} '
          f'at offset {self._offset}')
    if chunk.offset != self._offset:
      raise InvalidArgument(f'{w}: chunk {chunk.sequence} of leaf {spec.path} has offset '
                            f'{chunk.offset}, expected {self._offset}')
    data = chunk.data  # each read of a bytes field makes a new copy: read it once
    n = len(data)
    if n == 0:
      raise InvalidArgument(f'{w}: chunk {chunk.sequence} of leaf {spec.path} is empty')
    if n > MAX_CHUNK_BYTES:
      raise InvalidArgument(f'{w}: chunk {chunk.sequence} of leaf {spec.path} has {n} bytes, '
                            f'over {MAX_CHUNK_BYTES}')
    end = self._offset + n
    if end > spec.nbytes:
      raise InvalidArgument(
          f'{w}: leaf {spec.path} ({spec.described}) has {spec.nbytes} bytes, '
          f'but chunk {chunk.sequence} ends at byte {end}')
    self.sink.write(self._leaf, self._offset, np.frombuffer(data, np.uint8))
    self._checksum = (self._checksum + chunk_checksum(data)) & MASK64
    self._total += n
    self._offset = end
    self._seq += 1
    if end == spec.nbytes:
      self._complete_leaf()
      self._skip_empty()

  def finish(self, commit: Optional[tensor_pb2.StreamCommit]) -> None:
    """Checks the commit against what was received (every leaf complete, counts, checksum)."""
    w = self._what
    if commit is None:
      raise InvalidArgument(f'{w}: the stream ended without a commit')
    if self._leaf < len(self._specs):
      spec = self._specs[self._leaf]
      raise InvalidArgument(f'{w}: leaf {spec.path} is incomplete: got {self._offset} of '
                            f'{spec.nbytes} bytes before the commit')
    if commit.chunk_count != self._seq or commit.total_bytes != self._total:
      raise InvalidArgument(f'{w}: commit says {commit.chunk_count} chunks and '
                            f'{commit.total_bytes} bytes, received {self._seq} and {self._total}')
    if commit.checksum != self._checksum:
      raise DataLoss(f'{w}: checksum mismatch: commit says {commit.checksum:#018x}, '
                     f'received data has {self._checksum:#018x}')
