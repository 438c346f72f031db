"""`lamb-sharded status` against a real server: what DescribeModel, ListCheckpoints and the
metrics say, as JSON and as text."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from service.examples import status
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


def test_status_of_a_fleet_counts_workers_by_state():
  # 40 workers push step 0 (it completes), then 30 of them step 1: 10 are due.
  fleet = 40
  with running_server(devices=1, num_workers=fleet) as (running, client):
    client.initialize(P0)
    grads = {k: np.full_like(v, 0.1) for k, v in P0.items()}
    for step, workers in ((0, range(fleet)), (1, range(10, fleet))):
      for i in workers:
        client.push(step, grads, 1 + i % 3, f'worker-{i:02d}')
    server = f'127.0.0.1:{running.port}'
    report = json.loads(_status('--server', server, '--json'))
    text = _status('--server', server)
  # The JSON keeps every worker seen, and the counts.
  assert len(report['workers_seen']) == fleet
  assert report['worker_states'] == {'current': 30, 'previous': 10, 'behind': 0,
                                     'far_behind': 0, 'silent': 0}
  assert report['silent_after_s'] == status.SILENT_S
  # The text: counts by state and the 5 furthest behind (the first to push step 0), not
  # a line per worker.
  assert 'workers      40 expected, 40 seen since start:\n' in text
  assert re.search(r'\n {13}30 pushed into the current step 1\n {13}10 last pushed into step 0, '
                   r'their push for step 1 is due\n {13}furthest behind \(5 of 10\):\n', text), text
  named = re.findall(r'\n {13}(worker-\d\d)  last push into step 0, \d+\.\ds ago', text)
  assert named == [f'worker-{i:02d}' for i in range(5)], text
  assert len(text.splitlines()) < 20


def test_worker_states_and_the_slowest():
  step = 20
  seen = [{'worker_id': f'w{i}', 'last_step': last, 'seconds_ago': ago}
          for i, (last, ago) in enumerate([(20, 500.0), (19, 1.0), (19, 2.0), (15, 3.0),
                                           (11, 4.0), (10, 5.0), (3, 6.0), (19, 61.0),
                                           (5, 600.0), (20, 0.5), (20, 0.1), (18, 0.2)])]
  assert status.worker_states(seen, step) == {'current': 3, 'previous': 2, 'behind': 3,
                                              'far_behind': 2, 'silent': 2}
  assert [w['worker_id'] for w in status.slowest(seen, step)] == ['w6', 'w8', 'w5', 'w4', 'w3']
  report = {'server': 's', 'initialized': True, 'model_id': 'm', 'leaves': 2, 'parameters': 9,
            'step': step, 'learning_rate': 0.1, 'step_mode': 'sync', 'num_workers': 16,
            'quorum': 12, 'staleness_bound': 0, 'workers_seen': seen, 'checkpoints': None}
  text = status.as_text(report)
  assert ('workers      16 expected, 12 seen since start:\n'
          '             3 pushed into the current step 20\n'
          '             2 last pushed into step 19, their push for step 20 is due\n'
          '             3 behind by 2 to 9 steps\n'
          '             2 behind by 10 steps or more\n'
          '             2 silent: not in the current step, nothing counted for over 60s\n'
          '             furthest behind (5 of 9):\n'
          '             w6   last push into step 3, 6.0s ago\n') in text, text
  # Up to FEW_WORKERS: a line each, as before.
  report['workers_seen'] = seen[:status.FEW_WORKERS]
  assert 'seen since start (newest first):\n' in status.as_text(report)
  assert len(status.as_text(report).splitlines()) == 6 + status.FEW_WORKERS


def test_status_of_a_multi_process_server_shows_its_processes():
  report = {'server': 's', 'initialized': False, 'step': 0, 'step_mode': 'sync',
            'num_workers': 2, 'quorum': 2, 'staleness_bound': 0, 'workers_seen': [],
            'checkpoints': None,
            'processes': [{'index': 0, 'endpoint': 'h-0:50051'},
                          {'index': 1, 'endpoint': 'h-1:50051'}]}
  assert 'processes    2: 0 h-0:50051, 1 h-1:50051\n' in status.as_text(report)
  report['processes'] = []  # a single process: nothing to say
  assert 'processes' not in status.as_text(report)
