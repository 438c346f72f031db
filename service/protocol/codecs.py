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

`EncodedLeaf` takes a leaf's bytes as they arrive, at any byte cut, and checks
them at once: the scales are gathered (4 bytes per block, 1/64 of the leaf's
float32 size) and checked once complete, the codes are range-checked and kept
as the views they came in. Once every byte is in (the leaf well formed), each
run of codes becomes float32 values in pieces of at most `PIECE` elements (a
thread's scratch buffer: no float32 temporary of the leaf is ever made),
which the caller writes or adds where they belong (the server: into its
step's sum, in its mesh's block layout).
"""

from __future__ import annotations

from typing import Iterator, Optional

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
PIECE = 1 << 17  # elements decoded (and encoded) at a time: a multiple of BLOCK, L2-sized
QMAX = {INT8: 127, INT4: 7}
NAMES = {RAW: 'raw', INT8: 'int8', INT4: 'int4'}
BY_NAME = {v: k for k, v in NAMES.items()}
_F32 = np.dtype('<f4')
_I16 = np.dtype('<i2')
def _max_scale(qmax: int) -> np.float32:
  """The largest float32 scale whose values (up to `qmax` times it, in float32) are finite.

  float32(max / qmax) is one for int4 (7 x it rounds to max) but not for int8 (127 x it
  rounds up to inf): the bound is found, not assumed one ulp below.
  """
  s, q, top = np.float32(float(np.finfo(np.float32).max) / qmax), np.float32(qmax), np.float32(np.inf)
  with np.errstate(over='ignore'):
    while np.isfinite(q * np.nextafter(s, top)):
      s = np.nextafter(s, top)
    while not np.isfinite(q * s):
      s = np.nextafter(s, np.float32(0))
  return s


_MAX_SCALE = {e: _max_scale(q) for e, q in QMAX.items()}


# The smallest absmax whose qmax / absmax is finite in float32.
_MIN_ABSMAX = {e: np.float32(q / float(np.finfo(np.float32).max)) for e, q in QMAX.items()}


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


def encode(x: np.ndarray, encoding: int,
           residual_out: Optional[np.ndarray] = None) -> np.ndarray:
  """The bytes (uint8) of float32 values `x` (flattened, row-major) in a block encoding.

  `residual_out` (n float32, may be `x` itself): receives x - decode(the bytes), what
  the encoding dropped, exactly as a receiver's float32 decode computes it (the
  worker's error feedback), without a decode pass or a leaf-sized temporary.
  """
  x = np.ascontiguousarray(x, np.float32).reshape(-1)
  n, qmax = x.size, np.float32(QMAX[encoding])
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
    absmax = np.abs(blocks).max(axis=1)
    b0 = start // BLOCK
    s = scales[b0:b0 + len(absmax)]
    np.divide(absmax, qmax, out=s)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
      # NaN/Inf in: a scale receivers refuse. A block whose largest value is so small
      # (< ~4e-37, subnormal) that qmax / absmax overflows is sent as codes 0: its values
      # stay in the residual (an infinite factor would make them NaN there, and NaN the
      # next push's scale).
      inv = np.where(absmax > _MIN_ABSMAX[encoding], qmax / absmax, np.float32(0))
      q = blocks * inv[:, None]
      np.rint(q, out=q)
      np.clip(q, -qmax, qmax, out=q)
      q8 = q.astype(np.int8).reshape(-1)
    if encoding == INT8:
      codes[start:start + m] = q8[:m].view(np.uint8)
    else:  # two to a byte; a zero pad element makes an odd leaf's last high nibble 0
      u = q8.view(np.uint8)
      c0 = start // 2
      c = codes[c0:c0 + -(-m // 2)]
      np.bitwise_and(u[0:2 * len(c):2], 0x0F, out=c)
      c |= u[1:2 * len(c):2] << 4
    if residual_out is not None:  # the decoded values are float32(code) * scale, as here
      q *= s[:, None]
      np.subtract(x[start:start + m], q.reshape(-1)[:m], out=residual_out[start:start + m])
  return out


def decode(data, n: int, encoding: int, what: str = 'leaf') -> np.ndarray:
  """The n float32 values of a block-encoded leaf's bytes (a new array)."""
  raw = np.frombuffer(data, np.uint8)
  if raw.size != nbytes(n, encoding):
    raise InvalidArgument(f'{what}: {raw.size} bytes, expected {nbytes(n, encoding)} for '
                          f'{n} elements in {NAMES[encoding]} blocks')
  leaf = EncodedLeaf(n, encoding, what)
  leaf.feed(0, raw)
  out = np.empty(n, np.float32)
  scratch = Scratch()
  for run in leaf.runs():
    for e0, values in leaf.values(run, scratch):
      out[e0:e0 + values.size] = values
  return out


class Scratch:
  """A decoding thread's working memory: one piece of values and of codes."""

  def __init__(self):
    self.values = np.empty(PIECE, np.float32)
    self.codes = np.empty(PIECE, np.int8)
    self.tmp = np.empty(PIECE // 2, np.int8)
    self.lo = np.empty(PIECE // 2, _I16)
    self.hi = np.empty(PIECE // 2, _I16)


_NIBBLES = np.uint64(0x1111111111111111)
_HIGH_BITS = np.uint64(0x8888888888888888)


def _has_nibble_8(raw: np.ndarray) -> bool:
  """Whether any nibble of the bytes `raw` is 0x8 (int4's -8), without unpacking them:
  x ^ 0x88.. turns such nibbles into 0, and (x - 0x11..) & ~x & 0x88.. is nonzero exactly
  when some nibble of x is 0 (the classic has-a-zero test, a nibble wide)."""
  whole = raw.size - raw.size % 8
  if raw.size - whole and np.any(((raw[whole:] & 0x0F) == 8) | ((raw[whole:] & 0xF0) == 0x80)):
    return True
  if not whole:
    return False
  words = raw[:whole].view('<u8')
  x, y = np.empty(min(words.size, 1 << 15), '<u8'), np.empty(min(words.size, 1 << 15), '<u8')
  for i in range(0, words.size, x.size):  # a piece at a time: two piece-sized temporaries
    w = words[i:i + x.size]
    xp, yp = x[:w.size], y[:w.size]
    np.bitwise_xor(w, _HIGH_BITS, out=xp)
    np.subtract(xp, _NIBBLES, out=yp)
    np.invert(xp, out=xp)
    np.bitwise_and(xp, yp, out=xp)
    if np.bitwise_and(xp, _HIGH_BITS, out=xp).any():
      return True
  return False


class EncodedLeaf:
  """One block-encoded leaf (or run of a leaf) as it arrives: checked, kept, decoded later.

  `feed(offset, data)` takes the leaf's next bytes as they arrive (offset:
  where they start in its encoded bytes; consecutive, as a ChunkReceiver
  checked them) and checks them at once, raising InvalidArgument naming
  `what` (the leaf) for a scale that is NaN, infinite, negative or so large
  that its values would overflow float32 (checked when the last scale is in),
  or a code out of range (int8 -128, int4 -8, or a nonzero padding nibble).
  The scales are copied (4 bytes a block: 1/64 of the leaf's float32 size);
  the codes are kept as the views they came in (the received messages' bytes:
  no copy). So once every byte is fed, the leaf is known to be well formed,
  and `values` turns it into float32 values, a piece of at most `PIECE`
  elements at a time, in a scratch buffer: where they go (written, or added
  into a sum) is the caller's.

  Example:
    >>> leaf = EncodedLeaf(3, INT8, 'leaf x')
    >>> leaf.feed(0, encode(np.array([127., -64., 2.], np.float32), INT8))  # scale 1
    >>> [(e0, v.tolist()) for run in leaf.runs() for e0, v in leaf.values(run, Scratch())]
    [(0, [127.0, -64.0, 2.0])]
  """

  def __init__(self, n: int, encoding: int, what: str):
    """Args:
      n: the elements of the run the stream carries (the leaf's).
      encoding: INT8 or INT4.
      what: names the leaf in error messages.
    """
    self.n, self.encoding, self._what = n, encoding, what
    self._nb = num_blocks(n)
    self._scale_bytes = 4 * self._nb
    self.scales = np.empty(self._nb, _F32)
    self._scales_raw = self.scales.view(np.uint8)
    self._runs: list[tuple[int, np.ndarray]] = []  # (first element, its code bytes)

  def feed(self, offset: int, data: np.ndarray) -> None:
    """Checks and keeps the next bytes (a view of them: leave them unchanged); see the class."""
    data = np.asarray(data, np.uint8).reshape(-1)
    sb = self._scale_bytes
    if offset < sb:
      k = min(sb - offset, data.size)
      self._scales_raw[offset:offset + k] = data[:k]
      offset, data = offset + k, data[k:]
      if offset == sb:
        self._check_scales()
    if not data.size:
      return
    codes = data.view(np.int8)
    c0 = offset - sb
    if self.encoding == INT8:
      if codes.min() == -128:  # a reduction: cheaper than a compare
        self._bad_code(c0 + int(np.argmax(codes == -128)), -128)
      self._runs.append((c0, codes))
      return
    if self.n % 2 and c0 + codes.size == -(-self.n // 2) and data[-1] >> 4:
      raise InvalidArgument(f'{self._what}: the padding nibble after the last of its '
                            f'{self.n} elements is {int(codes[-1] >> 4)}, expected 0')
    if _has_nibble_8(data):
      e = 2 * c0 + int(np.argmax(self._unpack(codes, Scratch())[:2 * codes.size] == -8))
      self._bad_code(e, -8)
    self._runs.append((2 * c0, codes))

  def runs(self) -> list[tuple[int, np.ndarray]]:
    """The code runs kept, as (first element, code bytes): decode each with `values`
    (independent of each other: several threads may decode a leaf's runs at once)."""
    return list(self._runs)

  def values(self, run: tuple[int, np.ndarray],
             scratch: Scratch) -> Iterator[tuple[int, np.ndarray]]:
    """(first element, float32 values) of a run, a piece at a time: views of `scratch`,
    to be used before the next piece is asked for."""
    e0, codes = run
    per_byte = 1 if self.encoding == INT8 else 2
    step = PIECE // per_byte
    for i in range(0, codes.size, step):
      yield self._decode_piece(e0 + per_byte * i, codes[i:i + step], scratch)

  def _check_scales(self) -> None:
    s, top = self.scales, _MAX_SCALE[self.encoding]
    bad = ~((s >= 0) & (s <= top))  # NaN fails both
    if bad.any():
      b = int(np.argmax(bad))
      raise InvalidArgument(
          f'{self._what}: block {b} of {self._nb} has scale {float(s[b])!r} '
          f'({NAMES[self.encoding]} block scales must be finite, >= 0 and <= {top:.6g}, '
          f'float32\'s max / {QMAX[self.encoding]})')

  @staticmethod
  def _unpack(raw: np.ndarray, scratch: Scratch) -> np.ndarray:
    """int4 code bytes -> their codes, one int8 each (element 2i from byte i's low nibble).

    Each byte becomes a little-endian int16 holding its two sign-extended nibbles
    (contiguous int16 passes: strided int8 writes are 2-3x slower).
    """
    k = raw.size
    tmp, lo, hi, codes = scratch.tmp[:k], scratch.lo[:k], scratch.hi[:k], scratch.codes[:2 * k]
    lo[...] = raw.view(np.uint8)
    np.left_shift(lo, 12, out=lo)
    np.right_shift(lo, 12, out=lo)  # the low nibble, sign-extended (arithmetic shift)
    np.bitwise_and(lo, 0xFF, out=lo)
    np.right_shift(raw, 4, out=tmp)  # the high nibble, sign-extended
    hi[...] = tmp
    np.left_shift(hi, 8, out=hi)
    np.bitwise_or(lo, hi, out=codes.view(_I16))
    return codes

  def _decode_piece(self, e0: int, raw: np.ndarray, scratch: Scratch) -> tuple[int, np.ndarray]:
    """The values of the elements from e0 whose code bytes are `raw` (at most PIECE)."""
    m = min(raw.size * (1 if self.encoding == INT8 else 2), self.n - e0)
    codes = raw if self.encoding == INT8 else self._unpack(raw, scratch)
    # values = codes * scales: cast to float32, then scaled in place, block by block (a
    # cast and an in-place product beat numpy's mixed int8 x float32 product). No
    # overflow: the scales were checked to be at most float32's max / QMAX.
    # (np.multiply with `out=`: `v.reshape(...)[...] *= s` would copy the product back.)
    v = scratch.values[:m]
    np.copyto(v, codes[:m], casting='unsafe')
    s, b = self.scales, e0 // BLOCK
    head = min(m, -e0 % BLOCK)  # the rest of a block the piece starts inside
    if head:
      np.multiply(v[:head], s[b], out=v[:head])
      b += 1
    whole = (m - head) // BLOCK
    if whole:
      blocks = v[head:head + whole * BLOCK].reshape(whole, BLOCK)
      np.multiply(blocks, s[b:b + whole, None], out=blocks)
      b += whole
    if head + whole * BLOCK < m:
      tail = v[head + whole * BLOCK:]
      np.multiply(tail, s[b], out=tail)
    return e0, v

  def _bad_code(self, element: int, code: int) -> None:
    q = QMAX[self.encoding]
    raise InvalidArgument(f'{self._what}: element {element} has code {code}, outside '
                          f'[-{q}, {q}] ({NAMES[self.encoding]} blocks)')
