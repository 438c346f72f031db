"""The library demo: an MLP trained with sharded LAMB on a mesh of CPU devices.

Until the service demo lands this is what `make demo` runs. It trains the same
model twice from the same start -- once with `lamb_sharded.lamb` on a
("data", "model") mesh, once with `optax.lamb` -- and shows that the losses
agree while the sharded step needs a single all-reduce for all its norms.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lamb_sharded


def _mesh():
  n = jax.device_count()
  model = 2 if n % 2 == 0 and n > 1 else 1
  return jax.make_mesh((n // model, model), ('data', 'model'))


def _init(rng: np.random.Generator, sizes):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f'layer{i}'] = {
        'w': jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
        'b': jnp.zeros((b,), jnp.float32),
    }
  return params


def _forward(params, x):
  h = x
  for i in range(len(params)):
    layer = params[f'layer{i}']
    h = h @ layer['w'] + layer['b']
    if i < len(params) - 1:
      h = jax.nn.gelu(h)
  return h


def _loss(params, x, y):
  return jnp.mean((_forward(params, x) - y) ** 2)


def run(steps: int = 200, seed: int = 0) -> int:
  """Trains and prints a table; returns a process exit code."""
  mesh = _mesh()
  rng = np.random.default_rng(seed)
  sizes = (32, 256, 256, 8)
  params = _init(rng, sizes)
  # Weights split over "model" along their output dimension; biases likewise.
  specs = jax.tree.map(lambda x: P(None, 'model') if x.ndim == 2 else P('model'), params)
  teacher = _init(np.random.default_rng(seed + 1), sizes)
  x = jnp.asarray(rng.normal(size=(4096, sizes[0])), jnp.float32)
  y = _forward(teacher, x)

  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-2, steps // 10, steps)
  decay_mask = jax.tree.map(lambda x: x.ndim == 2, params)
  sharded = lamb_sharded.lamb(schedule, weight_decay=1e-4, mask=decay_mask,
                              mesh=mesh, param_specs=specs)
  reference = optax.lamb(schedule, weight_decay=1e-4, mask=decay_mask)

  def make_step(tx):
    @jax.jit
    def step(p, s, xb, yb):
      loss, g = jax.value_and_grad(_loss)(p, xb, yb)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss
    return step

  batch_sharding = NamedSharding(mesh, P('data'))
  runs = {}
  for name, tx, p in (
      ('lamb_sharded', sharded,
       jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))),
      ('optax.lamb', reference, params)):
    step = make_step(tx)
    s = tx.init(p)
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
      idx = np.random.default_rng(seed * 100003 + i).integers(0, x.shape[0], 512)
      xb, yb = x[idx], y[idx]
      if name == 'lamb_sharded':
        xb, yb = jax.device_put((xb, yb), batch_sharding)
      p, s, loss = step(p, s, xb, yb)
      losses.append(float(loss))
    runs[name] = (losses, time.perf_counter() - t0, p)

  # All-reduces in the optimizer update alone, both on the same sharded inputs.
  on_mesh = jax.device_put(params, lamb_sharded.named_shardings(mesh, specs, params))
  counts = {}
  for name, tx in (('lamb_sharded', sharded), ('optax.lamb', reference)):
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
    hlo = update.lower(on_mesh, tx.init(on_mesh), on_mesh).compile().as_text()
    counts[name] = hlo.count('all-reduce(')

  print(f'mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, '
        f'{sum(v.size for v in jax.tree.leaves(params)):,} parameters, {steps} steps\n')
  print(f'{"step":>6} {"lamb_sharded loss":>18} {"optax.lamb loss":>16}')
  for i in sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1}):
    print(f'{i:>6} {runs["lamb_sharded"][0][i]:>18.6f} {runs["optax.lamb"][0][i]:>16.6f}')
  diff = max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(runs['lamb_sharded'][2]),
                             jax.tree.leaves(runs['optax.lamb'][2])))
  print(f'\nall-reduces in the compiled optimizer update on this mesh: '
        f'lamb_sharded {counts["lamb_sharded"]}, optax.lamb {counts["optax.lamb"]}')
  print(f'max |param difference| after {steps} steps: {diff:.2e}')
  first, last = runs['lamb_sharded'][0][0], runs['lamb_sharded'][0][-1]
  ok = last < 0.5 * first
  print(f'loss {first:.4f} -> {last:.4f}: {"trained" if ok else "DID NOT TRAIN"}')
  return 0 if ok else 1
