"""The models `lamb-sharded worker` trains: plain JAX, deterministic data by step.

Each worker's examples for step t depend only on (seed, t, worker index), so a
worker that restarts -- or a test that recomputes what the workers pushed --
gets exactly the same gradients.

* `regression`: a student MLP fitting a random teacher on Gaussian inputs (the tests').
* `digits`: an MLP classifying scikit-learn's handwritten digits (`lamb-sharded demo`).
  Its `batch` takes the number of workers too (`shards_global_batch`): every
  step has one global batch, and each worker computes the gradient of its slice.

Your own model: `lamb-sharded worker --model mypkg.mymodel:make` imports
`mypkg.mymodel` and calls `make(seed=SEED)`; what it returns must do what `Model`
below says (the two models here are examples). `load_model` is that lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Model(Protocol):
  """What `lamb-sharded worker --model MODULE:FN` needs of the object FN(seed=...) returns.

  Data must depend only on (step, worker): a worker that restarts recomputes the same
  gradients. Parameters are a pytree of float32 arrays (dicts, lists, tuples...).
  """

  def init(self, seed: int) -> Any:
    """The initial parameters (used by the worker started with --init)."""

  def grad_fn(self) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """A function (params, x, y) -> (loss, grads), grads a pytree like params; e.g.
    `jax.jit(jax.value_and_grad(loss))`."""

  def batch(self, step: int, worker: int, size: int) -> tuple[Any, Any]:
    """(x, y): the `size` examples worker `worker` trains on at step `step`.

    With a class attribute `shards_global_batch = True`, `batch` is called as
    `batch(step, worker, size, num_workers)` instead: the worker's slice of the step's
    global batch of `size * num_workers` examples (see `Digits`).
    """


_MODEL_SPEC = re.compile(r'[A-Za-z_][\w.]*:[A-Za-z_]\w*')


def load_model(spec: str, seed: int = 0) -> Model:
  """The model named `spec`: a built-in one ('regression', 'digits'), or MODULE:FN, which
  imports MODULE and returns FN(seed=seed).

  Raises ConfigError naming --model if it cannot be found or does not fit `Model`.
  """
  from service.errors import ConfigError  # pylint: disable=import-outside-toplevel
  if spec in MODELS:
    return MODELS[spec](seed=seed)
  if not _MODEL_SPEC.fullmatch(spec):
    raise ConfigError(f'--model: {spec!r} is neither a built-in model ({", ".join(MODELS)}) '
                      f'nor MODULE:FN (e.g. mypkg.mymodel:make)')
  module_name, fn_name = spec.split(':')
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise ConfigError(f'--model {spec}: cannot import {module_name} ({e}; is it on '
                      f'PYTHONPATH?)') from None
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ConfigError(f'--model {spec}: {module_name} has no function {fn_name}')
  model = fn(seed=seed)
  missing = [name for name in ('init', 'grad_fn', 'batch')
             if not callable(getattr(model, name, None))]
  if missing:
    raise ConfigError(f'--model {spec}: what {fn_name}(seed=...) returns has no '
                      f'{", ".join(missing)} (see service.examples.models.Model)')
  return model


def mlp_init(sizes: Sequence[int], seed: int, scale: Callable[[int], float]) -> dict:
  """{'layer<i>': {'w', 'b'}} float32 params; w ~ N(0, 1) * scale(fan_in), b = 0."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f'layer{i}'] = {'w': (rng.normal(size=(a, b)) * scale(a)).astype(np.float32),
                           'b': np.zeros((b,), np.float32)}
  return params


def mlp_forward(params, x, activation):
  """Dense layers with `activation` between them (none after the last)."""
  h = x
  n = len(params)
  for i in range(n):
    h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
    if i < n - 1:
      h = activation(h)
  return h


@dataclasses.dataclass(frozen=True)
class Regression:
  """A student MLP regressing a fixed random teacher MLP on Gaussian inputs."""
  sizes: tuple[int, ...] = (16, 64, 64, 4)
  seed: int = 0

  def init(self, seed: int) -> dict:
    return mlp_init(self.sizes, seed, lambda fan_in: 1 / np.sqrt(fan_in))

  @staticmethod
  def forward(params, x):
    return mlp_forward(params, x, jnp.tanh)

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


@functools.lru_cache(maxsize=4)
def digits_split(test_fraction: float = 0.2, split_seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's digits (1,797 8x8 images, shipped inside the package: no download),
  pixels scaled to [0, 1], split stratified by class with a fixed seed:
  (x_train, y_train, x_test, y_test)."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
  return x_train, y_train, x_test, y_test


@dataclasses.dataclass(frozen=True)
class Digits:
  """An MLP (64 -> 128 -> 128 -> 10, ReLU) classifying handwritten digits.

  Step t's global batch is the slice t % E of the training set permuted by
  (seed, epoch), E = train examples // global batch (the remainder is dropped);
  worker w of W takes the w-th of its W equal parts. The test split (20%,
  stratified, fixed seed) is never trained on: `evaluate` measures it.
  """
  hidden: tuple[int, ...] = (128, 128)
  seed: int = 0
  test_fraction: float = 0.2
  split_seed: int = 0
  shards_global_batch = True  # batch() takes num_workers (a class attribute, not a field)

  @property
  def sizes(self) -> tuple[int, ...]:
    return (64, *self.hidden, 10)

  def data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_split(self.test_fraction, self.split_seed)

  def init(self, seed: int) -> dict:
    return mlp_init(self.sizes, seed, lambda fan_in: np.sqrt(2.0 / fan_in))

  @staticmethod
  def forward(params, x):
    """The logits."""
    return mlp_forward(params, x, jax.nn.relu)

  def loss(self, params, x, y):
    """Mean softmax cross-entropy."""
    logp = jax.nn.log_softmax(self.forward(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  def steps_per_epoch(self, global_batch: int) -> int:
    n = len(self.data()[0])
    if not 0 < global_batch <= n:
      raise ValueError(f'the global batch must be in [1, {n}] (the training examples), '
                       f'got {global_batch}')
    return n // global_batch

  def batch(self, step: int, worker: int, size: int, num_workers: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """Worker `worker`'s `size` examples of step `step`'s global batch (size * num_workers)."""
    if not 0 <= worker < num_workers:
      raise ValueError(f'worker index {worker} is not in [0, {num_workers})')
    x, y, _, _ = self.data()
    global_batch = size * num_workers
    epoch, i = divmod(step, self.steps_per_epoch(global_batch))
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(x))
    idx = perm[i * global_batch:(i + 1) * global_batch][worker * size:(worker + 1) * size]
    return x[idx], y[idx]

  def grad_fn(self) -> Callable:
    return jax.jit(jax.value_and_grad(self.loss))

  def evaluate(self, params) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the held-out test split (NumPy: nothing to compile)."""
    _, _, x, y = self.data()
    h = x.astype(np.float64)
    for i in range(len(params)):
      h = h @ np.asarray(params[f'layer{i}']['w']) + np.asarray(params[f'layer{i}']['b'])
      if i < len(params) - 1:
        h = np.maximum(h, 0.0)
    logp = h - h.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    accuracy = float(np.mean(np.argmax(h, axis=1) == y))
    return accuracy, float(-np.mean(logp[np.arange(len(y)), y]))


MODELS = {'regression': Regression, 'digits': Digits}
