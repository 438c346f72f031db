"""Real `lamb-sharded serve` processes of one multi-process job on 127.0.0.1, for the tests.

Every process has 4 simulated CPU devices unless told otherwise, is started
with PR_SET_PDEATHSIG (it dies with the test), and is ended by PID.
"""

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
import mp_engine  # noqa: E402  pylint: disable=wrong-import-position
from svc import ROOT  # noqa: E402  pylint: disable=wrong-import-position


# `lamb-sharded ARGS` that gets SIGKILL when the test process dies, whatever ends it (Linux):
# PR_SET_PDEATHSIG survives the exec. Not a `preexec_fn`: the test process has gRPC loaded,
# and a fork of it (which a preexec_fn forces) was now and then aborted by gRPC's poller.
DYING_WITH_PARENT = [sys.executable, '-c',
                     'import ctypes, os, signal, sys; '
                     'ctypes.CDLL(None).prctl(1, signal.SIGKILL); '
                     'os.execv(sys.executable, [sys.executable, "-m", "service.cli", '
                     '*sys.argv[1:]])']


# The job's secret (every process signs what it writes to the coordinator's store with it).
SECRET_ENV = 'LAMB_SHARDED_TEST_JOB_SECRET'
SECRET = 'a test job secret, not a secret'


def free_ports(n: int) -> list[int]:
  """`n` distinct free ports below the kernel's ephemeral range (ip_local_port_range:
  32768 and up).

  A port from `bind(0)` is free only until someone else binds an ephemeral one,
  and the other tests' servers do that all the time: a coordinator port taken
  meanwhile leaves the job waiting for JAX's 300 s initialisation timeout.
  """
  import random  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  ports = []
  while len(ports) < n:
    port = random.randrange(20000, 32000)
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
    if port not in ports:
      ports.append(port)
  return ports


def job_port() -> int:
  """A free port for a job's coordinator (`free_ports`)."""
  return free_ports(1)[0]


def init_file(tmp_path, params=None):
  """The --init-params file: `params` (path -> array; default mp_engine's)."""
  path = tmp_path / 'init.npz'
  if params is not None or not path.exists():
    np.savez(path, **(mp_engine.params() if params is None else params))
  return path


def start(tmp_path, processes=2, devices=4, extra=(), init_params=True, ports=None,
          params=None):
  """Starts the job's processes (on `ports`, default ephemeral ones); returns
  [(proc, port, metrics_port)] once all serve. `params`: the initial params (init_file)."""
  init_flags = ['--init-params', str(init_file(tmp_path, params))] if init_params else []
  coordinator = job_port()
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', SECRET_ENV: SECRET}
  job_flags = lambda i: (['--num-processes', str(processes), '--process-id', str(i),  # noqa: E731
                          '--coordinator-address', f'127.0.0.1:{coordinator}',
                          '--job-secret-env', SECRET_ENV]
                         if processes > 1 else [])
  procs = [subprocess.Popen(
      [*DYING_WITH_PARENT, 'serve', '--host', '127.0.0.1',
       '--port', str(ports[i] if ports else 0),
       '--metrics-port', '0', '--devices', str(devices),
       '--num-workers', str(mp_engine.WORKERS), '--learning-rate', '0.05',
       '--weight-decay', '0.01', *init_flags, *job_flags(i), '--log-level', 'WARNING', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  for p in procs:
    p.coordinator_port = coordinator  # for `forge`
  out = []
  try:
    for p in procs:  # each says so once the job has formed (after Gloo's lines, if any)
      lines = []
      while not (m := re.search(r'serving on [^:]+:(\d+).*metrics: port (\d+)',
                                lines[-1] if lines else '')):
        lines.append(_next_line(p, procs))
        assert lines[-1], (lines, p.poll(), p.stderr.read() if p.poll() is not None else '')
      out.append((p, int(m.group(1)), int(m.group(2))))
  except BaseException:
    stop(procs)
    raise
  return out


def forge(coordinator_port: int, key: str, value: str) -> None:
  """Writes `key` = `value` into the job's coordinator store as an outsider would: raw gRPC
  to JAX's coordination service, no secret, no part in the job (the service's incarnation,
  which every request must name, is in its own refusal of a request without it)."""
  import struct  # pylint: disable=import-outside-toplevel
  import grpc  # pylint: disable=import-outside-toplevel

  def varint(n):
    out = b''
    while True:
      b, n = n & 0x7f, n >> 7
      if not n:
        return out + bytes([b])
      out += bytes([b | 0x80])

  def field(number, payload):  # length-delimited
    return varint(number << 3 | 2) + varint(len(payload)) + payload

  # jaxlib 0.10's xla/tsl/protobuf/coordination_service.proto (package xla.coordination):
  # InsertKeyValueRequest: incarnations = 1, kv = 2 (key 1, value 2), allow_overwrite = 3;
  # TryGetKeyValueRequest: incarnations = 1, key = 2; Incarnations.service_incarnation = 3
  # (fixed64). Should a JAX upgrade change them, this fails loudly (an RPC error, or the
  # value not read back), never passes without having written.
  entry = field(2, field(1, key.encode()) + field(2, value.encode())) + varint(3 << 3) + b'\x01'
  with grpc.insecure_channel(f'127.0.0.1:{coordinator_port}') as channel:
    def rpc(name):
      return channel.unary_unary(f'/xla.coordination.CoordinationService/{name}',
                                 request_serializer=bytes, response_deserializer=bytes)
    incarnations = b''
    try:
      rpc('InsertKeyValue')(entry, timeout=10)
    except grpc.RpcError as e:
      found = re.search(r'currently (\d+)', e.details() or '')
      assert found, e.details()
      incarnations = field(1, varint(3 << 3 | 1) + struct.pack('<Q', int(found.group(1))))
      rpc('InsertKeyValue')(incarnations + entry, timeout=10)
    read = rpc('TryGetKeyValue')(incarnations + field(2, key.encode()), timeout=10)
    assert field(2, value.encode()) in read, read


def wait_free(ports, timeout=30.0):
  """Waits until every port of `ports` can be bound again (a process ends after its parent)."""
  import socket  # pylint: disable=import-outside-toplevel
  deadline = time.monotonic() + timeout
  for port in ports:
    while True:
      with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
          s.bind(('127.0.0.1', port))
          break
        except OSError:
          assert time.monotonic() < deadline, f'port {port} still in use'
      time.sleep(0.1)


def _next_line(proc, procs) -> str:
  """proc's next stdout line; fails at once if one of `procs` ends meanwhile (else the
  others would wait for it: JAX's 300 s)."""
  lines = queue.Queue()
  threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
  while True:
    try:
      return lines.get(timeout=0.5)
    except queue.Empty:
      ended = [q for q in procs if q.poll() is not None]
      assert not ended, (ended[0].args, ended[0].returncode, ended[0].stderr.read())


def stop(procs, timeout=30.0):
  """SIGTERM to those still running, then SIGKILL after `timeout`; then SIGKILL to any of
  their descendants still alive (a multi-process server's JAX child). The exit codes."""
  import psutil  # pylint: disable=import-outside-toplevel
  procs = [p[0] if isinstance(p, tuple) else p for p in procs]
  children = []
  for p in procs:
    with contextlib.suppress(psutil.NoSuchProcess):
      children += psutil.Process(p.pid).children(recursive=True)
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  for c in children:
    with contextlib.suppress(psutil.NoSuchProcess):
      c.kill()
  return [p.returncode for p in procs]


@contextlib.contextmanager
def job(tmp_path, **kwargs):
  """`start`, ended by PID whatever happens."""
  procs = start(tmp_path, **kwargs)
  try:
    yield procs
  finally:
    stop(procs)


def reference(pushes_per_step):
  """The params after steps of the given workers' gradients (mp_engine.grads), by optax."""
  import optax  # pylint: disable=import-outside-toplevel
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(ServerConfig(**mp_engine.CONFIG), None, None)
  params = mp_engine.params()
  state = tx.init(params)
  for step, workers in enumerate(pushes_per_step):
    g = [mp_engine.grads(step, w) for w in workers]
    updates, state = tx.update({k: sum(x[k] for x in g) / len(g) for k in params}, state,
                               params)
    params = optax.apply_updates(params, updates)
  return {k: np.asarray(v) for k, v in params.items()}


def assert_params(got, want):
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=2e-6, atol=2e-7, err_msg=k)
