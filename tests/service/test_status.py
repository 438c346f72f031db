"""`lamb-sharded status` against a real server: what DescribeModel, ListCheckpoints and the
metrics say, as JSON and as text."""

import json
import os
import re
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
  # Each worker's last counted push, newest first (b's refused one is not counted).
  seen = report['workers_seen']
  assert [(w['worker_id'], w['last_step']) for w in seen] == [('a', 1), ('b', 0)]
  assert 0 <= seen[0]['seconds_ago'] <= seen[1]['seconds_ago'] < 60
  assert 'workers      2 expected, 2 seen since start (newest first):' in text
  assert re.search(r'\n {13}a  last push into step 1, \d+\.\ds ago\n {13}b  last push into '
                   r'step 0, ', text), text
  assert 'checkpoints  2 on disk, newest step 1' in text


def test_status_of_a_server_without_a_model():
  with running_server(devices=1) as (running, _):
    report = json.loads(_status('--server', f'127.0.0.1:{running.port}', '--json'))
    text = _status('--server', f'127.0.0.1:{running.port}')
  assert (report['initialized'], report['step'], report['checkpoints']) == (False, 0, None)
  assert report['workers_seen'] == [] and 'workers      1 expected, 0 seen since start\n' in text
  assert 'model        none yet' in text and 'checkpoints  off (no --checkpoint-dir)' in text


def test_status_before_the_first_checkpoint(tmp_path):
  with running_server(devices=1, checkpoint_dir=str(tmp_path)) as (running, _):
    report = json.loads(_status('--server', f'127.0.0.1:{running.port}', '--json'))
  assert report['checkpoints'] == []


def test_the_engine_remembers_the_most_recently_seen_workers(monkeypatch):
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from service.protocol.specs import LeafSpec  # pylint: disable=import-outside-toplevel
  from svc import push_arrays  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(engine_lib, 'MAX_WORKERS_SEEN', 3)
  engine = engine_lib.Engine(ServerConfig(devices=1, step_mode='async', staleness_bound=1))
  try:
    engine.initialize([LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()],
                      [v.copy() for v in P0.values()])
    grads = {k: np.full_like(v, 0.1) for k, v in P0.items()}
    for step, worker in enumerate(['w0', 'w1', 'w2', 'w3', 'w1']):
      push_arrays(engine, worker, step, grads)
    with pytest.raises(Exception, match='stale|applied'):  # too stale: not counted
      push_arrays(engine, 'w9', 0, grads)
    seen = engine.workers_seen()
  finally:
    engine.close()
  # The last 3 distinct workers, most recent last; w0 was forgotten, w9 never counted.
  assert [(w, step) for w, step, _ in seen] == [('w2', 2), ('w3', 3), ('w1', 4)]
  assert seen[0][2] >= seen[1][2] >= seen[2][2] >= 0
