"""The models `lamb-sharded worker` trains: plain JAX, deterministic data by step.

Each worker's examples for step t depend only on (seed, t, worker index), so a
worker that restarts -- or a test that recomputes what the workers pushed --
gets exactly the same gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Regression:
  """A student MLP regressing a fixed random teacher MLP on Gaussian inputs."""
  sizes: tuple[int, ...] = (16, 64, 64, 4)
  seed: int = 0

  def init(self, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
      params[f'layer{i}'] = {'w': (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                             'b': np.zeros((b,), np.float32)}
    return params

  @staticmethod
  def forward(params, x):
    h = x
    n = len(params)
    for i in range(n):
      h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
      if i < n - 1:
        h = jnp.tanh(h)
    return h

  def loss(self, params, x, y):
    return jnp.mean((self.forward(params, x) - y) ** 2)

  def batch(self, step: int, worker: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The examples of `worker` at `step` (deterministic)."""
    rng = np.random.default_rng([self.seed, step, worker])
    x = rng.normal(size=(size, self.sizes[0])).astype(np.float32)
    teacher = self.init(self.seed + 1000)
    y = np.asarray(self.forward(teacher, x), np.float32)
    return x, y

  def grad_fn(self) -> Callable:
    return jax.jit(jax.value_and_grad(self.loss))


MODELS = {'regression': Regression}
