"""An example of your own model, for `lamb-sharded worker --model mymodel:make`.

deploy/overlays/own-model puts this file into the ConfigMap lamb-sharded-model, which the
workers mount on their PYTHONPATH (deploy/components/own-model). Replace it with your model:
`make(seed)` returns an object with the three methods a worker calls
(service/examples/models.py, `Model`):
  init(seed)                  the initial parameters, a pytree of float32 arrays (pushed by the
                              worker started with --init)
  grad_fn()                   a function (params, x, y) -> (loss, grads)
  batch(step, worker, size)   that worker's examples at that step: they must depend only on
                              (step, worker), so that a restarted worker recomputes the same
                              gradients
It may import whatever the image has (jax, numpy, optax...), and other modules of the ConfigMap.
"""

import jax
import jax.numpy as jnp
import numpy as np


class Blobs:
  """Softmax regression of 3 classes of Gaussian blobs in 8 dimensions."""

  features, classes = 8, 3

  def __init__(self, seed: int):
    self.seed = seed
    # The classes' centres: fixed by the seed, the same in every worker.
    self.centres = np.random.default_rng([seed, 1000]).normal(
        size=(self.classes, self.features)) * 2

  def init(self, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {'w': (rng.normal(size=(self.features, self.classes)) * 0.1).astype(np.float32),
            'b': np.zeros(self.classes, np.float32)}

  def batch(self, step: int, worker: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, worker])
    y = rng.integers(self.classes, size=size)
    x = (self.centres[y] + rng.normal(size=(size, self.features))).astype(np.float32)
    return x, y

  @staticmethod
  def loss(params, x, y):
    logits = x @ params['w'] + params['b']
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  def grad_fn(self):
    return jax.jit(jax.value_and_grad(self.loss))


def make(seed: int) -> Blobs:
  return Blobs(seed)
