"""8- and 4-bit moments (mu_dtype/nu_dtype='int8' or 'int4'): the codes, the exact trust ratio,
sharding, Orbax checkpoints onto other meshes, fidelity against float32 LAMB, bytes per parameter.

Tests that hold for both widths are parametrised over WIDTHS; what differs (the maps' error
bounds, the fidelity tolerances) is stated per width beside them."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lamb_sharded
from lamb_sharded._src import lowbit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
import bench_lowbit_fidelity  # noqa: E402  pylint: disable=wrong-import-position

INT8 = dict(mu_dtype='int8', nu_dtype='int8')
INT4 = dict(mu_dtype='int4', nu_dtype='int4')
WIDTHS = ['int8', 'int4']


def both(width):
  """mu_dtype = nu_dtype = `width`."""
  return dict(mu_dtype=width, nu_dtype=width)


def width_dtype(width):
  """The dtype that asks for codes of `width` (mu_dtype=, quantize_signed's dtype=)."""
  return jnp.dtype(jnp.int8 if width == 'int8' else jnp.int4)


def codes_dtype(width):
  """The codes' dtype of a leaf whose last axis is even: int8, or uint8 (4-bit, two a byte)."""
  return jnp.dtype(jnp.int8 if width == 'int8' else jnp.uint8)


def _run(tx, params, grads, state=None):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  state = tx.init(params) if state is None else state
  u = None
  for g in grads:
    params, state, u = step(params, state, g)
  return params, state, u


def _grads(params, steps, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(scale * rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
          for _ in range(steps)]


# ----------------------------------------------------------------------------- the code maps


def test_integer_e4m3_codec_is_bit_exact_against_xla_converts():
  """`encode_e4m3`/`decode_e4m3` (integer operations, which XLA:CPU vectorises) and the
  table decoder give exactly XLA's f32 <-> float8_e4m3fn converts (ties to even)."""
  codes = np.arange(256, dtype=np.uint8)
  codes = codes[(codes & 0x7F) != 0x7F]  # 0x7f and 0xff are NaN: never written (|y| <= 448)
  as_int8 = jnp.asarray(codes.view(np.int8))
  want = jax.lax.bitcast_convert_type(as_int8, jnp.float8_e4m3fn).astype(jnp.float32)
  bits = lambda x: np.asarray(x).view(np.uint32)
  np.testing.assert_array_equal(bits(jax.jit(lowbit.decode_e4m3)(as_int8)), bits(want))
  np.testing.assert_array_equal(bits(jax.jit(lowbit.E4M3.decode_scalar)(as_int8)), bits(want))
  # Encoding: random values over the whole range, every code, every midpoint between
  # codes (the ties) and the floats next to them, signed zeros, both ends.
  rng = np.random.default_rng(0)
  pos = np.sort(np.asarray(want)[np.asarray(want) >= 0]).astype(np.float32)
  mids = ((pos[1:].astype(np.float64) + pos[:-1]) / 2).astype(np.float32)
  x = np.concatenate([
      rng.uniform(-448, 448, 200_000),
      np.exp(rng.uniform(np.log(1e-12), np.log(448), 200_000)) * rng.choice([-1, 1], 200_000),
      pos, -pos, mids, -mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(448)),
      [0.0, -0.0, 448.0, -448.0]]).astype(np.float32)
  x = jnp.asarray(x)
  want = jax.lax.bitcast_convert_type(x.astype(jnp.float8_e4m3fn), jnp.int8)
  np.testing.assert_array_equal(np.asarray(jax.jit(lowbit.encode_e4m3)(x)), np.asarray(want))


def test_dynamic_4_bit_map_rounds_to_the_nearest_of_its_16_values():
  """The 4-bit first moment's map (Li et al.'s / torchao's dynamic map): codes are int4,
  code k stands for the k-th smallest value, encoding picks the nearest value (compares,
  no search) and both decoders agree with the table."""
  m = lowbit.DYNAMIC4
  values = lowbit.dynamic_map()
  np.testing.assert_allclose(values, [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325,
                                      -0.0055, 0, 0.0055, 0.0325, 0.0775, 0.2125, 0.4375,
                                      0.6625, 0.8875, 1], rtol=1e-6)
  assert (m.max, m.tiny) == (1.0, pytest.approx(0.0055))
  all_codes = jnp.arange(-8, 8).astype(jnp.int4)
  bits = np.asarray(lowbit.code_bits(all_codes))
  np.testing.assert_array_equal(jax.jit(m.decode)(all_codes), values[bits])
  np.testing.assert_array_equal(jax.jit(m.decode_scalar)(all_codes), values[bits])
  rng = np.random.default_rng(0)
  y = np.concatenate([rng.uniform(-1, 1, 100_000), values, -values,
                      np.exp(rng.uniform(np.log(1e-6), 0, 10_000)), [0.0, -0.0]])
  y = jnp.asarray(np.clip(y, -1, 1), jnp.float32)
  codes = jax.jit(m.encode)(y)
  assert codes.dtype == jnp.int4
  got = np.asarray(m.decode(codes))
  best = np.min(np.abs(np.asarray(y)[:, None] - values[None]), axis=1)
  np.testing.assert_allclose(np.abs(got - np.asarray(y)), best, atol=1e-7)  # nearest
  np.testing.assert_array_equal(got[-2:], 0.0)


def test_linear_map_rounds_to_the_nearest_of_16_levels_and_has_no_zero():
  """The 4-bit second moment's map: sqrt(v) / scale to the nearest k in 1..16."""
  y = jnp.asarray([0.0, 0.2, 1.0, 1.49, 1.51, 2.5, 7.2, 15.6, 16.0], jnp.float32)
  codes = jax.jit(lowbit.LINEAR16.encode)(y)
  assert codes.dtype == jnp.int4
  np.testing.assert_array_equal(jax.jit(lowbit.LINEAR16.decode)(codes),
                                [1, 1, 1, 1, 2, 2, 7, 16, 16])  # 2.5: ties to even
  all_codes = jnp.arange(-8, 8).astype(jnp.int4)
  np.testing.assert_array_equal(lowbit.LINEAR16.decode(all_codes),
                                lowbit.LINEAR16.decode_scalar(all_codes))
  assert sorted(np.asarray(lowbit.LINEAR16.decode(all_codes)).tolist()) == list(range(1, 17))


def _packed_by_hand(bits, b):
  """Byte j of a block of L codes: code j in the low nibble, code j + L/2 in the high one."""
  out = []
  for start in range(0, bits.shape[-1], b):
    block = bits[..., start:start + b]
    half = block.shape[-1] // 2
    out.append(block[..., :half] | block[..., half:] << 4)
  return np.concatenate(out, axis=-1).astype(np.uint8)


@pytest.mark.parametrize('n, b', [(512, 128), (300, 128), (96, 32), (2, 128)])
def test_4_bit_codes_are_packed_two_a_byte_where_the_last_axis_is_even(n, b):
  """Codes j and j + L/2 of a block of L (a row's last block may be shorter) in one byte:
  the same codes as int4 (what an odd last axis keeps), the same values decoded, half a
  byte each."""
  bits = np.random.default_rng(n).integers(0, 16, (3, n)).astype(np.uint32)
  packed = jax.jit(lowbit.pack4, static_argnums=1)(jnp.asarray(bits), b)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, n // 2)
  np.testing.assert_array_equal(packed, _packed_by_hand(bits, b))
  np.testing.assert_array_equal(jax.jit(lowbit.unpack4, static_argnums=1)(packed, b), bits)


def test_4_bit_moments_decode_as_their_unpacked_codes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 300)), jnp.float32)
  for quantize, dequantize, code_map in (
      (lowbit.quantize_signed, lowbit.dequantize_signed, lowbit.DYNAMIC4),
      (lowbit.quantize_sqrt, lowbit.dequantize_sqrt, lowbit.LINEAR16)):
    q = quantize(jnp.abs(x), 128, jnp.int4)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (4, 150)
    assert lowbit.block_size_of(q) == 128 and lowbit.leaf_length(q.codes) == 300
    assert lamb_sharded.state_nbytes(q) == 4 * 150 + 4 * 3 * 4
    as_int4 = lowbit.QuantizedMoment(lowbit.as_codes(lowbit.codes_of(q), jnp.int4), q.scales)
    np.testing.assert_array_equal(dequantize(q), dequantize(as_int4))
    odd = quantize(jnp.abs(x[:, :299]), 128, jnp.int4)  # the same codes, one fewer, unpacked
    assert odd.codes.dtype == jnp.int4 and odd.codes.shape == (4, 299)
    np.testing.assert_array_equal(lowbit.code_bits(odd.codes)[:, :256],
                                  lowbit.codes_of(q)[:, :256])
    assert code_map.dtype == jnp.int4
  assert lamb_sharded.codes_layout((8, 6), 'int4') == ((8, 3), np.dtype(np.uint8))
  assert lamb_sharded.codes_layout((8, 5), 'int4') == ((8, 5), np.dtype(jnp.int4))
  assert lamb_sharded.codes_layout((8, 5), 'int8') == ((8, 5), np.dtype(np.int8))


@pytest.mark.parametrize('width', WIDTHS)
def test_signed_map_keeps_its_precision_within_a_block(width):
  """int8 (E4M3): 2^-4 relative error over 2^-6 of the block's max (its normal range) and
  half the subnormal step (2^-10 / 448 of the max) below. int4 (the dynamic map): at most
  half the widest gap between values, 0.1125 of the block's max (0.2125 to 0.4375, and
  -1 to -0.8875: a block whose largest entry is negative stores it 11% smaller), and
  0 below half the smallest value (0.00275 of the max)."""
  rng = np.random.default_rng(0)
  # Each row a block of 128 spanning 6 orders of magnitude, with both signs.
  x = jnp.asarray(rng.choice([-1, 1], (64, 128)) * 10.0 ** rng.uniform(-6, 0, (64, 128)),
                  jnp.float32)
  q = lowbit.quantize_signed(x, 128, width_dtype(width))
  assert q.codes.dtype == codes_dtype(width)
  y = lowbit.dequantize_signed(q)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  if width == 'int8':
    normal = jnp.abs(x) >= absmax * 2.0 ** -6 / 448  # E4M3's normal range
    rel = jnp.abs(y - x) / jnp.abs(x)
    assert float(jnp.max(jnp.where(normal, rel, 0))) <= 2.0 ** -4 * 1.0001
    below = float(jnp.max(jnp.where(normal, 0, jnp.abs(y - x) / absmax)))
    assert below <= 2.0 ** -10 / 448 * 1.0001
    np.testing.assert_allclose(jnp.max(jnp.abs(y), -1), absmax[:, 0], rtol=2e-7)  # the max
  else:
    assert float(jnp.max(jnp.abs(y - x) / absmax)) <= 0.1125 * 1.0001
    assert bool(jnp.all(jnp.where(jnp.abs(x) < absmax * 0.00275, y == 0, True)))
    top = jnp.max(x, -1, keepdims=True) == absmax  # blocks whose largest entry is positive
    np.testing.assert_allclose(jnp.where(top, jnp.max(y, -1, keepdims=True), absmax), absmax,
                               rtol=2e-7)


@pytest.mark.parametrize('width', WIDTHS)
def test_sqrt_map_never_decodes_a_nonzero_block_entry_to_zero(width):
  # The zero-point problem: v spanning 1e-30..1 in one block. A linear absmax map
  # of v (or E4M3 of v itself) would decode the small ones to 0 and m / (sqrt(v) + eps)
  # would become m / eps.
  v = jnp.asarray(10.0 ** np.linspace(-30, 0, 128), jnp.float32)[None]
  got = lowbit.dequantize_sqrt(lowbit.quantize_sqrt(v, 128, width_dtype(width)))
  assert float(jnp.min(got)) > 0
  err = jnp.abs(jnp.sqrt(got) - jnp.sqrt(v))
  if width == 'int8':
    big = v >= 1e-6  # sqrt(v) within E4M3's normal range of the block's max
    assert float(jnp.max(jnp.where(big, err / jnp.sqrt(v), 0))) <= 2.0 ** -4 * 1.0001
  else:  # levels k/16 of max sqrt(v): half a level above 1/16, rounded up to 1/16 below
    big = jnp.sqrt(v) >= 1 / 16
    assert float(jnp.max(jnp.where(big, err, 0))) <= 1 / 32 * 1.0001
    np.testing.assert_allclose(jnp.where(big, 1 / 256, got), 1 / 256, rtol=1e-6)
  # An all-zero block stays zero.
  zeros = lowbit.quantize_sqrt(jnp.zeros((2, 128)), 128, width_dtype(width))
  assert float(jnp.max(lowbit.dequantize_sqrt(zeros))) == 0


@pytest.mark.parametrize('width', WIDTHS)
def test_blocks_are_rows_of_the_last_axis_and_the_tail_is_its_own_block(width):
  top = lowbit.signed_map(width_dtype(width)).max  # 448 (E4M3), 6 (E2M1)
  x = jnp.ones((3, 4097))
  q = lowbit.quantize_signed(x.at[1, 4096].set(1000.0), 128, width_dtype(width))
  # An odd last axis: int8, or int4 codes of the leaf's shape (4-bit codes are packed two
  # a byte only where it is even).
  assert q.codes.shape == (3, 4097) and q.codes.dtype == width_dtype(width)
  assert q.scales.shape == (3, 33)
  assert lowbit.block_size_of(q) == 128
  scales = np.asarray(q.scales)
  assert scales[1, 32] == pytest.approx(1000 / top)
  assert np.all(np.delete(scales.ravel(), 65) == np.float32(1 / top))
  np.testing.assert_array_equal(lowbit.dequantize_signed(q)[1, :4096], 1.0)


# ----------------------------------------------------------------------------- the LAMB step


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'w': f(64, 256), 'emb': f(32, 512), 'tail': f(8, 1000), 'small': f(16), 'b': f(4096)}


_SPECS = {'w': P('data', 'model'), 'emb': P(None, ('data', 'model')), 'tail': P('data'),
          'small': P(), 'b': P('model')}


@pytest.mark.parametrize('width', WIDTHS)
@pytest.mark.parametrize('on_mesh', [False, True], ids=['1-device', '(4,2)'])
def test_a_step_is_float_lamb_from_the_decoded_state(on_mesh, width):
  """The trust ratio and the update are those of float moments equal to the decoded ones."""
  params = _params()
  kw = dict(weight_decay=0.01, record_trust_ratio=True)
  if on_mesh:
    mesh = jax.make_mesh((4, 2), ('data', 'model'))
    kw.update(mesh=mesh, param_specs=_SPECS)
    params = jax.device_put(params, lamb_sharded.named_shardings(mesh, _SPECS, params))
  tx8 = lamb_sharded.lamb(1e-2, **kw, **both(width))
  txf = lamb_sharded.lamb(1e-2, **kw)
  grads = _grads(params, 4)
  params, state, _ = _run(tx8, params, grads[:3])
  kinds = {k: lowbit.is_quantized(v) for k, v in state[0].mu.items()}
  assert kinds == {'w': True, 'emb': True, 'tail': True, 'small': False, 'b': True}
  assert state[0].mu['small'].dtype == jnp.float32
  assert {state[0].nu[k].codes.dtype for k in kinds if kinds[k]} == {codes_dtype(width)}
  decoded = (lamb_sharded.dequantize_moments(state[0]), state[1])
  u8, s8 = jax.jit(tx8.update)(grads[3], state, params)
  uf, sf = jax.jit(txf.update)(grads[3], decoded, params)
  for k in params:
    np.testing.assert_allclose(u8[k], uf[k], rtol=2e-5, atol=1e-9, err_msg=k)
  # The 8-bit step sums ||p||^2 and ||u||^2 block by block (float steps: in 8 rows),
  # so the two float32 sums differ in the order of their additions only.
  np.testing.assert_allclose(s8[0].trust_ratio, sf[0].trust_ratio, rtol=1e-5)
  # ... and its new codes are the float step's new moments, encoded.
  d8 = lamb_sharded.dequantize_moments(s8[0])
  np.testing.assert_allclose(d8.mu['w'], lowbit.dequantize_signed(
      lowbit.quantize_signed(sf[0].mu['w'], 128, width_dtype(width))), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('width', WIDTHS)
def test_quantized_moments_are_sharded_like_the_params_with_local_blocks(width):
  mesh = jax.make_mesh((4, 2), ('data', 'model'))
  params = _params()
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, _SPECS, params))
  tx = lamb_sharded.lamb(1e-2, mesh=mesh, param_specs=_SPECS, **both(width))
  step = jax.jit(lambda p, s, g: tx.update(g, s, p)[1])
  state = step(on_mesh, tx.init(on_mesh), on_mesh)
  mu = state[0].mu
  assert mu['w'].codes.dtype == codes_dtype(width)
  for k in ('w', 'emb', 'b'):
    for a in mu[k]:
      assert a.sharding.spec == _SPECS[k], (k, a.sharding)
  # 'emb' (32, 512) split 8 ways on its last axis: 64 columns a device, so blocks of 64.
  assert lowbit.block_size_of(mu['emb']) == 64 and mu['emb'].scales.shape == (32, 8)
  assert {s.data.shape for s in mu['emb'].scales.addressable_shards} == {(32, 1)}
  assert lowbit.block_size_of(mu['w']) == 128  # 256 / 2 columns a device
  assert lowbit.block_size_of(mu['tail']) == 128 and mu['tail'].scales.shape == (8, 8)


def test_bad_moment_options_name_the_argument():
  with pytest.raises(ValueError, match="mu_dtype='int2'.*'int8' or 'int4'"):
    lamb_sharded.lamb(1e-3, mu_dtype='int2')
  with pytest.raises(ValueError, match='nu_dtype'):
    lamb_sharded.lamb(1e-3, nu_dtype=jnp.int32)
  with pytest.raises(ValueError, match='nu_dtype'):
    lamb_sharded.lamb(1e-3, nu_dtype=jnp.uint4)
  # The dtypes themselves are accepted like the names, in any mix.
  params = {'w': jnp.ones((64, 128))}
  state = lamb_sharded.lamb(1e-3, mu_dtype=jnp.int4, nu_dtype=jnp.int8,
                            min_quantized_size=1).init(params)
  assert (state[0].mu['w'].codes.dtype, state[0].nu['w'].codes.dtype) == (jnp.uint8, jnp.int8)
  assert (state[0].mu['w'].codes.shape, state[0].nu['w'].codes.shape) == ((64, 64), (64, 128))
  with pytest.raises(ValueError, match='quantized_block_size'):
    lamb_sharded.lamb(1e-3, quantized_block_size=48, **INT8)
  with pytest.raises(ValueError, match='min_quantized_size'):
    lamb_sharded.lamb(1e-3, min_quantized_size=0, **INT8)


@pytest.mark.parametrize('width', WIDTHS)
def test_a_state_whose_blocks_would_cross_shards_is_refused_by_name(width):
  mesh = jax.make_mesh((8,), ('x',))
  params = {'w': jnp.ones((8, 768))}
  state = lamb_sharded.lamb(1e-3, **both(width)).init(params)  # blocks of 128: 6 a row
  tx = lamb_sharded.lamb(1e-3, mesh=mesh, param_specs={'w': P(None, 'x')}, **both(width))
  bits = width[3:]
  with pytest.raises(ValueError, match=rf"\['w'\].*state.mu.*{bits}-bit blocks.*cross shard"):
    tx.update(params, state, params)


# ----------------------------------------------------------------------------- checkpoints


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _shardings_like(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@pytest.mark.parametrize('width', WIDTHS)
def test_orbax_restore_onto_other_meshes_and_device_counts_is_exact(tmp_path, width):
  """Blocks depend on the leaf's shape only when every local last-axis extent is a
  multiple of the block size: then a checkpoint restores bit for bit anywhere."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(64, 1024)), jnp.float32),
            'v': jnp.asarray(rng.normal(size=(8192,)), jnp.float32)}
  specs8 = {'w': P('data', 'model'), 'v': P(('data', 'model'))}
  mesh8 = jax.make_mesh((4, 2), ('data', 'model'))
  p8 = jax.device_put(params, lamb_sharded.named_shardings(mesh8, specs8, params))
  tx8 = lamb_sharded.lamb(1e-2, mesh=mesh8, param_specs=specs8, **both(width))
  p8, state8, _ = _run(tx8, p8, _grads(params, 3))
  assert state8[0].mu['w'].codes.dtype == codes_dtype(width)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', state8)
  want = jax.device_get(state8)

  targets = {
      '1 device': (None, None),
      '2 devices, (2,) mesh': (jax.make_mesh((2,), ('x',), devices=jax.devices()[:2]),
                               {'w': P(None, 'x'), 'v': P('x')}),
  }
  next_grads = _grads(params, 1, seed=7)
  _, _, u_here = _run(tx8, p8, next_grads, state=state8)
  for name, (mesh, specs) in targets.items():
    if mesh is None:
      tx, on = lamb_sharded.lamb(1e-2, **both(width)), jax.device_put(params, jax.devices()[0])
    else:
      tx = lamb_sharded.lamb(1e-2, mesh=mesh, param_specs=specs, **both(width))
      on = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
    like = tx.init(on)
    with ocp.StandardCheckpointer() as ckptr:
      got = ckptr.restore(tmp_path / 'ckpt', _abstract(like, _shardings_like(like)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.dtype == b.dtype, name
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    assert got[0].mu['w'].codes.sharding == like[0].mu['w'].codes.sharding
    # Training goes on from the restored state as it would have on the old mesh.
    _, _, u_there = _run(tx, jax.device_put(jax.device_get(p8), _shardings_like(on)),
                         next_grads, state=got)
    np.testing.assert_allclose(u_there['w'], u_here['w'], rtol=1e-5, atol=1e-10, err_msg=name)


# One more rounding (requantize_moments), per width. int8: m's and sqrt(v)'s relative
# error in E4M3's normal range (from 2^-6 of the row's max). int4: absolute errors, as a
# fraction of the row's max (at least the new block's): m, half the dynamic map's widest
# gap (0.1125); sqrt(v), half a level (1/32) on entries of at least 1/16 of it.
REQUANT_BOUNDS = {'int8': dict(rel=2.0 ** -4, normal_from=2.0 ** -6),
                  'int4': dict(m_abs=0.1125, sqrt_abs=1 / 32)}


def _check_one_rounding(before, after, width):
  bounds = REQUANT_BOUNDS[width]
  a, b = before.mu['w'], after.mu['w']
  row_max = jnp.max(jnp.abs(a), -1, keepdims=True)
  if 'm_abs' in bounds:
    assert 0 < float(jnp.max(jnp.abs(b - a) / row_max)) <= bounds['m_abs'] * 1.0001, 'mu'
  else:
    normal = jnp.abs(a) >= bounds['normal_from'] * row_max
    rel = jnp.where(normal, jnp.abs(b - a) / jnp.where(a == 0, 1, jnp.abs(a)), 0)
    assert 0 < float(jnp.max(rel)) <= bounds['rel'] * 1.0001, 'mu'
  a, b = jnp.sqrt(before.nu['w']), jnp.sqrt(after.nu['w'])
  row_max = jnp.max(a, -1, keepdims=True)
  if 'sqrt_abs' in bounds:
    err = jnp.where(a >= row_max / 16, jnp.abs(b - a) / row_max, 0)
    assert 0 < float(jnp.max(err)) <= bounds['sqrt_abs'] * 1.0001, 'sqrt nu'
  else:
    normal = a >= bounds['normal_from'] * row_max
    rel = jnp.where(normal, jnp.abs(b - a) / jnp.where(a == 0, 1, a), 0)
    assert 0 < float(jnp.max(rel)) <= bounds['rel'] * 1.0001, 'sqrt nu'


@pytest.mark.parametrize('width', WIDTHS)
def test_orbax_restore_onto_another_block_layout_requantizes_within_one_rounding(tmp_path, width):
  # A 768-wide axis split 8 ways has 96 columns a device: blocks of 32 there, of
  # 128 on one device. Restore the arrays as saved, then requantize_moments.
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(16, 768)), jnp.float32)}
  mesh = jax.make_mesh((8,), ('x',))
  specs = {'w': P(None, 'x')}
  on = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  tx8 = lamb_sharded.lamb(1e-2, mesh=mesh, param_specs=specs, **both(width))
  _, saved, _ = _run(tx8, on, _grads(params, 3))
  assert lowbit.block_size_of(saved[0].mu['w']) == 32
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', saved)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    as_saved = ckptr.restore(tmp_path / 'ckpt', _abstract(saved, jax.tree.map(lambda _: one, saved)))
  tx1 = lamb_sharded.lamb(1e-2, **both(width))
  like = jax.eval_shape(tx1.init, params)
  got = lamb_sharded.requantize_moments(as_saved[0], like[0])
  assert lowbit.block_size_of(got.mu['w']) == 128 and got.mu['w'].scales.shape == (16, 6)
  assert got.mu['w'].codes.dtype == codes_dtype(width)
  before, after = (jax.device_get(lamb_sharded.dequantize_moments(s)) for s in (saved[0], got))
  # Stated error: one more rounding (REQUANT_BOUNDS).
  _check_one_rounding(before, after, width)
  # With the same layout it is the identity.
  same = lamb_sharded.requantize_moments(saved[0], saved[0])
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(saved[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_of_another_width_converts_through_requantize_moments(tmp_path):
  """int4 saved, wanted as int8 or float (and back): restore into the abstract state of the
  optimizer that saved it, then requantize_moments into the wanted one. Orbax refuses the
  other targets: the packed 4-bit codes have half the leaf's last axis. (It casts each array
  to its target's dtype without a word: int4 codes of an odd leaf restored into an int8
  target would be the same integers read as E4M3.)"""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(16, 768)), jnp.float32)}
  tx4 = lamb_sharded.lamb(1e-2, **INT4)
  _, saved, _ = _run(tx4, params, _grads(params, 3))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', saved)
    ckptr.wait_until_finished()
    # What the checkpoint holds is in its metadata: 4-bit codes, two a byte.
    tree = ckptr.metadata(tmp_path / 'ckpt').item_metadata.tree
    assert tree[0]['mu']['w']['codes'].dtype == jnp.uint8
    assert tuple(tree[0]['mu']['w']['codes'].shape) == (16, 384)
    with pytest.raises(ValueError, match='[Ss]hape'):  # into an int8 target
      ckptr.restore(tmp_path / 'ckpt', jax.eval_shape(lamb_sharded.lamb(1e-2, **INT8).init,
                                                      params))
    # A float target has another structure: Orbax refuses it.
    with pytest.raises(ValueError, match='[Ss]tructure'):
      ckptr.restore(tmp_path / 'ckpt', jax.eval_shape(lamb_sharded.lamb(1e-2).init, params))
    as_saved = ckptr.restore(tmp_path / 'ckpt', jax.eval_shape(tx4.init, params))
  decoded = jax.device_get(lamb_sharded.dequantize_moments(saved[0]))
  for kw in (INT8, {}):
    tx = lamb_sharded.lamb(1e-2, **kw)
    got = lamb_sharded.requantize_moments(as_saved[0], jax.eval_shape(tx.init, params)[0])
    after = jax.device_get(lamb_sharded.dequantize_moments(got))
    if kw:  # one E4M3 rounding of the int4 moments' values
      assert got.mu['w'].codes.dtype == jnp.int8
      _check_one_rounding(decoded, after, 'int8')
    else:  # float32: the int4 moments' values exactly
      np.testing.assert_array_equal(after.mu['w'], decoded.mu['w'])
      np.testing.assert_array_equal(after.nu['w'], decoded.nu['w'])
    _run(tx, params, _grads(params, 1), state=(got, as_saved[1]))  # and it steps
  # Back: float32 moments into int4 ones. sqrt(v)'s levels re-encode to their codes; m's
  # do not always: a block whose largest entry is negative stored it as -0.8875 of its
  # scale (the dynamic map has no -1), so its new scale is smaller (one more rounding).
  f32 = lamb_sharded.requantize_moments(as_saved[0], jax.eval_shape(
      lamb_sharded.lamb(1e-2).init, params)[0])
  back = lamb_sharded.requantize_moments(f32, jax.eval_shape(tx4.init, params)[0])
  assert back.mu['w'].codes.dtype == jnp.uint8
  np.testing.assert_array_equal(back.nu['w'].codes, as_saved[0].nu['w'].codes)
  np.testing.assert_allclose(back.nu['w'].scales, as_saved[0].nu['w'].scales, rtol=2e-7)
  m_back = jax.device_get(lamb_sharded.dequantize_moments(back)).mu['w']
  row_max = np.abs(decoded.mu['w']).max(-1, keepdims=True)
  assert 0 < np.max(np.abs(m_back - decoded.mu['w']) / row_max) <= 0.1125 * 1.0001


# ----------------------------------------------------------------------------- fidelity

# bitsandbytes-style (its tests/test_optimizer8bit: shapes 1024 x {32, 1024, 4097},
# gradients 0.01 N(0, 1), params 0.1 N(0, 1), 50 steps, the 32-bit optimizer re-synced
# to the 8-bit one's decoded state after every step): here float32 LAMB steps from the
# decoded quantized state, and at every step
#   * the update is float LAMB's to `update` (it is computed from float moments: only
#     the storage is quantized, so the trust ratio is LAMB's; the two steps differ only
#     in the order of the float32 additions of ||p||^2 and ||u||^2: the quantized step
#     sums block by block, the float step in 8 long rows, which on 1024x4097 is 3.5e-4
#     off a float64 reference where the blockwise sums are 7e-6 off);
#   * the new quantized moments decode to the float step's new moments within one
#     rounding: max |mq - m32| <= `m_max` max |m32|, max |sqrt vq - sqrt v32| <=
#     `sqrt_v_max` max sqrt v32, mean relative error <= `mean` (bitsandbytes: mean
#     relative param error < 6e-4, at most 20 state entries outside atol 3e-3 / rtol 1e-3).
# The max errors are the bounds of one rounding: int8, half an E4M3 step at the top
# (2^-4); int4, half the dynamic map's widest gap (0.1125) for m, and for sqrt v a whole
# level (1/16: entries below the first level round up to it). The mean errors are stated
# from what was measured (worst of 1024 x {32, 1024, 4097}), with margin: int8 0.022 (m
# and sqrt v), int4 0.146 (m) and 0.063 (sqrt v). Measured max errors: int8 0.035 /
# 0.036, int4 0.1125 / 0.061; updates within 5.5e-5 (int8) and 3.6e-5 (int4).
SYNC_STEPS = 50
FIDELITY = {'int8': dict(update=5e-4, m_max=2.0 ** -4, sqrt_v_max=2.0 ** -4, m_mean=0.03,
                         sqrt_v_mean=0.03),
            'int4': dict(update=5e-4, m_max=0.1125 * 1.0001, sqrt_v_max=1 / 16, m_mean=0.2,
                         sqrt_v_mean=0.1)}


def _lamb_pair(width='int8', **kw):
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100, 1e-3)
  return (lamb_sharded.lamb(lr, weight_decay=0.01, **kw),
          lamb_sharded.lamb(lr, weight_decay=0.01, **both(width), **kw))


@pytest.mark.parametrize('width', WIDTHS)
@pytest.mark.parametrize('cols', [1, 32, 1024, 4097])
def test_fidelity_per_step_against_float32_lamb(cols, width):
  tol = FIDELITY[width]
  shape = (1024, cols)
  p0 = {'w': 0.1 * jax.random.normal(jax.random.key(cols), shape)}
  txf, tx8 = _lamb_pair(width)

  def body(carry, key):
    p, s8 = carry
    g = {'w': 0.01 * jax.random.normal(key, shape)}
    sf = (lamb_sharded.dequantize_moments(s8[0]), s8[1])
    uf, sf = txf.update(g, sf, p)
    u8, s8 = tx8.update(g, s8, p)
    d8 = lamb_sharded.dequantize_moments(s8[0])
    upd = jnp.max(jnp.abs(u8['w'] - uf['w'])) / jnp.maximum(jnp.max(jnp.abs(uf['w'])), 1e-30)
    errs = [upd]
    for a, b in ((d8.mu['w'], sf[0].mu['w']), (jnp.sqrt(d8.nu['w']), jnp.sqrt(sf[0].nu['w']))):
      errs.append(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      errs.append(jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(b)))
    return (optax.apply_updates(p, uf), s8), jnp.stack(errs)

  keys = jax.random.split(jax.random.key(1), SYNC_STEPS)
  (_, s8), errs = jax.jit(lambda p: jax.lax.scan(body, (p, tx8.init(p)), keys))(p0)
  worst = np.asarray(errs).max(0)
  print(f'{width} 1024x{cols}: update {worst[0]:.1e}, m max {worst[1]:.4f} mean {worst[2]:.4f}, '
        f'sqrt v max {worst[3]:.4f} mean {worst[4]:.4f}')
  assert lowbit.is_quantized(s8[0].mu['w']) == (cols * 1024 >= 4096)
  assert worst[0] <= tol['update']
  assert worst[1] <= tol['m_max'] and worst[3] <= tol['sqrt_v_max']
  assert worst[2] <= tol['m_mean'] and worst[4] <= tol['sqrt_v_mean']


# Without re-syncing, the two runs drift apart: v moves by (1 - b2) = 0.1% of itself
# a step, far below one E4M3 step (6%; a 4-bit level is 1/16 of the block's max), so
# within a block the quantized v lags the float one (its block scale follows the
# block's maximum exactly). Measured after 100 steps on 1024 x 1024: int8, params'
# largest difference 0.16 of how far they moved, the norm of the move within 0.4% (the
# trust ratio fixes each step's norm); int4, 0.36 and 3.0%.
DRIFT_STEPS = 100
DRIFT = {'int8': dict(params=0.25, norm=0.01), 'int4': dict(params=0.5, norm=0.05)}


@pytest.mark.parametrize('width', WIDTHS)
def test_drift_over_100_steps_without_resync(width):
  # 1024x1024, warmup-cosine learning rate to 1e-2, weight decay 0.01: the largest difference
  # between the params of float32 and 8/4-bit moments over the largest move, and the relative
  # difference of the norms of the moves (the benchmark's own measure).
  param_err, norm_err = bench_lowbit_fidelity.drift(both(width), DRIFT_STEPS)
  print(f'{width} drift: params {param_err:.3f}, norm {norm_err:.4f}')
  assert 0 < param_err <= DRIFT[width]['params'] and norm_err <= DRIFT[width]['norm']


# ----------------------------------------------------------------------------- memory


def test_state_bytes_per_parameter_for_a_bert_base_model():
  d, h, layers, vocab = 768, 3072, 12, 30522
  layer = {'q': (d, d), 'k': (d, d), 'v': (d, d), 'o': (d, d), 'w_in': (d, h), 'w_out': (h, d),
           'b_in': (h,), 'ln': (d,), 'b': (d,)}
  shapes = {'tok': (vocab, d), 'pos': (512, d), 'layers': [layer] * layers}
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  per_param = {}
  for name, kw in (('float32', {}), ('int8', INT8), ('int4', INT4)):
    state = jax.eval_shape(lamb_sharded.lamb(1e-3, **kw).init, params)
    per_param[name] = lamb_sharded.state_nbytes((state[0].mu, state[0].nu)) / n
  assert per_param['float32'] == 8
  assert per_param['int8'] <= 2.1  # m + v, scales and the float32 small leaves included
  assert 4 + per_param['int8'] <= 6.1  # params + state
  # int4 codes count half a byte (XLA stores them two to a byte; nbytes says one)
  assert per_param['int4'] <= 1.1 and 4 + per_param['int4'] <= 5.1
  assert per_param['int4'] == pytest.approx(per_param['int8'] - 1, abs=0.01)


def test_int4_codes_are_half_a_byte_each():
  assert lowbit.dtype_bits(jnp.int4) == 4 and jnp.dtype(jnp.int4).itemsize == 1
  q = lowbit.zeros((1000, 256), 128, jnp.zeros, jnp.int4)
  assert lamb_sharded.state_nbytes(q) == 1000 * 256 // 2 + 1000 * 2 * 4
  assert lamb_sharded.state_nbytes(jax.ShapeDtypeStruct((3,), jnp.int4)) == 2  # rounded up


@pytest.mark.parametrize('kw', [dict(mu_dtype='int8'), dict(nu_dtype='int8'),
                                dict(mu_dtype='int8', nu_dtype=jnp.bfloat16),
                                dict(**INT8, eps=0.0, max_grad_norm=0.5),
                                dict(mu_dtype='int4'), dict(nu_dtype=jnp.int4),
                                dict(mu_dtype='int4', nu_dtype='int8'),
                                dict(mu_dtype='int8', nu_dtype='int4'),
                                dict(**INT4, eps=0.0, max_grad_norm=0.5)],
                         ids=['mu only', 'nu only', 'mu int8 nu bf16', 'eps 0 and clipping',
                              'int4 mu only', 'int4 nu only', 'mu int4 nu int8',
                              'mu int8 nu int4', 'int4 eps 0 and clipping'])
def test_either_moment_alone_and_a_padded_tail_step_like_float_lamb(kw):
  """One quantized moment beside a float one (or one of each width), and a row of 300
  (its last block padded) with eps = 0: the update is float LAMB's from the decoded
  state, and finite."""
  params = {'w': jax.random.normal(jax.random.key(0), (64, 300)), 'b': jnp.ones((5,))}
  float_kw = {k: v for k, v in kw.items() if k in ('eps', 'max_grad_norm')}
  tx8 = lamb_sharded.lamb(1e-2, weight_decay=0.01, min_quantized_size=1, **kw)
  txf = lamb_sharded.lamb(1e-2, weight_decay=0.01, **float_kw)
  state = tx8.init(params)
  for g in _grads(params, 3):
    decoded = lamb_sharded.dequantize_moments(state[0])
    decoded = decoded._replace(mu=jax.tree.map(lambda x: x.astype(jnp.float32), decoded.mu),
                               nu=jax.tree.map(lambda x: x.astype(jnp.float32), decoded.nu))
    u8, state = jax.jit(tx8.update)(g, state, params)
    uf, _ = jax.jit(txf.update)(g, (decoded, state[1]), params)
    for k in params:
      assert bool(jnp.all(jnp.isfinite(u8[k])))
      np.testing.assert_allclose(u8[k], uf[k], rtol=2e-5, atol=1e-7, err_msg=k)
