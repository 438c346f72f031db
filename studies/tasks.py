"""What a study trains: a task is data, a model and a held-out measurement behind one interface.

Two tasks fit it: `studies.charlm` (a character-level language model of the Python
standard library's source; held-out loss) and `studies.mnist1d` (MNIST-1D, ten
classes of 1-D signals, generated locally; held-out accuracy). A study
(`studies.large_batch`, `studies.train.Trainer`, `studies.report`) reaches a task
only through `Task` below, so another task is one more module with the same methods
and one more line in `TASKS`.

Example:
    >>> HELDOUT_ACCURACY.score(0.8), HELDOUT_LOSS.score(1.9)   # lower is better
    (-0.8, 1.9)
    >>> HELDOUT_ACCURACY.score(0.8, diverged=True)
    inf
    >>> spec('mnist1d', quick=True)
    'studies.mnist1d:small'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable, Optional, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
  """The held-out figure a study ranks a task's runs by.

  `key` is the field of `studies.train.Run` (and of `Task.measure`'s answer) that holds it.
  """
  key: str
  label: str  # the table's column header
  short: str  # in the LAMB - AdamW table's header
  higher_is_better: bool

  def score(self, value: Optional[float], diverged: bool = False) -> float:
    """Lower is better: the value, negated where higher is better; inf for a diverged run
    or a missing or non-finite value."""
    if diverged or value is None or not math.isfinite(value):
      return math.inf
    return -value if self.higher_is_better else value


HELDOUT_LOSS = Metric('heldout_loss', 'held-out loss (nats/char)', 'held-out, nats/char', False)
HELDOUT_ACCURACY = Metric('heldout_accuracy', 'test accuracy', 'test accuracy', True)


class Task(Protocol):
  """What a study needs of a task (and, through `init`, `grad_fn` and `batch`, what a
  `lamb-sharded worker --model MODULE:FN` needs: `service.examples.models.Model`).

  A task is a frozen dataclass with a `seed` field: `dataclasses.replace(task, seed=s)`
  is the same task whose data order (and nothing else) depends on `s`.
  """
  name: str  # 'charlm', 'mnist1d': the --task that names it
  metric: Metric
  seed: int
  example_size: int  # what one example counts in `example_unit`s (a window: its context)
  example_unit: str  # 'characters', 'signals': the curves' x axis
  loss_unit: str  # the training loss's unit: 'nats/char', 'nats'
  shards_global_batch: bool  # True: batch() takes num_workers

  @property
  def num_examples(self) -> int:
    """Training examples in an epoch (the study's data budget is epochs x this)."""

  def init(self, seed: int) -> Any:
    """Float32 parameters, a pytree (one leaf per layer's weight or bias)."""

  def loss(self, params, x, y):
    """The mean training loss of a batch (a JAX function: the study differentiates it)."""

  def grad_fn(self) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """A jitted (params, x, y) -> (loss, grads)."""

  def batch(self, step: int, worker: int, size: int, num_workers: int = 1):
    """(x, y): worker `worker`'s `size` examples of step `step`'s global batch."""

  def measure(self, params) -> dict[str, float]:
    """The held-out figures: 'heldout_loss', and the metric's key if it is another."""

  def num_params(self) -> int:
    """The parameters' count."""

  def describe(self) -> dict[str, Any]:
    """Sizes for results.json: at least name, title (the plots'), summary (the study's first
    line), parameters, batch_unit (what a batch counts: 'sequences', 'signals'), example_size,
    example_unit, loss_unit and metric (`dataclasses.asdict(self.metric)`)."""


def description(task: Task, **sizes: Any) -> dict[str, Any]:
  """`Task.describe`'s dict: the task's own `sizes` (name, title, summary, parameters,
  batch_unit...) and the fields every task has (its units and metric)."""
  return {**sizes, 'example_size': task.example_size, 'example_unit': task.example_unit,
          'loss_unit': task.loss_unit, 'metric': dataclasses.asdict(task.metric)}


# --task NAME -> the module whose `model(seed=...)` is the default size and `small(seed=...)`
# the --quick size.
TASKS = {'charlm': 'studies.charlm', 'mnist1d': 'studies.mnist1d'}


def spec(name: str, quick: bool = False) -> str:
  """The task as `lamb-sharded worker --model` names it: MODULE:FN."""
  return f'{TASKS[name]}:{"small" if quick else "model"}'


def make(name: str, quick: bool = False, seed: int = 0) -> Task:
  """The task `name` (a key of TASKS) at its default size, or its --quick size."""
  module, fn = spec(name, quick).split(':')
  return getattr(importlib.import_module(module), fn)(seed=seed)


def stream_indices(seed: int, n: int, start: int, count: int) -> np.ndarray:
  """Positions [start, start + count) of the endless stream of the permutations of range(n)
  seeded by (seed, 0), (seed, 1), ...: epoch after epoch, nothing dropped, whatever the batch.

  Example:
    >>> a = stream_indices(0, 10, 0, 25)
    >>> sorted(a[:10].tolist()) == list(range(10)) == sorted(a[10:20].tolist())
    True
    >>> stream_indices(0, 10, 8, 4).tolist() == a[8:12].tolist()
    True
  """
  positions = np.arange(start, start + count)
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    at = epochs == epoch
    out[at] = _permutation(seed, int(epoch), n)[offsets[at]]
  return out


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)
