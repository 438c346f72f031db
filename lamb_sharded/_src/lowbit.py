"""8-bit optimizer moments: FP8 (E4M3) codes in blocks along the last axis, one float32 scale each.

A moment leaf of shape (..., n) is cut into blocks of `b` consecutive elements
along its last axis (each row on its own, the last block of a row padded when
`b` does not divide n). Every block stores `b` one-byte codes and one float32
scale; a moment is then about 1 + 4/b bytes per parameter instead of 4.

The code maps (why FP8 E4M3 and not a linear map):

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

Block size: 128 by default (torchao uses 256 for 8-bit Adam and 128 for 4-bit;
bitsandbytes 256 for its blockwise kernels): 4/128 = 0.03 bytes per parameter
per moment of scales, so m + v take 2.06 bytes per parameter. Where a leaf's
last axis is split over devices, a block must not cross a shard boundary, so
the block of that leaf is the largest power of two <= 128 dividing the local
extent of the last axis (32 for a 768-wide axis split 8 ways); below 32 the
leaf stays float32.

The block size is not stored: it is recomputed from the shapes of the codes
(the leaf's) and the scales (..., number of blocks), see `block_size_of`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PyTree = Any

INT8 = 'int8'
DEFAULT_BLOCK_SIZE = 128
MIN_BLOCK_SIZE = 32
DEFAULT_MIN_QUANTIZED_SIZE = 4096  # bitsandbytes' min_8bit_size

_CODE_MAX = 448.0  # largest finite E4M3 value
_CODE_TINY = 2.0 ** -9  # smallest positive E4M3 value (subnormal)


class QuantizedMoment(NamedTuple):
  """One moment leaf stored as 8-bit codes with one float32 scale per block.

  Attributes:
    codes: int8 array of the leaf's shape: the bits of FP8 E4M3 values (the
      square root of the moment for the second moment); sharded like the leaf.
    scales: float32 array of shape ``leaf.shape[:-1] + (number of blocks,)``,
      sharded like the leaf (the blocks of a device's shard are its own).
  """
  codes: jax.Array
  scales: jax.Array


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedMoment)


def is_int8(dtype: Any) -> bool:
  """Whether a `mu_dtype`/`nu_dtype` asks for 8-bit blockwise moments."""
  if isinstance(dtype, str):
    return dtype == INT8
  try:
    return dtype is not None and jnp.dtype(dtype) == jnp.int8
  except TypeError:
    return False


def check_moment_dtype(dtype: Any, name: str) -> None:
  """Raises a ValueError naming `name` unless `dtype` is None, 'int8' or a float dtype."""
  if dtype is None or is_int8(dtype):
    return
  try:
    d = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"{name}={dtype!r}: expected None, a floating dtype or 'int8'") from None
  if not jnp.issubdtype(d, jnp.inexact):
    raise ValueError(f"{name}={dtype!r}: expected None, a floating dtype or 'int8' "
                     f'(8-bit blockwise moments)')


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
  n, k = q.codes.shape[-1], q.scales.shape[-1]
  need = num_blocks(n, k)
  return 1 << max(need - 1, 0).bit_length()


def zeros(shape: tuple[int, ...], b: int, make) -> QuantizedMoment:
  """A zero moment (code 0 is 0.0) made by `make(shape, dtype)`."""
  scale_shape = tuple(shape[:-1]) + (num_blocks(shape[-1], b),)
  return QuantizedMoment(make(tuple(shape), jnp.int8), make(scale_shape, jnp.float32))


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


# E4M3 (OCP FP8 "e4m3fn": bias 7, no infinities, 0x7f/0xff NaN) encoded and
# decoded with integer operations on the float32 bits. XLA:CPU lowers its own
# f32 <-> f8e4m3fn converts to scalar code (measured: 2.25 ms to encode a
# 4096x1024 leaf against 0.69 ms here, 0.97 against 0.59 ms to decode); these
# are plain shifts, adds and selects that vectorise and fuse. Both are bit-exact
# against XLA's converts (round to nearest, ties to even) on |y| <= 448
# (tests/lamb_sharded/test_lowbit.py).
_U32 = jnp.uint32
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
  code = jnp.where(a < _U32(_MIN_NORMAL_BITS), sub, normal) | sign
  return jax.lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.int8)


def decode_e4m3(codes: jax.Array) -> jax.Array:
  """int8 bits of E4M3 values to float32 (exact)."""
  c = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(_U32)
  mag = c & _U32(0x7F)
  sign = (c & _U32(0x80)) << 24
  normal = jax.lax.bitcast_convert_type(((mag << 20) + _U32(_REBIAS)) | sign, jnp.float32)
  sub = mag.astype(jnp.float32) * jnp.float32(2.0 ** -9)  # no float32 denormals involved
  sub = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(sub, _U32) | sign,
                                     jnp.float32)
  return jnp.where(mag < _U32(8), sub, normal)


# Every code's value (NumPy, through ml_dtypes: nothing runs on a JAX backend at import).
_E4M3_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def decode_e4m3_table(codes: jax.Array) -> jax.Array:
  """`decode_e4m3` by a 256-entry table lookup.

  One load an entry where `decode_e4m3` does about a dozen integer operations:
  faster in loops XLA:CPU does not vectorise (a reduction over the decoded
  values), slower in those it does (a gather does not vectorise).
  """
  index = jax.lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.int32)
  return jnp.asarray(_E4M3_TABLE)[index]


def decode_blocks(q: QuantizedMoment, b: int, table: bool = False) -> jax.Array:
  """The stored values of `q` (m, or sqrt(v)) in the block view (..., k, b), float32."""
  decode = decode_e4m3_table if table else decode_e4m3
  return decode(to_blocks(q.codes, b)) * q.scales[..., None]


def encode_blocks(blocks: jax.Array, absmax: jax.Array, floor_tiny: bool) -> jax.Array:
  """Codes (..., k, b) of float32 `blocks` given each block's max |entry| (..., k)."""
  absmax = absmax[..., None]
  inv = jnp.where(absmax > 0, _CODE_MAX / absmax, 0.0)
  y = jnp.clip(blocks * inv, -_CODE_MAX, _CODE_MAX)
  if floor_tiny:  # no entry of the block rounds to the zero code
    y = jnp.maximum(y, _CODE_TINY)
  return encode_e4m3(y)


def scales_of(absmax: jax.Array) -> jax.Array:
  """The float32 scale of each block from its max |entry|."""
  return absmax / _CODE_MAX


def _encode(x: jax.Array, b: int, floor_tiny: bool) -> QuantizedMoment:
  """Blocks of `x` (float32, >= 0 if `floor_tiny`) to E4M3 codes and absmax scales."""
  blocks = to_blocks(x, b)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  return QuantizedMoment(from_blocks(encode_blocks(blocks, absmax, floor_tiny), x.shape[-1]),
                         scales_of(absmax))


def _decode(q: QuantizedMoment) -> jax.Array:
  return from_blocks(decode_blocks(q, block_size_of(q)), q.codes.shape[-1])


def quantize_signed(x: jax.Array, b: int) -> QuantizedMoment:
  """The first moment's map: E4M3 codes of x / (max|x| / 448) per block of `b`.

  Args:
    x: a real array (computed in float32).
    b: the block size along the last axis.

  Returns:
    A `QuantizedMoment` of x's shape.

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize_signed(jnp.array([1.0, -0.5, 0.01, 0.0]), 4)
    >>> print(dequantize_signed(q))
    [ 1.         -0.5         0.01004464  0.        ]
  """
  return _encode(x.astype(jnp.float32), b, floor_tiny=False)


def dequantize_signed(q: QuantizedMoment) -> jax.Array:
  """Float32 values of a first moment stored by `quantize_signed`."""
  return _decode(q)


def quantize_sqrt(v: jax.Array, b: int) -> QuantizedMoment:
  """The second moment's map: E4M3 codes of sqrt(v) per block, the zero code excluded.

  Args:
    v: a non-negative real array (computed in float32).
    b: the block size along the last axis.

  Returns:
    A `QuantizedMoment` of v's shape; every entry of a block with a nonzero
    entry decodes to at least (2^-9 max sqrt(v))^2 (an all-zero block stays 0).

  Example:
    >>> import jax.numpy as jnp
    >>> q = quantize_sqrt(jnp.array([4.0, 1e-30, 1.0, 0.0]), 4)
    >>> print(dequantize_sqrt(q))
    [4.000000e+00 7.602634e-11 1.000000e+00 7.602634e-11]
  """
  return _encode(jnp.sqrt(v.astype(jnp.float32)), b, floor_tiny=True)


def dequantize_sqrt(q: QuantizedMoment) -> jax.Array:
  """Float32 values of a second moment stored by `quantize_sqrt`."""
  s = _decode(q)
  return s * s


def moment_nbytes(tree: PyTree) -> int:
  """Bytes a moment pytree (float leaves or `QuantizedMoment`s) occupies, scales included.

  Works on arrays and on `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(tx.init, ...)`).
  """
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))
