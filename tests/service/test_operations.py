"""Operations: Prometheus metrics over HTTP, structured logs, and the server's limits.

Metrics are scraped from the real /metrics endpoint and compared with what the
test did; logs are read from a real `lamb-sharded serve` process's stderr.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from service import logs
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.server.metrics import sample
from svc import params_of, push_messages, running_server, start_server_process, stub, until

PARAMS = {"['w']": np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8),
          "['b']": np.full(8, 0.5, np.float32),
          "['z']": np.arange(1, 7, dtype=np.float32)}
NBYTES = sum(v.nbytes for v in PARAMS.values())


def _grads(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in PARAMS.items()}


def _scrape(port: int) -> str:
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    assert r.status == 200
    return r.read().decode()


def test_metrics_count_what_happened(tmp_path):
  with running_server(devices=2, num_workers=2, checkpoint_dir=str(tmp_path),
                      checkpoint_every_steps=0, checkpoint_every_seconds=0) as (running, client):
    client.initialize(PARAMS)
    steps, pulls = 3, 0
    for step in range(steps):
      client.pull()
      pulls += 1
      client.push(step, _grads(step), 3, 'w0', push_id=f'a{step}')
      if step == 1:  # a retry: answered again, not counted again
        assert client.push(step, _grads(step), 3, 'w0', push_id=f'a{step}').duplicate
        bad = dict(_grads(9), **{"['z']": np.full(6, np.inf, np.float32)})  # the last leaf
        with pytest.raises(grpc.RpcError):
          client.push(step, bad, 1, 'w1')
      assert client.push(step, _grads(step + 100), 1, 'w1').applied
    client.save_checkpoint(wait=True)

    m = running.metrics_port
    until(lambda: sample(_scrape(m), 'lamb_sharded_apply_seconds_count') == steps)
    until(lambda: sample(_scrape(m), 'lamb_sharded_checkpoint_seconds_count') == 2)
    text = _scrape(m)
    get = lambda name, **labels: sample(text, 'lamb_sharded_' + name, labels)
    assert get('steps_applied_total') == steps
    assert get('steps_skipped_total') == 0
    assert get('step') == steps
    assert get('pushes_accepted_total') == 2 * steps
    assert get('pushes_duplicate_total') == 1
    assert get('pushes_rejected_total', reason='nonfinite') == 1
    assert get('pushes_rejected_total', reason='stale_step') == 0
    assert get('push_seconds_count') == 2 * steps
    assert get('pushes_in_flight') == 0 and get('inflight_bytes') == 0
    # Every byte of every push that was read: 6 accepted + the rejected one (its NaN is
    # in the last leaf); the duplicate was answered from its header alone.
    assert get('received_bytes_total', rpc='PushGradients') == 7 * NBYTES
    assert get('received_bytes_total', rpc='InitializeModel') == NBYTES
    assert get('sent_bytes_total', rpc='PullParameters') == pulls * NBYTES
    assert get('pull_seconds_count') == pulls
    assert get('model_parameters') == sum(v.size for v in PARAMS.values())
    # Checkpoints: the initial one and the one asked for.
    assert get('checkpoint_blocking_seconds_count') == 2
    assert get('checkpoint_seconds_sum') >= get('checkpoint_blocking_seconds_sum') > 0
    # The trust ratios of the last step, as the engine recorded them.
    ratios = running.engine.trust_ratios()
    assert ratios.shape == (3,) and len(set(ratios.round(5))) == 3
    for stat, want in (('min', ratios.min()), ('median', np.median(ratios)),
                       ('max', ratios.max())):
      assert get('trust_ratio', stat=stat) == pytest.approx(float(want), rel=1e-6)


def test_unauthenticated_calls_are_counted(monkeypatch):
  monkeypatch.setenv('OPS_TEST_TOKEN', 'sesame')
  with running_server(devices=1, auth_token_env='OPS_TEST_TOKEN') as (running, _):
    with pytest.raises(grpc.RpcError) as e:
      stub(running.port).DescribeModel(pb.DescribeModelRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    text = _scrape(running.metrics_port)
    assert sample(text, 'lamb_sharded_rpcs_unauthenticated_total') == 1


def test_metrics_port_can_be_turned_off():
  with running_server(devices=1, metrics_port=-1) as (running, _):
    assert running.metrics_port is None


def test_json_logs_name_step_worker_and_leaf(tmp_path):
  proc, port = start_server_process('--devices', '1', '--log-format', 'json', '--log-level',
                                    'INFO')
  try:
    with grpc.insecure_channel(f'127.0.0.1:{port}') as channel:
      s = pb_stub(channel)
      s.InitializeModel(iter([pb.InitializeModelRequest(header=pb.InitializeModelHeader(
          leaves=[_spec(k, v) for k, v in PARAMS.items()]))] + _init_chunks()), timeout=30)
      bad = dict(_grads(1), **{"['b']": np.full(8, np.nan, np.float32)})
      with pytest.raises(grpc.RpcError):
        s.PushGradients(iter(push_messages(leaves=list(bad.items()), worker_id='w7', step=0)),
                        timeout=30)
  finally:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
  records = [json.loads(line) for line in err.splitlines() if line.strip()]
  assert records, err
  for r in records:  # every line is one JSON object with the fixed keys
    assert {'time', 'level', 'logger', 'message'} <= set(r), r
  refused = [r for r in records if r['message'].startswith('push refused')]
  assert len(refused) == 1, records
  assert refused[0]['step'] == 0 and refused[0]['worker'] == 'w7'
  assert refused[0]['leaf'] == "['b']" and refused[0]['reason'] == 'nonfinite'
  assert refused[0]['level'] == 'WARNING' and refused[0]['code'] == 'INVALID_ARGUMENT'
  assert any(r['message'].startswith('model initialised') and r.get('model_id')
             for r in records)


def test_text_logs_append_the_fields():
  record = logging.LogRecord('x', logging.WARNING, __file__, 1, 'push refused: %s', ('bad',),
                             None)
  record.__dict__.update(logs.fields(step=4, worker='w1', leaf=None))
  line = logs.TextFormatter().format(record)
  assert line.endswith('WARNING x: push refused: bad [step=4 worker=w1]')
  assert json.loads(logs.JsonFormatter().format(record))['worker'] == 'w1'


# ----------------------------------------------------------------------------- limits

def _stalled_push(port, step, gate, *, every=None, worker='slow'):
  """A push that sends its header and one chunk, then stalls (or trickles every `every` s)."""
  msgs = push_messages(leaves=list(_grads(0).items()), worker_id=worker, step=step,
                       chunk_bytes=8)

  def requests():
    yield from msgs[:2]
    if every is None:
      gate.wait(30)
      return
    for m in msgs[2:]:
      if gate.wait(every):
        return
      yield m
  return stub(port).PushGradients.future(requests(), timeout=60)


def test_a_push_open_too_long_is_cut_off():
  with running_server(devices=1, num_workers=2, stream_idle_timeout_s=5,
                      max_stream_seconds=1.0) as (running, client):
    client.initialize(PARAMS)
    gate = threading.Event()
    call = _stalled_push(running.port, 0, gate, every=0.2)  # never idle, but slow
    try:
      until(call.done)
    finally:
      gate.set()
    assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 'open too long (max_stream_seconds); cut off' in call.details()
    assert running.engine.pushes_in_flight == 0
    text = _scrape(running.metrics_port)
    assert sample(text, 'lamb_sharded_streams_cut_off_total',
                  {'rpc': 'PushGradients', 'reason': 'stream_too_long'}) == 1
    assert sample(text, 'lamb_sharded_pushes_rejected_total', {'reason': 'stream_too_long'}) == 1


def test_a_drip_fed_push_is_cut_off_by_its_rate_and_starves_no_other():
  """A client that sends a byte now and then (never idle) holds its push's slot only for
  stream_idle_timeout_s + its announced bytes at min_push_bytes_per_second, not for
  max_stream_seconds; meanwhile and after, the other worker's push counts."""
  with running_server(devices=1, num_workers=2, stream_idle_timeout_s=2,
                      max_inflight_pushes=2, min_push_bytes_per_second=1024) as (running, client):
    client.initialize(PARAMS)
    gate = threading.Event()
    t0 = time.monotonic()
    call = _stalled_push(running.port, 0, gate, every=1.5, worker='dripping')
    try:
      until(call.done, timeout=30)
    finally:
      gate.set()
    took = time.monotonic() - t0
    assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED, call.details()
    assert 'too slow' in call.details() and 'min_push_bytes_per_second' in call.details()
    assert took < 10, took  # 2 s + its ~100 bytes at 1 KiB/s, not max_stream_seconds (900)
    r = client.push(0, _grads(1), 1, 'prompt')
    assert r.accepted_step == 0 and running.engine.pushes_in_flight == 0
    text = _scrape(running.metrics_port)
    assert sample(text, 'lamb_sharded_streams_cut_off_total',
                  {'rpc': 'PushGradients', 'reason': 'too_slow'}) == 1


def test_a_pull_whose_client_stops_reading_is_cancelled():
  big = {"['w']": np.ones((2048, 2048), np.float32)}  # 16 MiB: more than gRPC buffers
  with running_server(devices=1, stream_idle_timeout_s=1.0) as (running, client):
    client.initialize(big)
    responses = stub(running.port).PullParameters(pb.PullParametersRequest(), timeout=60)
    next(responses)  # the header; then the client stops reading
    until(lambda: sample(_scrape(running.metrics_port), 'lamb_sharded_streams_cut_off_total',
                          {'rpc': 'PullParameters', 'reason': 'idle'}) == 1)
    with pytest.raises(grpc.RpcError) as e:
      for _ in responses:
        pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    np.testing.assert_array_equal(client.pull().params["['w']"], big["['w']"])


def test_rpcs_beyond_max_concurrent_rpcs_are_refused():
  with running_server(devices=1, max_concurrent_rpcs=2) as (running, client):
    client.initialize(PARAMS)
    stubs = [stub(running.port) for _ in range(2)]  # (a channel closes when collected)
    waits = [None, None]

    def both_polling():
      # A long poll may itself be turned away while an earlier RPC is still winding
      # down; such a poll is sent again.
      for i, w in enumerate(waits):
        if w is None or w.done():
          waits[i] = stubs[i].WaitForStep.future(pb.WaitForStepRequest(step=99), timeout=60)
      return running.engine.waiting == 2
    try:
      until(both_polling)
      assert _describe(running.port) == grpc.StatusCode.RESOURCE_EXHAUSTED
      assert not any(w.done() for w in waits)
    finally:
      for w in waits:
        w.cancel()
    until(lambda: running.engine.waiting == 0)  # cancelled long polls end at once
    until(lambda: _describe(running.port) == grpc.StatusCode.OK)


def _describe(port) -> grpc.StatusCode:
  try:
    stub(port).DescribeModel(pb.DescribeModelRequest(), timeout=10)
    return grpc.StatusCode.OK
  except grpc.RpcError as e:
    return e.code()


def test_bytes_in_flight_are_bounded():
  with running_server(devices=1, num_workers=3, max_inflight_pushes=4,
                      max_inflight_bytes=NBYTES + 8, admission_timeout_s=0.5) as (running,
                                                                                    client):
    client.initialize(PARAMS)
    gate = threading.Event()
    call = _stalled_push(running.port, 0, gate)
    try:
      until(lambda: running.engine.inflight_bytes == NBYTES)
      with pytest.raises(grpc.RpcError) as e:  # a second whole push does not fit
        client.push(0, _grads(1), 1, 'w1')
      assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
      assert 'max_inflight_bytes' in e.value.details()
    finally:
      gate.set()
    until(call.done)
    assert running.engine.inflight_bytes == 0
    # Once the stalled push is gone, pushes fit again; a push bigger than the whole
    # bound never fits and is told so at once.
    assert not client.push(0, _grads(1), 1, 'w1').applied
  with running_server(devices=1, max_inflight_bytes=NBYTES - 4) as (running, client):
    client.initialize(PARAMS)
    with pytest.raises(grpc.RpcError) as e:
      client.push(0, _grads(1), 1, 'w1')
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f'the push has {NBYTES} bytes, over max_inflight_bytes' in e.value.details()
    assert params_of(client)[0] == 0


# ----------------------------------------------------------------------------- helpers

def pb_stub(channel):
  from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc  # pylint: disable=import-outside-toplevel
  return pb_grpc.OptimizerServiceStub(channel)


def _spec(path, array):
  from svc import spec  # pylint: disable=import-outside-toplevel
  return spec(path, array.shape)


def _init_chunks():
  msgs = push_messages(leaves=list(PARAMS.items()))[1:]  # chunks + commit of the params
  return [pb.InitializeModelRequest(chunk=m.chunk) if m.HasField('chunk')
          else pb.InitializeModelRequest(commit=m.commit) for m in msgs]


def test_worker_json_logs_name_worker_and_step():
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from svc import ROOT  # pylint: disable=import-outside-toplevel
  with running_server(devices=1) as (running, _):
    proc = subprocess.run(
        [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{running.port}',
         '--worker-index', '0', '--steps', '2', '--init', '--batch-size', '8',
         '--log-format', 'json', '--log-level', 'INFO', '--connect-timeout', '30'],
        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
        timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr
  records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{')]
  steps = [r for r in records if r['logger'] == 'service.examples.worker' and 'loss' in r['message']]
  assert [r['step'] for r in steps] == [0, 1], records
  assert all(r['worker'] == 'worker-0' for r in steps)



def test_waiting_rpcs_hold_no_thread():
  """100 long polls and 10 pushes stalled half-way hold no thread of the server's: the
  process's threads stay as they were, and the server still answers at once."""
  with running_server(devices=1, num_workers=2, max_inflight_pushes=16) as (running, client):
    client.initialize(PARAMS)
    client.describe()
    before = threading.active_count()
    stubs = [pb_grpc.OptimizerServiceStub(grpc.insecure_channel(  # a connection each
        f'127.0.0.1:{running.port}', options=[('grpc.use_local_subchannel_pool', 1)]))
             for _ in range(4)]  # (at most max_streams_per_connection streams on one)
    waits = [stubs[i % 4].WaitForStep.future(pb.WaitForStepRequest(step=99), timeout=60)
             for i in range(100)]
    gate = threading.Event()
    pushes = [_stalled_push(running.port, 0, gate, worker=f'w{i}')
              for i in range(10)]
    try:
      until(lambda: running.engine.waiting == 100 and running.engine.pushes_in_flight == 10)
      # A thread per waiting RPC would be 110 more; the pool's threads are at most its size
      # (16), and the pushes' 10 senders are the test's own.
      assert threading.active_count() - before < 40, threading.active_count() - before
      t0 = time.monotonic()
      client.describe()
      assert time.monotonic() - t0 < 1.0
    finally:
      gate.set()
      for w in waits:
        w.cancel()
    until(lambda: running.engine.waiting == 0)


def test_the_libraries_chatter_stays_out_of_the_servers_info_log(tmp_path):
  """At --log-level INFO the server logs its own lines, not Orbax's per-save INFO lines
  (absl) nor JAX's backend notes; --log-level DEBUG lets them through."""
  import signal  # pylint: disable=import-outside-toplevel
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel

  def run(level, ckpt):
    import re  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    from svc import ROOT  # pylint: disable=import-outside-toplevel
    log_file = tmp_path / f'{level}.log'  # a file: DEBUG would fill a pipe nobody reads
    with open(log_file, 'w', encoding='utf-8') as err:
      proc = subprocess.Popen(
          [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
           '--metrics-port', '-1', '--devices', '1', '--log-level', level,
           '--checkpoint-dir', str(ckpt)], cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
          stdout=subprocess.PIPE, stderr=err, text=True)
      try:
        port = int(re.search(r'serving on [^:]+:(\d+)', proc.stdout.readline()).group(1))
        with OptimizerClient(f'127.0.0.1:{port}', timeout=60) as client:
          client.initialize({"['w']": np.ones(4, np.float32)})  # a save
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait(timeout=30)
    return log_file.read_text()

  info = run('INFO', tmp_path / 'a')
  assert 'INFO service.server.app: serving' in info and 'final checkpoint' in info, info
  assert ' absl' not in info and 'jax._src' not in info, info
  debug = run('DEBUG', tmp_path / 'b')
  assert ' absl' in debug or 'jax._src' in debug, debug


def test_the_progress_line_says_what_happened_since_the_last():
  from service.server.progress import Totals, line  # pylint: disable=import-outside-toplevel
  before = Totals(at=100.0, step=10, steps_applied=10, pushes_accepted=20, push_bytes=0,
                  apply_count=10, apply_seconds=1.0)
  now = Totals(at=110.0, step=50, steps_applied=50, pushes_accepted=100, push_bytes=20e6,
               apply_count=50, apply_seconds=1.2)
  assert line(before, now, (40, 1000.0), wall_now=1012.0) == (
      'progress: step 50 (+40 applied), 8.0 pushes/s, 2.0 MB/s received, apply 5.0 ms '
      '(mean of 40), last checkpoint step 40 (12s ago)')
  assert line(now, now, None).endswith('0.0 pushes/s, 0.0 MB/s received, no step applied, '
                                       'no checkpoint yet')


def test_a_server_logs_its_progress_every_few_seconds(tmp_path):
  """A real `serve --progress-every-seconds 0.5`: after the start-up lines, progress lines
  with the step applied, the pushes and bytes received, and the last checkpoint."""
  import re  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  from svc import ROOT  # pylint: disable=import-outside-toplevel
  log_file = tmp_path / 'server.log'
  with open(log_file, 'w', encoding='utf-8') as err:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
         '--metrics-port', '-1', '--devices', '1', '--log-level', 'INFO',
         '--progress-every-seconds', '0.5', '--checkpoint-dir', str(tmp_path / 'ckpt')],
        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, stdout=subprocess.PIPE, stderr=err,
        text=True)
    try:
      port = int(re.search(r'serving on [^:]+:(\d+)', proc.stdout.readline()).group(1))
      with OptimizerClient(f'127.0.0.1:{port}', timeout=60) as client:
        client.initialize(PARAMS)  # checkpoint of step 0
        for step in range(3):
          assert client.push(step, _grads(step), 2, 'w0').applied
      until(lambda: 'progress: step 3 ' in log_file.read_text(), timeout=30)
    finally:
      proc.kill()
      proc.wait(timeout=30)
  text = log_file.read_text()
  progress = [x for x in text.splitlines() if 'progress: ' in x]
  assert text.index('service.server.app: serving') < text.index('progress: '), text
  assert all(re.search(r'INFO service.server.progress: progress: step \d+ \(\+\d+ applied\), '
                       r'[\d.]+ pushes/s, [\d.]+ MB/s received, .*, (last checkpoint step 0 '
                       r'\(\d+s ago\)|no checkpoint yet) \[step=\d+\]$', x) for x in progress), text
  # Every step applied is in some line, and so are the pushes and their bytes.
  assert sum(int(re.search(r'\(\+(\d+) applied', x).group(1)) for x in progress) == 3, text
  assert any(re.search(r' [1-9][\d.]* pushes/s, [\d.]+ MB/s received, apply [\d.]+ ms '
                       r'\(mean of [1-3]\)', x) for x in progress), text
  assert 'last checkpoint step 0' in progress[-1], text


def _health(port):
  from grpc_health.v1 import health_pb2, health_pb2_grpc  # pylint: disable=import-outside-toplevel
  stub_ = health_pb2_grpc.HealthStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
  return health_pb2.HealthCheckResponse.ServingStatus.Name(
      stub_.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_health_reflects_a_wedged_engine():
  """Health.Check is the engine's: NOT_SERVING while its lock stays held past
  --health-stuck-s (a wedged step) or a thread it needs has ended; SERVING again once
  it answers. The probe itself always answers at once."""
  with running_server(devices=1, health_stuck_s=1.0) as (running, client):
    client.initialize(PARAMS)
    assert _health(running.port) == 'SERVING'
    engine = running.engine
    release = threading.Event()

    def wedge():
      with engine._cond:  # pylint: disable=protected-access  # a step that never ends
        release.wait(30)
    threading.Thread(target=wedge, daemon=True).start()
    try:
      until(lambda: _health(running.port) == 'NOT_SERVING', timeout=10)
    finally:
      release.set()
    until(lambda: _health(running.port) == 'SERVING', timeout=10)
    # A thread the engine needs ends (here: its apply timer, told to stop).
    engine._applied.put(None)  # pylint: disable=protected-access
    until(lambda: _health(running.port) == 'NOT_SERVING', timeout=10)
    assert 'NOT_SERVING' == _health(running.port)
