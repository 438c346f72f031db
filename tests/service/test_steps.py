"""Step semantics, tensors on the wire, long polls, health and reflection: real servers."""

import threading
import time

import grpc
import ml_dtypes
import numpy as np
import optax
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lamb_sharded
from service import config as config_lib
from svc import params_of, running_server

P0 = {"['w']": np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4),
      "['b']": np.linspace(0.5, 1, 3, dtype=np.float32)}


def _g(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in P0.items()}


def _lamb_step(params, grads, lr, state=None):
  tx = lamb_sharded.lamb(lr)
  state = tx.init(params) if state is None else state
  u, state = tx.update(grads, state, params)
  return optax.apply_updates(params, u), state


def test_sync_step_is_the_example_weighted_mean():
  with running_server(devices=8, num_workers=2, learning_rate=0.1) as (_, client):
    client.initialize(P0)
    g1, g2 = _g(1), _g(2)
    assert not client.push(0, g1, 1, 'a').applied
    assert client.push(0, g2, 3, 'b').applied
    step, got = params_of(client)
  mean = {k: (1 * g1[k] + 3 * g2[k]) * np.float32(1 / 4) for k in P0}
  want, _ = _lamb_step(P0, mean, 0.1)
  assert step == 1
  for k in P0:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  # Unweighted would be measurably different (the test can tell).
  plain = {k: (g1[k] + g2[k]) / 2 for k in P0}
  other, _ = _lamb_step(P0, plain, 0.1)
  assert max(np.max(np.abs(other[k] - want[k])) for k in P0) > 1e-3


def test_straggler_timeout_applies_with_a_quorum():
  with running_server(devices=2, num_workers=3, quorum=2, straggler_timeout_s=0.5) as (_, client):
    client.initialize(P0)
    t0 = time.monotonic()
    assert not client.push(0, _g(1), 1, 'a').applied
    # One push is below the quorum: nothing happens even after the timeout.
    assert client.wait_for_step(1, timeout=0.8) == (0, False)
    assert not client.push(0, _g(2), 1, 'b').applied
    assert client.wait_for_step(1, timeout=5) == (1, True)
    assert time.monotonic() - t0 >= 0.5
    with pytest.raises(grpc.RpcError) as e:  # the straggler arrives late
      client.push(0, _g(3), 1, 'c')
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert 'the current step is 1' in e.value.details()


def test_async_mode_bounds_staleness():
  with running_server(devices=2, num_workers=2, step_mode='async', staleness_bound=1,
                      learning_rate=0.05) as (_, client):
    client.initialize(P0)
    r = client.push(0, _g(1), 8, 'a')
    assert r.applied and r.accepted_step == 0 and r.current_step == 1
    r = client.push(0, _g(2), 8, 'b')  # computed at step 0, applied at step 1: staleness 1
    assert r.applied and r.accepted_step == 1 and r.current_step == 2
    with pytest.raises(grpc.RpcError) as e:  # staleness 2
      client.push(0, _g(3), 8, 'a')
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert 'too stale' in e.value.details() and 'current step is 2' in e.value.details()
    _, got = params_of(client)
  want, state = _lamb_step(P0, _g(1), 0.05)
  tx = lamb_sharded.lamb(0.05)
  u, _ = tx.update(_g(2), state, want)
  want = optax.apply_updates(want, u)
  for k in P0:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_bfloat16_push_and_pull():
  with running_server(devices=2, learning_rate=0.1) as (_, client):
    client.initialize(P0)
    g = _g(5)
    client.push(0, g, 1, 'a', wire_dtype=ml_dtypes.bfloat16)
    pulled = client.pull(dtype=ml_dtypes.bfloat16)
    full = client.pull()
  assert all(v.dtype == ml_dtypes.bfloat16 for v in pulled.params.values())
  g16 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in g.items()}
  want, _ = _lamb_step(P0, g16, 0.1)
  for k in P0:
    np.testing.assert_allclose(full.params[k], want[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pulled.params[k],
                                  np.asarray(want[k]).astype(ml_dtypes.bfloat16))


def test_a_leaf_larger_than_4mib_round_trips_bit_exactly():
  rng = np.random.default_rng(0)
  big = {"['emb']": rng.normal(size=(1536, 1024)).astype(np.float32),  # 6 MiB
         "['tiny']": np.float32(3.25).reshape(())}
  with running_server(devices=8) as (_, client):
    client.initialize(big)
    info = client.describe()
    pulled = client.pull()
  assert [s.path for s in info.leaves] == list(big)
  for k, v in big.items():
    assert pulled.params[k].tobytes() == v.tobytes()


def test_pull_only_if_newer_and_wait_for_step_long_polls():
  with running_server(devices=1, learning_rate=0.1) as (_, client):
    done = []
    waiter = threading.Thread(target=lambda: done.append(client.wait_for_step(1, timeout=20)))
    waiter.start()  # waits for a model that does not exist yet, then for step 1
    client.initialize(P0)
    first = client.pull()
    assert client.pull(if_newer_than=first.step, model_id=first.model_id) is None
    assert client.pull(if_newer_than=first.step, model_id='another') is not None
    time.sleep(0.2)
    assert not done
    client.push(0, _g(1), 1, 'a')
    waiter.join(10)
    assert done == [(1, True)]
    assert client.pull(if_newer_than=first.step, model_id=first.model_id).step == 1
    assert client.wait_for_step(5, timeout=0.3) == (1, False)


def test_wait_for_step_in_another_model_ends_at_once():
  """A wait names the model its step is of (a push's model_id): in another model, or
  with none, FAILED_PRECONDITION at once, naming both; in its model it waits."""
  with running_server(devices=1, num_workers=2, learning_rate=0.1) as (_, client):
    with pytest.raises(grpc.RpcError) as e:
      client.wait_for_step(0, timeout=20, model_id='f' * 32)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"model_id {'f' * 32} is not the server's model none (no model)" in e.value.details()
    client.initialize(P0)
    r = client.push(0, _g(1), 1, 'a')
    assert not r.applied and r.model_id == client.describe().model_id
    t0 = time.monotonic()
    assert client.wait_for_step(1, timeout=0.3, model_id=r.model_id) == (0, False)
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(grpc.RpcError) as e:
      client.wait_for_step(1, timeout=20, model_id='f' * 32)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"model_id {'f' * 32} is not the server's model {r.model_id}" in e.value.details()
    assert time.monotonic() - t0 < 10
    done = client.push(0, _g(1), 1, 'b', push_id='p1')
    again = client.push(0, _g(1), 1, 'b', push_id='p1')  # a retry's answer names it too
    assert done.applied and again.duplicate and again.model_id == done.model_id == r.model_id


def test_describe_health_and_reflection():
  with running_server(devices=2, num_workers=3, quorum=2, learning_rate=0.01,
                      schedule='warmup_cosine', warmup_steps=10) as (running, client):
    info = client.describe()
    assert not info.initialized and info.num_workers == 3 and info.quorum == 2
    client.initialize(P0)
    info = client.describe()
    assert info.initialized and info.step == 0 and len(info.model_id) == 32
    assert [(s.path, s.shape) for s in info.leaves] == [(k, v.shape) for k, v in P0.items()]
    channel = grpc.insecure_channel(f'127.0.0.1:{running.port}')
    hc = health_pb2_grpc.HealthStub(channel)
    for name in ('', 'lamb_sharded.v1.OptimizerService'):
      assert hc.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
          health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services='')]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert 'lamb_sharded.v1.OptimizerService' in names and 'grpc.health.v1.Health' in names


def test_config_from_yaml_and_flags(tmp_path):
  path = tmp_path / 'server.yaml'
  path.write_text('num-workers: 4\nstep_mode: async\nstaleness_bound: 3\nlearning_rate: 0.5\n')
  cfg = config_lib.parse(['--config', str(path), '--learning-rate', '0.25', '--port', '0'])
  assert (cfg.num_workers, cfg.step_mode, cfg.staleness_bound, cfg.learning_rate, cfg.port) == \
      (4, 'async', 3, 0.25, 0)
  path.write_text('nope: 1\n')
  with pytest.raises(ValueError, match="unknown setting 'nope'"):
    config_lib.parse(['--config', str(path)])
  with pytest.raises(ValueError, match='quorum'):
    config_lib.parse(['--num-workers', '2', '--quorum', '3'])
