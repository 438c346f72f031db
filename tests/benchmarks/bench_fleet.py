"""Benchmark: a fleet of N synchronous workers against one `lamb-sharded serve` process.

What is measured
----------------
A tiny model (2 float32 leaves, 136 parameters: what is measured is the
server's cost per RPC and per waiting worker, not bytes) is served by a real
server process on 127.0.0.1, started from an --init-params .npz:

    python -m service.cli serve --host 127.0.0.1 --port 0 --metrics-port 0 \\
        --log-level WARNING --devices 1 --num-workers N --init-params INIT.npz \\
        --max-inflight-pushes 4 --shutdown-grace-s 5

(the flags used are printed; everything else at its default: the RPC limit,
4,096, leaves room for a fleet of 1,000 synchronous workers, each with at most
one RPC at once, and the pool of --grpc-threads 16 does the blocking work). N
synchronous workers then run `--steps` steps each: push the gradient for step
t, then `wait_for_step(t + 1)` unless that push completed the step. Each
worker is a thread with its own OptimizerClient and its own TCP connection
(gRPC Python would otherwise share one connection between the channels of a
process with the same target and options: the client processes set
`grpc.use_local_subchannel_pool` on every channel they open, which also covers
the per-process channels OptimizerClient opens to a multi-process server). The
workers are threads of ceil(N / --workers-per-client) client processes (this
script with `--client`, 250 threads each by default), which connect, pull once
and then start together. A worker stops at its first failed RPC; every RPC has
a deadline (`--rpc-timeout`) and the whole row one more (`--row-timeout`), so a
server that stalls shows as steps not completed and RPCs failed, not as a hang.

Rows: each N of `--workers` against one server process, and `--mp-workers`
against a 2-process server (a jax.distributed job on 127.0.0.1, one simulated
device per process; workers push each process its part, OptimizerClient finds
the processes from DescribeModel). Columns:

  * steps done / asked: the server's step at the end (the lowest of its
    processes') / --steps.
  * steps/s: steps done / the run's wall time (from the start signal until
    every worker finished).
  * push p50 / p99 ms: latency of the workers' successful PushGradients calls.
  * Health p99 ms: a prober thread of this process calls
    grpc.health.v1.Health/Check on the server (process 0) every 50 ms during
    the run (deadline 5 s; a failed check counts as its time).
  * server threads: the most threads seen (psutil num_threads, summed over the
    server processes and their descendants, sampled every 100 ms), and
    before the start signal.
  * server RSS MB: the most resident memory seen, summed likewise.
  * server CPU ms/push: user + system CPU of the server processes and their
    descendants during the run / pushes answered.
  * RPC failures: pushes and waits that failed (by status code under the
    table), and waits that ended without the step.

Under the table, per row: the TCP connections established to the server's
gRPC port(s) once the workers connected (N for one process; 3N for two: each
worker's client of process 0, for describe and the waits, and its client of
each process, for the pushes), the health checks made, and the failures by kind.

Goals (issue 21; printed under the table, met or not): every step applied with
no RPC failed at every N; server CPU per push at the largest N <= 1.5x that at
the smallest; Health.Check p99 <= 1 s; server threads independent of N (here:
the most at the largest N at most the most at the smallest plus the server's
pool of --grpc-threads, 16, which grows as work comes and then stays: a thread
per waiting worker would add N).

How to run
----------
    python tests/benchmarks/bench_fleet.py                      # 10, 100, 1000; 200 on 2 processes
    python tests/benchmarks/bench_fleet.py --workers 10 20 --steps 5 --mp-workers 0
    python tests/benchmarks/bench_fleet.py --json /tmp/bench_fleet.json

Every process the script starts gets SIGKILL when the script dies
(PR_SET_PDEATHSIG) and is stopped by PID (SIGTERM, then SIGKILL) when a row
ends, fails, or the script gets SIGINT, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__)),
              os.path.join(ROOT, 'tests', 'multihost')):
  if _path not in sys.path:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import grpc
import numpy as np

from bench_service import at_least, machine_facts, proc_cpu_seconds
from mp_server import job_port, stop
# pylint: enable=g-import-not-at-top,wrong-import-position

SHAPES = {"['dense']['w']": (16, 8), "['dense']['b']": (8,)}  # 136 parameters
START_TIMEOUT_S = 180.0  # a server (or a job) to serve; client processes to connect
HEALTH_EVERY_S = 0.05
HEALTH_TIMEOUT_S = 5.0
SAMPLE_EVERY_S = 0.1
# A 2-process server's job secret (its processes sign what they write to the coordinator).
JOB_SECRET_ENV, JOB_SECRET = 'LAMB_SHARDED_BENCH_JOB_SECRET', 'the benchmark job, no secret'
GOALS = {'cpu_ratio': 1.5, 'health_p99_s': 1.0, 'pool_threads': 16}  # --grpc-threads' default
# A process that gets SIGKILL when this script dies, whatever ends it (Linux): the
# PR_SET_PDEATHSIG survives the exec (as tests/multihost/mp_server.py starts servers).
DYING_WITH_PARENT = [sys.executable, '-c',
                     'import ctypes, os, signal, sys; '
                     'ctypes.CDLL(None).prctl(1, signal.SIGKILL); '
                     'os.execv(sys.executable, [sys.executable, *sys.argv[1:]])']


# ----------------------------------------------------------------------------- processes


def server_flags(workers: int) -> list[str]:
  """The flags of every server process of a row of `workers` workers (not the job's)."""
  return ['--devices', '1', '--num-workers', str(workers), '--max-inflight-pushes', '4',
          '--shutdown-grace-s', '5']


@contextlib.contextmanager
def servers(workers: int, processes: int, init: str) -> Iterator[list[tuple]]:
  """`processes` server processes of one job (one: a lone server); yields [(proc, port)]."""
  job = []
  if processes > 1:
    job = ['--num-processes', str(processes), '--coordinator-address',
           f'127.0.0.1:{job_port()}', '--job-secret-env', JOB_SECRET_ENV]
  procs, errs = [], []
  try:
    for i in range(processes):
      errs.append(tempfile.TemporaryFile(mode='w+'))
      argv = [*DYING_WITH_PARENT, '-m', 'service.cli', 'serve', '--host', '127.0.0.1',
              '--port', '0', '--metrics-port', '0', '--log-level', 'WARNING',
              '--init-params', init, *server_flags(workers), *job,
              *(['--process-id', str(i)] if processes > 1 else [])]
      procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=errs[-1],
                                    text=True, env={**os.environ, 'PYTHONPATH': ROOT,
                                                    JOB_SECRET_ENV: JOB_SECRET}))
    out = []
    deadline = time.monotonic() + START_TIMEOUT_S
    for i, p in enumerate(procs):  # each says so once the job has formed
      ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
      line = p.stdout.readline() if ready else ''
      port = _port_of(line)
      if port is None:
        errs[i].seek(0)
        raise RuntimeError(f'server process {i} of {processes} did not start: {line!r}\n'
                           f'{errs[i].read()[-4000:]}')
      out.append((p, port))
    yield out
  finally:
    stop(procs)
    for e in errs:
      e.close()


def _port_of(line: str) -> Optional[int]:
  import re  # pylint: disable=import-outside-toplevel
  m = re.search(r'serving on [^:\s]+:(\d+)', line)
  return int(m.group(1)) if m else None


class Sampler:
  """Every SAMPLE_EVERY_S: threads and RSS of the server processes and their descendants."""

  def __init__(self, pids: Sequence[int]):
    self._pids = list(pids)
    self.threads, self.rss = 0, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='sampler', daemon=True)

  def sample(self) -> tuple[int, int]:
    import psutil  # pylint: disable=import-outside-toplevel
    threads = rss = 0
    for pid in self._pids:
      with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
          with contextlib.suppress(psutil.NoSuchProcess):
            threads += p.num_threads()
            rss += p.memory_info().rss
    self.threads, self.rss = max(self.threads, threads), max(self.rss, rss)
    return threads, rss

  def _run(self) -> None:
    while not self._stop.wait(SAMPLE_EVERY_S):
      self.sample()

  def start(self) -> 'Sampler':
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    self._thread.join()


class HealthProber:
  """Calls grpc.health.v1.Health/Check every HEALTH_EVERY_S; keeps each call's seconds."""

  def __init__(self, port: int):
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # pylint: disable=import-outside-toplevel
    self._channel = grpc.insecure_channel(f'127.0.0.1:{port}',
                                          options=[('grpc.use_local_subchannel_pool', 1)])
    self._check = health_pb2_grpc.HealthStub(self._channel).Check
    self._request = health_pb2.HealthCheckRequest()
    self.seconds: list[float] = []
    self.failures: collections.Counter = collections.Counter()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='health', daemon=True)

  def _run(self) -> None:
    while not self._stop.is_set():
      t = time.perf_counter()
      try:
        self._check(self._request, timeout=HEALTH_TIMEOUT_S)
      except grpc.RpcError as e:
        self.failures[e.code().name] += 1
      dt = time.perf_counter() - t
      self.seconds.append(dt)
      self._stop.wait(max(0.0, HEALTH_EVERY_S - dt))

  def start(self) -> 'HealthProber':
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    self._channel.close()


def server_step(ports: Sequence[int]) -> int:
  """The lowest step the server's processes are at (-1 if one does not answer)."""
  from service.protocol import pb  # pylint: disable=import-outside-toplevel
  from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc  # pylint: disable=import-outside-toplevel
  steps = []
  for port in ports:
    with grpc.insecure_channel(f'127.0.0.1:{port}',
                               options=[('grpc.use_local_subchannel_pool', 1)]) as channel:
      try:
        steps.append(pb_grpc.OptimizerServiceStub(channel).DescribeModel(
            pb.DescribeModelRequest(), timeout=30).step)
      except grpc.RpcError:
        steps.append(-1)
  return min(steps)


def server_connections(pids: Sequence[int], ports: Sequence[int]) -> int:
  """TCP connections established to the servers' gRPC ports, as the servers see them."""
  import psutil  # pylint: disable=import-outside-toplevel
  count = 0
  for pid, port in zip(pids, ports):
    with contextlib.suppress(psutil.Error):
      root = psutil.Process(pid)
      for p in [root, *root.children(recursive=True)]:
        count += sum(1 for c in p.net_connections('tcp')
                     if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
  return count


# ----------------------------------------------------------------------------- client processes


def client_argv(target: str, first: int, count: int, args: argparse.Namespace) -> list[str]:
  return [*DYING_WITH_PARENT, os.path.abspath(__file__), '--client', target, '--first',
          str(first), '--count', str(count), '--steps', str(args.steps), '--rpc-timeout',
          str(args.rpc_timeout)]


def _own_connections() -> None:
  """Every insecure channel this process opens gets a TCP connection of its own.

  OptimizerClient opens its channels with `grpc.insecure_channel`, also those to
  each process of a multi-process server: one worker per connection, as workers
  on hosts of their own would be.
  """
  make = grpc.insecure_channel

  def insecure_channel(target, options=None, compression=None):
    return make(target, [*(options or ()), ('grpc.use_local_subchannel_pool', 1)], compression)
  grpc.insecure_channel = insecure_channel


def run_client(args: argparse.Namespace) -> int:
  """`--client`: workers first..first+count-1 as threads; prints 'ready', waits for 'go
  SECONDS' on stdin, runs the steps within SECONDS, prints one JSON line of results."""
  _own_connections()
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(args.first)
  grads = {p: (1e-3 * rng.standard_normal(s)).astype(np.float32) for p, s in SHAPES.items()}
  go = threading.Event()
  deadline = [math.inf]
  lock = threading.Lock()
  latencies: list[float] = []
  failures: collections.Counter = collections.Counter()
  connected = threading.Semaphore(0)
  done = {'workers': 0}

  def fail(what: str) -> None:
    with lock:
      failures[what] += 1

  def steps(client, worker_id: str, mine: list[float]) -> bool:
    """The worker's steps; False at its first failure (counted)."""
    for t in range(args.steps):
      remaining = deadline[0] - time.monotonic()
      if remaining < 1.0:
        fail('row timeout')
        return False
      client.timeout = min(args.rpc_timeout, remaining)
      t0 = time.perf_counter()
      try:
        r = client.push(t, grads, 1, worker_id)
      except grpc.RpcError as e:
        fail(f'push {e.code().name}')
        return False
      mine.append(time.perf_counter() - t0)
      if r.applied:
        continue
      try:
        _, reached = client.wait_for_step(t + 1, timeout=client.timeout)
      except grpc.RpcError as e:
        fail(f'wait {e.code().name}')
        return False
      if not reached:
        fail('wait not reached')
        return False
    return True

  def worker(i: int) -> None:
    client = OptimizerClient(args.client, timeout=args.rpc_timeout, retries=1)
    mine: list[float] = []
    try:
      try:
        client.pull()  # connected (to every process of a multi-process server)
      except grpc.RpcError as e:
        fail(f'connect {e.code().name}')
        return
      finally:
        connected.release()
      go.wait()
      finished = steps(client, f'w{i:04d}', mine)
      with lock:
        done['workers'] += finished
    finally:
      with lock:
        latencies.extend(mine)
      client.close()

  threads = [threading.Thread(target=worker, args=(i,), name=f'w{i}', daemon=True)
             for i in range(args.first, args.first + args.count)]
  for t in threads:
    t.start()
  for _ in threads:
    connected.acquire()
  print('ready', flush=True)
  line = sys.stdin.readline().split()
  if not line or line[0] != 'go':
    return 1
  deadline[0] = time.monotonic() + float(line[1])
  go.set()
  for t in threads:
    t.join(max(0.0, deadline[0] + 2 * args.rpc_timeout + 15 - time.monotonic()))
  with lock:
    print(json.dumps({'latencies': latencies, 'failures': dict(failures),
                      'finished': done['workers'],
                      'running': sum(t.is_alive() for t in threads)}), flush=True)
  return 0


class ClientProcess:
  """A `--client` process of this script, its stdout lines read by a thread into a queue."""

  def __init__(self, argv: Sequence[str]):
    self.proc = subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def expect(self, deadline: float) -> Optional[str]:
    """The next stdout line before `deadline` (time.monotonic); None if none came."""
    try:
      line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      return None
    return line

  def stderr_tail(self) -> str:
    if self.proc.poll() is None:
      return '(still running)'
    return self.proc.stderr.read()[-2000:]


# ----------------------------------------------------------------------------- a row


def run_row(workers: int, processes: int, args: argparse.Namespace, init: str,
            log=print) -> dict:
  """N workers, `args.steps` steps, against a server of `processes` processes."""
  clients_n = math.ceil(workers / args.workers_per_client)
  with contextlib.ExitStack() as stack:
    job = stack.enter_context(servers(workers, processes, init))
    pids, ports = [p.pid for p, _ in job], [port for _, port in job]
    target = f'127.0.0.1:{ports[0]}'
    sizes = [workers // clients_n + (i < workers % clients_n) for i in range(clients_n)]
    clients = [ClientProcess(client_argv(target, sum(sizes[:i]), n, args))
               for i, n in enumerate(sizes)]
    stack.callback(stop, [c.proc for c in clients])
    deadline = time.monotonic() + START_TIMEOUT_S
    for c in clients:
      line = c.expect(deadline)
      if line is None or line.strip() != 'ready':
        raise RuntimeError(f'a client process did not connect: {line!r} {c.stderr_tail()}')
    connections = server_connections(pids, ports)
    sampler = Sampler(pids)
    idle_threads, _ = sampler.sample()
    cpu0 = sum(proc_cpu_seconds(pid) for pid in pids)
    prober = HealthProber(ports[0]).start()
    sampler.start()
    t0 = time.perf_counter()
    for c in clients:
      c.proc.stdin.write(f'go {args.row_timeout}\n')
      c.proc.stdin.flush()
    results = []
    deadline = time.monotonic() + args.row_timeout + 2 * args.rpc_timeout + 30
    for c in clients:
      line = c.expect(deadline)
      results.append(json.loads(line) if line else None)
    wall = time.perf_counter() - t0
    cpu = sum(proc_cpu_seconds(pid) for pid in pids) - cpu0
    prober.close()
    sampler.close()
    steps = server_step(ports)
  latencies = sorted(x for r in results if r for x in r['latencies'])
  failures: collections.Counter = collections.Counter()
  for r in results:
    failures.update(r['failures'] if r else {'client process gave no result': 1})
  failures.update({'health ' + k: v for k, v in prober.failures.items()})
  rpc_failures = sum(v for k, v in failures.items()
                     if k.startswith(('push ', 'wait ', 'connect ')))
  row = {
      'workers': workers, 'processes': processes, 'client_processes': clients_n,
      'steps_asked': args.steps, 'steps_done': steps, 'wall_s': wall,
      'steps_per_s': max(steps, 0) / wall, 'pushes': len(latencies),
      'push_p50_s': _quantile(latencies, 0.5), 'push_p99_s': _quantile(latencies, 0.99),
      'health_checks': len(prober.seconds),
      'health_p99_s': _quantile(sorted(prober.seconds), 0.99),
      'threads_idle': idle_threads, 'threads_max': sampler.threads, 'rss_max': sampler.rss,
      'cpu_s': cpu, 'cpu_per_push_s': cpu / len(latencies) if latencies else None,
      'rpc_failures': rpc_failures, 'failures': dict(failures), 'connections': connections,
      'workers_finished': sum(r['finished'] for r in results if r)}
  log(f'  {row_line(row)}')
  return row


def _quantile(sorted_values: Sequence[float], q: float) -> Optional[float]:
  if not sorted_values:
    return None
  return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ----------------------------------------------------------------------------- report


def _ms(x: Optional[float]) -> str:
  return 'n/a' if x is None else f'{x * 1e3:.1f}'


def row_line(r: dict) -> str:
  return (f"N={r['workers']} x {r['processes']} server process(es): {r['steps_done']}/"
          f"{r['steps_asked']} steps in {r['wall_s']:.1f}s, {r['pushes']} pushes, "
          f"{r['rpc_failures']} RPCs failed, {r['workers_finished']} workers finished")


def table(rows: list[dict]) -> str:
  lines = ['| workers | server processes | client processes | steps done / asked | steps/s | '
           'push p50 ms | push p99 ms | Health p99 ms | server threads (max; idle) | '
           'server RSS MB (max) | server CPU ms/push | RPC failures |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f"| {r['workers']} | {r['processes']} | {r['client_processes']} | "
        f"{r['steps_done']} / {r['steps_asked']} | {r['steps_per_s']:.2f} | "
        f"{_ms(r['push_p50_s'])} | {_ms(r['push_p99_s'])} | {_ms(r['health_p99_s'])} | "
        f"{r['threads_max']}; {r['threads_idle']} | {r['rss_max'] / 1e6:.0f} | "
        f"{_ms(r['cpu_per_push_s'])} | {r['rpc_failures']} |")
  return '\n'.join(lines)


def details(rows: list[dict]) -> str:
  out = []
  for r in rows:
    failures = ', '.join(f'{k} {v}' for k, v in sorted(r['failures'].items())) or 'none'
    out.append(f"  N={r['workers']} x {r['processes']}: {r['connections']} TCP connections to "
               f"the server at the start; {r['health_checks']} health checks; wall "
               f"{r['wall_s']:.1f}s; {r['pushes']} pushes answered; {r['workers_finished']} of "
               f"{r['workers']} workers finished; failures: {failures}")
  return '\n'.join(out)


def goals(rows: list[dict]) -> list[tuple[bool, str]]:
  """(met, text) of each of issue 21's goals, from the rows measured."""
  out = []
  bad = [r for r in rows if r['steps_done'] != r['steps_asked'] or r['rpc_failures']]
  out.append((not bad, 'every step applied, no RPC failed, at every N' + (
      ': not at ' + ', '.join(f"N={r['workers']} x {r['processes']} ({r['steps_done']}/"
                              f"{r['steps_asked']} steps, {r['rpc_failures']} failed)"
                              for r in bad) if bad else '')))
  lone = sorted((r for r in rows if r['processes'] == 1), key=lambda r: r['workers'])
  if len(lone) >= 2 and lone[0]['cpu_per_push_s'] and lone[-1]['cpu_per_push_s']:
    ratio = lone[-1]['cpu_per_push_s'] / lone[0]['cpu_per_push_s']
    out.append((ratio <= GOALS['cpu_ratio'],
                f"server CPU per push at N={lone[-1]['workers']} <= {GOALS['cpu_ratio']}x that "
                f"at N={lone[0]['workers']}: {ratio:.2f}x"))
  else:
    out.append((False, 'server CPU per push at the largest N vs the smallest: not measured '
                       '(two single-process rows with pushes needed)'))
  worst = max(rows, key=lambda r: r['health_p99_s'] or 0)
  out.append(((worst['health_p99_s'] or 0) <= GOALS['health_p99_s'],
              f"Health.Check p99 <= {GOALS['health_p99_s']:.0f} s: the worst row's "
              f"{_ms(worst['health_p99_s'])} ms (N={worst['workers']} x {worst['processes']})"))
  if len(lone) >= 2:
    bound = lone[0]['threads_max'] + GOALS['pool_threads']
    out.append((lone[-1]['threads_max'] <= bound,
                f"server threads independent of N (the most at N={lone[-1]['workers']} at most "
                f"N={lone[0]['workers']}'s + the pool's {GOALS['pool_threads']}): "
                f"{lone[-1]['threads_max']} vs {lone[0]['threads_max']}"))
  else:
    out.append((False, 'server threads independent of N: not measured (two single-process '
                       'rows needed)'))
  return out


# ----------------------------------------------------------------------------- main


def counts(minimum: int):
  """An argparse type: comma-separated integers >= `minimum` (bench_service.at_least each)."""
  one = at_least(minimum)
  return lambda text: [one(x) for x in text.split(',') if x] or [one(text)]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workers', type=counts(1), nargs='+', default=[[10, 100, 1000]],
                 help='worker counts against one server process: 10,100,1000 (the default) '
                      'or 10 100 1000')
  p.add_argument('--steps', type=at_least(1), default=20, help='steps per row (default 20)')
  p.add_argument('--mp-workers', type=at_least(0), default=200,
                 help='workers against a 2-process server (default 200; 0: skip)')
  p.add_argument('--workers-per-client', type=at_least(1), default=250,
                 help='worker threads per client process (default 250)')
  p.add_argument('--rpc-timeout', type=at_least(1), default=30,
                 help='deadline of each push and wait, seconds (default 30)')
  p.add_argument('--row-timeout', type=at_least(1), default=300,
                 help='the most a row\'s steps may take, seconds (default 300)')
  p.add_argument('--json', metavar='PATH', help='also write all figures here')
  p.add_argument('--client', metavar='TARGET', help=argparse.SUPPRESS)
  p.add_argument('--first', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--count', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.workers = [n for group in args.workers for n in group]
  return args


def _exit_on_signal(signum, frame) -> None:
  del frame
  raise SystemExit(f'signal {signum}')  # unwinds the finally blocks that stop the children


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.client:
    return run_client(args)
  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, _exit_on_signal)
  t_start = time.perf_counter()
  print('command: python tests/benchmarks/bench_fleet.py ' + ' '.join(sys.argv[1:]))
  print(f'machine: {machine_facts()}')
  print(f'model: {len(SHAPES)} float32 leaves, {sum(math.prod(s) for s in SHAPES.values())} '
        f'parameters; {args.steps} steps per row')
  print('server: python -m service.cli serve --host 127.0.0.1 --port 0 --metrics-port 0 '
        '--log-level WARNING --init-params INIT.npz ' + ' '.join(server_flags(0)).replace(
            '--num-workers 0', '--num-workers N')
        + (' (2-process row: + --num-processes 2 --process-id I --coordinator-address '
           '127.0.0.1:PORT)' if args.mp_workers else ''))
  print(f'workers: threads of ceil(N / {args.workers_per_client}) client processes, each '
        f'thread an OptimizerClient with its own TCP connection; RPC deadline '
        f'{args.rpc_timeout}s, row deadline {args.row_timeout}s')
  plan = [(n, 1) for n in args.workers] + ([(args.mp_workers, 2)] if args.mp_workers else [])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    init = os.path.join(tmp, 'init.npz')
    rng = np.random.default_rng(0)
    np.savez(init, **{p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()})
    for n, processes in plan:
      rows.append(run_row(n, processes, args, init))
  print(f'\nsynchronous workers, {args.steps} steps, {os.cpu_count()} CPU cores shared by the '
        f'server, the client processes and this one:\n')
  print(table(rows))
  print()
  print(details(rows))
  print('\nGoals (issue 21):')
  for met, text in goals(rows):
    print(f"  {'met    ' if met else 'NOT MET'}  {text}")
  wall = time.perf_counter() - t_start
  print(f'\nwall time {wall:.0f}s')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'steps': args.steps, 'shapes': SHAPES, 'server_flags': server_flags(0),
                 'rows': rows, 'goals': goals(rows), 'wall_s': wall}, f, indent=2)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
