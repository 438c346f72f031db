"""Sharding: state placed like the params, one all-reduce per step, no hidden gathers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import lamb_sharded


def transformer_params(layers=4, d=64, vocab=128):
  """A 40-leaf transformer-shaped pytree (4 layers x 9 leaves + 4)."""
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32)
  params = {'embed': f(vocab, d), 'pos': f(32, d), 'ln_f': {'scale': jnp.ones(d), 'bias': jnp.zeros(d)}}
  for i in range(layers):
    params[f'layer{i}'] = {
        'qkv': f(d, 3 * d), 'out': f(d, d), 'mlp_in': f(d, 4 * d), 'mlp_in_b': jnp.zeros(4 * d),
        'mlp_out': f(4 * d, d), 'ln1_scale': jnp.ones(d), 'ln1_bias': jnp.zeros(d),
        'ln2_scale': jnp.ones(d), 'ln2_bias': jnp.zeros(d)}
  return params


def transformer_specs(params):
  """Megatron-style: column-parallel in, row-parallel out, data axis on the rows."""
  def spec(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith(("['out']", "['mlp_out']")):
      return P('model', 'data')
    if x.ndim == 2:
      return P('data', 'model')
    if 'mlp_in_b' in name:
      return P('model')
    return P()  # layer norms: replicated over both axes
  return jax.tree_util.tree_map_with_path(spec, params)


def count_all_reduces(hlo_text):
  return len(re.findall(r'\ball-reduce(?:-start)?\(', hlo_text))


def _compiled_update_hlo(tx, params):
  state = tx.init(params)
  return jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(params, state, params).compile().as_text()


@pytest.fixture(scope='module')
def mesh():
  return jax.make_mesh((4, 2), ('data', 'model'))


@pytest.fixture(scope='module')
def sharded(mesh):
  params = transformer_params()
  specs = transformer_specs(params)
  return params, specs, jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))


@pytest.mark.parametrize('moments', ['float32', 'int8', 'int4'])
def test_one_all_reduce_for_a_40_leaf_transformer(mesh, sharded, moments):
  params, specs, on_mesh = sharded
  assert len(jax.tree.leaves(params)) == 40
  kw = dict(mu_dtype=moments, nu_dtype=moments) if moments != 'float32' else {}
  tx = lamb_sharded.lamb(1e-3, weight_decay=0.01, mesh=mesh, param_specs=specs, **kw)
  if moments != 'float32':  # embed, qkv and mlp_in hold 8-/4-bit codes (out and mlp_out
    # have 64 / 4 = 16 columns a device, too few for a block of 32: float32)
    mu = tx.init(on_mesh)[0].mu
    assert sum(isinstance(x, lamb_sharded.QuantizedMoment)
               for x in jax.tree.leaves(mu, is_leaf=lambda x: isinstance(
                   x, lamb_sharded.QuantizedMoment))) == 9
  hlo = _compiled_update_hlo(tx, on_mesh)
  assert count_all_reduces(hlo) == 1
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo and 'collective-permute' not in hlo
  # For comparison: optax.lamb on the same sharded inputs needs one per norm.
  assert count_all_reduces(_compiled_update_hlo(optax.lamb(1e-3, weight_decay=0.01), on_mesh)) > 40


def test_grad_clipping_adds_exactly_one_more_all_reduce(mesh, sharded):
  _, specs, on_mesh = sharded
  tx = lamb_sharded.lamb(1e-3, max_grad_norm=1.0, mesh=mesh, param_specs=specs)
  assert count_all_reduces(_compiled_update_hlo(tx, on_mesh)) == 2


def test_state_and_updates_keep_the_params_sharding(mesh, sharded):
  params, specs, on_mesh = sharded
  tx = lamb_sharded.lamb(1e-3, mesh=mesh, param_specs=specs)
  state = tx.init(on_mesh)
  want = lamb_sharded.named_shardings(mesh, specs, params)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return u, optax.apply_updates(p, u), s

  updates, new_params, new_state = step(on_mesh, state, on_mesh)
  for tree in (state[0].mu, state[0].nu, updates, new_params, new_state[0].mu, new_state[0].nu):
    for (path, x), w in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(want)):
      assert x.sharding.is_equivalent_to(w, x.ndim), (jax.tree_util.keystr(path), x.sharding, w)
  # Every device holds only its block: 1/8 of a 2-D-sharded leaf.
  qkv = new_state[0].mu['layer0']['qkv']
  assert {s.data.shape for s in qkv.addressable_shards} == {(64 // 4, 3 * 64 // 2)}


@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto])
def test_jitted_init_places_moments_like_the_params(axis_type):
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(axis_type,) * 2)
  params = transformer_params(layers=1)
  specs = transformer_specs(params)
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  tx = lamb_sharded.lamb(1e-3, mesh=mesh, param_specs=specs)
  with jax.set_mesh(mesh):  # JAX's rule for explicit axes under jit
    state = jax.jit(tx.init)(on_mesh)
  want = lamb_sharded.named_shardings(mesh, specs, params)
  for x, w in zip(jax.tree.leaves(state[0].mu) + jax.tree.leaves(state[0].nu),
                  jax.tree.leaves(want) * 2):
    assert x.sharding.is_equivalent_to(w, x.ndim), (x.sharding, w)


def test_init_places_moments_for_abstract_params(mesh, sharded):
  params, specs, _ = sharded
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = lamb_sharded.lamb(1e-3, mesh=mesh, param_specs=specs)
  shapes = jax.eval_shape(tx.init, abstract)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes[0].mu) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), params)
  state = tx.init(abstract)
  assert state[0].mu['layer1']['mlp_in'].sharding.spec == P('data', 'model')


def test_replicated_axes_are_not_double_counted(mesh):
  # A leaf replicated over all 8 devices and one replicated over 'data' only:
  # if their partial sums were counted on every replica the ratio would be off
  # by sqrt(8) or 2, and the result would differ from the unsharded run.
  params = {'r': jnp.arange(1.0, 9.0), 'm': jnp.arange(1.0, 9.0).reshape(2, 4)}
  specs = {'r': P(), 'm': P(None, 'model')}
  grads = {'r': jnp.linspace(-1, 1, 8), 'm': jnp.linspace(1, -2, 8).reshape(2, 4)}
  tx = lamb_sharded.lamb(0.1, mesh=mesh, param_specs=specs)
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  got, _ = tx.update(grads, tx.init(on_mesh), on_mesh)
  want, _ = optax.lamb(0.1).update(grads, optax.lamb(0.1).init(params), params)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    # The trust ratio is ||w|| / ||u||, so ||update|| = lr * ||w||.
    np.testing.assert_allclose(jnp.linalg.norm(got[k]), 0.1 * jnp.linalg.norm(params[k]), rtol=1e-6)


def test_explicit_sharding_mode_uses_the_params_shardings():
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  params = transformer_params(layers=1)
  specs = transformer_specs(params)
  tx = lamb_sharded.lamb(1e-3, weight_decay=0.01)  # no mesh, no specs
  with jax.set_mesh(mesh):
    on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
    state = tx.init(on_mesh)
    assert state[0].mu['layer0']['qkv'].sharding.spec == P('data', 'model')
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    updates, new_state = step(on_mesh, state, on_mesh)
    hlo = step.lower(on_mesh, state, on_mesh).compile().as_text()
  assert count_all_reduces(hlo) == 1
  assert updates['layer0']['mlp_out'].sharding.spec == P('model', 'data')
  want, _ = optax.lamb(1e-3, weight_decay=0.01).update(params, optax.lamb(1e-3).init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_without_mesh_or_shardings_it_is_plain_jax():
  params = {'w': jnp.ones((4, 4))}
  tx = lamb_sharded.lamb(1e-3)
  hlo = _compiled_update_hlo(tx, params)
  assert count_all_reduces(hlo) == 0


def test_named_shardings_broadcasts_a_prefix(mesh):
  params = {'a': {'x': jnp.ones((4, 2)), 'y': jnp.ones(4)}, 'b': jnp.ones(2)}
  sh = lamb_sharded.named_shardings(mesh, {'a': P('data'), 'b': None}, params)
  assert sh['a']['x'].spec == P('data') and sh['a']['y'].spec == P('data')
  assert sh['b'].spec == P()


def count_all_gathers(hlo_text):
  return len(re.findall(r'\ball-gather(?:-start)?\(', hlo_text))


@pytest.mark.parametrize('shape,spec,all_reduces', [
    ((8,), P('data'), 1),
    ((4, 2), P('data', 'model'), 2),
    ((4, 2), P(None, 'model'), 1),
], ids=['8-data', '4x2-data-model', '4x2-none-model'])
def test_auto_sharded_params_without_a_mesh_never_gather(shape, spec, all_reduces):
  # Params put on a mesh with automatic axes (the usual jax.device_put), and no
  # mesh= for lamb: XLA partitions the update. It must not gather the leaves (or
  # their partial sums) onto every device: its per-leaf sums become all-reduces,
  # which XLA combines. (optax.lamb on the same inputs: 21 all-reduces.)
  mesh = jax.make_mesh(shape, ('data', 'model')[:len(shape)], axis_types=(AxisType.Auto,) * len(shape))
  rng = np.random.default_rng(0)
  params = {f'l{i}': jnp.asarray(rng.normal(size=(64, 32)), jnp.float32) for i in range(10)}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
  put = lambda t: jax.device_put(t, jax.sharding.NamedSharding(mesh, spec))
  on_mesh, grads_on_mesh = put(params), put(grads)
  tx = lamb_sharded.lamb(1e-2, weight_decay=0.1)
  state = tx.init(on_mesh)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  hlo = step.lower(grads_on_mesh, state, on_mesh).compile().as_text()
  assert count_all_gathers(hlo) == 0
  assert 'all-to-all' not in hlo and 'collective-permute' not in hlo
  assert count_all_reduces(hlo) == all_reduces
  updates, new_state = step(grads_on_mesh, state, on_mesh)
  for x in jax.tree.leaves((state[0].mu, new_state[0].mu, new_state[0].nu)):
    assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim)
  ref = optax.lamb(1e-2, weight_decay=0.1)
  want, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)


def test_a_leaf_on_one_device_keeps_the_fused_reduction():
  # The plain sums are only for leaves XLA partitions: on one device the norms
  # stay one variadic reduction (a reduce with two operands), which is faster.
  params = {'w': jnp.ones((64, 32))}
  tx = lamb_sharded.lamb(1e-3)
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(
      params, tx.init(params), params).as_text()
  variadic = re.findall(r'= stablehlo\.reduce\(\S+ init: \S+\), \(\S+ init: \S+\)', hlo)
  assert len(variadic) == 1, [l for l in hlo.splitlines() if 'reduce' in l]
