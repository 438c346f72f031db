"""Wherever optax.lamb works, lamb_sharded.lamb works -- and gives the same numbers."""

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lamb_sharded


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  def f(*s):
    x = rng.normal(size=s)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      x = x + 1j * rng.normal(size=s)
    return jnp.asarray(x, dtype)
  return {'w': f(8, 4), 'b': f(4), 's': f()}


def _grads(params, seed):
  return jax.tree.map(lambda x: jnp.asarray(
      np.random.default_rng(seed).normal(size=x.shape), x.dtype), params)


def _steps(tx, params, n=5, jit=True, **extra):
  def step(p, s, g):
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s, u
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  for i in range(n):
    params, state, updates = step(params, state, _grads(params, i))
  return params, state, updates


def _close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.complex128 if jnp.iscomplexobj(x) else np.float64),
                               np.asarray(y, np.complex128 if jnp.iscomplexobj(y) else np.float64),
                               rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize('dtype,rtol', [
    (jnp.float16, 2e-2), (jnp.bfloat16, 2e-2), (jnp.float32, 1e-5), (jnp.float64, 1e-12),
    (jnp.complex64, 1e-5)])
def test_dtypes_match_optax(dtype, rtol):
  with jax.enable_x64(dtype == jnp.float64):
    params = _params(dtype)
    got, state, updates = _steps(lamb_sharded.lamb(1e-2, weight_decay=0.1), params)
    want, _, _ = _steps(optax.lamb(1e-2, weight_decay=0.1), params)
    for x in jax.tree.leaves((got, state[0].mu, state[0].nu, updates)):
      assert x.dtype == dtype
    _close(got, want, rtol)


def test_updates_have_the_gradients_dtype():
  params = _params(jnp.float32)
  tx = lamb_sharded.lamb(1e-2)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


def test_inject_hyperparams():
  params = _params()
  ours = optax.inject_hyperparams(lamb_sharded.lamb)(learning_rate=1e-2, weight_decay=0.1)
  theirs = optax.inject_hyperparams(optax.lamb)(learning_rate=1e-2, weight_decay=0.1)
  got, state, _ = _steps(ours, params)
  want, _, _ = _steps(theirs, params)
  _close(got, want, 1e-5)
  # A changed hyperparameter takes effect without re-creating the optimizer.
  state.hyperparams['learning_rate'] = jnp.asarray(0.0)
  updates, _ = ours.update(_grads(params, 9), state, got)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))


def test_inject_hyperparams_on_a_mesh():
  mesh = jax.make_mesh((8,), ('x',))
  params = _params()
  specs = {'w': P('x'), 'b': P(), 's': P()}
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  # A Mesh is callable (a decorator), so inject_hyperparams must be told it is static.
  ours = optax.inject_hyperparams(lamb_sharded.lamb, static_args='mesh')(
      learning_rate=1e-2, b1=0.8, mesh=mesh, param_specs=specs)
  got, _, _ = _steps(ours, on_mesh)
  want, _, _ = _steps(optax.inject_hyperparams(optax.lamb)(learning_rate=1e-2, b1=0.8), params)
  _close(got, want, 1e-5)


def test_multisteps():
  params = _params()
  got, _, _ = _steps(optax.MultiSteps(lamb_sharded.lamb(1e-2), every_k_schedule=3), params, n=7)
  want, _, _ = _steps(optax.MultiSteps(optax.lamb(1e-2), every_k_schedule=3), params, n=7)
  _close(got, want, 1e-5)


def test_under_lax_cond():
  params = _params()
  tx = lamb_sharded.lamb(1e-2)

  @jax.jit
  def maybe_step(flag, p, s, g):
    return jax.lax.cond(flag, lambda: tx.update(g, s, p),
                        lambda: (jax.tree.map(jnp.zeros_like, g), s))

  state = tx.init(params)
  u1, s1 = maybe_step(True, params, state, _grads(params, 0))
  u0, s0 = maybe_step(False, params, state, _grads(params, 0))
  assert int(s1[0].count) == 1 and int(s0[0].count) == 0
  assert float(jnp.max(jnp.abs(u1['w']))) > 0 and float(jnp.max(jnp.abs(u0['w']))) == 0


def test_extra_args_and_no_recompilation():
  params = _params()
  tx = lamb_sharded.lamb(optax.linear_schedule(1e-2, 1e-3, 10))
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p, loss=jnp.asarray(1.0), some_flag=True)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  params, state = step(params, state, _grads(params, 0))
  assert step._cache_size() == 1
  for i in range(1, 5):  # counted from the second call on
    params, state = step(params, state, _grads(params, i))
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_abstract_init_without_mesh():
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = lamb_sharded.lamb(1e-2)
  state = tx.init(abstract)
  concrete = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(concrete)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), concrete)


def test_map_params_on_state():
  params = _params()
  tx = lamb_sharded.lamb(1e-2)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mapped[0].mu))
  assert mapped[0].count.dtype == jnp.int32  # not a param: untouched


def test_schedules_for_learning_rate_and_weight_decay():
  params = _params()
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)
  wd = optax.linear_schedule(0.1, 0.0, 6)
  got, _, _ = _steps(lamb_sharded.lamb(lr, weight_decay=wd), params, n=6)
  want, _, _ = _steps(optax.lamb(lr, weight_decay=wd), params, n=6)
  _close(got, want, 1e-5)


def test_callable_mask_and_prefix_mask():
  params = {'dense': {'w': _params()['w'], 'b': _params()['b']}, 'norm': _params()['b']}
  for mask in (lambda p: {'dense': True, 'norm': False}, {'dense': {'w': True, 'b': False},
                                                          'norm': True}):
    got, _, _ = _steps(lamb_sharded.lamb(1e-2, weight_decay=0.5, mask=mask), params)
    want, _, _ = _steps(optax.lamb(1e-2, weight_decay=0.5, mask=mask), params)
    _close(got, want, 1e-5)


def test_eager_update_works_like_optax():
  params = _params()
  got, _, _ = _steps(lamb_sharded.lamb(1e-2), params, n=2, jit=False)
  want, _, _ = _steps(optax.lamb(1e-2), params, n=2, jit=False)
  _close(got, want, 1e-5)


class _Records(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def _compilations():
  """The compilations JAX logs inside the block (as optax's `test_utils.log_compilations`)."""
  handler, logger = _Records(), logging.getLogger('jax')
  logger.addHandler(handler)
  found = []
  try:
    with jax.log_compiles():
      yield found
  finally:
    logger.removeHandler(handler)
    found.extend(m for m in handler.messages if re.search(r'Finished .* compilation', m))


def _committed_like_the_step(state, replicated):
  """Commits the leaves that optax's wrappers create uncommitted (their counters and
  hyperparameters) to `replicated`, where a jitted step returns them (docs/library.md's recipe)."""
  return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, replicated), state)


_PLACEMENTS = ('plain', 'one device', 'mesh + specs', 'auto-sharded, no mesh', 'explicit')


def _placed(placement):
  """(params, lamb kwargs, context for init and steps, where committed scalars live or None)."""
  params = _params()
  specs = {'w': P('x'), 'b': P(), 's': P()}
  if placement == 'plain':
    return params, {}, contextlib.nullcontext, None
  if placement == 'one device':
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.device_put(params, device), {}, contextlib.nullcontext, device
  if placement == 'explicit':
    mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
      on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
    return on_mesh, {}, lambda: jax.set_mesh(mesh), None
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  kwargs = {'mesh': mesh, 'param_specs': specs} if placement == 'mesh + specs' else {}
  return on_mesh, kwargs, contextlib.nullcontext, NamedSharding(mesh, P())


@pytest.mark.parametrize('wrapper', ['none', 'inject_hyperparams', 'MultiSteps'])
@pytest.mark.parametrize('placement', _PLACEMENTS)
def test_no_compilation_on_the_second_call(placement, wrapper):
  # The state init returns must have the types (placement, commitment, weak type,
  # structure) of the state update returns, or the second call compiles again.
  params, kwargs, ctx, replicated = _placed(placement)
  lr = optax.linear_schedule(1e-2, 1e-3, 10)  # a schedule has a state of its own
  if wrapper == 'inject_hyperparams':
    tx = optax.inject_hyperparams(lamb_sharded.lamb, static_args=('mesh',) if kwargs else ())(
        learning_rate=lr, weight_decay=0.1, **kwargs)
  elif wrapper == 'MultiSteps':
    tx = optax.MultiSteps(lamb_sharded.lamb(lr, weight_decay=0.1, **kwargs), every_k_schedule=2)
  else:
    tx = lamb_sharded.lamb(lr, weight_decay=0.1, **kwargs)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with ctx():
    state = tx.init(params)
    if wrapper != 'none' and replicated is not None:  # optax's own counters: see docs/library.md
      state = _committed_like_the_step(state, replicated)
    params, state = step(params, state, params)
    with _compilations() as second:
      params, state = step(params, state, params)
    with _compilations() as third:
      step(params, state, params)
  assert not second, second
  assert not third, third
