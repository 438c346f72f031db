"""`lamb-sharded study diloco`: how much less can K workers communicate, and at what loss?

The large-batch study's task (`studies.charlm`, the --quick size by default here: 2
cores run K = 4 workers and a server), trained by K real worker processes through a
real local optimizer server (`studies.diloco_runs`), every method at the same number
of examples:

0. a synchronous warm-up, in this process (`studies.train.Trainer`, LAMB at global
   batch K * b with the study's warm-up + cosine schedule -- the same update as through
   the service, `tests/studies/test_train.py`), on another seed's data order; its
   parameters are the start of every run below (`serve --init-params`), as DiLoCo
   starts from a pre-trained checkpoint;
1. the synchronous baseline: a gradient push every step (H = 1), float32, LAMB on the
   server (warm-up + cosine, fresh moments);
2. DiLoCo at H in `--local-steps` (10, 50): each worker takes H steps of AdamW (a
   constant `--inner-lr`, its state kept across rounds) and pushes Δ = θ_pulled −
   θ_worker; the server's outer optimizer is nesterov (lr 0.7, momentum 0.9: DiLoCo's),
   sgd (lr 1: averaging) or lamb -- at `--lamb-lrs` × H / 10 (LAMB's step is lr × ‖w‖
   per leaf whatever the size of Δ, so its lr is not DiLoCo's, and a round of H steps
   needs an lr ∝ H), one more 3x past an edge of that grid that holds the best, and at
   the best of them with LAMB's trust ratio fixed at 1 for the biases and LayerNorm
   vectors (`--exclude-from-layer-adaptation`), the leaves that start at 0 or 1;
3. the best of (2) at each H with int8 and int4 pseudo-gradients (error feedback, the
   client's default), both with bfloat16 pulls.

Inner step k of the round from server step t trains on the batch of index t * H + k,
so every method sees the same examples in the same order. The best of (2)'s sweeps
is chosen on seed 0; the baseline and the best of (2) at each H are run again with
more seeds (`--seeds`; the other rows: one seed, said so in the table). `--longer`
adds the baseline and, at each H, the best nesterov, the best lamb and the codec rows
of (3) at 4x the steps (one seed, the learning rates chosen at the default horizon): does the
gap shrink with the horizon?

Bytes are the tensors' (no gRPC framing) per worker, computed exactly and checked
against the server's Prometheus counters after every run.

Writes OUT/results.json (every run), OUT/table.md and the plots (`studies.diloco_report`).
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


@dataclasses.dataclass(frozen=True)
class DilocoConfig:
  """Everything that defines a study run (the defaults are the documented run)."""
  quick: bool = False
  workers: int = 4
  local_batch: int = 8  # sequences per worker per step
  warmup_steps: int = 500  # synchronous, global batch workers * local_batch
  warmup_lr: float = 0.02
  steps: int = 1000  # inner steps per worker after the warm-up (every method)
  sync_lr: float = 0.02
  local_steps: tuple[int, ...] = (10, 50)
  inner_lr: float = 1e-3
  nesterov: tuple[float, float] = (0.7, 0.9)
  lamb_lrs: tuple[float, ...] = (0.003, 0.01, 0.03)  # at H = 10; x H / 10 at another H
  extend: int = 1  # more lamb lrs (x3) past a grid edge that holds the best
  outers: tuple[str, ...] = ('nesterov', 'sgd', 'lamb')  # the outer optimizers of (2)
  codecs: tuple[str, ...] = ('int8', 'int4')  # the pushes of (3), with bfloat16 pulls
  seeds: int = 2
  longer: bool = False
  out: str = 'runs/study-diloco'
  progress: bool = True


# --quick: 3 runs (each a server and 4 workers starting: ~20 s here) -- (1), nesterov at H=10,
# and it with int8 pushes.
QUICK = dict(quick=True, warmup_steps=100, steps=100, local_steps=(10,), outers=('nesterov',),
             codecs=('int8',), seeds=1)
LONGER = 4  # --longer: the steps' factor


def make_task(config: DilocoConfig):
  del config  # one size: the char-LM's --quick size, K = 4 workers on 2 cores
  from studies import charlm  # pylint: disable=import-outside-toplevel
  return charlm.small()


TASK_SPEC = 'studies.charlm:small'


class Study:
  """Runs the study's methods with a trainer; collects every `DilocoRun`."""

  def __init__(self, config: DilocoConfig, trainer, warm: dict, bar=None):
    self.config, self.trainer, self.warm, self.bar = config, trainer, warm, bar
    self.runs = []

  def _train(self, method, seed: int, role: str, horizon: str = 'default'):
    from studies.diloco_runs import DilocoRun  # pylint: disable=import-outside-toplevel
    steps = self.config.steps * (LONGER if horizon == 'longer' else 1)
    run = DilocoRun(method, seed, steps, self.config.local_batch, horizon=horizon, role=role)
    if self.bar is not None:
      self.bar.set_postfix_str(f'{method.label()}, seed {seed}'
                               + (' (longer)' if horizon == 'longer' else ''), refresh=False)
    self.trainer.train(run, self.warm[seed],
                       on_step=self.bar.update if self.bar is not None else lambda n: None)
    self.runs.append(run)
    return run

  def _expect(self, steps: int) -> None:
    if self.bar is not None:
      self.bar.total += steps
      self.bar.refresh()

  def outer_methods(self, h: int) -> list:
    """(2) at H = h: nesterov, sgd, lamb at each lr (the trust-ratio form comes after)."""
    from studies.diloco_runs import Method  # pylint: disable=import-outside-toplevel
    lr, momentum = self.config.nesterov
    methods = {'nesterov': [Method(h, 'nesterov', lr, momentum)], 'sgd': [Method(h, 'sgd', 1.0)],
               'lamb': [Method(h, 'lamb', lr) for lr in self.lamb_lrs(h)]}
    return [m for outer in self.config.outers for m in methods[outer]]

  def lamb_lrs(self, h: int) -> list[float]:
    """Outer LAMB's grid at H = h: `lamb_lrs` x h / 10. LAMB moves each leaf by lr x its
    norm a round, whatever the size of Δ: the same rate per inner step needs lr ∝ H."""
    return [float(f'{lr * h / LAMB_LR_AT_H:.3g}') for lr in self.config.lamb_lrs]

  def planned_steps(self) -> int:
    """Inner steps of every planned run (the progress bar's total)."""
    c = self.config
    per_h = len(self.outer_methods(1)) + ('lamb' in c.outers) + len(c.codecs)  # (2), (3)
    runs = c.seeds + len(c.local_steps) * (per_h + c.seeds - 1)
    longer = ((1 + len(c.local_steps) * (len({'nesterov', 'lamb'} & set(c.outers))
                                         + len(c.codecs))) * LONGER if c.longer else 0)
    return (runs + longer) * c.steps

  def run_all(self) -> None:
    from studies.diloco_runs import Method  # pylint: disable=import-outside-toplevel
    c = self.config
    self._expect(self.planned_steps())
    baseline = Method(1, 'lamb', c.sync_lr)
    self._train(baseline, 0, 'baseline')
    best = {}
    for h in c.local_steps:
      runs = [self._train(m, 0, 'outer') for m in self.outer_methods(h)]
      if 'lamb' in c.outers:  # past an edge of the grid if the best is there; the other form
        runs += self._extend_lamb(h, [r for r in runs if r.method.outer == 'lamb'])
        lamb = min((r for r in runs if r.method.outer == 'lamb'), key=_score)
        runs.append(self._train(dataclasses.replace(lamb.method, exclude_biases=True), 0,
                                'outer'))
      best[h] = min(runs, key=_score).method
      for codec in c.codecs:
        self._train(dataclasses.replace(best[h], codec=codec, pull_dtype='bfloat16'), 0,
                    'codec')
    for seed in range(1, c.seeds):
      self._train(baseline, seed, 'baseline')
      for h in c.local_steps:
        self._train(best[h], seed, 'outer')
    if c.longer:
      self._train(baseline, 0, 'baseline', 'longer')
      for h in c.local_steps:
        for outer in [o for o in ('nesterov', 'lamb') if o in c.outers]:
          chosen = min((r for r in self.runs if r.horizon == 'default' and r.seed == 0
                        and r.method.local_steps == h and r.method.outer == outer
                        and r.method.codec == 'none'), key=_score)
          self._train(chosen.method, 0, 'outer', 'longer')
        for codec in c.codecs:
          self._train(dataclasses.replace(best[h], codec=codec, pull_dtype='bfloat16'), 0,
                      'codec', 'longer')


  def _extend_lamb(self, h: int, runs: list) -> list:
    """LAMB runs at 3x past the edge of the grid, while the best lies on it (`extend` times)."""
    from studies.diloco_runs import Method  # pylint: disable=import-outside-toplevel
    more = []
    for _ in range(self.config.extend):
      tried = sorted(runs + more, key=lambda r: r.method.lr)
      best = min(tried, key=_score)
      if len(tried) < 2 or best not in (tried[0], tried[-1]):
        break
      lr = tried[0].method.lr / 3 if best is tried[0] else tried[-1].method.lr * 3
      self._expect(self.config.steps)
      more.append(self._train(Method(h, 'lamb', float(f'{lr:.3g}')), 0, 'outer'))
    return more


LAMB_LR_AT_H = 10  # the H at which `lamb_lrs` are given


def _score(run) -> float:
  return math.inf if run.diverged or not math.isfinite(run.heldout_loss) else run.heldout_loss


def warm_start(config: DilocoConfig, task, out: str, seeds: Sequence[int],
               say: Callable[[str], None] = print) -> tuple[dict, list]:
  """The synchronous warm-up of each seed, in this process: {seed: .npz path}, its runs."""
  from studies import diloco_runs, train  # pylint: disable=import-outside-toplevel
  trainer = train.Trainer(task, train.make_mesh(1))
  paths, runs = {}, []
  for seed in seeds:
    # Another seed's data order (and init): the runs after it start at batch 0 of theirs.
    run = train.Run('lamb', config.workers * config.local_batch, config.warmup_lr,
                    WARMUP_SEED + seed, config.warmup_steps)
    params = trainer.train(run)
    paths[seed] = diloco_runs.warm_start_file(params, os.path.join(out, f'warm-{seed}.npz'))
    runs.append(run)
    say(f'warm-up of seed {seed}: {config.warmup_steps} synchronous LAMB steps at batch '
        f'{run.batch}, held-out loss {run.heldout_loss:.3f} ({run.wall_s:.0f} s)')
  return paths, runs


WARMUP_SEED = 1000  # the warm-up of seed s trains on seed 1000 + s's init and data order


# ---------------------------------------------------------------------- command line


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}') from None
  if not values or min(values) < 2:
    raise argparse.ArgumentTypeError(f'expected integers >= 2, got {text!r}')
  return values


def _float_list(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {text!r}') from None
  if not values or not all(math.isfinite(v) and v > 0 for v in values):
    raise argparse.ArgumentTypeError(f'expected numbers > 0, got {text!r}')
  return values


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The study's flags (shared by `lamb-sharded study diloco` and `python -m`)."""
  d = DilocoConfig()
  parser.add_argument('--quick', action='store_true',
                      help=f'{QUICK["warmup_steps"]} warm-up and {QUICK["steps"]} steps, 3 runs '
                      '(synchronous; nesterov at H=10, with f32 and int8 pushes), one seed: '
                      'about a minute (default: the documented run)')
  parser.add_argument('--out', default=d.out, help=f'output directory (default {d.out})')
  parser.add_argument('--steps', type=int, default=None,
                      help=f'inner steps of each worker after the warm-up, every method '
                      f'(default {d.steps}; --quick {QUICK["steps"]})')
  parser.add_argument('--warmup-steps', type=int, default=None,
                      help=f'synchronous warm-up steps (default {d.warmup_steps}; --quick '
                      f'{QUICK["warmup_steps"]})')
  parser.add_argument('--local-steps', type=_int_list, default=None,
                      help='H of the DiLoCo runs, comma-separated (default '
                      f'{",".join(map(str, d.local_steps))}; --quick 10); each must divide '
                      '--steps')
  parser.add_argument('--lamb-lrs', type=_float_list, default=None,
                      help='outer LAMB learning rates at H=10, times H/10 at another H (default '
                      f'{",".join(map(str, d.lamb_lrs))}; one more past an edge that holds the '
                      'best)')
  parser.add_argument('--inner-lr', type=float, default=d.inner_lr,
                      help=f'the workers\' AdamW learning rate (default {d.inner_lr:g})')
  parser.add_argument('--sync-lr', type=float, default=d.sync_lr,
                      help=f'the baseline\'s LAMB learning rate (default {d.sync_lr:g})')
  parser.add_argument('--seeds', type=int, default=None,
                      help=f'seeds of the baseline and the best rows (default {d.seeds}; '
                      f'--quick {QUICK["seeds"]})')
  parser.add_argument('--longer', action='store_true',
                      help=f'also train the baseline, and the best nesterov, the best lamb and '
                      f'the codec rows of each H, at {LONGER}x the steps (default: not)')
  parser.add_argument('--no-progress', dest='progress', action='store_false',
                      help='no progress bar (default: one on stderr)')


def config_from_args(args) -> DilocoConfig:
  """The DilocoConfig of parsed flags; ConfigError naming the flag if one is out of range."""
  values = dict(QUICK) if args.quick else {}
  for name in ('steps', 'warmup_steps', 'local_steps', 'lamb_lrs', 'seeds'):
    if getattr(args, name) is not None:
      values[name] = getattr(args, name)
  values.update(out=args.out, inner_lr=args.inner_lr, sync_lr=args.sync_lr,
                longer=args.longer, progress=args.progress)
  config = DilocoConfig(**values)
  bad = [h for h in config.local_steps if config.steps % h]
  for flag, ok, what in (
      ('--steps', config.steps >= 1, f'must be >= 1, got {config.steps}'),
      ('--warmup-steps', config.warmup_steps >= 1, f'must be >= 1, got {config.warmup_steps}'),
      ('--seeds', config.seeds >= 1, f'must be >= 1, got {config.seeds}'),
      ('--inner-lr', math.isfinite(config.inner_lr) and config.inner_lr > 0,
       f'must be > 0, got {config.inner_lr:g}'),
      ('--sync-lr', math.isfinite(config.sync_lr) and config.sync_lr > 0,
       f'must be > 0, got {config.sync_lr:g}'),
      ('--local-steps', not bad, f'{",".join(map(str, bad))} do not divide --steps '
       f'{config.steps}')):
    if not ok:
      raise ConfigError(f'{flag}: {what}')
  return config


def run(config: DilocoConfig, say: Callable[[str], None] = print) -> dict:
  """Runs the study and writes its outputs; returns the JSON summary."""
  t0 = time.monotonic()
  runtime.simulate_cpu_devices(None)  # one CPU device here (drop an inherited ask)
  from studies import diloco_report, diloco_runs  # pylint: disable=import-outside-toplevel
  task = make_task(config)
  os.makedirs(config.out, exist_ok=True)
  say(f'lamb-sharded study diloco: {task.num_params():,}-parameter char-LM, '
      f'{config.workers} workers of {config.local_batch} sequences a step; warm-up '
      f'{config.warmup_steps} synchronous steps, then {config.steps} steps of every method '
      f'(H = 1, {", ".join(map(str, config.local_steps))})')
  warm, warm_runs = warm_start(config, task, config.out, range(config.seeds), say)
  trainer = diloco_runs.LocalStepsTrainer(task, TASK_SPEC, config.workers,
                                          os.path.join(config.out, 'service'), config.inner_lr)
  study = Study(config, trainer, warm)

  def run_all(bar):
    study.bar = bar
    study.run_all()
  command.run_with_progress(run_all, config.progress)
  summary = diloco_report.write(config, task, warm_runs, study.runs, config.out,
                                wall_s=time.monotonic() - t0)
  say(diloco_report.table_text(summary))
  say(f'wrote {", ".join(summary["files"])} ({summary["wall_s"]:.0f} s)')
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m studies.diloco [flags]`."""
  return command.main('studies.diloco', __doc__, add_flags, config_from_args, run, argv)


if __name__ == '__main__':
  sys.exit(main())
