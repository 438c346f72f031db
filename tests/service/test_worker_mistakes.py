"""The mistakes a worker makes, caught at once: each a real server and a real `lamb-sharded
worker` process, a one-line error (or message) naming the flag, and the model untouched."""

import logging
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from service.client import ModelMismatch, model_difference
from service.examples.models import Regression
from service.protocol.specs import LeafSpec
from svc import ROOT, push_messages, running_server, stub

WORKER_TIMEOUT_S = 120


def worker(port: int, *args: str, timeout: float = WORKER_TIMEOUT_S) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
       '--batch-size', '8', '--connect-timeout', '30', *args],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=timeout, check=False)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  lines = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  return lines[0]


def regression_params(sizes=(16, 64, 64, 4)) -> dict:
  return Regression(sizes=sizes).init(0)


def test_a_worker_whose_model_differs_is_told_which_leaf_and_how():
  with running_server(devices=1) as (running, client):
    client.initialize(regression_params((16, 64, 64, 5)))  # the last layer: 5 outputs, not 4
    before = client.pull().params
    proc = worker(str(running.port), '--worker-index', '0', '--steps', '3')
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "--model" in line and "leaf ['layer2']['b']" in line, line
    assert 'float32[5]' in line and 'float32[4]' in line, line  # the server's, the worker's
    after = client.pull()
    assert after.step == 0
    for path, value in before.items():
      np.testing.assert_array_equal(after.params[path], value)


def test_model_difference_names_missing_extra_and_reshaped_leaves():
  server = [LeafSpec("['a']", (2, 3), np.dtype('float32')),
            LeafSpec("['b']", (3,), np.dtype('float32'))]
  assert model_difference(server, {'a': np.zeros((2, 3), np.float32),
                                   'b': np.zeros(3, np.float32)}) is None
  assert model_difference(server, {'a': np.zeros((2, 3), np.float32)}) == \
      "leaf ['b'] (float32[3]) is the server's, not this worker's"
  text = model_difference(server, {'a': np.zeros((3, 2), np.float32), 'c': np.zeros(1)})
  assert text.startswith("leaf ['a']: the server's is float32[2, 3], this worker's "
                         "float32[3, 2]"), text
  assert text.endswith('(and 2 more leaf differences)'), text
  assert 'float16' in model_difference(server[1:], {'b': np.zeros(3, np.float16)})


def test_a_pull_into_a_model_of_other_shapes_raises_model_mismatch():
  with running_server(devices=1) as (running, client):
    client.initialize({'w': np.zeros(12, np.float32)})
    with pytest.raises(ModelMismatch, match=r"leaf \['w'\]: the server's is float32\[12\], "
                                            r"this worker's float32\[10\]"):
      client.pull(like={'w': np.zeros(10, np.float32)})
    assert client.pull(like={'w': np.zeros(12, np.float32)}).params['w'].shape == (12,)


def test_a_worker_without_init_says_at_once_how_the_server_gets_a_model(tmp_path):
  with running_server(devices=1) as (running, client):
    port = str(running.port)
    log = open(tmp_path / 'worker.log', 'w+')  # pylint: disable=consider-using-with
    proc = subprocess.Popen(
        [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
         '--worker-index', '0', '--steps', '1', '--batch-size', '8'],
        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, stdout=subprocess.DEVNULL,
        stderr=log, text=True)
    try:
      deadline = time.monotonic() + 60
      while 'no model yet' not in (text := (tmp_path / 'worker.log').read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, text
        time.sleep(0.1)
      line = next(l for l in text.splitlines() if 'no model yet' in l)
      assert '--init' in line and '--init-params' in line, line
      assert 'FAILED_PRECONDITION' not in text, text
      client.initialize(regression_params())  # a model arrives: the worker trains
      assert proc.wait(timeout=WORKER_TIMEOUT_S) == 0, (tmp_path / 'worker.log').read_text()
      assert client.pull().step == 1
    finally:
      if proc.poll() is None:
        proc.kill()
      log.close()


@pytest.mark.parametrize('flags,named', [
    (('--worker-index', '5', '--num-workers', '2'), '--num-workers 2'),
    (('--worker-index', '5', '--num-workers', '3'), '--worker-index 5'),
])
def test_worker_flags_that_do_not_match_the_server_are_refused_at_start(flags, named):
  with running_server(devices=1, num_workers=3) as (running, client):
    client.initialize(regression_params())
    proc = worker(str(running.port), '--steps', '3', *flags)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert named in line and 'the server trains with 3 worker' in line, line
    assert client.pull().step == 0


def test_the_server_refuses_a_worker_index_outside_its_worker_count():
  with running_server(devices=1, num_workers=3) as (running, client):
    leaves = [('w', np.ones(4, np.float32))]
    client.initialize(dict(leaves))
    before = client.pull().params["['w']"].copy()
    with pytest.raises(grpc.RpcError) as e:
      stub(running.port).PushGradients(
          iter(push_messages([("['w']", a) for _, a in leaves], worker_id='worker-3',
                             push_id='p')), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'worker-3' in e.value.details() and '3 worker(s), worker-0 .. worker-2' in \
        e.value.details(), e.value.details()
    # Ids of another form are the operator's to choose; worker-2 is in range.
    for worker_id in ('worker-2', 'trainer-7'):
      stub(running.port).PushGradients(
          iter(push_messages([("['w']", a) for _, a in leaves], worker_id=worker_id,
                             push_id=worker_id)), timeout=30)
    np.testing.assert_array_equal(client.pull().params["['w']"], before)


def test_a_worker_whose_steps_are_done_says_so():
  with running_server(devices=1) as (running, client):
    client.initialize(regression_params())
    proc = worker(str(running.port), '--worker-index', '0', '--steps', '0')
    assert proc.returncode == 0, proc.stderr
    assert 'at or past --steps 0: nothing to train' in proc.stderr, proc.stderr


def test_several_init_workers_are_the_normal_case_not_a_warning(caplog):
  with running_server(devices=1) as (running, client):
    with caplog.at_level(logging.INFO, logger='service'):
      client.initialize(regression_params())
      with pytest.raises(grpc.RpcError) as e:
        client.initialize(regression_params())
      assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    refused = [r for r in caplog.records if 'InitializeModel refused' in r.getMessage()]
    assert refused and all(r.levelno == logging.INFO for r in refused), \
        [(r.levelname, r.getMessage()) for r in refused]
