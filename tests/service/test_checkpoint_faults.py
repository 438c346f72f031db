"""Checkpoint faults, from outside: unreadable or newer checkpoints, foreign and unwritable
directories (a real `lamb-sharded serve`), saves that fail (a checkpoint directory that turns
into a file under a running server), and ListCheckpoints while a save is in flight."""

import asyncio
import glob
import logging
import os
import re
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from service.core import checkpoint as checkpoint_lib
from service.core.checkpoint import Checkpointer
from service.examples import status
from service.server.metrics import sample
from svc import ROOT, pb, running_server, start_server_process, stub, until

P0 = {"['w']": np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4),
      "['b']": np.linspace(0.5, 1, 8, dtype=np.float32)}
GRADS = {k: np.full_like(v, 0.1) for k, v in P0.items()}
FAILURES = 'lamb_sharded_checkpoint_failures_total'
LAST_SUCCESS = 'lamb_sharded_checkpoint_last_success_timestamp_seconds'


def _serve(*flags, timeout=90):
  """`lamb-sharded serve` that is expected to stop at start: (exit status, stderr)."""
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--devices', '1', '--metrics-port', '-1', *flags],
      env={**os.environ, 'PYTHONPATH': ROOT}, cwd=ROOT, capture_output=True, text=True,
      timeout=timeout)
  return proc.returncode, proc.stderr


def _error_line(stderr):
  """The CLI's one line of error: the last line, `lamb-sharded serve: error: ...`."""
  lines = stderr.strip().splitlines()
  assert lines and lines[-1].startswith('lamb-sharded serve: error: '), stderr
  assert 'Traceback' not in stderr, stderr
  return lines[-1]


def _train(ckpt, steps=3):
  """A run that leaves checkpoints of its last steps (the newest 3) in `ckpt`."""
  with running_server(devices=1, checkpoint_dir=str(ckpt), checkpoint_every_steps=1,
                      async_checkpoints=False) as (_, client):
    client.initialize(P0)
    for step in range(steps):
      client.push(step, GRADS, 1, 'w')
  return Checkpointer(str(ckpt)).steps()


def _truncate(ckpt, step):
  for f in glob.glob(str(ckpt / str(step) / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      with open(f, 'r+b') as fh:
        fh.truncate(os.path.getsize(f) // 3)


def test_every_checkpoint_unreadable_stops_serve_unless_told_to_discard_them(tmp_path):
  ckpt = tmp_path / 'ckpt'
  steps = _train(ckpt)
  assert steps == [1, 2, 3]  # the newest 3 kept
  for step in steps:
    _truncate(ckpt, step)
  code, err = _serve('--checkpoint-dir', str(ckpt))
  assert code == 1, err
  line = _error_line(err)
  assert f'--checkpoint-dir {ckpt}' in line and 'none of its 3 checkpoints' in line, line
  assert '--discard-unreadable-checkpoints' in line
  assert Checkpointer(str(ckpt)).steps() == steps  # nothing deleted
  # The operator says so: the unreadable checkpoints go, the server starts without a model.
  server, port = start_server_process('--devices', '1', '--checkpoint-dir', str(ckpt),
                                      '--discard-unreadable-checkpoints', 'true')
  try:
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      assert not client.describe().initialized
      assert client.list_checkpoints() == []
  finally:
    server.kill()
    server.wait(timeout=30)


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path, monkeypatch):
  ckpt = tmp_path / 'ckpt'
  _train(ckpt, steps=1)
  monkeypatch.setattr(checkpoint_lib, 'FORMAT', checkpoint_lib.FORMAT + 1)
  with running_server(devices=1, checkpoint_dir=str(ckpt), async_checkpoints=False,
                      discard_unreadable_checkpoints=False) as (_, client):
    client.push(1, GRADS, 1, 'w')  # a newer server writes step 2 in its format
  code, err = _serve('--checkpoint-dir', str(ckpt))
  assert code == 1, err
  line = _error_line(err)
  assert (f'--checkpoint-dir {ckpt}: checkpoint 2 is of format {checkpoint_lib.FORMAT}' in line
          and f'this lamb-sharded reads format {checkpoint_lib.FORMAT - 1}' in line), line
  # Not even with the flag: a newer server's checkpoints are not unreadable, nor discarded.
  code, err = _serve('--checkpoint-dir', str(ckpt), '--discard-unreadable-checkpoints', 'true')
  assert code == 1 and 'is of format' in _error_line(err)
  assert 2 in Checkpointer(str(ckpt)).steps()


@pytest.mark.parametrize('moments', ['int4', 'int8'])
def test_4_bit_moments_of_format_1_are_refused_not_misread(tmp_path, monkeypatch, moments):
  """Format 1 packed 4-bit codes 2j and 2j + 1 in a byte, this version j and j + L/2 of a
  block: same shapes, other codes. Such a checkpoint is refused, naming the format; one of
  format 1 with int8 moments (their layout unchanged) restores."""
  ckpt = tmp_path / 'ckpt'
  w = {"['w']": np.linspace(-1, 1, 64 * 128, dtype=np.float32).reshape(64, 128)}  # quantized
  monkeypatch.setattr(checkpoint_lib, 'FORMAT', 1)  # as the version before wrote it
  with running_server(devices=1, checkpoint_dir=str(ckpt), moments=moments,
                      async_checkpoints=False) as (_, client):
    client.initialize(w)
    client.push(0, {k: np.full_like(v, 0.1) for k, v in w.items()}, 1, 'w')
  assert Checkpointer(str(ckpt)).read_meta(1)['format'] == 1
  monkeypatch.undo()
  if moments == 'int4':
    code, err = _serve('--checkpoint-dir', str(ckpt), '--moments', moments)
    assert code == 1, err
    line = _error_line(err)
    assert (f'--checkpoint-dir {ckpt}: its checkpoints are of format 1, whose 4-bit moments '
            f'(--moments int4)' in line and f'(format {checkpoint_lib.FORMAT})' in line), line
    assert Checkpointer(str(ckpt)).steps() == [0, 1]  # untouched
  else:
    with running_server(devices=1, checkpoint_dir=str(ckpt), moments=moments) as (_, client):
      assert client.describe().step == 1


def test_foreign_files_are_left_alone_and_a_foreign_step_directory_is_unreadable(tmp_path):
  ckpt = tmp_path / 'ckpt'
  (ckpt / 'lost+found').mkdir(parents=True)
  (ckpt / 'notes.txt').write_text('mine')
  with running_server(devices=1, checkpoint_dir=str(ckpt), checkpoint_every_steps=1,
                      keep_checkpoints=1, async_checkpoints=False) as (_, client):
    client.initialize(P0)
    for step in range(3):
      client.push(step, GRADS, 1, 'w')
  assert Checkpointer(str(ckpt)).steps() == [3]
  assert (ckpt / 'notes.txt').read_text() == 'mine' and (ckpt / 'lost+found').is_dir()
  # A directory named like a step, holding something else: not restorable, so refused.
  other = tmp_path / 'other'
  (other / '7').mkdir(parents=True)
  (other / '7' / 'data.bin').write_bytes(b'\0' * 100)
  code, err = _serve('--checkpoint-dir', str(other))
  assert code == 1, err
  assert 'none of its 1 checkpoints (steps [7])' in _error_line(err)


def test_an_unwritable_checkpoint_dir_is_found_at_start(tmp_path):
  blocker = tmp_path / 'a-file'
  blocker.write_text('x')
  code, err = _serve('--checkpoint-dir', str(blocker / 'ckpt'))
  assert code == 1, err
  line = _error_line(err)
  assert f'--checkpoint-dir {blocker / "ckpt"}: cannot write there' in line, line


def _metrics(running):
  return running.metrics.text()


@pytest.mark.parametrize('asynchronous', [True, False])
def test_a_failing_save_never_fails_a_push_is_logged_once_counted_and_retried(
    tmp_path, caplog, asynchronous):
  ckpt = tmp_path / 'ckpt'
  away = tmp_path / 'away'
  caplog.set_level(logging.INFO)
  with running_server(devices=1, checkpoint_dir=str(ckpt), checkpoint_every_steps=1,
                      async_checkpoints=asynchronous) as (running, client):
    client.initialize(P0)
    until(lambda: sample(_metrics(running), LAST_SUCCESS) > 0)
    first_success = sample(_metrics(running), LAST_SUCCESS)
    assert sample(_metrics(running), FAILURES) == 0
    # The disk goes away: the directory is a file now (as root, chmod would not stop us).
    os.rename(ckpt, away)
    ckpt.write_text('not a directory')
    for step in range(4):  # each step is a save point; every save fails
      r = client.push(step, GRADS, 1, 'w', push_id=f'p{step}')
      assert r.applied and not r.duplicate
      again = client.push(step, GRADS, 1, 'w', push_id=f'p{step}')  # its retry
      assert again.accepted_step == step and again.duplicate
    until(lambda: sample(_metrics(running), FAILURES) >= 4)
    assert sample(_metrics(running), LAST_SUCCESS) == first_success
    report = status.gather(f'127.0.0.1:{running.port}', f'127.0.0.1:{running.metrics_port}')
    text = status.as_text(report)
    assert re.search(r'\nsaving +failing: \d+ in a row', text), text
    # Asked for explicitly, a failing save is UNAVAILABLE (retry later), not UNKNOWN.
    with pytest.raises(grpc.RpcError) as refused:
      stub(running.port).SaveCheckpoint(pb.SaveCheckpointRequest(wait=True), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert 'could not be written' in refused.value.details()
    # The disk is back: the next save point writes.
    ckpt.unlink()
    os.rename(away, ckpt)
    client.push(4, GRADS, 1, 'w', push_id='p4')
    until(lambda: sample(_metrics(running), LAST_SUCCESS) > first_success)
    text = status.as_text(status.gather(f'127.0.0.1:{running.port}',
                                         f'127.0.0.1:{running.metrics_port}'))
    assert re.search(r'\nsaving +last written \d+s ago', text), text
  failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
  # One line for the streak (not Orbax's tracebacks, several per failed save).
  assert len(failed) == 1, [r.getMessage()[:200] for r in failed]
  assert 'failed' in failed[0].getMessage() and failed[0].exc_info is None
  assert any('checkpoints are written again' in r.getMessage() for r in caplog.records)
  steps = Checkpointer(str(ckpt)).steps()
  assert steps[-1] == 5, steps  # written at the save point after the streak (and on stop)


def test_list_checkpoints_lists_a_save_in_flight_as_not_complete(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  release, renaming = threading.Event(), threading.Event()
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_finalize(self, *args, **kwargs):  # a slow disk: the save is not on disk yet
    renaming.set()
    await asyncio.to_thread(release.wait, 60)
    return await real(self, *args, **kwargs)

  with running_server(devices=1, checkpoint_dir=str(tmp_path / 'ckpt'), checkpoint_every_steps=0,
                      checkpoint_every_seconds=0, async_checkpoints=True) as (running, client):
    client.initialize(P0)
    until(lambda: [(c.step, c.complete) for c in client.list_checkpoints()] == [(0, True)])
    client.push(0, GRADS, 1, 'w')
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', slow_finalize)
    try:
      assert client.save_checkpoint(wait=False)[0] == 1
      assert renaming.wait(30)
      listed = [(c.step, c.complete) for c in client.list_checkpoints()]
      assert listed == [(0, True), (1, False)], listed
      text = status.as_text(status.gather(f'127.0.0.1:{running.port}'))
      assert 'checkpoints  1 on disk, newest step 0' in text and 'writing step 1' in text, text
    finally:
      release.set()
    until(lambda: [(c.step, c.complete) for c in client.list_checkpoints()] ==
          [(0, True), (1, True)])


def test_a_failed_synchronous_save_does_not_stop_the_time_policy(tmp_path):
  """Orbax leaves its "saving in progress" mark set after a failed synchronous save; its time
  policy would then never save again (--checkpoint-every-seconds with --async-checkpoints false)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ckpt = tmp_path / 'ckpt'
  checkpointer = Checkpointer(str(ckpt), every_seconds=0.1, asynchronous=False)
  state = {'params': [jnp.ones(4)], 'opt_state': [jnp.zeros(4)]}
  try:
    assert checkpointer.save(0, state, {'leaves': []}, force=True)
    os.rename(ckpt, tmp_path / 'away')
    ckpt.write_text('not a directory')
    with pytest.raises(OSError):
      checkpointer.save(1, state, {'leaves': []}, force=True)
    ckpt.unlink()
    os.rename(tmp_path / 'away', ckpt)
    time.sleep(0.3)
    assert checkpointer.should_save(2)
    assert checkpointer.save(2, state, {'leaves': []})
    assert checkpointer.steps() == [0, 2]
  finally:
    checkpointer.close()
