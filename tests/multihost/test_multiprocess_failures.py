"""A multi-process server's processes agree, fail and stop together: real `serve` processes.

Two processes of 4 simulated CPU devices each on 127.0.0.1 (`mp_server`), driven
through real gRPC: a push one process refuses is refused by both; the
straggler timeout closes the same step on both; `kill -9` of one ends the other
with one line naming it, and the restarted group resumes from the checkpoint;
SIGTERM to one stops both with one final checkpoint, which restores into one
process of 8 devices, and back into two; checkpoints that cannot be read are
discarded by both when told to. The parameters are checked against
optax's LAMB fed the same gradients.
"""

import concurrent.futures
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from service.client import OptimizerClient
from service.server import supervise
from service.protocol import pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
import mp_engine  # noqa: E402  pylint: disable=wrong-import-position
import mp_server  # noqa: E402  pylint: disable=wrong-import-position
from svc import push_messages  # noqa: E402  pylint: disable=wrong-import-position

EVERY = list(range(mp_engine.WORKERS))


def _pool_map(fn, items):
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(fn, items))


def _train(port, steps, workers=EVERY):
  """Each of `workers` pushes mp_engine.grads(step, w) for each step, through the client."""
  clients = [OptimizerClient(f'127.0.0.1:{port}', timeout=60) for _ in workers]
  try:
    for step in steps:
      pulled = clients[0].pull()
      assert pulled.step == step
      _pool_map(lambda i: clients[i].push(step, mp_engine.grads(step, workers[i]), 1,
                                          f'worker-{workers[i]}', model_id=pulled.model_id),
                range(len(workers)))
      clients[0].wait_for_step(step + 1, timeout=60)
    return clients[0].pull()
  finally:
    for c in clients:
      c.close()


def _parts(stub_):
  """Each process's index into every leaf, from the description's placements."""
  d = stub_.DescribeModel(pb.DescribeModelRequest(), timeout=30)
  shapes = {s.path: tuple(s.shape) for s in d.leaves}
  parts = {}
  for pl in d.placements:
    shape = shapes[pl.path]
    if not pl.HasField('split_dim'):
      parts[pl.path] = [tuple(slice(None) for _ in shape)] * 2
      continue
    k, starts = pl.split_dim, list(pl.starts) + [shape[pl.split_dim]]
    parts[pl.path] = [tuple(slice(starts[i], starts[i + 1]) if j == k else slice(None)
                            for j in range(len(shape))) for i in range(2)]
  return parts


def _steps(stubs):
  return [s.DescribeModel(pb.DescribeModelRequest(), timeout=30).step for s in stubs]


def test_a_push_one_process_refuses_is_refused_by_all_and_a_retry_counts_once(tmp_path):
  with mp_server.job(tmp_path) as job:
    stubs = [pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
             for _, port, _ in job]
    parts = _parts(stubs[0])
    g = mp_engine.grads(0, 0)
    leaf = "['rows']"

    def push(mutate, push_id):
      """Both processes their parts of g, process `i`'s part changed by mutate(i, leaves)."""
      def one(i):
        leaves = [(k, np.array(g[k][parts[k][i]])) for k in mp_engine.SHAPES]
        leaves = mutate(i, leaves)
        try:
          stubs[i].PushGradients(iter(push_messages(leaves, worker_id='worker-0', step=0,
                                                    push_id=push_id)), timeout=60)
          return None
        except grpc.RpcError as e:
          return e
      return _pool_map(one, range(2))

    def nan_on_1(i, leaves):
      if i == 1:
        leaves[0][1][0, 0] = np.nan
      return leaves

    errors = push(nan_on_1, 'nan')
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2, errors
    assert leaf in errors[1].details() and 'NaN' in errors[1].details()
    assert 'server process 1 refused its part' in errors[0].details()
    assert leaf in errors[0].details()

    def bad_shape_on_0(i, leaves):  # refused by process 0 before it reads any data
      return [(k, x[:1]) if i == 0 and k == leaf else (k, x) for k, x in leaves]

    errors = push(bad_shape_on_0, 'shape')
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2, errors
    assert 'server process 0 refused its part' in errors[1].details()
    assert _steps(stubs) == [0, 0]
    # Nothing of either push was counted: the next step is both workers' gradients alone.
    pulled = _train(job[1][1], [0])
    mp_server.assert_params(pulled.params, mp_server.reference([EVERY]))
    assert _steps(stubs) == [1, 1]
    # A retry counts once, on each process and across them: worker 0's step-1 push, then its
    # part retried on process 1 alone (its answer lost, say), then worker 1's push.
    def part(w, i):
      g = mp_engine.grads(1, w)
      leaves = [(k, np.array(g[k][parts[k][i]])) for k in mp_engine.SHAPES]
      return stubs[i].PushGradients(iter(push_messages(
          leaves, worker_id=f'worker-{w}', step=1, push_id=f'retry-{w}')), timeout=60)
    first = _pool_map(lambda i: part(0, i), range(2))
    assert [(r.accepted_step, r.applied, r.duplicate) for r in first] == [(1, False, False)] * 2
    again = part(0, 1)
    assert (again.accepted_step, again.duplicate) == (1, True)
    last = _pool_map(lambda wi: part(*wi), [(w, i) for w in EVERY[1:] for i in range(2)])
    assert sum(r.applied for r in last) == 2  # the last push's two parts applied step 1
    with OptimizerClient(f'127.0.0.1:{job[0][1]}', timeout=60) as c:
      mp_server.assert_params(c.pull().params, mp_server.reference([EVERY, EVERY]))


def test_the_straggler_timeout_closes_the_same_step_on_every_process(tmp_path):
  with mp_server.job(tmp_path, extra=['--straggler-timeout-s', '1', '--quorum', '1']) as job:
    # Only worker 0 comes to step 0: process 0 closes the step with it after 1 s.
    stubs = [pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
             for _, port, _ in job]
    _train(job[0][1], [0], workers=[0])
    assert _steps(stubs) == [1, 1]
    pulled = _train(job[1][1], [1])
    mp_server.assert_params(pulled.params, mp_server.reference([[0], EVERY]))


def _wait_exit(proc, timeout):
  t0 = time.monotonic()
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    return None, timeout
  return proc.returncode, time.monotonic() - t0


def _kill_one(job, victim):
  """kill -9 of process `victim`: the other must exit 3 within 15 s, without a traceback;
  its last line of stderr."""
  survivor = job[1 - victim][0]
  os.kill(job[victim][0].pid, signal.SIGKILL)
  code, seconds = _wait_exit(survivor, 15)
  err = survivor.stderr.read()
  assert code == 3, (code, err[-2000:])
  assert seconds < 15
  assert 'Traceback' not in err
  return err.strip().splitlines()[-1]


def test_kill_9_of_one_process_ends_the_other_with_one_line_and_the_group_resumes(tmp_path):
  ckpt = ['--checkpoint-dir', str(tmp_path / 'ckpt'), '--checkpoint-every-steps', '0',
          '--checkpoint-every-seconds', '0']
  job = mp_server.start(tmp_path, extra=ckpt)
  try:
    _train(job[0][1], [0, 1])
    with OptimizerClient(f'127.0.0.1:{job[1][1]}') as c:  # through process 0, for both
      assert c.save_checkpoint(wait=True)[0] == 2
    last = _kill_one(job, victim=1)
    assert last.startswith('lamb-sharded serve: error: server process 1 of 2 (127.0.0.1:'), last
  finally:
    mp_server.stop(job)
  with mp_server.job(tmp_path, extra=ckpt) as job:  # the group restarts: from step 2
    assert _steps([pb_grpc.OptimizerServiceStub(grpc.insecure_channel(
        f'127.0.0.1:{job[0][1]}'))]) == [2]
    pulled = _train(job[1][1], [2, 3])
  mp_server.assert_params(pulled.params, mp_server.reference([EVERY] * 4))


def test_unreadable_checkpoints_are_discarded_by_every_process_when_told(tmp_path):
  # Every checkpoint's data truncated (a disk that lost them): with
  # --discard-unreadable-checkpoints both processes find none readable, Orbax deletes them,
  # and the job starts afresh from --init-params, together; then it trains and saves again.
  from service.core.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  ckpt = ['--checkpoint-dir', str(tmp_path / 'ckpt'), '--checkpoint-every-steps', '1',
          '--async-checkpoints', 'false']
  with mp_server.job(tmp_path, extra=ckpt) as job:
    _train(job[0][1], [0, 1])
  assert Checkpointer(str(tmp_path / 'ckpt')).steps() == [0, 1, 2]
  data = glob.glob(str(tmp_path / 'ckpt' / '*' / 'state' / '**' / 'd' / '*'), recursive=True)
  assert data
  for f in data:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 3)
  with mp_server.job(tmp_path, extra=[*ckpt, '--discard-unreadable-checkpoints', 'true']) as job:
    assert _steps([pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))
                   for _, port, _ in job]) == [0, 0]  # nothing restored: the init params
    pulled = _train(job[1][1], [0])
    assert mp_server.stop(job) == [supervise.STOPPED_EXIT] * 2
  mp_server.assert_params(pulled.params, mp_server.reference([EVERY]))
  assert Checkpointer(str(tmp_path / 'ckpt')).steps() == [0, 1]  # the new run's, no old one


def test_sigterm_to_one_process_stops_both_with_one_checkpoint_that_restores_in_1_and_2(
    tmp_path):
  # SIGTERM (a preemption, a node drain) stops both with a checkpoint and a status the Job
  # restarts (supervise.STOPPED_EXIT): training is not over. SIGINT (the operator) ends it: 0.
  from service.core.checkpoint import latest_step  # pylint: disable=import-outside-toplevel
  ckpt = ['--checkpoint-dir', str(tmp_path / 'ckpt'), '--checkpoint-every-steps', '0',
          '--checkpoint-every-seconds', '0']
  job = mp_server.start(tmp_path, extra=ckpt)
  try:
    _train(job[0][1], [0])
    job[1][0].send_signal(signal.SIGTERM)  # one pod told to stop: the job stops with it
    codes = [_wait_exit(p, 60)[0] for p, _, _ in job]
    errs = [p.stderr.read() for p, _, _ in job]
    assert codes == [supervise.STOPPED_EXIT] * 2, (codes, [e[-2000:] for e in errs])
  finally:
    mp_server.stop(job)
  assert latest_step(str(tmp_path / 'ckpt')) == 1
  # Two processes' checkpoint, restored by one process of 8 devices: one more step there.
  with mp_server.job(tmp_path, processes=1, devices=8, extra=ckpt) as one:
    pulled = _train(one[0][1], [1])
    assert mp_server.stop(one) == [0]
  mp_server.assert_params(pulled.params, mp_server.reference([EVERY] * 2))
  assert latest_step(str(tmp_path / 'ckpt')) == 2
  # And one process's, restored by two.
  with mp_server.job(tmp_path, extra=ckpt) as job:
    pulled = _train(job[1][1], [2])
    job[0][0].send_signal(signal.SIGINT)  # the operator's stop, to one process: both end, 0
    codes = [_wait_exit(p, 60)[0] for p, _, _ in job]
    assert codes == [0, 0], (codes, [p.stderr.read()[-2000:] for p, _, _ in job])
  mp_server.assert_params(pulled.params, mp_server.reference([EVERY] * 3))
  assert latest_step(str(tmp_path / 'ckpt')) == 3


def test_an_outsiders_shutdown_in_the_coordinators_store_stops_nothing(tmp_path):
  # A third process holding no secret writes `shutdown` into the real coordinator (raw gRPC,
  # as issue 22 did: before, both processes drained and exited 0, the Job Complete). It is
  # not signed: logged, ignored, and the job trains on.
  job = mp_server.start(tmp_path)
  try:
    _train(job[0][1], [0])
    coordinator = job[0][0].coordinator_port
    for forged in ('1', '1 final', '0' * 64 + ':1 final'):
      mp_server.forge(coordinator, 'lamb_sharded/shutdown', forged)
      time.sleep(2.5)  # the processes look every second
      assert [p.poll() for p, _, _ in job] == [None, None]
    pulled = _train(job[1][1], [1])
    assert pulled.step == 2
    mp_server.assert_params(pulled.params, mp_server.reference([EVERY] * 2))
  finally:
    codes = mp_server.stop(job)
  errs = [p.stderr.read() for p, _, _ in job]
  assert all("unauthenticated value in the job's store at 'lamb_sharded/shutdown'" in e
             for e in errs), [e[-2000:] for e in errs]
  assert codes == [supervise.STOPPED_EXIT] * 2, codes  # the real stop: SIGTERM, restartable


def test_kill_9_of_process_0_ends_the_other_with_one_line_naming_the_coordinator(tmp_path):
  # JAX aborts a process at once when the coordinator is gone: `serve` says so in one line.
  job = mp_server.start(tmp_path)
  try:
    last = _kill_one(job, victim=0)
    assert last.startswith('lamb-sharded serve: error: server process 1 of 2 was ended by JAX: '
                           'the job lost its coordinator (process 0, 127.0.0.1:'), last
  finally:
    mp_server.stop(job)


def test_kill_9_of_process_0s_server_ends_both_with_one_line_each(tmp_path):
  """The JAX child of process 0 killed (the OOM killer, say): process 0's `serve` says so in
  one line, process 1's that the job lost its coordinator -- without JAX's C++ stack trace --
  and both exit LOST_EXIT, for the group to restart. Neither printed the collectives' chatter
  at start."""
  import psutil  # pylint: disable=import-outside-toplevel
  job = mp_server.start(tmp_path)
  try:
    children = psutil.Process(job[0][0].pid).children()
    assert len(children) == 1, children
    os.kill(children[0].pid, signal.SIGKILL)
    codes = [_wait_exit(p[0], 30)[0] for p in job]
    errs = [p[0].stderr.read() for p in job]
    assert codes == [supervise.LOST_EXIT] * 2, (codes, [e[-3000:] for e in errs])
    for i, err in enumerate(errs):
      assert 'Traceback' not in err and 'stack trace' not in err, err[-3000:]
      assert '[Gloo]' not in err and 'Terminating process' not in err, err[-3000:]
      assert not [l for l in err.splitlines() if l.lstrip().startswith('@ ')], err[-3000:]
    assert errs[0].strip().splitlines()[-1] == (
        'lamb-sharded serve: error: server process 0 of 2 was killed (SIGKILL); exiting so '
        'that the job restarts from its last checkpoint'), errs[0][-2000:]
    assert errs[1].strip().splitlines()[-1].startswith(
        'lamb-sharded serve: error: server process 1 of 2 was ended by JAX: the job lost its '
        'coordinator'), errs[1][-2000:]
  finally:
    mp_server.stop(job)


def test_async_pushes_are_applied_in_one_order_on_every_process(tmp_path):
  # Two workers push at once: process 0 orders them, and process 1 applies them in its order.
  with mp_server.job(tmp_path, extra=['--step-mode', 'async', '--staleness-bound', '2']) as job:
    clients = [OptimizerClient(f'127.0.0.1:{job[w % 2][1]}', timeout=60) for w in EVERY]
    try:
      model_id = clients[0].pull().model_id
      results = _pool_map(lambda w: clients[w].push(0, mp_engine.grads(0, w), 1, f'worker-{w}',
                                                    model_id=model_id), EVERY)
      clients[0].wait_for_step(len(EVERY), timeout=60)
      pulled = clients[1].pull()
    finally:
      for c in clients:
        c.close()
  order = sorted(EVERY, key=lambda w: results[w].accepted_step)
  assert [results[w].accepted_step for w in order] == list(range(len(EVERY)))
  import optax  # pylint: disable=import-outside-toplevel
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(ServerConfig(**mp_engine.CONFIG), None, None)
  params = mp_engine.params()
  state = tx.init(params)
  for w in order:
    updates, state = tx.update(mp_engine.grads(0, w), state, params)
    params = optax.apply_updates(params, updates)
  assert pulled.step == len(EVERY)
  mp_server.assert_params(pulled.params, {k: np.asarray(v) for k, v in params.items()})


def _final_params(port):
  with OptimizerClient(f'127.0.0.1:{port}', timeout=60) as c:
    return c.pull()


def test_real_workers_wait_through_a_group_restart_and_end_as_an_uninterrupted_run(tmp_path):
  # `lamb-sharded worker` processes (the model and data deterministic by step) train a
  # 2-process server; process 1 is killed mid-run, the group restarts on its ports from the
  # last checkpoint, and the workers, which waited, finish: as one process of 8 devices ends.
  from svc import start_workers  # pylint: disable=import-outside-toplevel
  steps, batch = 12, {w: 16 for w in EVERY}

  def finish(workers, timeout=240):
    for w in workers:
      out = w.communicate(timeout=timeout)[0]
      assert w.returncode == 0, out[-3000:]

  with mp_server.job(tmp_path, processes=1, devices=8, init_params=False) as one:
    finish(start_workers(one[0][1], batch, steps))
    want = _final_params(one[0][1])
  ports = [mp_server.job_port(), mp_server.job_port()]
  ckpt = ['--checkpoint-dir', str(tmp_path / 'ckpt'), '--checkpoint-every-steps', '1',
          '--checkpoint-every-seconds', '0']
  job = mp_server.start(tmp_path, extra=ckpt, init_params=False, ports=ports)
  workers = start_workers(ports[0], batch, steps)
  try:
    with OptimizerClient(f'127.0.0.1:{ports[0]}', timeout=60) as c:
      c.wait_for_step(steps // 2, timeout=120)
    os.kill(job[1][0].pid, signal.SIGKILL)
    assert _wait_exit(job[0][0], 15)[0] == 3
    mp_server.stop(job)
    mp_server.wait_free(ports)  # the killed process's JAX child may still hold its port
    job = mp_server.start(tmp_path, extra=ckpt, init_params=False, ports=ports)
    finish(workers)
    got = _final_params(ports[0])
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
    mp_server.stop(job)
  assert got.step == want.step == steps
  for k, v in want.params.items():
    np.testing.assert_allclose(got.params[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_client_follows_a_server_restarted_with_another_number_of_processes(tmp_path):
  # One process of 8 devices, restarted from its checkpoint as two of 4 on the same ports (a
  # resized Job): a client that knew it as one process pulls whole leaves from both
  # and pushes each its parts; restarted as two of 3 (other parts), then one, then one
  # again, the same client pulls the same params each time.
  ckpt = ['--checkpoint-dir', str(tmp_path / 'ckpt'), '--checkpoint-every-steps', '1',
          '--checkpoint-every-seconds', '0']
  ports = mp_server.free_ports(2)
  client = OptimizerClient(f'127.0.0.1:{ports[0]}', timeout=60)
  try:
    with mp_server.job(tmp_path, processes=1, devices=8, extra=ckpt, ports=ports[:1]):
      _train(ports[0], [0])
      before = client.pull()
    mp_server.wait_free(ports[:1])
    with mp_server.job(tmp_path, extra=ckpt, ports=ports):
      like = {k[2:-2]: np.zeros_like(v) for k, v in before.params.items()}  # "['rows']"
      pulled = client.pull(like=like)  # as a worker pulls: into its own tree
      assert pulled.step == 1 and pulled.model_id != before.model_id
      for k, v in before.params.items():
        np.testing.assert_array_equal(pulled.params[k[2:-2]], v, err_msg=k)
      _pool_map(lambda w: client.push(1, mp_engine.grads(1, w), 1, f'worker-{w}',
                                      model_id=pulled.model_id), EVERY)
      client.wait_for_step(2, timeout=60)
      after = client.pull()
    mp_server.assert_params(after.params, mp_server.reference([EVERY] * 2))
    mp_server.wait_free(ports)
    # Two processes again, of 3 devices: no leaf divides into 6, each process holds them whole.
    with mp_server.job(tmp_path, devices=3, extra=ckpt, ports=ports):
      pulled = client.pull()
      assert pulled.step == 2 and pulled.model_id != after.model_id
      for k, v in after.params.items():
        np.testing.assert_array_equal(pulled.params[k], v, err_msg=k)
    mp_server.wait_free(ports)
    with mp_server.job(tmp_path, processes=1, devices=8, extra=ckpt, ports=ports[:1]):
      for _ in range(3):  # the first call may find process 1 gone (UNAVAILABLE)
        try:
          again = client.pull()
          break
        except grpc.RpcError as e:
          assert e.code() == grpc.StatusCode.UNAVAILABLE, e
      assert again.step == 2 and again.model_id != pulled.model_id
      for k, v in after.params.items():
        np.testing.assert_array_equal(again.params[k], v, err_msg=k)
    mp_server.wait_free(ports[:1])
    with mp_server.job(tmp_path, processes=1, devices=8, extra=ckpt, ports=ports[:1]):
      last = client.pull()  # one process again, another model_id: its leaves are whole
      assert last.step == 2 and last.model_id != again.model_id
      for k, v in after.params.items():
        np.testing.assert_array_equal(last.params[k], v, err_msg=k)
  finally:
    client.close()


def test_a_clients_calls_to_a_servers_processes_all_run_at_once_whatever_else_runs():
  # A push's part on one process waits (on the server) for its parts on the others: each
  # call's requests to the processes must all be under way at once, also while other
  # calls of the same client are, or a part queued behind waiting ones waits for the
  # server's timeout (a pool shared by the calls did that with concurrent pushes).
  from service.client import client as client_module  # pylint: disable=import-outside-toplevel

  def call(_):
    barrier = threading.Barrier(4, timeout=20)  # passes only with all 4 waiting at once
    return client_module._on_each(lambda i: barrier.wait() >= 0, range(4))  # pylint: disable=protected-access
  assert _pool_map(call, range(3)) == [[True] * 4] * 3
