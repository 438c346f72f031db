"""The optimizer server as a 2-process JAX job: real `serve` processes on 127.0.0.1.

Each process has 4 simulated CPU devices; together they hold one 8-device mesh.
The test reads the model's placements from DescribeModel, sends each process
only its part of every gradient, pulls each process's part back, and checks
the joined params against one process on one device fed the same gradients.
Every process is bounded by timeouts and ended by PID.
"""

import concurrent.futures
import contextlib
import os
import re
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from service.protocol import pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.server.metrics import sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
import mp_engine  # noqa: E402  pylint: disable=wrong-import-position
from svc import ROOT, free_port, push_messages, spec  # noqa: E402  pylint: disable=wrong-import-position


def _die_with_parent():
  """In the child: SIGKILL when the test process dies, whatever ends it (Linux)."""
  import ctypes  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _job(tmp_path, processes=2, init_params=True, params=None):
  """`processes` server processes of one job; yields [(proc, port, metrics_port)].

  `params`: the initial params (path -> array; default mp_engine's).
  """
  init = tmp_path / 'init.npz'
  np.savez(init, **(mp_engine.params() if params is None else params))
  init_flags = ['--init-params', str(init)] if init_params else []
  coordinator = free_port()
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--metrics-port', '0', '--devices', '4', '--num-workers', str(mp_engine.WORKERS),
       '--learning-rate', '0.05', '--weight-decay', '0.01', *init_flags,
       '--num-processes', str(processes), '--process-id', str(i),
       '--coordinator-address', f'127.0.0.1:{coordinator}', '--log-level', 'WARNING'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=_die_with_parent) for i in range(processes)]
  try:
    out = []
    for p in procs:  # every process prints its first line once the job has formed
      line = p.stdout.readline()
      m = re.search(r'serving on [^:]+:(\d+).*metrics: port (\d+)', line)
      assert m, (line, p.poll(), p.stderr.read() if p.poll() is not None else '')
      out.append((p, int(m.group(1)), int(m.group(2))))
    yield out
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    deadline = time.monotonic() + 30
    for p in procs:
      try:
        p.wait(max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


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
  with _job(tmp_path) as job:
    stubs = [pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
             for _, port, _ in job]
    d = stubs[1].DescribeModel(pb.DescribeModelRequest(), timeout=30)
    assert d.initialized and len(d.leaves) == len(mp_engine.SHAPES)
    assert [p.endpoint for p in d.processes] == [f'127.0.0.1:{port}' for _, port, _ in job]
    shapes = {s.path: tuple(s.shape) for s in d.leaves}
    parts = {pl.path: _parts(pl, shapes[pl.path]) for pl in d.placements}
    assert not d.placements[2].HasField('split_dim')  # (7,): every process holds it whole
    assert [pl.split_dim for pl in d.placements[:2]] == [0, 1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      for step in range(mp_engine.STEPS):
        futures = []
        for w in range(mp_engine.WORKERS):
          g = mp_engine.grads(step, w)
          for i, st in enumerate(stubs):  # each process gets only its part of each leaf
            leaves = [(k, np.ascontiguousarray(g[k][parts[k][i]])) for k in shapes]
            futures.append(pool.submit(st.PushGradients, iter(push_messages(
                leaves, worker_id=f'worker-{w}', step=step, push_id=f'{step}-{w}-{i}')),
                timeout=60))
        assert sum(f.result().applied for f in futures) == 2  # each process applied the step
    got = {k: np.empty(s, np.float32) for k, s in shapes.items()}
    for i, st in enumerate(stubs):
      assert st.WaitForStep(pb.WaitForStepRequest(step=mp_engine.STEPS), timeout=60).reached
      step, local = _pull(st)
      assert step == mp_engine.STEPS
      for k, v in local.items():
        got[k][parts[k][i]] = v
    # The client library does the same by itself, given one process's address: one more step.
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    workers = [OptimizerClient(f'127.0.0.1:{job[1][1]}', timeout=60) for _ in range(2)]
    pulled = workers[0].pull()
    assert pulled.step == mp_engine.STEPS
    for k in shapes:
      np.testing.assert_array_equal(pulled.params[k], got[k])
    results = list(pool_map(lambda w: workers[w].push(
        mp_engine.STEPS, mp_engine.grads(mp_engine.STEPS, w), 1, f'worker-{w}',
        model_id=pulled.model_id), range(2)))
    # Each process applies the step with one of the two pushes (not always the same one's).
    assert [r.accepted_step for r in results] == [mp_engine.STEPS] * 2
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
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return list(pool.map(fn, items))


def _scrape(port):
  import urllib.request  # pylint: disable=import-outside-toplevel
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    return r.read().decode()


def test_a_multi_process_server_takes_its_initial_params_from_a_file(tmp_path):
  # InitializeModel would give one process whole leaves: refused, naming what to use.
  with _job(tmp_path, init_params=False) as job:
    stub_ = pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{job[0][1]}'))
    assert not stub_.DescribeModel(pb.DescribeModelRequest(), timeout=30).initialized
    with pytest.raises(grpc.RpcError) as e:
      stub_.InitializeModel(iter([pb.InitializeModelRequest(
          header=pb.InitializeModelHeader(leaves=[spec('x', (1,))]))]), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert '--init-params' in e.value.details()
