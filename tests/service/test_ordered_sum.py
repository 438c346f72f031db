"""`serve --ordered-sum`: a synchronous step's sum does not depend on the pushes' arrival order.

Float32 addition is not associative: added as they arrive, the same pushes give a
sum that differs in its last bits from one arrival order to another, and runs
drift apart. With --ordered-sum a step holds its pushes and adds them by worker
once it is complete. Real servers on 127.0.0.1; a push's arrival is ordered by
pushing one at a time (a synchronous push is answered once it is counted).
"""

import subprocess
import sys
import threading
import time

import grpc
import ml_dtypes
import numpy as np
import pytest

from service.config import ServerConfig
from service.core.checkpoint import latest_step
from service.errors import ConfigError
from service.examples import status
from service.protocol import pb
from svc import ROOT, params_of, push_messages, running_server, stub, until

SHAPES = {"['w']": (64, 33), "['b']": (50,)}
ZEROS = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
EXAMPLES = (1, 3, 2, 5)  # per worker: the pushes are scaled by them, as a sum's pushes are
# sgd with learning rate 1 from zeros: the params are -(sum / examples), the sum's bits seen.
SGD = dict(optimizer='sgd', learning_rate=1.0)


def _grads(step, worker):
  """Values whose float32 sum depends on the order: magnitudes from 1 to 1e8, mixed."""
  rng = np.random.default_rng([step, worker])
  return {k: (rng.normal(size=s) * 10.0 ** rng.integers(0, 9, size=s)).astype(np.float32)
          for k, s in SHAPES.items()}


def _run(arrivals, steps=2, devices=4, **server):
  """The params after each of `steps` steps whose pushes arrive in the order `arrivals`
  (worker indices), one at a time; and the engine's held buffers at the end."""
  workers = len(arrivals)
  after = []
  with running_server(devices=devices, num_workers=workers, max_inflight_pushes=workers,
                      **server) as (running, client):
    client.initialize(ZEROS)
    for step in range(steps):
      for i, w in enumerate(arrivals):
        r = client.push(step, _grads(step, w), EXAMPLES[w], f'worker-{w}')
        assert r.accepted_step == step and r.applied == (i == workers - 1)
      got_step, params = params_of(client)
      assert got_step == step + 1
      after.append(params)
    return after, running.engine._sum.held  # pylint: disable=protected-access


def _first_step_in_worker_order(workers=4):
  """NumPy's float32 params after the first step: its pushes added by worker, as the
  accumulator does (the first one scaled, then each `sum += push * examples`), times
  1 / examples. (Later steps' `params - mean` XLA may fuse into one FMA: compared run
  against run.)"""
  s = {k: _grads(0, 0)[k] * np.float32(EXAMPLES[0]) for k in SHAPES}
  for w in range(1, workers):
    s = {k: s[k] + _grads(0, w)[k] * np.float32(EXAMPLES[w]) for k in SHAPES}
  return {k: ZEROS[k] - s[k] * np.float32(1.0 / sum(EXAMPLES[:workers])) for k in SHAPES}


def _same_bits(a, b) -> bool:
  return all(a[k].tobytes() == b[k].tobytes() for k in SHAPES)


def test_the_same_pushes_in_any_arrival_order_give_bit_identical_params():
  want = _first_step_in_worker_order()
  (first, second), held = _run((0, 1, 2, 3), **SGD)  # today's sum, in worker order
  assert held == 0 and _same_bits(first, want)
  for order in ((3, 1, 0, 2), (2, 0, 3, 1)):
    after, held = _run(order, ordered_sum=True, **SGD)
    assert held == 0
    assert _same_bits(after[0], want) and _same_bits(after[1], second)
  # Without the setting these arrivals sum otherwise: the order is what the setting fixes.
  (added_as_they_came, _), _ = _run((3, 1, 0, 2), **SGD)
  assert not _same_bits(added_as_they_came, want)


def test_mixed_wire_dtypes_and_encodings_sum_alike_in_any_order():
  # worker-0 (the first in order) pushes bfloat16, so the sum takes a float32 buffer of
  # its own; worker-1 int8 blocks, kept as their wire bytes until they are decoded into it.
  how = {0: dict(wire_dtype=ml_dtypes.bfloat16), 1: dict(compression='int8',
                                                         error_feedback=False)}
  runs = []
  for order in ((3, 2, 1, 0), (1, 3, 0, 2)):
    with running_server(devices=4, num_workers=4, max_inflight_pushes=4, ordered_sum=True,
                        learning_rate=0.01) as (running, client):
      client.initialize({k: np.ones(s, np.float32) for k, s in SHAPES.items()})
      for step in range(2):
        for w in order:
          client.push(step, _grads(step, w), EXAMPLES[w], f'worker-{w}', **how.get(w, {}))
      runs.append(params_of(client))
      assert running.engine._sum.held == 0  # pylint: disable=protected-access
  assert runs[0][0] == runs[1][0] == 2
  assert _same_bits(runs[0][1], runs[1][1])


def test_a_straggler_step_adds_the_pushes_it_got_in_worker_order():
  runs = []
  for order in ((3, 2, 0), (0, 3, 2)):
    with running_server(devices=2, num_workers=4, quorum=3, straggler_timeout_s=0.3,
                        max_inflight_pushes=4, ordered_sum=True, **SGD) as (running, client):
      client.initialize(ZEROS)
      for w in order:
        assert not client.push(0, _grads(0, w), 1, f'worker-{w}').applied
      assert client.wait_for_step(1, timeout=10) == (1, True)
      assert running.engine._sum.held == 0  # pylint: disable=protected-access
      with pytest.raises(grpc.RpcError) as e:  # the straggler is late
        client.push(0, _grads(0, 1), 1, 'worker-1')
      assert e.value.code() == grpc.StatusCode.ABORTED
      runs.append(params_of(client)[1])
  g = [_grads(0, w) for w in range(4)]
  want = {k: ZEROS[k] - ((g[0][k] + g[2][k]) + g[3][k]) * np.float32(1 / 3) for k in SHAPES}
  assert _same_bits(runs[0], want) and _same_bits(runs[1], want)


def test_a_poisoned_step_gives_back_every_held_buffer():
  # max_inflight_pushes == num_workers: a single held buffer not given back would leave
  # no room for the next step's last push.
  with running_server(devices=2, num_workers=3, max_inflight_pushes=3, ordered_sum=True,
                      nonfinite='skip_step', admission_timeout_s=2, **SGD) as (running, client):
    client.initialize(ZEROS)
    bad = {k: v.copy() for k, v in _grads(0, 1).items()}
    bad["['b']"][7] = np.nan
    client.push(0, _grads(0, 0), 1, 'worker-0')
    client.push(0, bad, 1, 'worker-1')
    assert running.engine._sum.held == 2  # pylint: disable=protected-access
    assert client.push(0, _grads(0, 2), 1, 'worker-2').applied  # skipped, in fact
    assert running.engine._sum.held == 0  # pylint: disable=protected-access
    step, params = params_of(client)
    assert step == 1 and _same_bits(params, ZEROS)
    for w in (2, 0, 1):
      client.push(1, _grads(1, w), 1, f'worker-{w}')
    assert params_of(client)[0] == 2
    assert running.engine.pushes_in_flight == 0
    assert running.engine._sum.held == 0  # pylint: disable=protected-access


def test_a_push_cancelled_mid_stream_beside_held_pushes_frees_its_buffer():
  with running_server(devices=2, num_workers=3, max_inflight_pushes=3, ordered_sum=True,
                      admission_timeout_s=2, **SGD) as (running, client):
    client.initialize(ZEROS)
    client.push(0, _grads(0, 2), 1, 'worker-2')
    client.push(0, _grads(0, 0), 1, 'worker-0')
    msgs = push_messages(list(_grads(0, 1).items()), worker_id='worker-1', chunk_bytes=256)
    gate = threading.Event()

    def stalled():
      yield from msgs[:3]
      gate.wait(30)  # half-way

    call = stub(running.port).PushGradients.future(stalled(), timeout=30)
    until(lambda: running.engine.pushes_in_flight == 1)
    # Two pushes held and one in flight: the three buffers are taken.
    with pytest.raises(grpc.RpcError) as e:
      client.push(0, _grads(0, 1), 1, 'worker-1', push_id='too-soon')
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "beside the step's 2 held pushes (ordered sum)" in e.value.details()
    call.cancel()
    gate.set()
    until(lambda: running.engine.pushes_in_flight == 0)
    assert running.engine._sum.held == 2  # pylint: disable=protected-access
    assert client.push(0, _grads(0, 1), 1, 'worker-1').applied
    assert running.engine._sum.held == 0  # pylint: disable=protected-access
    _, params = params_of(client)
  want = {k: -(( _grads(0, 0)[k] + _grads(0, 1)[k]) + _grads(0, 2)[k]) * np.float32(1 / 3)
          for k in SHAPES}
  assert _same_bits(params, want)


def test_a_server_stopped_with_pushes_held_stops_at_once_and_saves_the_last_step(tmp_path):
  with running_server(devices=2, num_workers=3, max_inflight_pushes=3, ordered_sum=True,
                      checkpoint_dir=str(tmp_path), **SGD) as (running, client):
    client.initialize(ZEROS)
    for w in (1, 0):
      client.push(0, _grads(0, w), 1, f'worker-{w}')
    assert running.engine._sum.held == 2  # pylint: disable=protected-access
    t0 = time.monotonic()
    running.stop(grace=30)
    assert time.monotonic() - t0 < 10  # held pushes are not in flight: nothing to wait for
  assert latest_step(str(tmp_path)) == 0  # the incomplete step is not applied


def test_describe_and_status_show_the_setting():
  for ordered in (False, True):
    with running_server(devices=1, num_workers=2, ordered_sum=ordered) as (running, _):
      d = stub(running.port).DescribeModel(pb.DescribeModelRequest(), timeout=10)
      assert d.ordered_sum == ordered
      report = status.gather(f'127.0.0.1:{running.port}')
      assert report['ordered_sum'] == ordered
      assert ('ordered sum' in status.as_text(report)) == ordered


def test_the_setting_is_refused_where_it_cannot_work():
  with pytest.raises(ConfigError) as e:
    ServerConfig(num_workers=4, ordered_sum=True).validate()
  assert e.value.setting == 'ordered_sum'
  assert str(e.value) == ('--ordered-sum: a step holds each of its pushes until it is applied, '
                          'a gradient buffer each: --max-inflight-pushes (2) must be >= '
                          '--num-workers (4)')
  with pytest.raises(ConfigError, match=r'--ordered-sum: only a synchronous step sums'):
    ServerConfig(step_mode='async', ordered_sum=True).validate()
  ServerConfig(num_workers=4, max_inflight_pushes=4, ordered_sum=True).validate()
  ServerConfig(num_workers=2, ordered_sum=True).validate()  # the default 2 buffers suffice
  # The CLI: one line, before JAX is loaded.
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--num-workers', '3', '--ordered-sum',
       'true'], cwd=ROOT, capture_output=True, text=True, timeout=60,
      env={'PYTHONPATH': ROOT, 'PATH': '/usr/bin:/bin'})
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      'lamb-sharded serve: error: --ordered-sum: a step holds each of its pushes until it is '
      'applied, a gradient buffer each: --max-inflight-pushes (2) must be >= --num-workers (3)']
