"""Training runs of one task (a `studies.tasks.Task`) in one process: one compiled step per
optimizer, reused by every batch size, learning rate and seed (the learning rate is an
argument of the step).

Optimizers (each with optax's defaults but for the learning rate and weight decay):

* `lamb`: `lamb_sharded.lamb`, its state sharded on the mesh (`param_specs`);
* `adamw`: `optax.adamw`;
* `optax_lamb`: `optax.lamb` (a sanity check: it should match `lamb`).

Weight decay applies to every parameter (optax's default, and the server's), the
same for all. The learning rate follows optax's `warmup_cosine_decay_schedule` (from 0 to
the peak over the warm-up, cosine to 0 at the last step) -- the server's
`warmup_cosine` schedule, so that a run through the service matches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lamb_sharded

OPTIMIZERS = ('lamb', 'adamw', 'optax_lamb')
LABELS = {'lamb': 'lamb_sharded.lamb', 'adamw': 'optax.adamw', 'optax_lamb': 'optax.lamb'}
DATA_AXIS = 'data'
CURVE_POINTS = 100  # training-loss points kept per run
CHECK_EVERY = 50  # steps between divergence checks (a non-finite loss ends the run)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run shares: warm-up fraction and the optimizers' other hyperparameters."""
  warmup_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999

  def warmup_steps(self, steps: int) -> int:
    return max(1, round(self.warmup_fraction * steps))

  def schedule(self, peak: float, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, peak, self.warmup_steps(steps),
                                              max(steps, 1), 0.0)


@dataclasses.dataclass
class Run:
  """One training run and what it measured."""
  optimizer: str
  batch: int
  lr: float
  seed: int
  steps: int
  view: str = 'epochs'  # 'epochs': the study's fixed data budget; 'steps': fixed steps
  heldout_loss: float = math.nan
  heldout_accuracy: Optional[float] = None  # where the task measures one (MNIST-1D)
  final_train_loss: float = math.nan
  diverged: bool = False
  wall_s: float = 0.0
  tokens: int = 0  # examples trained on x the task's example_size (characters, signals)
  curve: list = dataclasses.field(default_factory=list)  # [[step, train loss], ...]
  path: str = 'in-process'  # or 'service'

  def key(self) -> tuple:
    return (self.view, self.optimizer, self.batch, self.lr, self.seed)


def make_mesh(devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D mesh ('data',) over the first `devices` devices (default: all)."""
  available = jax.devices()
  n = len(available) if devices is None else devices
  if not 0 < n <= len(available):
    raise ValueError(f'asked for {n} devices, this machine has {len(available)}')
  return jax.sharding.Mesh(np.array(available[:n]), (DATA_AXIS,))


def param_specs(params, mesh) -> Any:
  """The first dimension of each matrix sharded over 'data' where it divides; else replicated."""
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: P(DATA_AXIS) if np.ndim(x) == 2 and x.shape[0] % n == 0
                      else P(), params)


def _optimizer(name: str, lr, mask, recipe: Recipe, mesh, specs):
  if name == 'lamb':
    return lamb_sharded.lamb(lr, b1=recipe.b1, b2=recipe.b2, weight_decay=recipe.weight_decay,
                             mask=mask, mesh=mesh, param_specs=specs)
  if name == 'adamw':
    return optax.adamw(lr, b1=recipe.b1, b2=recipe.b2, weight_decay=recipe.weight_decay,
                       mask=mask)
  if name == 'optax_lamb':
    return optax.lamb(lr, b1=recipe.b1, b2=recipe.b2, weight_decay=recipe.weight_decay,
                      mask=mask)
  raise ValueError(f'unknown optimizer {name!r}; known: {", ".join(OPTIMIZERS)}')


def record_losses(run: Run, losses: np.ndarray, example_size: int) -> None:
  """The run's tokens, its curve (at most CURVE_POINTS means of consecutive steps, each at
  its first step) and its final training loss (the mean of the last 5% of the steps)."""
  run.tokens = len(losses) * run.batch * example_size
  every = max(1, math.ceil(len(losses) / CURVE_POINTS))
  run.curve = [[i, round(float(np.mean(losses[i:i + every])), 5)]
               for i in range(0, len(losses), every)]
  run.final_train_loss = float(np.mean(losses[-max(1, len(losses) // 20):]))


def record_heldout(run: Run, task, params) -> None:
  """The run's held-out figures (`task.measure`); a diverged run's loss is inf."""
  if run.diverged:
    run.heldout_loss = math.inf
    return
  figures = task.measure(params)
  run.heldout_loss = figures['heldout_loss']
  run.heldout_accuracy = figures.get('heldout_accuracy')


class Trainer:
  """Trains `task` (a `studies.tasks.Task`) on `mesh` with any optimizer."""

  def __init__(self, task, mesh: jax.sharding.Mesh, recipe: Recipe = Recipe()):
    self.task, self.mesh, self.recipe = task, mesh, recipe
    template = task.init(0)
    self.mask = None  # weight decay on every leaf, as the optimizer server applies it
    self.specs = param_specs(template, mesh)
    self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.specs)
    self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    self._steps: dict[str, Callable] = {}

  def _step(self, name: str) -> Callable:
    if name not in self._steps:
      task, mask, recipe, mesh, specs = self.task, self.mask, self.recipe, self.mesh, self.specs

      def step(params, opt_state, x, y, lr):
        loss, grads = jax.value_and_grad(task.loss)(params, x, y)
        opt = _optimizer(name, lr, mask, recipe, mesh, specs)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
      self._steps[name] = jax.jit(step, donate_argnums=(0, 1))
    return self._steps[name]

  def init(self, name: str, seed: int):
    params = jax.device_put(self.task.init(seed), self.param_shardings)
    opt = _optimizer(name, 0.0, self.mask, self.recipe, self.mesh, self.specs)
    return params, opt.init(params)

  def learning_rates(self, peak: float, steps: int) -> np.ndarray:
    return np.asarray(self.recipe.schedule(peak, steps)(jnp.arange(steps)), np.float32)

  def train(self, run: Run, on_step: Callable[[int], None] = lambda n: None):
    """Trains `run` (fills in its results); returns the final parameters.

    `on_step(n)` is called as steps are dispatched (for a progress bar).
    """
    t0 = time.perf_counter()
    step_fn = self._step(run.optimizer)
    params, opt_state = self.init(run.optimizer, run.seed)
    lrs = self.learning_rates(run.lr, run.steps)
    task = dataclasses.replace(self.task, seed=run.seed)
    losses = []
    for t in range(run.steps):
      x, y = task.batch(t, 0, run.batch)
      x, y = jax.device_put((x, y), self.batch_sharding)
      params, opt_state, loss = step_fn(params, opt_state, x, y, lrs[t])
      losses.append(loss)
      on_step(1)
      if (t + 1) % CHECK_EVERY == 0 and not np.isfinite(float(loss)):
        run.diverged = True
        on_step(run.steps - t - 1)
        break
    losses = np.asarray(jax.device_get(losses), np.float64)
    run.diverged = run.diverged or not np.all(np.isfinite(losses))
    record_losses(run, losses, self.task.example_size)
    record_heldout(run, self.task, params)
    run.wall_s = time.perf_counter() - t0
    return params
