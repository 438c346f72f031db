"""`lamb-sharded study large-batch`: the plan, the flags, and a --quick run end to end."""

import json
import math
import os
import subprocess
import sys

import pytest

from studies import large_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _cli(*args, timeout=60):
  return subprocess.run([sys.executable, '-m', 'service.cli', 'study', *args], cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                        timeout=timeout)


def test_batches_with_too_few_steps_are_dropped():
  config = large_batch.StudyConfig(batches=(8, 32, 128, 512), epochs=0.15, min_steps=50)
  p = large_batch.plan(config, num_windows=62_842)  # the default task's
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
  done = _cli('large-batch', '--quick', '--out', os.devnull + '-never', *flags)
  assert done.returncode == 2, done.stderr
  lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and flag in lines[0] and 'study' in lines[0], done.stderr


def test_quick_study_writes_the_table_and_both_optimizers_learn(tmp_path):
  out = tmp_path / 'study'
  done = _cli('large-batch', '--quick', '--out', str(out), timeout=600)
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
    assert (out / name).read_bytes()[:8] == PNG_MAGIC
