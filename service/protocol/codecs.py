"""Block-wise int8/int4 gradient codecs (`lamb_sharded.v1.Encoding`): encode, stream-decode.

Pure NumPy. The byte layout is documented in proto/lamb_sharded/v1/tensor.proto
("Encoding"): a leaf of n float32 values, cut into blocks of `BLOCK`
consecutive elements, travels as ceil(n / BLOCK) float32 scales, then its
codes (int8: a signed byte an element; int4: a signed nibble an element, two
to a byte, the even element low). A value is code * its block's scale, and
the encoder picks scale = absmax / 127 (int8) or / 7 (int4), so that every
element is within scale / 2 of what it was given.

Blocks count from the first element the stream carries, so a codec works on
any contiguous run of a leaf's elements (a whole leaf today; a per-process
slice of it on a multi-host server).

`LeafDecoder` decodes as the bytes arrive, at any byte cut: the scales are
gathered (4 bytes per block, 1/64 of the leaf's float32 size), checked once
complete, then each run of codes becomes float32 values in pieces of at
most `PIECE` elements (a scratch buffer reused for the whole leaf: no
float32 temporary of the leaf is ever made), which the caller writes where
they belong (the server: through its wire view, in its mesh's block layout).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from service.errors import InvalidArgument
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2

RAW = tensor_pb2.ENCODING_UNSPECIFIED
INT8 = tensor_pb2.ENCODING_INT8_BLOCKS
INT4 = tensor_pb2.ENCODING_INT4_BLOCKS
# Elements per block, one float32 scale each. 256: the scales cost 1.6% of the int8 codes
# (3.1% of int4), and one outlier coarsens only its own block's 255 neighbours (with
# 2048 the scales would be 8x cheaper, but a block's step size set by its largest of
# 2048 heavy-tailed gradient values would round most of the others to 0 in int4).
BLOCK = 256
PIECE = 1 << 16  # elements decoded (and encoded) at a time: a multiple of BLOCK, cache-sized
QMAX = {INT8: 127, INT4: 7}
NAMES = {RAW: 'raw', INT8: 'int8', INT4: 'int4'}
BY_NAME = {v: k for k, v in NAMES.items()}
_F32 = np.dtype('<f4')


def num_blocks(n: int) -> int:
  return -(-n // BLOCK)


def nbytes(n: int, encoding: int, itemsize: int = 4) -> int:
  """The bytes of n elements in `encoding` (raw: n * itemsize)."""
  if encoding == RAW:
    return n * itemsize
  codes = n if encoding == INT8 else -(-n // 2)
  return 4 * num_blocks(n) + codes


def check_encoding(encoding: int, what: str) -> int:
  """`encoding` if it is one this side knows; else InvalidArgument naming `what`."""
  if encoding not in NAMES:
    raise InvalidArgument(f'{what}: unsupported encoding {encoding} (expected '
                          f'ENCODING_UNSPECIFIED, ENCODING_INT8_BLOCKS or ENCODING_INT4_BLOCKS)')
  return encoding


def encode(x: np.ndarray, encoding: int) -> np.ndarray:
  """The bytes (uint8) of float32 values `x` (flattened, row-major) in a block encoding."""
  x = np.ascontiguousarray(x, np.float32).reshape(-1)
  n, qmax = x.size, QMAX[encoding]
  nb = num_blocks(n)
  out = np.empty(nbytes(n, encoding), np.uint8)
  scales = out[:4 * nb].view(_F32)
  codes = out[4 * nb:]
  pad = np.zeros(min(PIECE, nb * BLOCK), np.float32)  # the last piece, padded with zeros
  for start in range(0, n, PIECE):
    piece = x[start:start + PIECE]
    m = piece.size
    if m % BLOCK:
      pad[:m] = piece
      pad[m:] = 0
      piece = pad[:num_blocks(m) * BLOCK]
    blocks = piece.reshape(-1, BLOCK)
    absmax = np.max(np.abs(blocks), axis=1)
    b0 = start // BLOCK
    np.divide(absmax, np.float32(qmax), out=scales[b0:b0 + len(absmax)])
    with np.errstate(divide='ignore', invalid='ignore'):
      inv = np.where(absmax > 0, np.float32(qmax) / absmax, np.float32(0))
    with np.errstate(invalid='ignore'):  # NaN/Inf in: a NaN/Inf scale, which receivers refuse
      q = np.rint(blocks * inv[:, None]).clip(-qmax, qmax).astype(np.int8).reshape(-1)
    if encoding == INT8:
      codes[start:start + m] = q[:m].view(np.uint8)
    else:  # two to a byte; a zero pad element makes an odd leaf's last high nibble 0
      u = q.view(np.uint8)
      c0 = start // 2
      c = codes[c0:c0 + -(-m // 2)]
      np.bitwise_and(u[0:2 * len(c):2], 0x0F, out=c)
      c |= u[1:2 * len(c):2] << 4
  return out


def decode(data, n: int, encoding: int, what: str = 'leaf') -> np.ndarray:
  """The n float32 values of a block-encoded leaf's bytes (a new array)."""
  out = np.empty(n, np.float32)
  dec = LeafDecoder(n, encoding, what)
  raw = np.frombuffer(data, np.uint8)
  if raw.size != nbytes(n, encoding):
    raise InvalidArgument(f'{what}: {raw.size} bytes, expected {nbytes(n, encoding)} for '
                          f'{n} elements in {NAMES[encoding]} blocks')
  for off, values in dec.feed(0, raw):
    out[off // 4:off // 4 + values.size] = values
  return out


class LeafDecoder:
  """Decodes one block-encoded leaf of n elements as its bytes arrive, in order.

  `feed(offset, data)` takes the next bytes (offset: where they start in the
  leaf's encoded bytes; consecutive, as a ChunkReceiver checked them) and
  yields (byte offset in the leaf's float32 bytes, float32 values): views of
  a scratch buffer, to be used before the next one is asked for. Malformed
  data raises InvalidArgument naming `what` (the leaf): a scale that is NaN,
  infinite or negative; a code out of range (int8 -128, int4 -8, or a nonzero
  padding nibble).
  """

  def __init__(self, n: int, encoding: int, what: str):
    self._n, self._enc, self._what = n, encoding, what
    self._nb = num_blocks(n)
    self._scale_bytes = 4 * self._nb
    self._scales_raw = np.empty(self._scale_bytes, np.uint8)
    self._scales = self._scales_raw.view(_F32)
    size = min(PIECE, self._nb * BLOCK) + BLOCK
    self._values = np.empty(size, np.float32)
    self._codes = np.zeros(size, np.int8)
    self._tmp = np.empty(PIECE // 2 + 1, np.int8)

  def feed(self, offset: int, data: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    data = np.asarray(data, np.uint8).reshape(-1)
    sb = self._scale_bytes
    if offset < sb:
      k = min(sb - offset, data.size)
      self._scales_raw[offset:offset + k] = data[:k]
      offset, data = offset + k, data[k:]
      if offset == sb:
        self._check_scales()
    if data.size:
      yield from self._codes_at(offset - sb, data.view(np.int8))

  def _check_scales(self) -> None:
    s = self._scales
    bad = ~(np.isfinite(s) & (s >= 0))
    if bad.any():
      b = int(np.argmax(bad))
      raise InvalidArgument(
          f'{self._what}: block {b} of {self._nb} has scale {float(s[b])!r} '
          f'({NAMES[self._enc]} block scales must be finite and >= 0)')

  def _codes_at(self, c0: int, codes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Values of code bytes `codes` starting at code byte c0."""
    per_byte = 1 if self._enc == INT8 else 2
    step = PIECE // per_byte
    for i in range(0, codes.size, step):
      yield self._decode_run(per_byte * (c0 + i), codes[i:i + step])

  def _decode_run(self, e0: int, raw: np.ndarray) -> tuple[int, np.ndarray]:
    """Values of the elements from e0 whose code bytes are `raw` (at most PIECE elements)."""
    a, b0 = e0 % BLOCK, e0 // BLOCK  # the run starts a elements into block b0
    m = min(raw.size * (1 if self._enc == INT8 else 2), self._n - e0)
    codes = self._codes
    if self._enc == INT8:
      codes[a:a + m] = raw
      if codes[a:a + m].min(initial=0) == -128:  # a reduction: cheaper than a compare
        self._bad_code(e0 + int(np.argmax(codes[a:a + m] == -128)), -128)
    else:  # low nibble: sign-extend by shifting it up and back; high: arithmetic shift
      k = raw.size
      tmp = self._tmp[:k]
      np.left_shift(raw, 4, out=tmp)
      np.right_shift(tmp, 4, out=codes[a:a + 2 * k:2])
      np.right_shift(raw, 4, out=codes[a + 1:a + 2 * k:2])
      if m < 2 * k and codes[a + m] != 0:  # the padding nibble of an odd leaf
        raise InvalidArgument(f'{self._what}: the padding nibble after the last of its '
                              f'{self._n} elements is {int(codes[a + m])}, expected 0')
      if codes[a:a + m].min(initial=0) == -8:
        self._bad_code(e0 + int(np.argmax(codes[a:a + m] == -8)), -8)
    k = num_blocks(a + m)
    with np.errstate(over='ignore'):  # a huge scale makes Inf: the server's finite check says so
      np.multiply(codes[:k * BLOCK].reshape(k, BLOCK), self._scales[b0:b0 + k, None],
                  out=self._values[:k * BLOCK].reshape(k, BLOCK))
    return 4 * e0, self._values[a:a + m]

  def _bad_code(self, element: int, code: int) -> None:
    q = QMAX[self._enc]
    raise InvalidArgument(f'{self._what}: element {element} has code {code}, outside '
                          f'[-{q}, {q}] ({NAMES[self._enc]} blocks)')
