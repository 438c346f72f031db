"""`lamb-sharded demo` end to end: the real CLI, a real server and real worker processes."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from service.examples import demo
from service.examples.progress import Progress
from service.client import OptimizerClient
from svc import ROOT

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _demo(out, *flags, stderr=None):
  return subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'demo', '--out', str(out), *flags],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, stdout=subprocess.PIPE,
      stderr=stderr, text=True)


def _started(line: str):
  """(port, server pid, worker pids) from the demo's first line."""
  m = re.search(r'server 127\.0\.0\.1:(\d+) \(pid (\d+)\), \d+ workers \(pids ([\d ]+)\)', line)
  assert m, line
  return int(m.group(1)), int(m.group(2)), [int(p) for p in m.group(3).split()]


def _assert_gone(pids):
  for pid in pids:
    alive = psutil.pid_exists(pid)
    if alive:  # the pid may have been reused: only a process of ours counts
      try:
        alive = 'service.cli' in ' '.join(psutil.Process(pid).cmdline())
      except psutil.Error:
        alive = False
    assert not alive, f'process {pid} outlived the demo'


def test_short_demo_trains_and_leaves_nothing_behind(tmp_path):
  out = tmp_path / 'demo'
  with open(tmp_path / 'stderr.txt', 'w', encoding='utf-8') as err:
    proc = _demo(out, '--workers', '2', '--steps', '30', '--batch-size', '256', stderr=err)
    stdout, _ = proc.communicate(timeout=240)
  stderr = (tmp_path / 'stderr.txt').read_text()
  assert proc.returncode == 0, stdout + stderr
  _, server_pid, worker_pids = _started(stdout.splitlines()[0])
  assert 'test accuracy' in stdout and 'training' in stderr  # the table; the progress bar

  summary = json.loads((out / 'summary.json').read_text())
  for key in ('accuracy', 'steps', 'wall_seconds', 'workers', 'devices', 'final_loss'):
    assert key in summary, key
  assert summary['steps'] == 30
  assert summary['workers'] == 2 and summary['devices'] == 8
  assert 0.5 < summary['accuracy'] <= 1.0  # 30 steps: well above chance (0.1)
  assert summary['final_loss'] < 0.5 * summary['first_loss']
  assert [s for s, _ in summary['loss_curve']] == list(range(30))
  assert summary['worker_restarts'] == 0 and summary['server_exit_code'] == 0
  assert summary['pids'] == {'server': server_pid, 'workers': worker_pids}
  assert (out / 'loss.png').read_bytes()[:8] == PNG_MAGIC
  assert (out / 'server.yaml').exists()
  _assert_gone([server_pid, *worker_pids])

  # --resume continues from the final checkpoint the server wrote when it was stopped.
  with open(tmp_path / 'stderr2.txt', 'w', encoding='utf-8') as err:
    proc = _demo(out, '--workers', '2', '--steps', '40', '--batch-size', '256', '--resume',
                 stderr=err)
    stdout, _ = proc.communicate(timeout=240)
  stderr = (tmp_path / 'stderr2.txt').read_text()
  assert proc.returncode == 0, stdout + stderr
  # Nothing a user has to read past: no fork warning, no library's notes.
  for noise in ('RuntimeWarning', 'os.fork()', 'WARNING:absl', 'read only'):
    assert noise not in stderr, stderr
  resumed = json.loads((out / 'summary.json').read_text())
  assert resumed['resumed'] and resumed['start_step'] == 30 and resumed['steps'] == 40
  _, server_pid, worker_pids = _started(stdout.splitlines()[0])
  _assert_gone([server_pid, *worker_pids])
  # The history, the summary and the plot cover both runs: every step's training loss,
  # the held-out loss measured in each run, and where the second run resumed.
  history = json.loads((out / 'history.json').read_text())
  assert [s for s, _ in history['train_loss']] == list(range(40))
  assert history['train_loss'][:30] == summary['loss_curve']
  test_steps = [s for s, _ in history['test_loss']]
  assert test_steps == sorted(set(test_steps)) and test_steps[0] == 0 and test_steps[-1] == 40
  assert any(s < 30 for s in test_steps) and any(30 <= s < 40 for s in test_steps)
  assert history['resumed_at'] == [30]
  assert resumed['loss_curve'] == history['train_loss']
  assert resumed['test_loss_curve'] == history['test_loss']
  assert history['test_loss'][-1][1] < 0.5 * history['test_loss'][0][1]
  assert 'held-out loss' in stdout and 'step 0 -> 40' in stdout


def test_a_killed_worker_is_restarted_and_the_run_finishes(tmp_path):
  """The straggler policy: steps go on with quorum workers-1; the dead worker is restarted."""
  out = tmp_path / 'demo'
  steps = 45
  with open(tmp_path / 'stderr.txt', 'w', encoding='utf-8') as err:
    proc = _demo(out, '--workers', '3', '--steps', str(steps), '--batch-size', '255',
                 stderr=err)
    try:
      port, server_pid, worker_pids = _started(proc.stdout.readline())
      with OptimizerClient(f'127.0.0.1:{port}') as client:
        assert client.wait_for_step(8, timeout=120)[1]
      os.kill(worker_pids[-1], signal.SIGKILL)
      stdout, _ = proc.communicate(timeout=240)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = (tmp_path / 'stderr.txt').read_text()
  assert proc.returncode == 0, stdout + stderr
  assert f'worker 2 (pid {worker_pids[-1]}) exited with signal SIGKILL' in stdout
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['steps'] == steps
  assert summary['worker_restarts'] == 1
  restart = summary['restarts'][0]
  assert restart['worker'] == 2 and restart['pid'] == worker_pids[-1]
  assert summary['pids']['workers'] == worker_pids + [restart['replacement_pid']]
  assert summary['final_loss'] < 0.5 * summary['first_loss']
  _assert_gone([server_pid, *summary['pids']['workers']])


def test_ctrl_c_says_how_to_resume(tmp_path):
  out = tmp_path / 'demo'
  proc = _demo(out, '--workers', '2', '--steps', '1000', '--batch-size', '256',
               stderr=subprocess.PIPE)
  try:
    port, server_pid, worker_pids = _started(proc.stdout.readline())
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      assert client.wait_for_step(5, timeout=120)[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, stderr
  assert 'Traceback' not in stderr, stderr
  assert 'WARNING:absl' not in stderr and 'read only' not in stderr, stderr
  m = re.search(r'stopped at step (\d+) \(checkpointed\); to resume:\n  (.*)\n', stderr)
  assert m, stderr
  assert m.group(2) == (f'lamb-sharded demo --out {out} --workers 2 --devices 8 --steps 1000 '
                        '--batch-size 256 --seed 0 --resume')
  step = int(m.group(1))
  assert step >= 5 and demo._latest_checkpoint(str(out / 'checkpoints')) == step  # pylint: disable=protected-access
  history = json.loads((out / 'history.json').read_text())  # what a resume carries on
  assert [s for s, _ in history['train_loss']][:5] == list(range(5))
  _assert_gone([server_pid, *worker_pids])


def test_stopping_counts_the_losses_the_workers_reported_before_they_stopped(tmp_path):
  """An interrupted run saves its history after stop_all: the pushes still queued count."""
  state = demo._Run(str(tmp_path), workers=1, devices=1, steps=10, batch_size=4, seed=0)  # pylint: disable=protected-access
  line = Progress('push', 0, 0, 0.0, step=4, loss=0.25, examples=4, applied=True).line()
  proc = subprocess.Popen(  # a worker that reported one push, then waits to be stopped
      [sys.executable, '-c', f'import time; print({line!r}, flush=True); time.sleep(60)'],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
  reader = threading.Thread(target=state._read_worker, args=(0, proc, str(tmp_path / 'w.log')),  # pylint: disable=protected-access
                            daemon=True)
  state.workers[0] = demo._Worker(0, proc, str(tmp_path / 'w.log'), reader)  # pylint: disable=protected-access
  reader.start()
  deadline = time.monotonic() + 30
  while state.events.qsize() == 0 and time.monotonic() < deadline:  # queued, not handled
    time.sleep(0.01)
  state.stop_all()
  assert proc.returncode is not None
  assert state.losses == {4: {0: (0.25, 4)}}
  assert state.restarts == []  # its exit while stopping starts no replacement


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
  assert demo.run(resume=True, out=str(tmp_path / 'demo')) == 1
  assert '--resume: no checkpoint to resume from' in capsys.readouterr().err
  assert not (tmp_path / 'demo').exists()  # nothing started, nothing written


def test_bad_batch_size_is_refused_before_anything_starts(tmp_path, capsys):
  assert demo.run(workers=3, batch_size=256, out=str(tmp_path / 'demo')) == 1
  assert 'not a multiple of --workers 3' in capsys.readouterr().err
