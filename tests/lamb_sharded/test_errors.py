"""Bad input raises a ValueError that names the leaf, before any state changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lamb_sharded


@pytest.fixture
def params():
  return {'enc': {'w': jnp.ones((8, 4)), 'b': jnp.ones(4)}, 'head': jnp.ones((4, 2))}


@pytest.fixture
def mesh():
  return jax.make_mesh((4, 2), ('data', 'model'))


def _snapshot(state):
  return [np.asarray(x).copy() for x in jax.tree.leaves(state)]


def _assert_unchanged(state, snap):
  for x, y in zip(jax.tree.leaves(state), snap):
    np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize('jit', [False, True])
def test_grads_with_a_missing_leaf(params, jit):
  tx = lamb_sharded.lamb(1e-2)
  state = tx.init(params)
  snap = _snapshot(state)
  grads = {'enc': {'w': jnp.ones((8, 4))}, 'head': jnp.ones((4, 2))}
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=r"\['enc'\]\['b'\]"):
    update(grads, state, params)
  _assert_unchanged(state, snap)


def test_grads_with_an_extra_leaf(params):
  tx = lamb_sharded.lamb(1e-2)
  grads = dict(params, extra=jnp.ones(3))
  with pytest.raises(ValueError, match=r"\['extra'\]"):
    tx.update(grads, tx.init(params), params)


def test_grads_with_a_wrong_shape(params):
  tx = lamb_sharded.lamb(1e-2)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['enc']['w'] = jnp.ones((4, 8))
  with pytest.raises(ValueError, match=r"\['enc'\]\['w'\].*\(4, 8\).*\(8, 4\)"):
    tx.update(grads, tx.init(params), params)


def test_state_of_other_params(params):
  tx = lamb_sharded.lamb(1e-2)
  other = dict(params, head=jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"state.mu.*\['head'\]|\['head'\].*state.mu"):
    tx.update(params, tx.init(other), params)


def test_missing_params():
  tx = lamb_sharded.lamb(1e-2)
  x = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='params'):
    tx.update(x, tx.init(x))


@pytest.mark.parametrize('specs,pattern', [
    ({'enc': {'w': P('data')}, 'head': P()}, r"\['enc'\]\['b'\]"),                # missing
    ({'enc': P(), 'head': P(), 'x': P()}, r"\['x'\]"),                             # extra
    ({'enc': {'w': P('data'), 'b': P('nope')}, 'head': P()}, r"\['enc'\]\['b'\].*'nope'"),
    ({'enc': {'w': P('data', None, 'model'), 'b': P()}, 'head': P()}, r"\['enc'\]\['w'\].*3 entries"),
    ({'enc': {'w': P('data'), 'b': P()}, 'head': P(None, ('data', 'model'))},
     r"\['head'\].*dimension 1 of size 2 into 8 blocks"),
    ({'enc': {'w': P('data', 'data'), 'b': P()}, 'head': P()}, r"\['enc'\]\['w'\].*twice"),
    ({'enc': {'w': 'data', 'b': P()}, 'head': P()}, r"\['enc'\]\['w'\].*PartitionSpec"),
])
def test_param_specs_that_do_not_fit(params, mesh, specs, pattern):
  tx = lamb_sharded.lamb(1e-2, mesh=mesh, param_specs=specs)
  with pytest.raises(ValueError, match=pattern):
    tx.init(params)
  good = lamb_sharded.lamb(1e-2, mesh=mesh, param_specs={'enc': P('data'), 'head': P()})
  state = good.init(params)
  snap = _snapshot(state)
  with pytest.raises(ValueError, match=pattern):
    tx.update(params, state, params)
  _assert_unchanged(state, snap)


def test_param_specs_without_a_mesh(params):
  with pytest.raises(ValueError, match='mesh'):
    lamb_sharded.lamb(1e-2, param_specs={'enc': P(), 'head': P()}).init(params)


def test_mask_that_does_not_fit(params):
  tx = lamb_sharded.lamb(1e-2, weight_decay=0.1, mask={'enc': True})
  with pytest.raises(ValueError, match=r"mask.*\['head'\]"):
    tx.update(params, tx.init(params), params)
