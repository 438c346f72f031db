"""lamb_sharded.lamb against optax.lamb and against the paper's formulas, on and off a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lamb_sharded
from reference import lamb_reference

# Stated tolerance: after 100 steps, for every leaf, max|a - b| / max|b| <= 1e-5.
RTOL = 1e-5
STEPS = 100


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'emb': f(24, 4),          # sharded over all 8 devices
      'w': f(16, 8),            # 2-D sharded on the (4, 2) mesh
      'b': f(8),                # sharded over one axis, replicated over the other
      'odd': f(7),              # does not divide 8: replicated
      'odd2': f(3, 5),          # does not divide anything: replicated
      'scalar': jnp.asarray(1.5, jnp.float32),
      'zeros': jnp.zeros((8,), jnp.float32),  # ||w|| = 0: trust ratio 1
  }


_MESHES = {
    '1-device': (None, None),
    '(8,)': ((8,), ('x',)),
    '(4,2)': ((4, 2), ('data', 'model')),
}


def _specs(mesh_name):
  if mesh_name == '(8,)':
    return {'emb': P('x'), 'w': P('x'), 'b': P('x'), 'odd': P(), 'odd2': P(None, None),
            'scalar': P(), 'zeros': P('x')}
  return {'emb': P(('data', 'model')), 'w': P('data', 'model'), 'b': P('model'), 'odd': P(),
          'odd2': None, 'scalar': P(), 'zeros': P('data')}


def _grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
          for _ in range(steps)]


def _run(tx, params, grads):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _max_rel(a, b):
  out = {}
  for k in b:
    scale = float(jnp.max(jnp.abs(b[k])))
    out[k] = float(jnp.max(jnp.abs(a[k] - b[k]))) / (scale if scale else 1.0)
  return out


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, STEPS, end_value=1e-4)
MASK = {'emb': False, 'w': True, 'b': False, 'odd': True, 'odd2': True, 'scalar': False,
        'zeros': True}


@pytest.mark.parametrize('mesh_name', list(_MESHES))
def test_matches_optax_lamb_after_100_steps(mesh_name):
  shape, names = _MESHES[mesh_name]
  params = _params()
  grads = _grads(params, STEPS)
  grads[-1]['zeros'] = jnp.zeros((8,))  # a zero update too
  kw = dict(weight_decay=0.01, mask=MASK, eps_root=1e-8)
  if shape is None:
    ours = lamb_sharded.lamb(SCHEDULE, **kw)
    p0 = params
  else:
    mesh = jax.make_mesh(shape, names)
    specs = _specs(mesh_name)
    ours = lamb_sharded.lamb(SCHEDULE, **kw, mesh=mesh, param_specs=specs)
    p0 = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  got, state = _run(ours, p0, grads)
  want, _ = _run(optax.lamb(SCHEDULE, **kw), params, grads)
  rel = _max_rel(got, want)
  assert max(rel.values()) <= RTOL, rel
  assert int(state[0].count) == STEPS
  # The all-zero leaf: weight decay on a zero leaf adds nothing, ratio 1; it moved
  # by the Adam direction (not stuck at zero as with a missing zero-norm guard).
  assert float(jnp.max(jnp.abs(got['zeros']))) > 0
  if shape is not None:
    for tree in (got, state[0].mu, state[0].nu):
      for k, x in tree.items():
        assert x.sharding.spec == P(*(specs[k] or ())) or _equiv(x.sharding.spec, specs[k]), k


def _equiv(a, b):
  strip = lambda s: tuple(e for e in (s or ()) if e is not None)
  return strip(a) == strip(b)


def test_seed_example_reproduces():
  solver = lamb_sharded.lamb(learning_rate=0.003)
  params = jnp.array([1., 2., 3.])
  f = lambda x: jnp.sum(x ** 2)
  state = solver.init(params)
  printed = []
  for _ in range(5):
    updates, state = solver.update(jax.grad(f)(params), state, params)
    params = optax.apply_updates(params, updates)
    printed.append('{:.2E}'.format(f(params)))
  assert printed == ['1.39E+01', '1.38E+01', '1.38E+01', '1.37E+01', '1.36E+01']


def test_default_matches_paper_reference():
  params = {k: v for k, v in _params().items()}
  grads = _grads(params, 20, seed=3)
  lr = lambda t: 1e-2
  got, _ = _run(lamb_sharded.lamb(1e-2, weight_decay=0.05), params, grads)
  want = lamb_reference({k: np.asarray(v) for k, v in params.items()},
                        [{k: np.asarray(v) for k, v in g.items()} for g in grads],
                        lr=lr, weight_decay=0.05)[-1]
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=2e-6, err_msg=k)


OPTIONS = {
    'exclude_from_layer_adaptation': (
        dict(exclude_from_layer_adaptation={'emb': False, 'w': True, 'b': True, 'odd': False,
                                            'odd2': False, 'scalar': True, 'zeros': False}),
        dict(adapt={'emb': True, 'w': False, 'b': False, 'odd': True, 'odd2': True,
                    'scalar': False, 'zeros': True})),
    'trust_ratio_clip': (dict(min_trust_ratio=1.1, max_trust_ratio=1.3),
                         dict(min_ratio=1.1, max_ratio=1.3)),
    'max_grad_norm': (dict(max_grad_norm=1.0), dict(max_grad_norm=1.0)),
    'no_bias_correction': (dict(bias_correction=False), dict(bias_correction=False)),
}


@pytest.mark.parametrize('mesh_name', ['1-device', '(4,2)'])
@pytest.mark.parametrize('option', list(OPTIONS))
def test_options_match_paper_reference(option, mesh_name):
  ours_kw, ref_kw = OPTIONS[option]
  params = _params()
  grads = _grads(params, 15, seed=4)
  if option == 'max_grad_norm':  # make the clipping bite on some steps only
    grads = [jax.tree.map(lambda x, s=s: x * s, g) for g, s in zip(grads, np.geomspace(0.01, 3, 15))]
  shape, names = _MESHES[mesh_name]
  extra = {}
  p0 = params
  if shape is not None:
    mesh = jax.make_mesh(shape, names)
    extra = dict(mesh=mesh, param_specs=_specs(mesh_name))
    p0 = jax.device_put(params, lamb_sharded.named_shardings(mesh, extra['param_specs'], params))
  tx = lamb_sharded.lamb(3e-2, weight_decay=0.01, **ours_kw, **extra)
  got, _ = _run(tx, p0, grads)
  want = lamb_reference({k: np.asarray(v) for k, v in params.items()},
                        [{k: np.asarray(v) for k, v in g.items()} for g in grads],
                        lr=lambda t: 3e-2, weight_decay=0.01, **ref_kw)[-1]
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=5e-5, atol=5e-6, err_msg=k)
  # And the option changes something: it is not silently ignored.
  plain = lamb_reference({k: np.asarray(v) for k, v in params.items()},
                         [{k: np.asarray(v) for k, v in g.items()} for g in grads],
                         lr=lambda t: 3e-2, weight_decay=0.01)[-1]
  assert max(np.max(np.abs(plain[k] - want[k])) for k in want) > 1e-4


def test_moment_dtype_bfloat16():
  params = _params()
  grads = _grads(params, 30, seed=5)
  tx = lamb_sharded.lamb(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  got, state = _run(tx, params, grads)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].mu))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].nu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  # Reference: the same algorithm, with the moments rounded to bfloat16 after each step.
  import ml_dtypes
  rnd = lambda a: np.asarray(a, ml_dtypes.bfloat16).astype(np.float64)
  x = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in x.items()}
  v = {k: np.zeros_like(val) for k, val in x.items()}
  for t, g in enumerate(grads, start=1):
    for k in x:
      gk = np.asarray(g[k], np.float64)
      mk = 0.9 * m[k] + 0.1 * gk
      vk = 0.999 * v[k] + 0.001 * gk ** 2
      u = (mk / (1 - 0.9 ** t)) / (np.sqrt(vk / (1 - 0.999 ** t)) + 1e-6)
      wn, un = np.linalg.norm(x[k]), np.linalg.norm(u)
      ratio = wn / un if wn > 0 and un > 0 else 1.0
      x[k] = x[k] - 1e-2 * ratio * u
      m[k], v[k] = rnd(mk), rnd(vk)
  for k in x:
    np.testing.assert_allclose(np.asarray(got[k]), x[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # bf16 storage really differs from f32 storage.
  f32, _ = _run(lamb_sharded.lamb(1e-2), params, grads)
  assert max(float(jnp.max(jnp.abs(f32[k] - got[k]))) for k in x) > 1e-6


@pytest.mark.parametrize('mesh_name', list(_MESHES))
def test_recorded_trust_ratios_match_paper_reference(mesh_name):
  """`record_trust_ratio=True` keeps each leaf's ratio of the last step, in flattening order."""
  params = _params()
  grads = _grads(params, 3, seed=5)
  adapt = {'emb': True, 'w': False, 'b': True, 'odd': True, 'odd2': True, 'scalar': True,
           'zeros': True}
  shape, names = _MESHES[mesh_name]
  extra, p0 = {}, params
  if shape is not None:
    mesh = jax.make_mesh(shape, names)
    extra = dict(mesh=mesh, param_specs=_specs(mesh_name))
    p0 = jax.device_put(params, lamb_sharded.named_shardings(mesh, extra['param_specs'], params))
  tx = lamb_sharded.lamb(1e-2, weight_decay=0.01, record_trust_ratio=True,
                         exclude_from_layer_adaptation={k: not v for k, v in adapt.items()},
                         **extra)
  assert jax.tree.leaves(tx.init(p0)[0].trust_ratio) and bool(
      jnp.all(tx.init(p0)[0].trust_ratio == 1))
  got_params, state = _run(tx, p0, grads)
  ratios = []
  want = lamb_reference({k: np.asarray(v) for k, v in params.items()},
                        [{k: np.asarray(v) for k, v in g.items()} for g in grads],
                        lr=lambda t: 1e-2, weight_decay=0.01, adapt=adapt, ratios=ratios)[-1]
  names_in_order = [jax.tree_util.keystr(p)[2:-2] for p, _ in
                    jax.tree_util.tree_flatten_with_path(params)[0]]
  recorded = np.asarray(state[0].trust_ratio)
  assert recorded.dtype == np.float32 and recorded.shape == (len(params),)
  np.testing.assert_allclose(recorded, [ratios[-1][k] for k in names_in_order], rtol=1e-5)
  assert recorded[names_in_order.index('w')] == 1.0  # adaptation off
  assert len(set(np.round(recorded, 4))) > 3  # real, distinct ratios
  for k in want:  # recording changes nothing else
    np.testing.assert_allclose(np.asarray(got_params[k]), want[k], rtol=5e-5, atol=5e-6)


def test_trust_ratio_is_not_in_the_state_by_default():
  params = _params()
  state = lamb_sharded.lamb(1e-2).init(params)
  assert state[0].trust_ratio is None
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(optax.lamb(1e-2).init(params)))
