"""`lamb-sharded study diloco`: the plan, the flags, the bytes against the server's counters,
and a --quick run end to end."""

import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import tqdm

from studies import charlm, diloco, diloco_runs
from studies.diloco_runs import Method
import study_cli  # tests/studies/study_cli.py


def test_push_bytes_per_codec_send_small_leaves_as_float32():
  sizes = [1000, 255, 256]  # 255: under one block of 256, sent as float32 by the client
  assert diloco_runs.push_bytes(sizes, 'none') == 4 * 1511
  assert diloco_runs.push_bytes(sizes, 'bf16') == 2 * 1511
  assert diloco_runs.push_bytes(sizes, 'int8') == (4 * 4 + 1000) + 4 * 255 + (4 + 256)
  assert diloco_runs.push_bytes(sizes, 'int4') == (4 * 4 + 500) + 4 * 255 + (4 + 128)
  pushed, pulled = diloco_runs.expected_bytes(sizes, Method(local_steps=5), rounds=3)
  assert (pushed, pulled) == (3 * 4 * 1511, 4 * 4 * 1511)  # a pull per round, and the last


@pytest.mark.parametrize('flags, flag', [
    (['--steps', '0'], '--steps'),
    (['--steps', '105'], '--local-steps'),  # 10 does not divide 105
    (['--local-steps', '1'], '--local-steps'),
    (['--lamb-lrs', '0.01,x'], '--lamb-lrs'),
    (['--seeds', '0'], '--seeds'),
    (['--inner-lr', '-1'], '--inner-lr'),
])
def test_a_usage_error_is_one_line_naming_the_flag(flags, flag):
  done = study_cli.study('diloco', '--quick', '--out', os.devnull + '-never', *flags)
  assert done.returncode == 2, done.stderr
  lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and flag in lines[0] and 'study' in lines[0], done.stderr


class _FakeTrainer:
  """Held-out loss by method: the study's choices without training. Outer LAMB's best lr is
  0.01 at H = 10 (the grid's centre) and 0.3 at H = 50 (past the grid's upper edge, 0.15)."""

  LOSS = {'nesterov': 2.03, 'sgd': 2.1}

  def __init__(self):
    self.trained = []

  def loss(self, m):
    if m.local_steps == 1:
      return 2.0
    if m.outer == 'lamb':
      best = 0.01 if m.local_steps == 10 else 0.3
      return 2.15 + 0.1 * math.log(m.lr / best, 3) ** 2 - 0.2 * m.exclude_biases
    return self.LOSS[m.outer] + 0.001 * m.local_steps / 10

  def train(self, run, init_params, on_step):
    m = run.method
    run.heldout_loss = self.loss(m) + 0.01 * (m.codec != 'none')
    run.rounds = run.steps // m.local_steps
    run.pushed_bytes, run.pulled_bytes = diloco_runs.expected_bytes([100], m, run.rounds)
    self.trained.append((run, init_params))
    on_step(run.steps)


def test_the_study_runs_each_method_from_its_seeds_warm_start_and_the_bar_counts_every_step():
  config = diloco.DilocoConfig(steps=100, seeds=2, longer=True)
  trainer, bar = _FakeTrainer(), tqdm.tqdm(total=0, file=io.StringIO())
  study = diloco.Study(config, trainer, {0: 'warm-0.npz', 1: 'warm-1.npz'}, bar)
  study.run_all()
  assert bar.n == bar.total == sum(r.steps for r, _ in trainer.trained)
  assert all(path == f'warm-{r.seed}.npz' for r, path in trainer.trained)
  seed0 = [r.method for r in study.runs if r.seed == 0 and r.horizon == 'default']
  assert seed0[0] == Method(1, 'lamb', 0.02)  # (1)
  at_10 = [m for m in seed0 if m.local_steps == 10]
  # (2): nesterov, sgd, lamb at each lr, lamb's best lr without trust ratio on the biases
  assert [(m.outer, m.lr, m.exclude_biases) for m in at_10[:6]] == [
      ('nesterov', 0.7, False), ('sgd', 1.0, False), ('lamb', 0.003, False),
      ('lamb', 0.01, False), ('lamb', 0.03, False), ('lamb', 0.01, True)]
  # (3): the best of (2) -- here lamb without trust ratio on the biases -- with the codecs
  assert [(m.codec, m.pull_dtype) for m in at_10[6:]] == [('int8', 'bfloat16'),
                                                          ('int4', 'bfloat16')]
  assert all(m.outer == 'lamb' and m.exclude_biases for m in at_10[6:])
  # At H = 50 the grid is x5 (lr ∝ H), and its best on the upper edge extends it once, x3.
  lamb_50 = [m.lr for m in seed0 if m.local_steps == 50 and m.outer == 'lamb'
             and not m.exclude_biases and m.codec == 'none']
  assert lamb_50 == [0.015, 0.05, 0.15, 0.45]
  seed1 = [r.method for r in study.runs if r.seed == 1]
  assert seed1 == [Method(1, 'lamb', 0.02), at_10[5],
                   Method(50, 'lamb', 0.45, exclude_biases=True)]
  longer = [r for r in study.runs if r.horizon == 'longer']
  assert [r.steps for r in longer] == [400] * 9  # (1); nesterov, lamb and (3) at each H
  assert [r.method.codec for r in longer if r.method.local_steps == 50] == [
      'none', 'none', 'int8', 'int4']


def test_the_bytes_the_study_computes_are_the_servers_counters(tmp_path):
  """A run through a real server and 4 workers: int4 pushes (small leaves as float32) and
  bfloat16 pulls, as computed, per worker, as the server's Prometheus counters say."""
  task = charlm.small()
  trainer = diloco_runs.LocalStepsTrainer(task, 'studies.charlm:small', 4, str(tmp_path),
                                          inner_lr=1e-3)
  warm = diloco_runs.warm_start_file(task.init(0), str(tmp_path / 'warm.npz'))
  run = diloco_runs.DilocoRun(Method(5, 'nesterov', 0.7, 0.9, codec='int4',
                                     pull_dtype='bfloat16'), seed=0, steps=10, local_batch=4)
  trainer.train(run, warm)
  assert run.rounds == 2 and math.isfinite(run.heldout_loss)
  m = run.measured
  assert m['local_steps'] == 4 * 10  # every worker's inner steps
  assert (m['pushed_per_worker'], m['pulled_per_worker']) == (run.pushed_bytes, run.pulled_bytes)
  n = task.num_params()
  assert run.pulled_bytes == 3 * 2 * n  # 2 rounds and the last pull, in bfloat16
  per_push = run.pushed_bytes / 2
  assert n / 2 < per_push < 4 * n / 6  # int4 codes, their scales, small leaves as float32


def test_quick_study_writes_the_table_and_training_learns(tmp_path):
  out = tmp_path / 'study'
  done = study_cli.study('diloco', '--quick', '--out', str(out), timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert 'study' in done.stderr  # the progress bar
  summary = json.loads((out / 'results.json').read_text())
  rows = summary['rows']
  assert [(r['local_steps'], r['outer'], r['method']['codec'], r['method']['pull_dtype'])
          for r in rows] == [(1, 'lamb', 'none', 'float32'), (10, 'nesterov', 'none', 'float32'),
                             (10, 'nesterov', 'int8', 'bfloat16')]
  warm = summary['warmup']['heldout_loss']
  assert warm < math.log(128) - 1.0  # the warm-up learnt
  for row in rows:
    assert row['mean'] < warm, row  # and every method learnt more from it
    assert row['bytes_match'], row  # computed = the server's counters
  assert [r['rounds'] for r in rows] == [100, 10, 10]
  assert rows[0]['ratio'] == 1.0 and 9 < rows[1]['ratio'] < 10 < 20 < rows[2]['ratio']
  table = (out / 'table.md').read_text()
  assert table.count('\n| default |') == 3 and 'agree for every run' in table
  assert table.splitlines()[0] in done.stdout
  for name in ('loss_vs_bytes.png', 'loss_curves.png'):
    assert study_cli.is_png(out / name)
  assert np.isfinite([r['wall_s'] for r in rows]).all()
