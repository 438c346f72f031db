"""The optimizer server as a 2-process JAX job: real `serve` processes on 127.0.0.1.

Each process has 4 simulated CPU devices; together they hold one 8-device mesh.
The test reads the model's placements from DescribeModel, sends each process
only its part of every gradient, pulls each process's part back, and checks
the joined params against one process on one device fed the same gradients.
Every process is bounded by timeouts and ended by PID.
"""

import concurrent.futures
import os
import sys

import grpc
import numpy as np
import pytest

from service.protocol import pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.server.metrics import sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
import mp_engine  # noqa: E402  pylint: disable=wrong-import-position
import mp_server  # noqa: E402  pylint: disable=wrong-import-position
from svc import push_messages, spec  # noqa: E402  pylint: disable=wrong-import-position


def _parts(placement, shape):
  """Each process's index into a leaf of `shape`, from its LeafPlacement."""
  if not placement.HasField('split_dim'):
    return [tuple(slice(None) for _ in shape)] * 2
  d, starts = placement.split_dim, list(placement.starts) + [shape[placement.split_dim]]
  return [tuple(slice(starts[i], starts[i + 1]) if k == d else slice(None)
                for k in range(len(shape))) for i in range(len(starts) - 1)]


def _pull(stub_):
  arrays, chunks = {}, {}
  header = None
  for msg in stub_.PullParameters(pb.PullParametersRequest(), timeout=60):
    kind = msg.WhichOneof('kind')
    if kind == 'header':
      header = msg.header
      chunks = {s.path: bytearray() for s in header.leaves}
    elif kind == 'chunk':
      chunks[msg.chunk.path] += msg.chunk.data
  for s in header.leaves:
    arrays[s.path] = np.frombuffer(bytes(chunks[s.path]), np.float32).reshape(list(s.shape))
  return header.step, arrays


def test_two_server_processes_each_take_only_their_part_and_train_like_one(tmp_path):
  with mp_server.job(tmp_path) as job:
    stubs = [pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
             for _, port, _ in job]
    d = stubs[1].DescribeModel(pb.DescribeModelRequest(), timeout=30)
    assert d.initialized and len(d.leaves) == len(mp_engine.SHAPES)
    assert [p.endpoint for p in d.processes] == [f'127.0.0.1:{port}' for _, port, _ in job]
    shapes = {s.path: tuple(s.shape) for s in d.leaves}
    parts = {pl.path: _parts(pl, shapes[pl.path]) for pl in d.placements}
    assert not d.placements[2].HasField('split_dim')  # (7,): every process holds it whole
    assert [pl.split_dim for pl in d.placements[:2]] == [0, 1]
    with concurrent.futures.ThreadPoolExecutor(2 * mp_engine.WORKERS) as pool:
      for step in range(mp_engine.STEPS):
        futures = []
        for w in range(mp_engine.WORKERS):
          g = mp_engine.grads(step, w)
          for i, st in enumerate(stubs):  # each process its part of each leaf, one push id
            leaves = [(k, np.ascontiguousarray(g[k][parts[k][i]])) for k in shapes]
            futures.append(pool.submit(st.PushGradients, iter(push_messages(
                leaves, worker_id=f'worker-{w}', step=step, push_id=f'{step}-{w}')),
                timeout=60))
        assert sum(f.result().applied for f in futures) == 2  # the last push's parts applied it
    got = {k: np.empty(s, np.float32) for k, s in shapes.items()}
    for i, st in enumerate(stubs):
      assert st.WaitForStep(pb.WaitForStepRequest(step=mp_engine.STEPS), timeout=60).reached
      step, local = _pull(st)
      assert step == mp_engine.STEPS
      for k, v in local.items():
        got[k][parts[k][i]] = v
    # The client library does the same by itself, given one process's address: one more step.
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    workers = [OptimizerClient(f'127.0.0.1:{job[1][1]}', timeout=60)
               for _ in range(mp_engine.WORKERS)]
    pulled = workers[0].pull()
    assert pulled.step == mp_engine.STEPS
    for k in shapes:
      np.testing.assert_array_equal(pulled.params[k], got[k])
    results = list(pool_map(lambda w: workers[w].push(
        mp_engine.STEPS, mp_engine.grads(mp_engine.STEPS, w), 1, f'worker-{w}',
        model_id=pulled.model_id), range(mp_engine.WORKERS)))
    assert [r.accepted_step for r in results] == [mp_engine.STEPS] * mp_engine.WORKERS
    workers[0].wait_for_step(mp_engine.STEPS + 1, timeout=60)
    after = workers[1].pull()
    assert after.step == mp_engine.STEPS + 1
    for w in workers:
      w.close()
    metrics = [sample(_scrape(m), 'lamb_sharded_received_bytes_total',
                      {'rpc': 'PushGradients'}) for _, _, m in job]
  import optax  # pylint: disable=import-outside-toplevel
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(ServerConfig(**mp_engine.CONFIG), None, None)
  params = mp_engine.params()
  state = tx.init(params)
  for step in range(mp_engine.STEPS + 1):
    g = [mp_engine.grads(step, w) for w in range(mp_engine.WORKERS)]
    updates, state = tx.update({k: sum(x[k] for x in g) / len(g) for k in params}, state, params)
    params = optax.apply_updates(params, updates)
    if step == mp_engine.STEPS - 1:
      for k, want in params.items():  # what the parts pulled by hand joined to
        np.testing.assert_allclose(got[k], np.asarray(want), rtol=2e-6, atol=2e-7, err_msg=k)
  for k, want in params.items():  # what the client joined, one step later
    np.testing.assert_allclose(after.params[k], np.asarray(want), rtol=2e-6, atol=2e-7,
                               err_msg=k)
  # Bytes per process: half of every split leaf, the replicated one whole, per push.
  split = sum(4 * np.prod(s) for k, s in mp_engine.SHAPES.items() if k != "['odd']")
  assert metrics == [(mp_engine.STEPS + 1) * mp_engine.WORKERS * (split // 2 + 4 * 7)] * 2


def pool_map(fn, items):
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(fn, items))


def _scrape(port):
  import urllib.request  # pylint: disable=import-outside-toplevel
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    return r.read().decode()


def test_initialize_model_on_a_multi_process_server_gives_each_process_its_part(tmp_path):
  # The client sends the whole stream to every process (one init id); each keeps its part.
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  with mp_server.job(tmp_path, init_params=False) as job:
    stub_ = pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{job[0][1]}'))
    assert not stub_.DescribeModel(pb.DescribeModelRequest(), timeout=30).initialized
    with pytest.raises(grpc.RpcError) as e:  # without an init id the streams cannot be matched
      stub_.InitializeModel(iter([pb.InitializeModelRequest(
          header=pb.InitializeModelHeader(leaves=[spec('x', (1,))]))]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'header.init_id' in e.value.details()
    client = OptimizerClient(f'127.0.0.1:{job[1][1]}', timeout=60)
    bad = mp_engine.params()
    bad["['rows']"][-1, 0] = np.nan  # in process 1's part only (rows are split on dim 0)
    with pytest.raises(grpc.RpcError) as e:
      client.initialize(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "['rows']" in e.value.details() and 'NaN' in e.value.details()
    assert not stub_.DescribeModel(pb.DescribeModelRequest(), timeout=30).initialized
    model_id = client.initialize(mp_engine.params())
    pulled = client.pull()
    assert (pulled.model_id, pulled.step) == (model_id, 0)
    for k, v in mp_engine.params().items():
      np.testing.assert_array_equal(pulled.params[k], v)
    client.close()
    metrics = [sample(_scrape(m), 'lamb_sharded_received_bytes_total',
                      {'rpc': 'InitializeModel'}) for _, _, m in job]
  whole = sum(4 * np.prod(s) for s in mp_engine.SHAPES.values())
  assert metrics == [2 * whole] * 2  # every process read both streams whole, kept its part


def _mixed_grads(step, worker):
  """mp_engine's leaves, magnitudes from 1 to 1e8 mixed: their float32 sum depends on the
  order the pushes are added in."""
  rng = np.random.default_rng([step, worker, 7])
  return {k: (rng.normal(size=s) * 10.0 ** rng.integers(0, 9, size=s)).astype(np.float32)
          for k, s in mp_engine.SHAPES.items()}


def test_an_ordered_sum_is_the_same_on_two_processes_whatever_the_arrival_order(tmp_path):
  # --ordered-sum: each process holds its part of every push of a step and adds them by
  # worker once it is complete. The same pushes arriving otherwise give the same bits, and
  # the two processes' parts are of one sum (each process adds its parts in that order).
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  runs = []
  for order in ((2, 0, 1), (1, 2, 0)):
    with mp_server.job(tmp_path, extra=['--ordered-sum', 'true', '--max-inflight-pushes',
                                        str(mp_engine.WORKERS)]) as job:
      with OptimizerClient(f'127.0.0.1:{job[1][1]}', timeout=60) as client:
        stub_ = pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{job[0][1]}'))
        assert stub_.DescribeModel(pb.DescribeModelRequest(), timeout=30).ordered_sum
        for step in range(2):
          for i, w in enumerate(order):
            r = client.push(step, _mixed_grads(step, w), 1 + w, f'worker-{w}')
            assert r.applied == (i == len(order) - 1)
        pulled = client.pull()
      assert pulled.step == 2
      runs.append(pulled.params)
  for k in mp_engine.SHAPES:
    assert runs[0][k].tobytes() == runs[1][k].tobytes(), k
