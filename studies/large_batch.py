"""`lamb-sharded study large-batch`: does LAMB keep its quality as the global batch grows?

The same task (`--task`, a `studies.tasks.Task`: the character-level language model
`studies.charlm` by default, or MNIST-1D, `studies.mnist1d`) is trained at global
batches B, 4B, 16B (and 64B where it still gets enough steps) for the same number
of training examples (`--epochs`: a fraction of an epoch for the char-LM, 30 epochs
for MNIST-1D), with `lamb_sharded.lamb` and with `optax.adamw`, each with the same
recipe:

* a linear warm-up over the first 10% of the steps, then cosine decay to 0;
* a learning rate that starts from square-root scaling with the batch
  (lr(B) = lr0 * sqrt(B / B0), lr0 per optimizer, where each optimizer's best lay
  on a probe at B0) and is swept over x1/4, x1/2, x1, x2 of it -- at 16 B0 that
  spans from no scaling at all (lr0) to twice the square-root rule; where the
  best of the sweep lies on an edge of the grid, the grid is extended by one
  more point in that direction (`--extend` times); the best of the sweep (seed 0,
  by the task's metric: held-out loss, or MNIST-1D's test accuracy) is kept, so
  neither optimizer is handicapped by a badly placed grid (`--quick`: x1/2, x1,
  x2, no extension);
* the best learning rate of each (optimizer, batch) run again with more seeds
  (`--seeds`): the table reports the mean and standard deviation over them.

A batch with fewer than `--min-steps` steps at that budget is dropped (said so).

The fixed-steps view: with the same number of steps for every batch (the
steps of the largest batch kept), larger batches see more data; each
(optimizer, batch) cell gets its own sweep (the same factors) around the fixed-epochs best
(one seed). It shows what the large-batch regime is for: fewer steps.

Every run happens in this one process: one compiled step per optimizer and batch
size, the learning rate an argument. `optax.lamb` is trained at LAMB's best
learning rates as a sanity row (`--no-sanity` skips it): it should match.
With `--through-service`, the LAMB runs go through a real local optimizer server
and `--workers` worker processes (`studies.service_runs`) instead.

Writes OUT/results.json (every run), OUT/table.md and the plots (`studies.report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

from service import runtime
from service.errors import ConfigError
from studies import command
from studies import tasks

# lr0 at the smallest batch (8), per optimizer: the centre of each grid. A probe of the
# char-LM at batch 8 (LAMB 0.005-0.04, AdamW 0.002-0.008, one seed) found each
# optimizer's best here, inside its grid: held-out 1.936 (LAMB) and 1.909 (AdamW).
BASE_LR = {'lamb': 0.01, 'adamw': 0.004, 'optax_lamb': 0.01}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything that defines a study run (the defaults are the char-LM's documented run;
  `default_config` gives another task's)."""
  task: str = 'charlm'
  quick: bool = False
  batches: tuple[int, ...] = (8, 32, 128, 512)
  epochs: float = 0.15
  min_steps: int = 50
  optimizers: tuple[str, ...] = ('lamb', 'adamw')
  sanity: bool = True
  base_lr: tuple[tuple[str, float], ...] = tuple(BASE_LR.items())
  grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
  extend: int = 1
  seeds: int = 3
  fixed_steps: bool = True
  devices: Optional[int] = None
  out: str = 'runs/study-large-batch'
  through_service: bool = False
  workers: int = 2
  progress: bool = True

  def lr0(self, optimizer: str) -> float:
    return dict(self.base_lr)[optimizer]


# Per task, the documented run's settings where they differ from StudyConfig's (the char-LM's).
TASK_DEFAULTS = {
    'charlm': {},
    # MNIST-1D: 30 epochs, so that batch 2048 still gets 58 steps. lr0 at batch 32: a probe
    # (30 epochs, mean test accuracy of seeds 0 and 1) found LAMB's best at 0.01 (0.9630,
    # 0.9745, 0.9705 at 0.007, 0.01, 0.014; stuck at chance from 0.02 up) and AdamW's at 0.016
    # (0.9715, 0.9785, 0.9735 at 0.008, 0.016, 0.032; 0.6755 at 0.064). The batches span 64x,
    # so the grid starts at x1/8: at batch 2048 it spans from no scaling at all (lr0) to twice
    # the square-root rule, as the char-LM's four points do at its 16x.
    'mnist1d': dict(batches=(32, 128, 512, 2048), epochs=30.0,
                    base_lr=(('lamb', 0.01), ('adamw', 0.016), ('optax_lamb', 0.01)),
                    grid=(0.125, 0.25, 0.5, 1.0, 2.0), out='runs/study-large-batch-mnist1d'),
}
# Per task, what --quick changes.
QUICK = {
    'charlm': dict(quick=True, epochs=0.25, seeds=2, extend=0, sanity=False,
                   grid=(0.5, 1.0, 2.0)),
    'mnist1d': dict(quick=True, batches=(32, 128, 512), epochs=8.0, seeds=2, extend=0,
                    sanity=False, grid=(0.5, 1.0, 2.0)),
}


def default_config(task: str = 'charlm', quick: bool = False) -> StudyConfig:
  """The documented run of `task` (a key of `studies.tasks.TASKS`), or its --quick run.

  Example:
    >>> default_config('mnist1d', quick=True).batches
    (32, 128, 512)
    >>> default_config() == StudyConfig()
    True
  """
  return StudyConfig(task=task, **{**TASK_DEFAULTS[task], **(QUICK[task] if quick else {})})


def make_task(config: StudyConfig):
  return tasks.make(config.task, config.quick)


def task_spec(config: StudyConfig) -> str:
  """The task as `--model` names it for a worker."""
  return tasks.spec(config.task, config.quick)


@dataclasses.dataclass
class Plan:
  """The batches kept and dropped, and the steps of each."""
  steps: dict[int, int]
  dropped: dict[int, int]
  fixed_steps: int


def plan(config: StudyConfig, num_examples: int) -> Plan:
  """Steps per batch at the data budget (`num_examples` training examples an epoch); batches
  under `min_steps` dropped.

  Example:
    >>> plan(StudyConfig(batches=(8, 32, 128), epochs=0.5, min_steps=50), 16_000)
    Plan(steps={8: 1000, 32: 250, 128: 62}, dropped={}, fixed_steps=62)
    >>> plan(StudyConfig(batches=(8, 512), epochs=0.5, min_steps=50), 16_000).dropped
    {512: 15}
  """
  steps, dropped = {}, {}
  for b in config.batches:
    n = int(config.epochs * num_examples) // b
    (steps if n >= config.min_steps else dropped)[b] = n
  return Plan(steps, dropped, min(steps.values()) if steps else 0)


class Study:
  """Runs the study's sweeps with a trainer per path; collects every `Run`."""

  def __init__(self, config: StudyConfig, trainer, service_trainer=None, bar=None):
    self.config, self.trainer, self.service_trainer = config, trainer, service_trainer
    self.bar = bar
    self.runs = []
    self.metric = trainer.task.metric
    self.plan = plan(config, trainer.task.num_examples)

  def _train(self, run):
    same = [done for done in self.runs  # the same configuration already trained: reuse it
            if done.key()[1:] == run.key()[1:] and done.steps == run.steps]
    if same:
      done = next((d for d in same if d.view == run.view), None)
      if done is None:  # the largest batch's runs are in both views
        done = dataclasses.replace(same[0], view=run.view)
        self.runs.append(done)
      if self.bar is not None:
        self.bar.update(run.steps)
      return done
    trainer = (self.service_trainer if self.service_trainer is not None
               and run.optimizer == 'lamb' else self.trainer)
    if self.bar is not None:
      self.bar.set_postfix_str(f'{run.optimizer} batch {run.batch} lr {run.lr:.3g} '
                               f'seed {run.seed} ({run.view})', refresh=False)
    trainer.train(run, on_step=self.bar.update if self.bar is not None else lambda n: None)
    self.runs.append(run)
    return run

  def _expect(self, steps: int) -> None:
    if self.bar is not None:
      self.bar.total += steps
      self.bar.refresh()

  def sweep(self, optimizer: str, batch: int, steps: int, centre: float, view: str,
            extend: int) -> list:
    """Seed-0 runs over centre x grid, extended past an edge best up to `extend` times."""
    from studies.train import Run  # pylint: disable=import-outside-toplevel
    lrs = sorted(centre * f for f in self.config.grid)
    runs = {lr: self._train(Run(optimizer, batch, lr, 0, steps, view)) for lr in lrs}
    for _ in range(extend):
      best = min(runs, key=lambda lr: self.score(runs[lr]))
      ordered = sorted(runs)
      if best == ordered[0]:
        lr = ordered[0] / 2
      elif best == ordered[-1]:
        lr = ordered[-1] * 2
      else:
        break
      self._expect(steps)
      runs[lr] = self._train(Run(optimizer, batch, lr, 0, steps, view))
    return [runs[lr] for lr in sorted(runs)]

  def planned_steps(self) -> int:
    """The steps of every run planned before any grid extension (the progress bar's total)."""
    c, p = self.config, self.plan
    per_cell = len(c.grid) + c.seeds - 1
    total = sum(s * (per_cell * len(c.optimizers) + (c.sanity and 'lamb' in c.optimizers))
                for s in p.steps.values())
    if c.fixed_steps and len(p.steps) > 1:
      total += p.fixed_steps * len(c.grid) * len(c.optimizers) * len(p.steps)
    return total

  def run_all(self) -> None:
    from studies.train import Run  # pylint: disable=import-outside-toplevel
    c, p = self.config, self.plan
    self._expect(self.planned_steps())
    best = {}
    for batch, steps in p.steps.items():
      for opt in c.optimizers:
        centre = c.lr0(opt) * math.sqrt(batch / c.batches[0])
        runs = self.sweep(opt, batch, steps, centre, 'epochs', c.extend)
        best[opt, batch] = min(runs, key=self.score).lr
        for seed in range(1, c.seeds):
          self._train(Run(opt, batch, best[opt, batch], seed, steps, 'epochs'))
      if c.sanity and 'lamb' in c.optimizers:
        self._train(Run('optax_lamb', batch, best['lamb', batch], 0, steps, 'epochs'))
    if c.fixed_steps and len(p.steps) > 1:
      for batch in p.steps:
        for opt in c.optimizers:
          self.sweep(opt, batch, p.fixed_steps, best[opt, batch], 'steps', c.extend)

  def score(self, run) -> float:
    """The run's rank by the task's metric (lower is better; inf if it diverged)."""
    return self.metric.score(getattr(run, self.metric.key), run.diverged)


# ---------------------------------------------------------------------- command line


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected integers >= 1, got {text!r}')
  return values


def _per_task(name: str, show=str) -> str:
  """A setting's default for each task, and with --quick: '0.15, --quick 0.25 (charlm); ...'."""
  out = []
  for task in tasks.TASKS:
    full, quick = (getattr(default_config(task, q), name) for q in (False, True))
    out.append(f'{show(full)}' + (f', --quick {show(quick)}' if quick != full else '')
               + f' ({task})')
  return '; '.join(out)


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The study's flags (shared by `lamb-sharded study large-batch` and `python -m`)."""
  d = StudyConfig()
  batches = lambda b: ','.join(map(str, b))  # pylint: disable=unnecessary-lambda-assignment
  parser.add_argument('--task', choices=tuple(tasks.TASKS), default=d.task,
                      help='what to train: charlm, a character-level language model of the '
                      'Python stdlib\'s source (held-out loss); mnist1d, a 1-D CNN on MNIST-1D '
                      '(generated locally; test accuracy) (default charlm)')
  parser.add_argument('--quick', action='store_true',
                      help='a smaller model and data budget, 2 seeds, no grid extension and '
                      'no optax.lamb row: about a minute (default: the documented run)')
  parser.add_argument('--out', default=None,
                      help=f'output directory (default {_per_task("out")})')
  parser.add_argument('--batches', type=_int_list, default=None,
                      help='global batches in examples (sequences, signals), comma-separated '
                      f'(default {_per_task("batches", batches)}; those under --min-steps are '
                      'dropped)')
  parser.add_argument('--epochs', type=float, default=None,
                      help='training data per run, in epochs of the training set (default '
                      f'{_per_task("epochs", "{:g}".format)})')
  parser.add_argument('--min-steps', type=int, default=d.min_steps,
                      help=f'drop a batch with fewer steps than this (default {d.min_steps})')
  parser.add_argument('--seeds', type=int, default=None,
                      help=f'seeds of each best learning rate (default {d.seeds}; --quick '
                      f'{QUICK["charlm"]["seeds"]})')
  parser.add_argument('--extend', type=int, default=None,
                      help='extra learning rates past a grid edge that holds the best '
                      f'(default {d.extend}; --quick {QUICK["charlm"]["extend"]})')
  parser.add_argument('--no-sanity', dest='sanity', action='store_false', default=None,
                      help='skip the optax.lamb rows (default: run them; --quick skips them)')
  parser.add_argument('--no-fixed-steps', dest='fixed_steps', action='store_false',
                      help='skip the fixed-steps view (default: run it)')
  parser.add_argument('--devices', type=int, default=None,
                      help='devices of the mesh: the first N of this machine\'s accelerators, '
                      'or N simulated CPU devices on a CPU-only machine (default: all of this '
                      'machine\'s devices, one on a CPU)')
  parser.add_argument('--through-service', action='store_true',
                      help='train the LAMB runs through a local optimizer server and '
                      '--workers worker processes (default: all in this process)')
  parser.add_argument('--workers', type=int, default=d.workers,
                      help=f'worker processes with --through-service (default {d.workers})')
  parser.add_argument('--no-progress', dest='progress', action='store_false',
                      help='no progress bar (default: one on stderr)')


def config_from_args(args) -> StudyConfig:
  """The StudyConfig of parsed flags; ConfigError naming the flag if one is out of range."""
  values = {}
  for name in ('out', 'batches', 'epochs', 'seeds', 'extend', 'sanity'):
    if getattr(args, name) is not None:
      values[name] = getattr(args, name)
  values.update(min_steps=args.min_steps, fixed_steps=args.fixed_steps,
                devices=args.devices, through_service=args.through_service,
                workers=args.workers, progress=args.progress)
  config = dataclasses.replace(default_config(args.task, args.quick), **values)
  for flag, ok, what in (
      ('--epochs', config.epochs > 0, f'must be > 0, got {config.epochs:g}'),
      ('--seeds', config.seeds >= 1, f'must be >= 1, got {config.seeds}'),
      ('--extend', config.extend >= 0, f'must be >= 0, got {config.extend}'),
      ('--min-steps', config.min_steps >= 1, f'must be >= 1, got {config.min_steps}'),
      ('--devices', config.devices is None or config.devices >= 1,
       f'must be >= 1, got {config.devices}'),
      ('--workers', config.workers >= 1, f'must be >= 1, got {config.workers}'),
      ('--batches', list(config.batches) == sorted(set(config.batches)),
       f'must be increasing, got {",".join(map(str, config.batches))}')):
    if not ok:
      raise ConfigError(f'{flag}: {what}')
  if config.through_service:
    bad = [b for b in config.batches if b % config.workers]
    if bad:
      raise ConfigError(f'--workers: {config.workers} does not divide the batches '
                        f'{",".join(map(str, bad))}')
  return config


def run(config: StudyConfig, say: Callable[[str], None] = print) -> dict:
  """Runs the study and writes its outputs; returns the JSON summary."""
  t0 = time.monotonic()
  runtime.simulate_cpu_devices(config.devices)  # before JAX loads (None: drop an inherited ask)
  from studies import report, train  # pylint: disable=import-outside-toplevel
  task = make_task(config)
  try:
    mesh = train.make_mesh(config.devices)
  except ValueError as e:
    raise ConfigError(f'--devices: {e}') from None
  bad = [b for b in config.batches if b % mesh.size]
  if bad:
    raise ConfigError(f'--batches: {",".join(map(str, bad))} not divisible by the '
                      f'{mesh.size} devices')
  trainer = train.Trainer(task, mesh)
  service_trainer = None
  os.makedirs(config.out, exist_ok=True)
  study = Study(config, trainer)
  say(f'lamb-sharded study large-batch: {task.describe()["summary"]}, '
      f'mesh of {mesh.size} {mesh.devices.flat[0].platform} device(s); batches '
      f'{", ".join(f"{b} ({s} steps)" for b, s in study.plan.steps.items())}'
      + ''.join(f'; batch {b} dropped ({s} steps < {config.min_steps})'
                for b, s in study.plan.dropped.items()))
  if not study.plan.steps:
    raise ConfigError(f'--batches: every batch has fewer than --min-steps {config.min_steps} '
                      f'steps at --epochs {config.epochs:g}')
  if config.through_service:
    from studies import service_runs  # pylint: disable=import-outside-toplevel
    service_trainer = service_runs.ServiceTrainer(
        task, task_spec(config), config.workers, os.path.join(config.out, 'service'),
        devices=mesh.size, recipe=trainer.recipe)
  study.service_trainer = service_trainer

  def run_all(bar):
    study.bar = bar
    study.run_all()
  command.run_with_progress(run_all, config.progress)
  summary = report.write(config, task, mesh, study.plan, study.runs, config.out,
                         wall_s=time.monotonic() - t0)
  say(report.table_text(summary))
  say(f'wrote {", ".join(summary["files"])} ({summary["wall_s"]:.0f} s)')
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m studies.large_batch [flags]`."""
  return command.main('studies.large_batch', __doc__, add_flags, config_from_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
