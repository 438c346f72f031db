"""8- and 4-bit optimizer moments: codes in blocks along the last axis, one float32 scale each.

A moment leaf of shape (..., n) is cut into blocks of `b` consecutive elements
along its last axis (each row on its own, the last block of a row padded when
`b` does not divide n). Every block stores `b` codes -- 8-bit, or 4-bit, two
to a byte -- and one float32 scale; a moment is then about 1 + 4/b (8-bit) or
0.5 + 4/b (4-bit) bytes per parameter instead of 4. The codes' dtype is the
bit width; each width has its code map per moment (a `CodeMap`: `signed_map`,
`sqrt_map`), and everything else -- blocks, scales, the step -- is the same
for both.

Storage (`QuantizedMoment.codes`): 8-bit codes are int8, of the leaf's shape.
4-bit codes are packed by hand, two to a uint8 along the last axis, block by
block: byte j of a block of L codes holds code j in its low nibble and code
j + L/2 in its high one (L = b, or the length of a row's last, shorter block);
shape (..., n / 2). The two halves of a block, not neighbours: XLA:CPU combines
two contiguous runs with vector instructions, and every other element an
element at a time (`pack4`). Not `jnp.int4`: XLA:CPU writes int4 arrays an
element at a time, with an atomic compare-and-swap on the word that holds it --
36 ms to write a 4096x1024 leaf's codes against 0.5 ms as packed bytes, a
bitcast from packed bytes to int4 included (XLA lowers it element-wise too) --
and the step writes its codes every step. A leaf whose last axis is odd keeps
`jnp.int4` codes of its shape (packing would make n ambiguous; such leaves are
rare: vocabularies are padded). A sharded last axis is always even here: its
local extent is a multiple of the block (>= 32), so the bytes split like the
leaf, each device's the packing of its own blocks.

The 8-bit code maps (why FP8 E4M3 and not a linear map):

* First moment m (signed, roughly symmetric): ``m ~= scale * e4m3(code)`` with
  ``scale = max|m| / 448`` over the block (448 is E4M3's largest finite value).
  E4M3 is a dynamic-exponent map -- sign, 4 exponent bits, 3 mantissa bits --
  like bitsandbytes' dynamic (tree) map and Li et al.'s "DE" map: every entry
  keeps about 2^-4 relative precision over 2^17 of dynamic range below the
  block's maximum, where a linear int8 (absmax) map gives the small entries of a
  block with one large outlier no significant bits at all. The rounding is to
  nearest, ties to even (bit-exact with XLA's f32 -> f8e4m3fn convert), done
  with integer operations on the float32 bits (`encode_e4m3`): no table search.
* Second moment v (non-negative, many orders of magnitude, under a square root
  in the denominator): its square root is stored, ``v ~= (scale * e4m3(code))^2``
  with ``scale = max sqrt(v) / 448``, and the zero code is excluded -- an entry
  rounds at least to E4M3's smallest positive value (2^-9 * scale). This is the
  zero-point problem of Li et al. (2023): a map that rounds small v to 0 turns
  m / (sqrt(v) + eps) into m / eps and blows the update up; here small entries
  are at worst rounded *up*, which only shrinks their update. Storing sqrt(v)
  halves the exponent range the codes must span (v/max(v) down to ~2e-11 is
  still represented).
* The scale is a float32 per block (not a power of two): a moment that decays
  or grows uniformly (an embedding row with no gradient: v shrinks by b2 every
  step) moves with its scale exactly, though each step's change (0.1% of v for
  b2 = 0.999) is far below one code step.

The 4-bit code maps (chosen by measurement: docs/low-bit-state.md, "4-bit
moments", from `tests/benchmarks/bench_lowbit_fidelity.py --compare-maps`):

* m: the 4-bit dynamic map of Li et al. (2023), built as torchao's 4-bit AdamW
  builds it (`dynamic_map`, `DYNAMIC4`): 0, +-{0.0055, 0.0325, 0.0775, 0.2125,
  0.4375, 0.6625, 0.8875} and +1, scale = max|m|. Its decimal exponent keeps
  entries down to 0.0055 of the block's max nonzero, where FP4 E2M1 (range
  12) rounds everything below 1/24 of it to 0; on the demo's task E2M1, a
  linear map, powers of two and a symmetric map without zero all trained
  2.9-8.5% worse at 800 steps, the dynamic map as float32. Its price: coarse
  middle steps (an error of up to 0.1125 of the max) and no -1 (a negative
  maximum is stored as -0.8875 of itself), as in torchao.
* v: sqrt(v) to the nearest k/16 of the block's max sqrt(v), k = 1..16
  (`LINEAR16`): the linear map without a zero code of Li et al. and torchao,
  applied to sqrt(v) as the 8-bit map is, so every entry decodes to at least
  1/256 of the block's max v (the zero-point problem, as above). It drifted
  least and trained best of the three maps of v tried.

Block size: 128 by default (torchao uses 256 for 8-bit Adam and 128 for 4-bit;
bitsandbytes 256 for its blockwise kernels): 4/128 = 0.03 bytes per parameter
per moment of scales, so m + v take 2.06 (int8) or 1.06 (int4) bytes per
parameter. Where a leaf's last axis is split over devices, a block must not
cross a shard boundary, so the block of that leaf is the largest power of two
<= 128 dividing the local extent of the last axis (32 for a 768-wide axis split
8 ways); below 32 the leaf stays float32.

The block size is not stored: it is recomputed from the shapes of the codes
(the leaf's) and the scales (..., number of blocks), see `block_size_of`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PyTree = Any

INT8, INT4 = 'int8', 'int4'
DEFAULT_BLOCK_SIZE = 128
MIN_BLOCK_SIZE = 32
DEFAULT_MIN_QUANTIZED_SIZE = 4096  # bitsandbytes' min_8bit_size

class QuantizedMoment(NamedTuple):
  """One moment leaf stored as 8- or 4-bit codes with one float32 scale per block.

  Attributes:
    codes: the codes (their dtype is the bit width): int8 of the leaf's shape,
      the bits of FP8 E4M3 values; 4-bit, uint8 of shape (..., n / 2), two codes
      a byte (`pack4`; `jnp.int4` of the leaf's shape where n is odd; `codes_layout`):
      the index of a value of the dynamic map (`DYNAMIC4`) for the first moment
      and a level k - 1 of k/16 for the second; for the second moment, codes of
      its square root (see `signed_map`, `sqrt_map`). Sharded like the leaf.
    scales: float32 array of shape ``leaf.shape[:-1] + (number of blocks,)``,
      sharded like the leaf (the blocks of a device's shard are its own).
  """
  codes: jax.Array
  scales: jax.Array


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedMoment)


_CODE_DTYPES = {INT8: np.dtype(jnp.int8), INT4: np.dtype(jnp.int4)}
PACKED4 = np.dtype(np.uint8)  # 4-bit codes, two a byte (see the module's docstring)
_WIDTHS = {np.dtype(jnp.int8): 8, np.dtype(jnp.int4): 4, PACKED4: 4}
_EXPECTED = "expected None, a floating dtype, 'int8' or 'int4'"


def code_dtype(dtype: Any) -> Optional[np.dtype]:
  """The codes' dtype (int8 or int4) a `mu_dtype`/`nu_dtype` asks for; None for a float
  (or None) moment."""
  if isinstance(dtype, str):
    return _CODE_DTYPES.get(dtype)
  try:
    d = None if dtype is None else np.dtype(dtype)
  except TypeError:
    return None
  return d if d in _CODE_DTYPES.values() else None


def code_width(codes_dtype: Any) -> Optional[int]:
  """The bits of one code stored as `codes_dtype` (int8: 8; int4, or uint8 two a byte: 4);
  None if it is no codes' dtype."""
  try:
    return _WIDTHS.get(np.dtype(codes_dtype))
  except TypeError:
    return None


def is_packed(codes: Any) -> bool:
  """Whether `codes` (an array or a `ShapeDtypeStruct`) holds 4-bit codes two a byte."""
  return np.dtype(codes.dtype) == PACKED4


def codes_layout(shape: tuple[int, ...], dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of the codes of a leaf of `shape` at width `dtype` (int8 or int4).

  Example:
    >>> codes_layout((3, 8), 'int4'), codes_layout((3, 7), 'int4')[0]
    (((3, 4), dtype('uint8')), (3, 7))
  """
  d = code_dtype(dtype)
  if d is None:
    raise ValueError(f"{dtype!r}: expected 'int8' or 'int4'")
  if d == np.dtype(jnp.int4) and shape and shape[-1] % 2 == 0:
    return tuple(shape[:-1]) + (shape[-1] // 2,), PACKED4
  return tuple(shape), d


def leaf_length(codes: Any) -> int:
  """The length n of the last axis of the leaf whose codes are `codes`."""
  n = codes.shape[-1]
  return 2 * n if is_packed(codes) else n


def check_moment_dtype(dtype: Any, name: str) -> None:
  """Raises a ValueError naming `name` unless `dtype` is None, 'int8', 'int4' (or
  `jnp.int8`, `jnp.int4`) or a float dtype."""
  if dtype is None or code_dtype(dtype) is not None:
    return
  try:
    d = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f'{name}={dtype!r}: {_EXPECTED}') from None
  if not jnp.issubdtype(d, jnp.inexact):
    raise ValueError(f'{name}={dtype!r}: {_EXPECTED} (8- or 4-bit blockwise moments)')


def static_int(value: Any, name: str) -> int:
  """`value` as a Python int (a concrete integer array is accepted), else a ValueError."""
  if isinstance(value, bool):
    raise ValueError(f'{name}={value!r}: expected an int')
  if isinstance(value, int):
    return value
  try:
    if jnp.issubdtype(jnp.asarray(value).dtype, jnp.integer) and jnp.ndim(value) == 0:
      return int(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    pass
  raise ValueError(f'{name}={value!r}: expected a Python int (with optax.inject_hyperparams, '
                   f'list it in static_args)')


def check_block_size(block_size: Any) -> None:
  if (not isinstance(block_size, int) or isinstance(block_size, bool)
      or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1)):
    raise ValueError(f'quantized_block_size={block_size!r}: expected a power of two '
                     f'>= {MIN_BLOCK_SIZE}')


def leaf_block_size(shape: tuple[int, ...], last_axis_shards: int, block_size: int,
                    min_size: int, dtype: Any) -> Optional[int]:
  """The block size a leaf's moment gets, or None where it stays float.

  Args:
    shape: the leaf's (global) shape.
    last_axis_shards: into how many blocks the leaf's sharding splits its last
      axis (1 if not split).
    block_size: the largest block (a power of two).
    min_size: leaves with fewer elements stay float.
    dtype: the leaf's dtype (complex leaves stay unquantized).

  Returns:
    `block_size` if the last axis is not split; else the largest power of two
    <= `block_size` dividing the local extent, if >= `MIN_BLOCK_SIZE`; else None.
  """
  if not shape or int(np.prod(shape)) < min_size:
    return None
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    return None
  if last_axis_shards == 1:
    return block_size
  local = shape[-1] // last_axis_shards
  b = block_size
  while b >= MIN_BLOCK_SIZE and local % b:
    b //= 2
  return b if b >= MIN_BLOCK_SIZE else None


def num_blocks(n: int, b: int) -> int:
  return -(-n // b)


def block_size_of(q: QuantizedMoment) -> int:
  """The block size of a (local or global) `QuantizedMoment`, from its shapes.

  With b a power of two and k = ceil(n / b) blocks per row, b is the smallest
  power of two >= ceil(n / k) (any b >= n is the same single block per row).
  """
  n, k = leaf_length(q.codes), q.scales.shape[-1]
  need = num_blocks(n, k)
  return 1 << max(need - 1, 0).bit_length()


def zeros(shape: tuple[int, ...], b: int, make, dtype: Any = jnp.int8) -> QuantizedMoment:
  """A zero moment (a zero scale decodes every code to 0.0) made by `make(shape, dtype)`,
  its codes of width `dtype` (int8 or int4; stored as `codes_layout` says)."""
  scale_shape = tuple(shape[:-1]) + (num_blocks(shape[-1], b),)
  return QuantizedMoment(make(*codes_layout(tuple(shape), dtype)),
                         make(scale_shape, jnp.float32))


def to_blocks(x: jax.Array, b: int) -> jax.Array:
  """`x` (..., n) viewed as (..., ceil(n / b), b), the last block zero-padded if needed."""
  n = x.shape[-1]
  k = num_blocks(n, b)
  if k * b != n:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k * b - n)])
  return x.reshape(x.shape[:-1] + (k, b))


def from_blocks(x: jax.Array, n: int) -> jax.Array:
  """The inverse of `to_blocks`: (..., k, b) back to (..., n)."""
  x = x.reshape(x.shape[:-2] + (-1,))
  return x if x.shape[-1] == n else x[..., :n]


# ----------------------------------------------------------------------------- code maps
#
# Every map is encoded and decoded with operations on whole arrays that XLA:CPU
# vectorises and fuses with the arithmetic around them, never its own f32 <->
# f8e4m3fn converts (scalar code there: 2.25 ms to encode a 4096x1024 leaf
# against 0.69 ms with integer operations, 0.97 against 0.59 ms to decode) or a
# search in a table. The E4M3 codec is bit-exact against XLA's converts (round
# to nearest, ties to even) on |y| <= 448 (tests/lamb_sharded/test_lowbit.py).

_U32 = jnp.uint32


class CodeMap(NamedTuple):
  """How the values of a block, divided by its scale, become codes and back.

  Attributes:
    name: what the codes are ('e4m3', 'dynamic4', 'linear16').
    dtype: the codes' dtype (int8 or int4: the bit width).
    max: the largest value: a block's scale is max |entry| / `max`.
    tiny: the smallest positive value: where the zero code is excluded (the
      second moment's maps), every entry rounds at least to it.
    encode: float32 y with |y| <= `max` -> the codes of their nearest values.
    decode: codes -> float32 values (exact), for loops XLA:CPU vectorises.
    decode_scalar: the same, for the loops it runs as scalar code (a reduction
      over the decoded values), where other operations are faster.
    table: the value of every code, indexed by its bits as an unsigned integer
      (NumPy float32, 2^bits entries).
    step_gathers: the LAMB step (inside `shard_map`, or on one device) decodes
      by `decode_scalar` in its vectorised loops too, where that is faster;
      `decode` stays for decoding anywhere else.
  """
  name: str
  dtype: np.dtype
  max: float
  tiny: float
  encode: Callable[[jax.Array], jax.Array]
  decode: Callable[[jax.Array], jax.Array]
  decode_scalar: Callable[[jax.Array], jax.Array]
  table: np.ndarray
  step_gathers: bool = False


def code_bits(codes: jax.Array) -> jax.Array:
  """The bits of int8 / int4 codes as uint32 values in [0, 2^bits) (uint32: as they are)."""
  if codes.dtype == _U32:
    return codes
  if codes.dtype == jnp.int8:
    return jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(_U32)
  return codes.astype(jnp.int32).astype(_U32) & _U32(0xF)


def as_codes(bits: jax.Array, dtype: Any) -> jax.Array:
  """uint32 `bits` in [0, 2^bits) as codes of `dtype` (int8 / int4: two's complement)."""
  if np.dtype(dtype) == jnp.int8:
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.int8)
  return bits.astype(jnp.int32).astype(jnp.int4)  # keeps the low 4 bits


def _block_spans(n: int, b: int) -> list[tuple[int, int, int]]:
  """(start, stop, blocks) of the runs of equal blocks of a row of n: the whole blocks of
  `b`, then the row's last, shorter block (if `b` does not divide n)."""
  whole = n // b * b
  spans = [(0, whole, whole // b)] if whole else []
  return spans + ([(whole, n, 1)] if whole < n else [])


def pack4(bits: jax.Array, b: int) -> jax.Array:
  """4-bit codes' bits (uint32 in [0, 16), last axis n even) two a uint8, (..., n / 2),
  in blocks of `b` along the last axis: byte j of a block of L codes holds code j in its
  low nibble and code j + L/2 in its high one (L = b, or the length of a row's last,
  shorter block).

  Halves, not neighbours: the two codes of a byte come from two contiguous runs, which
  XLA:CPU reads and combines with vector instructions; pairing code 2j with 2j + 1 takes
  every other element, which it does an element at a time (7.9 against 1.0 ms to encode
  and pack a 4096x1024 leaf). A device's shard of a split last axis is whole blocks, so
  packing it alone gives its part of the packed leaf.
  """
  lead, parts = bits.shape[:-1], []
  for start, stop, count in _block_spans(bits.shape[-1], b):
    halves = bits[..., start:stop].reshape(lead + (count, 2, (stop - start) // count // 2))
    weights = jnp.asarray([1, 16], _U32)[:, None]  # a sum over the pair: low + 16 * high
    parts.append(jnp.sum(halves * weights, axis=-2).astype(jnp.uint8)
                 .reshape(lead + ((stop - start) // 2,)))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def unpack4(packed: jax.Array, b: int) -> jax.Array:
  """The inverse of `pack4`: uint8 (..., p) to the codes' bits, uint32 (..., 2p)."""
  lead, parts = packed.shape[:-1], []
  for start, stop, count in _block_spans(2 * packed.shape[-1], b):
    half = (stop - start) // count // 2
    x = packed[..., start // 2:stop // 2].astype(_U32).reshape(lead + (count, 1, half))
    # A shift by (0, 4) broadcast along a new axis, not a stack: XLA fuses it into its
    # consumers where a stack is a concatenation it writes out (as uint32).
    halves = (x >> jnp.asarray([0, 4], _U32)[:, None]) & _U32(0xF)
    parts.append(halves.reshape(lead + (stop - start,)))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def codes_of(q: QuantizedMoment) -> jax.Array:
  """`q`'s codes one per element, of the leaf's shape (unpacked bits where packed), for a
  `CodeMap`'s decode."""
  return unpack4(q.codes, block_size_of(q)) if is_packed(q.codes) else q.codes


def store(codes: jax.Array, dtype: Any, b: int) -> jax.Array:
  """Codes of the leaf's shape (a `CodeMap`'s encode's), in blocks of `b`, as
  `QuantizedMoment.codes` of width `dtype`: packed two a byte where `codes_layout` says so."""
  if codes_layout(codes.shape, dtype)[1] == PACKED4:
    return pack4(code_bits(codes), b)
  return codes


def _lookup(table: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """Decoding by a gather from `table` (one load an entry)."""
  def decode(codes):
    return jnp.asarray(table)[code_bits(codes).astype(jnp.int32)]
  return decode


# E4M3 (OCP FP8 "e4m3fn": bias 7, no infinities, 0x7f/0xff NaN).
_REBIAS = (127 - 7) << 23  # float32 exponent bias minus E4M3's, in place
_MIN_NORMAL_BITS = 0x3C800000  # float32 bits of 2^-6, E4M3's smallest normal
_SUBNORMAL_MAGIC = 2.0 ** 14  # a float32 whose ulp is 2^-9, E4M3's subnormal step
_SUBNORMAL_MAGIC_BITS = 0x46800000


def encode_e4m3(y: jax.Array) -> jax.Array:
  """float32 `y` with |y| <= 448 to the bits of its nearest E4M3 value, as int8."""
  bits = jax.lax.bitcast_convert_type(y, _U32)
  sign = (bits >> 24) & _U32(0x80)
  a = bits & _U32(0x7FFFFFFF)
  # Normal range: round the 23-bit mantissa to 3 bits (ties to even), then
  # shift sign-less exponent and mantissa into 7 bits and re-bias the exponent.
  rounded = a + _U32(0x7FFFF) + ((a >> 20) & _U32(1))
  normal = (rounded >> 20) - _U32(_REBIAS >> 20)
  # Subnormals (|y| < 2^-6, steps of 2^-9): adding 2^14 rounds |y| to a multiple
  # of 2^-9 (ties to even, in the FPU); the mantissa's low bits are the code
  # (8, the smallest normal's code, when it rounds up).
  af = jax.lax.bitcast_convert_type(a, jnp.float32)
  sub = (jax.lax.bitcast_convert_type(af + jnp.float32(_SUBNORMAL_MAGIC), _U32)
         - _U32(_SUBNORMAL_MAGIC_BITS))
  return as_codes(jnp.where(a < _U32(_MIN_NORMAL_BITS), sub, normal) | sign, jnp.int8)


def decode_e4m3(codes: jax.Array) -> jax.Array:
  """int8 bits of E4M3 values to float32 (exact)."""
  c = code_bits(codes)
  mag = c & _U32(0x7F)
  sign = (c & _U32(0x80)) << 24
  normal = jax.lax.bitcast_convert_type(((mag << 20) + _U32(_REBIAS)) | sign, jnp.float32)
  sub = mag.astype(jnp.float32) * jnp.float32(2.0 ** -9)  # no float32 denormals involved
  sub = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(sub, _U32) | sign,
                                     jnp.float32)
  return jnp.where(mag < _U32(8), sub, normal)


_E4M3_TABLE = (np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
               .astype(np.float32))  # NumPy: nothing runs on a JAX backend at import
E4M3 = CodeMap('e4m3', np.dtype(jnp.int8), 448.0, 2.0 ** -9, encode_e4m3, decode_e4m3,
               _lookup(_E4M3_TABLE), _E4M3_TABLE)


def dynamic_map(signed: bool = True) -> np.ndarray:
  """The 16 values of the 4-bit dynamic-exponent map of Li et al. (2023), as torchao builds
  it (`create_dynamic_map(signed, 3, 4)`, torchao/optim/quant_utils.py, after bitsandbytes'
  dynamic map of Dettmers et al.): a decimal exponent (10^-2, 10^-1, 10^0) with a linear
  fraction, and 0 and 1. Signed: 0, +-{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625,
  0.8875} and +1 (no -1: the last code is 1). Sorted ascending, float32.

  Example:
    >>> print(dynamic_map()[8:])
    [0.0055 0.0325 0.0775 0.2125 0.4375 0.6625 0.8875 1.    ]
  """
  data, exponents = [], 3
  for i in range(exponents):
    n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1  # fraction values of this exponent, + 1
    bounds = np.linspace(0.1, 1, n)
    means = (bounds[:-1] + bounds[1:]) / 2
    data += list(10.0 ** (i - exponents + 1) * means)
    if signed:
      data += list(-(10.0 ** (i - exponents + 1)) * means)
  return np.sort(np.asarray(data + [0.0, 1.0], np.float32))


def table_map(name: str, values: Any) -> CodeMap:
  """A 4-bit map from its 16 values: code k (its int4 bits read as 0..15) stands for the
  k-th smallest value.

  Encoding counts the midpoints between consecutive values that y exceeds (15 compares
  and adds a value, vectorised; round to nearest, a tie to the smaller). Decoding is a
  gather from the 16 values (`decode_scalar`) in the LAMB step (`step_gathers`): a step
  of a 4096x1024 leaf with 4-bit m took 18 ms with it, 38 ms with a tree of 15 selects on
  the code's 4 bits in the step's vectorised loops (XLA:CPU). Elsewhere (`decode`,
  `dequantize_moments`) the tree: a gather's index array may carry an explicit sharding
  that jnp's indexing refuses outside `shard_map`.
  """
  values = np.sort(np.asarray(values, np.float32))
  if values.shape != (16,):
    raise ValueError(f'{name}: a 4-bit map has 16 values, got {values.shape}')
  mids = ((values[1:].astype(np.float64) + values[:-1]) / 2).astype(np.float32)

  def encode(y):
    index = jnp.zeros(y.shape, _U32)
    for mid in mids:
      index = index + (y > mid).astype(_U32)
    return as_codes(index, jnp.int4)

  def decode(codes):
    bits = code_bits(codes)
    level = [jnp.float32(v) for v in values]
    for bit in range(4):  # pairs that differ in this bit, from the lowest
      on = (bits & _U32(1 << bit)) != 0
      level = [jnp.where(on, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
    return level[0]

  positive = values[values > 0]
  return CodeMap(name, np.dtype(jnp.int4), float(np.abs(values).max()),
                 float(positive.min()) if positive.size else 0.0, encode, decode,
                 _lookup(values), values, step_gathers=True)


DYNAMIC4 = table_map('dynamic4', dynamic_map(signed=True))


def encode_linear16(y: jax.Array) -> jax.Array:
  """float32 `y` in [1, 16] to its nearest level k in 1..16 (ties to even), as the int4
  bits of k - 1."""
  k = jnp.round(jnp.clip(y, 1.0, 16.0))
  return as_codes(k.astype(_U32) - _U32(1), jnp.int4)


def decode_linear16(codes: jax.Array) -> jax.Array:
  """int4 bits of k - 1 to the level k in 1..16, float32."""
  return (code_bits(codes) + _U32(1)).astype(jnp.float32)


LINEAR16 = CodeMap('linear16', np.dtype(jnp.int4), 16.0, 1.0, encode_linear16,
                   decode_linear16, decode_linear16, np.arange(1, 17, dtype=np.float32))

# By the codes' dtype: the first moment's maps (signed) and the second moment's
# (of its square root, the zero code excluded).
SIGNED_MAPS = {np.dtype(jnp.int8): E4M3, np.dtype(jnp.int4): DYNAMIC4, PACKED4: DYNAMIC4}
SQRT_MAPS = {np.dtype(jnp.int8): E4M3, np.dtype(jnp.int4): LINEAR16, PACKED4: LINEAR16}


def signed_map(dtype: Any) -> CodeMap:
  """The first moment's map for codes of `dtype` (int8: E4M3, int4: `DYNAMIC4`)."""
  return SIGNED_MAPS[np.dtype(dtype)]


def sqrt_map(dtype: Any) -> CodeMap:
  """The second moment's map (of sqrt(v)) for codes of `dtype` (int8: E4M3, int4: k/16)."""
  return SQRT_MAPS[np.dtype(dtype)]


# ----------------------------------------------------------------------------- blocks


def decode_blocks(q: QuantizedMoment, b: int, code_map: CodeMap,
                  table: bool = False) -> jax.Array:
  """The stored values of `q` (m, or sqrt(v)) in the block view (..., k, b), float32
  (`table`: decoded by `code_map.decode_scalar`, for a loop XLA:CPU runs as scalar code)."""
  decode = code_map.decode_scalar if table else code_map.decode
  return decode(to_blocks(codes_of(q), b)) * q.scales[..., None]


def encode_blocks(blocks: jax.Array, absmax: jax.Array, code_map: CodeMap,
                  floor_tiny: bool) -> jax.Array:
  """Codes (..., k, b) of float32 `blocks` given each block's max |entry| (..., k)."""
  absmax = absmax[..., None]
  inv = jnp.where(absmax > 0, code_map.max / absmax, 0.0)
  y = jnp.clip(blocks * inv, -code_map.max, code_map.max)
  if floor_tiny:  # no entry of the block rounds to the zero code
    y = jnp.maximum(y, code_map.tiny)
  return code_map.encode(y)


def scales_of(absmax: jax.Array, code_map: CodeMap) -> jax.Array:
  """The float32 scale of each block from its max |entry|."""
  return absmax / code_map.max


def _encode(x: jax.Array, b: int, code_map: CodeMap, floor_tiny: bool) -> QuantizedMoment:
  """Blocks of `x` (float32, >= 0 if `floor_tiny`) to codes and absmax scales."""
  blocks = to_blocks(x, b)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  codes = encode_blocks(blocks, absmax, code_map, floor_tiny)
  return QuantizedMoment(store(from_blocks(codes, x.shape[-1]), code_map.dtype, b),
                         scales_of(absmax, code_map))


def _decode(q: QuantizedMoment, code_map: CodeMap) -> jax.Array:
  return from_blocks(decode_blocks(q, block_size_of(q), code_map), leaf_length(q.codes))


def quantize_signed(x: jax.Array, b: int, dtype: Any = jnp.int8) -> QuantizedMoment:
  """The first moment's map: codes of x / scale per block of `b`, scale = max|x| / max.

  Args:
    x: a real array (computed in float32).
    b: the block size along the last axis.
    dtype: the codes' dtype: int8 (E4M3, max 448) or int4 (`DYNAMIC4`, max 1).

  Returns:
    A `QuantizedMoment` of x's shape.

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize_signed(jnp.array([1.0, -0.5, 0.01, 0.0]), 4)
    >>> print(dequantize_signed(q))
    [ 1.         -0.5         0.01004464  0.        ]
    >>> print(dequantize_signed(quantize_signed(jnp.array([1.0, -0.5, 0.3, 0.01]), 4,
    ...                                         jnp.int4)))  # the dynamic map's values
    [ 1.     -0.4375  0.2125  0.0055]
  """
  return _encode(x.astype(jnp.float32), b, signed_map(dtype), floor_tiny=False)


def dequantize_signed(q: QuantizedMoment) -> jax.Array:
  """Float32 values of a first moment stored by `quantize_signed`."""
  return _decode(q, signed_map(q.codes.dtype))


def quantize_sqrt(v: jax.Array, b: int, dtype: Any = jnp.int8) -> QuantizedMoment:
  """The second moment's map: codes of sqrt(v) per block, the zero code excluded.

  Args:
    v: a non-negative real array (computed in float32).
    b: the block size along the last axis.
    dtype: the codes' dtype: int8 (E4M3 of sqrt(v)) or int4 (sqrt(v) to the nearest
      k/16 of the block's max sqrt(v), k = 1..16).

  Returns:
    A `QuantizedMoment` of v's shape; every entry of a block with a nonzero
    entry decodes to at least (tiny * max sqrt(v))^2, tiny = 2^-9 / 448 (int8)
    or 1/16 (int4); an all-zero block stays 0.

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize_sqrt(jnp.array([4.0, 1e-30, 1.0, 0.0]), 4)
    >>> print(dequantize_sqrt(q))
    [4.000000e+00 7.602634e-11 1.000000e+00 7.602634e-11]
    >>> print(dequantize_sqrt(quantize_sqrt(jnp.array([4.0, 1e-30, 1.0, 0.0]), 4, jnp.int4)))
    [4.       0.015625 1.       0.015625]
  """
  return _encode(jnp.sqrt(v.astype(jnp.float32)), b, sqrt_map(dtype), floor_tiny=True)


def dequantize_sqrt(q: QuantizedMoment) -> jax.Array:
  """Float32 values of a second moment stored by `quantize_sqrt`."""
  s = _decode(q, sqrt_map(q.codes.dtype))
  return s * s


def dtype_bits(dtype: Any) -> int:
  """Bits of one element of `dtype` (4 for int4, which XLA stores two to a byte, though
  NumPy's and JAX's `itemsize` and `nbytes` count it as a byte; 8 for uint8, packed
  codes' bytes)."""
  dtype = np.dtype(dtype)
  for info in (jnp.iinfo, jnp.finfo):
    try:
      return int(info(dtype).bits)
    except ValueError:
      pass
  return dtype.itemsize * 8


def moment_nbytes(tree: PyTree) -> int:
  """Bytes a moment pytree (float leaves or `QuantizedMoment`s) occupies, scales included.

  Works on arrays and on `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(tx.init, ...)`);
  int4 codes count half a byte each (as XLA stores them, packed), not `nbytes`' one.
  """
  return sum(-(-int(np.prod(x.shape)) * dtype_bits(x.dtype) // 8)
             for x in jax.tree_util.tree_leaves(tree))
