"""`lamb-sharded study large-batch`: the plan, the flags, and a --quick run end to end."""

import io
import json
import math
import os

import pytest
import tqdm

from studies import large_batch, tasks
import study_cli  # tests/studies/study_cli.py


def test_batches_with_too_few_steps_are_dropped():
  config = large_batch.StudyConfig(batches=(8, 32, 128, 512), epochs=0.15, min_steps=50)
  p = large_batch.plan(config, num_examples=62_842)  # the default task's
  assert p.steps == {8: 1178, 32: 294, 128: 73} and p.dropped == {512: 18}
  assert p.fixed_steps == 73


@pytest.mark.parametrize('flags, flag', [
    (['--epochs', '0'], '--epochs'),
    (['--seeds', '0'], '--seeds'),
    (['--batches', '32,8'], '--batches'),
    (['--batches', '8,x'], '--batches'),
    (['--through-service', '--workers', '3'], '--workers'),
    (['--batches', '8', '--epochs', '0.001'], '--batches'),  # every batch under --min-steps
])
def test_a_usage_error_is_one_line_naming_the_flag(flags, flag):
  done = study_cli.study('large-batch', '--quick', '--out', os.devnull + '-never', *flags)
  assert done.returncode == 2, done.stderr
  lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and flag in lines[0] and 'study' in lines[0], done.stderr


def test_quick_study_writes_the_table_and_both_optimizers_learn(tmp_path):
  out = tmp_path / 'study'
  done = study_cli.study('large-batch', '--quick', '--out', str(out), timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert 'study' in done.stderr  # the progress bar
  summary = json.loads((out / 'results.json').read_text())
  assert summary['plan']['dropped'] == {'512': 15}
  rows = summary['rows']
  cells = [(r['view'], r['batch'], r['optimizer']) for r in rows]
  assert cells == [(view, b, opt) for view in ('epochs', 'steps') for b in (8, 32, 128)
                   for opt in ('lamb', 'adamw')]
  chance = math.log(128)
  for row in rows:
    assert row['mean'] < chance - 1.0, row  # learnt, at every batch, with both
    assert len(row['lrs']) == 3 and row['best_lr'] > 0
  for row in rows[:6]:
    assert row['seeds'] == 2 and row['std'] >= 0
  assert {r['steps'] for r in rows[6:]} == {61}
  assert len(summary['runs']) >= 6 * 3 + 6 + 4 * 3  # sweeps, seeds, fixed-steps sweeps
  table = (out / 'table.md').read_text()
  assert table.count('\n| same data (epochs) |') == 6 + 3  # rows, and LAMB - AdamW per batch
  assert table.splitlines()[0] in done.stdout
  for name in ('heldout_vs_batch.png', 'loss_curves.png'):
    assert study_cli.is_png(out / name)


def test_quick_mnist1d_study_writes_the_table_and_both_optimizers_learn(tmp_path):
  out = tmp_path / 'study'
  done = study_cli.study('large-batch', '--task', 'mnist1d', '--quick', '--out', str(out),
                         timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  summary = json.loads((out / 'results.json').read_text())
  assert summary['task']['name'] == 'mnist1d' and summary['config']['task'] == 'mnist1d'
  assert summary['plan'] == {'steps': {'32': 1000, '128': 250, '512': 62}, 'dropped': {},
                             'fixed_steps': 62}
  rows = summary['rows']
  assert [(r['view'], r['batch'], r['optimizer']) for r in rows] == [
      (view, b, opt) for view in ('epochs', 'steps') for b in (32, 128, 512)
      for opt in ('lamb', 'adamw')]
  for row in rows[:6]:  # same data: learnt, with both optimizers, far above chance (0.1)
    assert row['mean'] > 0.4 and row['seeds'] == 2 and len(row['lrs']) == 3, row
    assert 0 < row['loss_mean'] < math.log(10) - 0.5, row
  for row in rows[6:]:  # 62 steps for every batch: above chance still
    assert row['mean'] > 0.2 and row['steps'] == 62, row
  runs = summary['runs']
  assert all(0 <= r['heldout_accuracy'] <= 1 for r in runs)
  assert {r['tokens'] for r in runs if r['view'] == 'epochs'} == {32_000, 31_744}  # signals
  table = (out / 'table.md').read_text().splitlines()
  assert table[0].startswith('| view | batch | optimizer | best lr | test accuracy | '
                             'held-out loss (nats) |')
  assert table[0] in done.stdout
  assert sum(line.startswith('| same data (epochs) |') for line in table) == 6 + 3
  assert 'LAMB − AdamW (test accuracy; > 0: LAMB better)' in '\n'.join(table)
  for name in ('heldout_vs_batch.png', 'loss_curves.png'):
    assert study_cli.is_png(out / name)


class _FakeTrainer:
  """Held-out loss = (log2(lr / optimum))^2: the sweep's logic without training."""

  def __init__(self, optimum):
    self.task = type('Task', (), {'num_examples': 16_000, 'metric': tasks.HELDOUT_LOSS})()
    self.optimum, self.trained = optimum, []

  def train(self, run, on_step):
    run.heldout_loss = 1.0 + math.log2(run.lr / self.optimum[run.optimizer]) ** 2
    self.trained.append(run)
    on_step(run.steps)


def _study(optimum, **overrides):
  config = large_batch.StudyConfig(batches=(8, 32, 128), epochs=0.5, grid=(0.5, 1.0, 2.0),
                                   **overrides)
  trainer, bar = _FakeTrainer(optimum), tqdm.tqdm(total=0, file=io.StringIO())
  study = large_batch.Study(config, trainer, bar=bar)
  study.run_all()
  return study, trainer, bar


def test_a_best_on_the_grid_edge_extends_the_grid_and_the_bar_counts_every_step():
  # AdamW's optimum lies 4x below its grid's centre at every batch: one extension reaches it.
  study, trainer, bar = _study({'lamb': 0.01, 'adamw': 0.001, 'optax_lamb': 0.01}, extend=1,
                               base_lr=(('lamb', 0.01), ('adamw', 0.004), ('optax_lamb', 0.01)),
                               fixed_steps=False)
  lrs = lambda opt, b: sorted(r.lr for r in study.runs if (r.optimizer, r.batch, r.seed)
                              == (opt, b, 0))
  assert lrs('lamb', 8) == pytest.approx([0.005, 0.01, 0.02])  # best inside: no extension
  assert lrs('adamw', 8) == pytest.approx([0.001, 0.002, 0.004, 0.008])
  assert bar.n == bar.total == sum(r.steps for r in trainer.trained)
  seeds = [r for r in study.runs if r.seed > 0 and r.optimizer == 'adamw' and r.batch == 8]
  assert [r.lr for r in seeds] == pytest.approx([0.001, 0.001])  # the best, seeds 1 and 2


def test_the_fixed_steps_view_reuses_the_largest_batch_runs():
  study, trainer, bar = _study({'lamb': 0.01, 'adamw': 0.004, 'optax_lamb': 0.01}, extend=0)
  fixed = [r for r in study.runs if r.view == 'steps']
  assert {r.steps for r in fixed} == {study.plan.fixed_steps} == {62}
  assert len(fixed) == 3 * 2 * 3  # batches x optimizers x grid
  distinct = {(r.optimizer, r.batch, r.lr, r.seed, r.steps) for r in study.runs}
  assert len(trainer.trained) == len(distinct) <= len(study.runs) - 2  # none trained twice
  largest = [r for r in fixed if r.batch == 128]
  assert len(largest) == 6 and all(r.steps == 62 for r in largest)
  assert bar.n == bar.total == study.planned_steps()


def test_through_the_service_only_the_lamb_runs_go_to_the_service():
  optimum = {'lamb': 0.01, 'adamw': 0.004, 'optax_lamb': 0.01}
  config = large_batch.StudyConfig(batches=(8, 32), epochs=0.5, extend=0, seeds=1,
                                   through_service=True)
  local, remote = _FakeTrainer(optimum), _FakeTrainer(optimum)
  study = large_batch.Study(config, local, service_trainer=remote)
  study.run_all()
  assert remote.trained and {r.optimizer for r in remote.trained} == {'lamb'}
  assert {r.optimizer for r in local.trained} == {'adamw', 'optax_lamb'}
