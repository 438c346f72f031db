"""`lamb-sharded status` against a real server: what DescribeModel, ListCheckpoints and the
metrics say, as JSON and as text."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from svc import ROOT, running_server

P0 = {"['w']": np.ones((16, 4), np.float32), "['b']": np.ones(8, np.float32)}


def _status(*argv):
  proc = subprocess.run([sys.executable, '-m', 'service.cli', 'status', *argv], cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def test_status_of_a_running_server(tmp_path):
  with running_server(devices=2, num_workers=2, quorum=1, checkpoint_dir=str(tmp_path),
                      checkpoint_every_steps=0, checkpoint_every_seconds=0) as (running, client):
    server = f'127.0.0.1:{running.port}'
    client.initialize(P0)  # (its save is the first: see the xfail below)
    grads = {k: np.full_like(v, 0.1) for k, v in P0.items()}
    client.push(0, grads, 3, 'a')
    client.push(0, grads, 3, 'b')  # completes step 0
    client.push(1, grads, 3, 'a')  # step 1 waits for b
    try:
      client.push(0, grads, 3, 'b')  # refused: step 0 is applied
    except Exception:  # pylint: disable=broad-except
      pass
    client.save_checkpoint(wait=True)
    report = json.loads(_status('--server', server, '--metrics',
                                f'127.0.0.1:{running.metrics_port}', '--json'))
    text = _status('--server', server)
  assert report['initialized'] and report['step'] == 1
  assert report['model_id'] == running.engine.describe().model_id
  assert (report['leaves'], report['parameters']) == (2, 72)
  assert (report['step_mode'], report['num_workers'], report['quorum']) == ('sync', 2, 1)
  assert [(c['step'], c['complete']) for c in report['checkpoints']] == [(0, True), (1, True)]
  m = report['metrics']
  assert (m['steps_applied'], m['pushes_accepted'], m['pushes_in_flight']) == (1, 3, 0)
  assert m['pushes_rejected'] == {'stale_step': 1}
  assert 'step         1 (learning rate now 0.001)' in text
  assert 'checkpoints  2 on disk, newest step 1' in text


def test_status_of_a_server_without_a_model():
  with running_server(devices=1) as (running, _):
    report = json.loads(_status('--server', f'127.0.0.1:{running.port}', '--json'))
    text = _status('--server', f'127.0.0.1:{running.port}')
  assert (report['initialized'], report['step'], report['checkpoints']) == (False, 0, None)
  assert 'model        none yet' in text and 'checkpoints  off (no --checkpoint-dir)' in text


def test_status_before_the_first_checkpoint(tmp_path):
  with running_server(devices=1, checkpoint_dir=str(tmp_path)) as (running, _):
    report = json.loads(_status('--server', f'127.0.0.1:{running.port}', '--json'))
  assert report['checkpoints'] == []
