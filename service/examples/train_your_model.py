"""Your own model through the optimizer service, with `OptimizerClient` alone.

    lamb-sharded serve --port 50051 --learning-rate 0.05 &
    python -m service.examples.train_your_model --server 127.0.0.1:50051 --steps 100

The model, its data and its gradient are yours (here: linear regression in JAX); the
server holds the parameters and the LAMB state and applies each step. `make` wraps
the same model for `lamb-sharded worker --model service.examples.train_your_model:make`
(init, grad_fn, batch: see `service.examples.models.Model`).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from service.client import OptimizerClient


def init(seed):  # any pytree of float32 arrays
  return {'w': np.random.default_rng(seed).normal(size=(8, 1)).astype(np.float32),
          'b': np.zeros(1, np.float32)}


def loss(params, x, y):
  return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)


def batch(step, worker=0, size=64):  # depends only on (step, worker): restarts recompute it
  x = np.random.default_rng([step, worker]).normal(size=(size, 8)).astype(np.float32)
  return x, x @ np.linspace(-1, 1, 8, dtype=np.float32)[:, None] + 0.5


def train(server, steps, worker_id='me'):
  """Pull, compute the gradient of this step's batch, push, wait; returns the final params."""
  grad_fn = jax.jit(jax.value_and_grad(loss))
  with OptimizerClient(server) as client:
    if not client.describe(wait_for_ready=True).initialized:
      client.initialize(init(0))
    while (pulled := client.pull(like=init(0))).step < steps:
      x, y = batch(pulled.step)
      _, grads = grad_fn(pulled.params, x, y)
      r = client.push(pulled.step, jax.tree.map(np.asarray, grads), len(x), worker_id,
                      model_id=pulled.model_id)
      if not r.applied:  # other workers' pushes complete the step
        client.wait_for_step(r.accepted_step + 1, model_id=r.model_id)
    return pulled.params


class _Linear:
  """The same model as `lamb-sharded worker --model ...:make` wants it."""

  def __init__(self, seed):
    self.seed = seed

  def init(self, seed):
    return init(seed)

  def grad_fn(self):
    return jax.jit(jax.value_and_grad(loss))

  def batch(self, step, worker, size):
    return batch(step, worker, size)


def make(seed=0):
  return _Linear(seed)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--server', required=True, help='host:port of the server')
  parser.add_argument('--steps', type=int, default=100, help='train until this step')
  args = parser.parse_args()
  params = train(args.server, args.steps)
  held_out = batch(10 ** 9)
  print(f'step {args.steps}: loss {float(loss(init(0), *held_out)):.4f} at the start, '
        f'{float(loss(params, *held_out)):.4f} now (held-out batch)')
