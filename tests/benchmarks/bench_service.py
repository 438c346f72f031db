"""Benchmark: the optimizer service's synchronous step over real gRPC, vs raw gRPC streaming.

What is measured
----------------
A transformer-shaped model (a flat dict of float32 leaves keyed by paths like
"['layer0']['mlp']['w_in']"; about 109M parameters with `--size 100m`, BERT-base
shaped with a 30522x768 token embedding, about 10.6M with `--size 10m`) is
served by the real server, started as a separate process:

    python -m service.cli serve --host 127.0.0.1 --port 0 --devices 8 \\
        --num-workers W --log-level WARNING

(one fresh server per worker count W, in 1 and 4; its port is read from its
first stdout line). One client uploads the parameters with
`OptimizerClient.initialize`, then each timed step is:

  1. W workers push one gradient each for the current step, concurrently: W
     threads of this process, each with its own OptimizerClient (its own
     channel). Threads share the GIL, and on a small machine they share the
     cores with the server; the client cost is reported separately (client
     CPU s/step). All workers push the same read-only gradient arrays.
  2. The server applies the LAMB update when the W-th push commits; that
     push's RPC returns after the update was *dispatched* (JAX dispatches
     asynchronously, so the computation may still be running).
  3. One client pulls the new parameters (float32): this pull waits for the
     update to finish. Then every worker pulls them at once (ready params),
     as workers do after a step.

Two warm-up steps precede `--reps` timed steps (the server compiles its step
when the model is initialised; the warm-up covers first-touch effects such
as the first push buffers and the pulls' first transfers); medians are
reported.
Columns:

  * push s: from the first push's start until every push's last message
    (the commit) was handed to gRPC *and* every push but the step-completing
    one returned. It includes the server's receive, checksum, NaN check and the
    commit of the W-1 non-completing pushes (the first push of a step becomes
    the host accumulator as is; the others are added to it in place).
    The time each message is handed over is taken by wrapping the client's
    stub (the request iterator's exhaustion; gRPC asks for the next message
    only after the previous one was accepted by the transport).
  * apply s: from the end of `push s` until the new parameters are ready:
    the rest of the completing push's RPC (its last bytes in flight, its
    commit: adding it to the host accumulator, the copy of the sum onto the
    mesh, and the dispatch of the LAMB update) plus the first pull's extra
    time over a pull of ready params by one client alone (the wait for the
    update's computation). The details give the commit-only
    tail of the non-completing pushes (W > 1) and the RPC part alone.
  * pull s: the W workers' concurrent PullParameters of all parameters
    (float32, ready), from the first start to the last end.
  * ingestion MB/s: W x gradient bytes / push s (MB = 1e6 bytes).
  * raw gRPC MB/s: the baseline, measured in the same run, interleaved with
    the service steps: a bare grpcio client-streaming server (this script
    with `--raw-server`, a separate process; identity (de)serializers; it
    only counts the bytes) receives W concurrent streams, each of one
    worker's gradient bytes in messages of service.protocol.chunks.DEFAULT_CHUNK_BYTES
    (1 MiB, cut per leaf as the service's client does), with the service's
    message size limits. Rate: W x gradient bytes / (first start .. last
    return). The raw client copies each chunk out of the array (`tobytes`);
    the service's client also copies each chunk once (into the message
    bytes it encodes itself) and computes the stream checksum.
  * ingestion / raw: the service's rate as a fraction of the baseline.
  * pull MB/s: W x parameter bytes / pull s.
  * raw pull MB/s: the baseline of pulls, measured in the same run: the same
    bare grpcio server sends W concurrent server streams, each of a model's
    bytes (the same leaf shapes) in messages of 1 MiB cut per leaf, each a copy
    out of its array (`tobytes`); its client only counts the bytes. The
    service's client parses each chunk and copies it into the pulled arrays,
    and checks the checksum.
  * pull / raw: the service's pull rate as a fraction of that baseline.
  * raw with the copy (printed under the table): both baselines again, the
    sink copying each message into a buffer of its own and the pulling
    clients each message into an array of theirs (reused, as the service's
    buffers are): the least a server that keeps what it receives, or a
    client that keeps what it pulls, does beyond gRPC's own work.
  * peak RSS GB: VmHWM of the server process (/proc/<pid>/status) at the end
    of its run (initialisation included; VmHWM right after InitializeModel
    is in the details).
  * RSS / (state + overhead): peak RSS / (16 B x params + fixed overhead),
    16 B = float32 params, two moments and the accumulation buffer. The
    fixed overhead is the VmHWM of a server run through the same procedure
    (W = 1) with a tiny model of the same leaf structure (d_model 8, a few
    thousand params). Beyond params and moments, the server holds at most
    --max-inflight-pushes (default 2) model-sized gradient buffers, recycled:
    one per push being received and one for the step's sum; on this CPU mesh
    the devices wrap the sum's blocks without a copy, the apply donates the
    params and the LAMB state (it keeps the params only while a pull reads
    them), and a pull reads a leaf a chunk at a time.

Targets (for orientation): ingestion / raw >= 0.8; pull / raw >= 0.8;
RSS / (state + overhead) <= 1.3.

Ordered sum (`--ordered-sum`, instead of the rows above): each worker count W
is run on two servers at once, one with `--ordered-sum true` (a step holds its
pushes and adds them by worker once the W-th arrives), one without (each push
added as it arrives), both with --max-inflight-pushes max(2, W) (what
--ordered-sum needs; unless --server-arg sets it). Their timed steps
alternate (off, on, on, off, off, on, ...), so that both meet the same load
on a shared machine. A table gives, per W, both servers' medians of push s,
apply s, step s (push s + apply s, per step: the ordered sum moves the adding
from beside the receiving into the completing push's commit) and server CPU
s/step, their peak RSS, and the ratios on / off.

The workers stay threads of one process: what had made four pulling threads
slow was the kernel faulting in fresh memory for every pull (they queue on
the process's memory map), which the client now avoids by reusing the memory
of a pull nothing holds (service.protocol.chunks.Recycler), not the GIL
(threads that only count the bytes ran as fast as the raw clients).

Processes axis (`--processes 1 2`, the default): one worker, OptimizerClient
given process 0's address, pushing the gradient to a server of P processes
x 8/P simulated devices (a jax.distributed job on 127.0.0.1, started from an
--init-params .npz; --num-workers 100000 so that no step completes: every
push is received, checked and added into the step's float32 sum). Per push:
push s (the call, the client's split into each process's parts included),
ingestion MB/s (gradient bytes / push s), each process's server CPU; beside
the raw baseline in the same run, one stream of the whole gradient and one
stream per process of its part at once. All processes share this machine's
cores with the client and the baseline, so the cores, not the processes,
bound the figure: it shows what splitting costs, not how it scales.

How to run
----------
    python tests/benchmarks/bench_service.py                  # 100M params, 5 reps
    python tests/benchmarks/bench_service.py --size 10m --reps 3
    python tests/benchmarks/bench_service.py --json /tmp/bench_service.json
    python tests/benchmarks/bench_service.py --server-arg=--max-inflight-pushes=4
    python tests/benchmarks/bench_service.py --workers --processes 1 2  # the processes axis only
    python tests/benchmarks/bench_service.py --size 10m --ordered-sum  # the ordered sum's cost

`--raw-server` runs only the baseline's sink (used by the script itself).
Every process the script starts is stopped (SIGTERM, then SIGKILL) when the
script exits, fails, or gets SIGINT, SIGTERM or SIGHUP (not on SIGKILL).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import platform
import queue
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A multi-process server's job secret (its processes sign what they write to the coordinator).
JOB_SECRET_ENV, JOB_SECRET = 'LAMB_SHARDED_BENCH_JOB_SECRET', 'the benchmark job, no secret'
if ROOT not in sys.path:  # run from a checkout without PYTHONPATH
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import grpc
import numpy as np

from service.protocol import MAX_RECEIVE_BYTES
from service.protocol.chunks import DEFAULT_CHUNK_BYTES
# pylint: enable=g-import-not-at-top,wrong-import-position

SIZES = {
    '100m': dict(vocab=30522, max_len=512, d_model=768, layers=12),
    '10m': dict(vocab=10000, max_len=512, d_model=256, layers=10),
}
WORKER_COUNTS = (1, 4)
STATE_BYTES_PER_PARAM = 16  # float32 params, 2 moments, 1 accumulation buffer
CHUNK_BYTES = DEFAULT_CHUNK_BYTES
# The service's limits (service.protocol.MAX_RECEIVE_BYTES, on both ends).
MAX_MESSAGE = MAX_RECEIVE_BYTES
GRPC_THREADS = 32  # the server's default thread pool
CALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 180.0
WARMUP_STEPS = 2  # first-touch effects (buffers, transfers) of the first steps
RAW_PULL_METHOD = '/bench.RawSink/Pull'
RAW_METHOD = '/bench.RawSink/Push'
RAW_COPY_METHOD = '/bench.RawSink/PushCopy'
TARGETS = {'ingestion_vs_raw': 0.8, 'pull_vs_raw': 0.8, 'rss_ratio': 1.3}
PROCESS_AXIS_WORKERS = 100_000  # a step never completes: every push is added into the sum


# ----------------------------------------------------------------------------- model


def leaf_shapes(vocab: int, max_len: int, d_model: int, layers: int) -> dict[str, tuple]:
  """Path -> shape of a transformer encoder's leaves (keystr-style paths)."""
  d, h = d_model, 4 * d_model
  shapes = {"['embed']['token']": (vocab, d), "['embed']['position']": (max_len, d)}
  for i in range(layers):
    layer = {"['attn']['q']": (d, d), "['attn']['k']": (d, d), "['attn']['v']": (d, d),
             "['attn']['out']": (d, d), "['ln1']['scale']": (d,), "['ln1']['bias']": (d,),
             "['mlp']['w_in']": (d, h), "['mlp']['b_in']": (h,), "['mlp']['w_out']": (h, d),
             "['mlp']['b_out']": (d,), "['ln2']['scale']": (d,), "['ln2']['bias']": (d,)}
    shapes.update({f"['layer{i}']{k}": s for k, s in layer.items()})
  shapes["['final_ln']['scale']"] = (d,)
  shapes["['final_ln']['bias']"] = (d,)
  return shapes


def tiny_shapes(layers: int) -> dict[str, tuple]:
  """The same leaf structure with d_model 8: the runtime's fixed overhead."""
  return leaf_shapes(vocab=16, max_len=8, d_model=8, layers=layers)


def random_tree(shapes: dict[str, tuple], seed: int, scale: float) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {p: scale * rng.standard_normal(s, dtype=np.float32) for p, s in shapes.items()}


def tree_bytes(tree: dict[str, np.ndarray]) -> int:
  return sum(a.nbytes for a in tree.values())


def tree_params(tree: dict[str, np.ndarray]) -> int:
  return sum(a.size for a in tree.values())


# ----------------------------------------------------------------------------- processes


def proc_status_bytes(pid: int, key: str) -> int:
  """A kB field of /proc/<pid>/status (VmHWM, VmRSS), in bytes."""
  with open(f'/proc/{pid}/status', encoding='ascii') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def proc_cpu_seconds(pid: int) -> float:
  """utime + stime of a process (all its threads) and of its live descendants.

  A process of a multi-process server is `serve` watching its JAX child
  (service/server/supervise.py), which does the work.
  """
  import psutil  # pylint: disable=import-outside-toplevel
  total = 0.0
  root = psutil.Process(pid)
  for proc in [root, *root.children(recursive=True)]:
    with contextlib.suppress(psutil.NoSuchProcess):
      t = proc.cpu_times()
      total += t.user + t.system
  return total


def self_cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def stop_process(proc: subprocess.Popen) -> None:
  """SIGTERM, then SIGKILL if it is still alive after 20 s."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@contextlib.contextmanager
def child_process(argv: Sequence[str], what: str) -> Iterator[tuple[subprocess.Popen, int]]:
  """Starts `argv`, reads 'serving on HOST:PORT' from its first stdout line; stops it at exit."""
  with tempfile.TemporaryFile(mode='w+') as err:
    proc = subprocess.Popen(list(argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, 'PYTHONPATH': ROOT, JOB_SECRET_ENV: JOB_SECRET})
    try:
      ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
      line = proc.stdout.readline() if ready else ''
      m = re.search(r'serving on [^:\s]+:(\d+)', line)
      if not m:
        stop_process(proc)
        err.seek(0)
        raise RuntimeError(f'{what} did not start: {line!r}\n{err.read()[-4000:]}')
      yield proc, int(m.group(1))
    finally:
      stop_process(proc)


def service_argv(workers: int, extra: Sequence[str]) -> list[str]:
  return [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
          '--devices', '8', '--num-workers', str(workers), '--metrics-port', '0',
          '--log-level', 'WARNING', *extra]


# ----------------------------------------------------------------------------- raw baseline


def serve_raw(size: str) -> int:
  """The baseline: a client-streaming sink that counts the bytes it receives (`Push`), and a
  server-streaming source (`Pull`) that sends a model of `size`'s bytes as the service's pulls
  cut them, each message a copy out of the arrays (`raw_chunks`)."""
  model = random_tree(leaf_shapes(**SIZES[size]), 3, 0.02)
  free: queue.SimpleQueue = queue.SimpleQueue()  # PushCopy's buffers, reused (pages touched)

  def push(request_iterator, context):
    del context
    count = total = 0
    for msg in request_iterator:
      count += 1
      total += len(msg)
    return f'{count} {total}'.encode()

  def push_copy(request_iterator, context):
    """`push`, each message also copied into a buffer of the stream's: the least a server
    does that keeps what it receives."""
    del context
    try:
      buf = free.get_nowait()
    except queue.Empty:
      buf = np.zeros(tree_bytes(model), np.uint8)
    count = total = 0
    try:
      for msg in request_iterator:
        n = len(msg)
        if total + n <= buf.size:
          buf[total:total + n] = np.frombuffer(msg, np.uint8)
        count += 1
        total += n
    finally:
      free.put(buf)
    return f'{count} {total}'.encode()

  def pull(request, context):
    del request, context
    yield from raw_chunks(model)

  handler = grpc.method_handlers_generic_handler(
      'bench.RawSink', {'Push': grpc.stream_unary_rpc_method_handler(push),
                        'PushCopy': grpc.stream_unary_rpc_method_handler(push_copy),
                        'Pull': grpc.unary_stream_rpc_method_handler(pull)})
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=GRPC_THREADS),
                       options=[('grpc.max_receive_message_length', MAX_MESSAGE),
                                ('grpc.max_send_message_length', MAX_MESSAGE)])
  server.add_generic_rpc_handlers((handler,))
  port = server.add_insecure_port('127.0.0.1:0')
  server.start()
  print(f'raw sink serving on 127.0.0.1:{port}', flush=True)
  stopped = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stopped.set())
  stopped.wait()
  server.stop(0).wait()
  return 0


def raw_chunks(tree: dict[str, np.ndarray]) -> Iterator[bytes]:
  """Each leaf's bytes in CHUNK_BYTES pieces, as the service's client cuts them."""
  for a in tree.values():
    raw = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    for off in range(0, len(raw), CHUNK_BYTES):
      yield raw[off:off + CHUNK_BYTES].tobytes()


class RawClients:
  """W channels to the raw baseline; `round()` streams one gradient on each, concurrently,
  `pull_round()` receives the model's bytes on each, concurrently."""

  def __init__(self, port: int, workers: int, pool: concurrent.futures.ThreadPoolExecutor):
    self.channels = [grpc.insecure_channel(f'127.0.0.1:{port}', options=[
        ('grpc.max_receive_message_length', MAX_MESSAGE)]) for _ in range(workers)]
    self.calls = [ch.stream_unary(RAW_METHOD) for ch in self.channels]
    self.copy_calls = [ch.stream_unary(RAW_COPY_METHOD) for ch in self.channels]
    self.pulls = [ch.unary_stream(RAW_PULL_METHOD) for ch in self.channels]
    self.pool = pool
    self._into: dict[int, np.ndarray] = {}  # channel -> its pulls' buffer (pages touched)

  def pull_round(self, expected: int, copy: bool = False) -> float:
    """Seconds from the first pull's start until every pull received `expected` bytes;
    with `copy`, each message is also copied into an array of the channel's (reused): the
    least a client does that keeps what it pulls."""

    def one(i, call):
      into = self._into.get(i) if copy else None
      if copy and (into is None or into.size != expected):
        into = self._into[i] = np.zeros(expected, np.uint8)
      t = time.perf_counter()
      total = 0
      for m in call(b'', timeout=CALL_TIMEOUT_S):
        if into is not None and total + len(m) <= expected:
          into[total:total + len(m)] = np.frombuffer(m, np.uint8)
        total += len(m)
      if total != expected:
        raise RuntimeError(f'raw source sent {total} bytes, expected {expected}')
      return t, time.perf_counter()

    spans = [f.result() for f in [self.pool.submit(one, i, c)
                                  for i, c in enumerate(self.pulls)]]
    return max(e for _, e in spans) - min(s for s, _ in spans)

  def round(self, grads: dict[str, np.ndarray],
            parts: Optional[Sequence[dict[str, np.ndarray]]] = None, copy: bool = False) -> float:
    """Seconds from the first stream's start until every stream returned.

    Every channel streams `grads`, or channel i streams `parts[i]`; with `copy`, to the
    sink that also copies each message into a buffer (`PushCopy`).
    """
    trees = list(parts) if parts is not None else [grads] * len(self.calls)
    calls = self.copy_calls if copy else self.calls

    def one(call, tree):
      expected = tree_bytes(tree)
      t = time.perf_counter()
      count, total = map(int, call(raw_chunks(tree), timeout=CALL_TIMEOUT_S).split())
      if total != expected:
        raise RuntimeError(f'raw sink counted {total} bytes in {count} messages, sent {expected}')
      return t, time.perf_counter()

    spans = [f.result() for f in [self.pool.submit(one, c, tree)
                                  for c, tree in zip(calls, trees)]]
    return max(e for _, e in spans) - min(s for s, _ in spans)

  def close(self) -> None:
    for ch in self.channels:
      ch.close()


# ----------------------------------------------------------------------------- service steps


class _TimedStub:
  """Wraps an OptimizerServiceStub: records when a push's request stream was exhausted."""

  def __init__(self, stub):
    self._stub = stub
    self.sent_at: Optional[float] = None

  def PushGradients(self, requests, **kwargs):  # pylint: disable=invalid-name
    def timed():
      yield from requests
      self.sent_at = time.perf_counter()
    self.sent_at = None
    return self._stub.PushGradients(timed(), **kwargs)

  def __getattr__(self, name):
    return getattr(self._stub, name)


@dataclasses.dataclass
class StepTiming:
  push_s: float
  apply_s: float
  pull_s: float
  apply_rpc_s: float  # the completing push's return - the end of push_s
  first_pull_s: float  # the pull that waits for the update
  commit_tails_s: list[float]  # return - last message sent, of the non-completing pushes
  server_cpu_s: float
  client_cpu_s: float


def make_clients(port: int, workers: int) -> list:
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  clients = []
  for _ in range(workers):
    c = OptimizerClient(f'127.0.0.1:{port}', timeout=CALL_TIMEOUT_S)
    c._stub = _TimedStub(c._stub)  # pylint: disable=protected-access
    clients.append(c)
  return clients


def sync_step(clients: list, pool: concurrent.futures.ThreadPoolExecutor, step: int,
              model_id: str, grads: dict[str, np.ndarray], server_pid: int) -> StepTiming:
  """One synchronous step: all workers push concurrently, then clients[0] pulls twice."""
  cpu0, self0 = proc_cpu_seconds(server_pid), self_cpu_seconds()

  def push(i: int):
    c = clients[i]
    t = time.perf_counter()
    r = c.push(step, grads, num_examples=1, worker_id=f'worker-{i}', model_id=model_id)
    done = time.perf_counter()
    return t, c._stub.sent_at, done, r  # pylint: disable=protected-access

  spans = [f.result() for f in [pool.submit(push, i) for i in range(len(clients))]]
  completing = [i for i, (*_, r) in enumerate(spans) if r.applied]
  if len(completing) != 1 or any(r.accepted_step != step for *_, r in spans):
    raise RuntimeError(f'step {step}: expected exactly one push to apply the step, got '
                       f'{[r for *_, r in spans]}')
  c = completing[0]
  t0 = min(s[0] for s in spans)
  others = [s for i, s in enumerate(spans) if i != c]
  ingest_end = max([s[1] for s in spans] + [s[2] for s in others])
  first_pull_s = timed_pull(clients[0], step + 1)  # waits for the update
  pull_s = concurrent_pulls(clients, pool, step + 1)
  # One pull of ready params alone, for the update's share of the first pull.
  single_s = pull_s if len(clients) == 1 else timed_pull(clients[0], step + 1)
  apply_rpc_s = max(0.0, spans[c][2] - ingest_end)  # < 0 when another push returned later
  return StepTiming(push_s=ingest_end - t0, apply_s=apply_rpc_s + max(0.0, first_pull_s - single_s),
                    pull_s=pull_s, apply_rpc_s=apply_rpc_s, first_pull_s=first_pull_s,
                    commit_tails_s=[s[2] - s[1] for s in others],
                    server_cpu_s=proc_cpu_seconds(server_pid) - cpu0,
                    client_cpu_s=self_cpu_seconds() - self0)


def concurrent_pulls(clients: list, pool: concurrent.futures.ThreadPoolExecutor,
                     want_step: int) -> float:
  """Every worker pulls the (ready) params at once: first start to last end."""
  def one(c):
    t = time.perf_counter()
    timed_pull(c, want_step)
    return t, time.perf_counter()
  spans = [f.result() for f in [pool.submit(one, c) for c in clients]]
  return max(e for _, e in spans) - min(s for s, _ in spans)


def timed_pull(client, want_step: int) -> float:
  t = time.perf_counter()
  pulled = client.pull()
  dt = time.perf_counter() - t
  if pulled.step != want_step:
    raise RuntimeError(f'pulled step {pulled.step}, expected {want_step}')
  return dt


def run_server(workers: int, params: dict, grads: dict, reps: int, extra_flags: Sequence[str],
               raw: Optional[RawClients] = None, log: Callable[[str], None] = print) -> dict:
  """A fresh server with `workers` workers: init, warm-up, `reps` timed steps (+ raw rounds)."""
  with contextlib.ExitStack() as stack:
    proc, port = stack.enter_context(
        child_process(service_argv(workers, extra_flags), f'server (W={workers})'))
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers))
    clients = make_clients(port, workers)
    for c in clients:
      stack.callback(c.close)
    t = time.perf_counter()
    model_id = clients[0].initialize(params)
    init_s = time.perf_counter() - t
    hwm_init = proc_status_bytes(proc.pid, 'VmHWM')
    t = time.perf_counter()
    for step in range(WARMUP_STEPS):
      sync_step(clients, pool, step, model_id, grads, proc.pid)
    warmup_s = time.perf_counter() - t
    if raw is not None:
      for copy in (False, True):  # warm-up
        raw.round(grads, copy=copy)
        raw.pull_round(tree_bytes(params), copy=copy)
    steps, raw_s, raw_pull_s, raw_copy_s, raw_pull_copy_s = [], [], [], [], []
    for rep in range(reps):  # service step, raw rounds, service step, ...
      steps.append(sync_step(clients, pool, WARMUP_STEPS + rep, model_id, grads, proc.pid))
      if raw is not None:
        raw_s.append(raw.round(grads))
        raw_pull_s.append(raw.pull_round(tree_bytes(params)))
        raw_copy_s.append(raw.round(grads, copy=True))
        raw_pull_copy_s.append(raw.pull_round(tree_bytes(params), copy=True))
      s = steps[-1]
      log(f'    rep {rep}: push {s.push_s:.3f}s apply {s.apply_s:.3f}s pull {s.pull_s:.3f}s'
          + (f', raw push {raw_s[-1]:.3f}s pull {raw_pull_s[-1]:.3f}s, with the copy: push '
             f'{raw_copy_s[-1]:.3f}s pull {raw_pull_copy_s[-1]:.3f}s' if raw_s else ''))
    return {'workers': workers, 'pid': proc.pid, 'init_s': init_s, 'warmup_s': warmup_s,
            'vmhwm_after_init': hwm_init, 'vmhwm': proc_status_bytes(proc.pid, 'VmHWM'),
            'vmrss_end': proc_status_bytes(proc.pid, 'VmRSS'),
            'steps': [dataclasses.asdict(s) for s in steps], 'raw_s': raw_s,
            'raw_pull_s': raw_pull_s, 'raw_copy_s': raw_copy_s,
            'raw_pull_copy_s': raw_pull_copy_s}


def ordered_flags(workers: int, server_args: Sequence[str], ordered: bool) -> list[str]:
  """The flags of a server of the ordered sum's comparison: `server_args`, --max-inflight-pushes
  max(2, W) unless given, and --ordered-sum true if `ordered`."""
  given = any(a.startswith('--max-inflight-pushes') for a in server_args)
  return (list(server_args) + ([] if given else ['--max-inflight-pushes', str(max(2, workers))])
          + (['--ordered-sum', 'true'] if ordered else []))


def run_ordered_pair(workers: int, params: dict, grads: dict, reps: int,
                     server_args: Sequence[str], log: Callable[[str], None] = print) -> dict:
  """Two fresh servers of `workers` workers, without and with --ordered-sum, at once: each
  initialised and warmed up, then `reps` timed steps each, alternating."""
  with contextlib.ExitStack() as stack:
    servers = {}
    for name, ordered in (('off', False), ('on', True)):
      flags = ordered_flags(workers, server_args, ordered)
      log(f'  --ordered-sum {name}: ' + ' '.join(flags))
      proc, port = stack.enter_context(child_process(
          service_argv(workers, flags), f'server (W={workers}, ordered sum {name})'))
      clients = make_clients(port, workers)
      for c in clients:
        stack.callback(c.close)
      servers[name] = (proc, clients, clients[0].initialize(params))
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers))
    steps = {name: [] for name in servers}
    for step in range(WARMUP_STEPS + reps):
      turns = list(servers.items())
      for name, (proc, clients, model_id) in turns[::-1] if step % 2 else turns:  # who first
        timing = sync_step(clients, pool, step, model_id, grads, proc.pid)
        if step >= WARMUP_STEPS:
          steps[name].append(timing)
      if step >= WARMUP_STEPS:
        log(f'    rep {step - WARMUP_STEPS}: ' + ', '.join(
            f'{name} push {s[-1].push_s:.3f}s apply {s[-1].apply_s:.3f}s'
            for name, s in steps.items()))
    return {'workers': workers, **{
        name: {'flags': ordered_flags(workers, server_args, name == 'on'),
               'vmhwm': proc_status_bytes(proc.pid, 'VmHWM'),
               'steps': [dataclasses.asdict(s) for s in steps[name]]}
        for name, (proc, _, _) in servers.items()}}


def summarize_ordered(pair: dict) -> dict:
  """One worker count's servers without and with --ordered-sum: medians, ratios on / off."""
  row = {'workers': pair['workers']}
  for name in ('off', 'on'):
    steps = pair[name]['steps']
    med = lambda key, steps=steps: statistics.median(s[key] for s in steps)  # noqa: E731
    row[name] = {'push_s': med('push_s'), 'apply_s': med('apply_s'),
                 'step_s': statistics.median(s['push_s'] + s['apply_s'] for s in steps),
                 'server_cpu_s': med('server_cpu_s'), 'peak_rss': pair[name]['vmhwm']}
  row['ratio'] = {k: row['on'][k] / row['off'][k] if row['off'][k] else float('nan')
                  for k in row['off']}
  return row


def ordered_table(rows: list[dict]) -> str:
  lines = ['| workers | step s off | step s on | on / off | push s off / on | apply s off / on | '
           'server CPU s/step off / on | on / off | peak RSS GB off / on | on / off |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    off, on, ratio = r['off'], r['on'], r['ratio']
    lines.append(f"| {r['workers']} | {off['step_s']:.3f} | {on['step_s']:.3f} | "
                 f"{ratio['step_s']:.2f} | {off['push_s']:.3f} / {on['push_s']:.3f} | "
                 f"{off['apply_s']:.3f} / {on['apply_s']:.3f} | "
                 f"{off['server_cpu_s']:.2f} / {on['server_cpu_s']:.2f} | "
                 f"{ratio['server_cpu_s']:.2f} | {off['peak_rss'] / 1e9:.2f} / "
                 f"{on['peak_rss'] / 1e9:.2f} | {ratio['peak_rss']:.2f} |")
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- processes axis


@contextlib.contextmanager
def server_job(processes: int, init: str, extra: Sequence[str]) -> Iterator[list[tuple]]:
  """`processes` serve processes of one job (8 / processes simulated devices each), started
  from the .npz `init`, accumulating without ever completing a step; yields [(proc, port)]."""
  devices = 8 // processes
  flags = ['--init-params', init, *extra]
  if processes > 1:
    coordinator = _free_port()
    flags += ['--num-processes', str(processes), '--coordinator-address',
              f'127.0.0.1:{coordinator}', '--job-secret-env', JOB_SECRET_ENV]
  with contextlib.ExitStack() as stack:
    argvs = [service_argv(PROCESS_AXIS_WORKERS, [*flags] + (
        ['--process-id', str(i)] if processes > 1 else [])) for i in range(processes)]
    for argv in argvs:
      argv[argv.index('--devices') + 1] = str(devices)
    # Every process must be started before any prints its line (the job forms first).
    jobs = [stack.enter_context(_started(argv, f'server process {i} of {processes}'))
            for i, argv in enumerate(argvs)]
    yield [job() for job in jobs]


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def _started(argv: Sequence[str], what: str):
  """Starts `argv` now; yields a function that waits for its 'serving on' line."""
  with tempfile.TemporaryFile(mode='w+') as err:
    proc = subprocess.Popen(list(argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, 'PYTHONPATH': ROOT, JOB_SECRET_ENV: JOB_SECRET})

    def ready() -> tuple[subprocess.Popen, int]:
      ok, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
      line = proc.stdout.readline() if ok else ''
      m = re.search(r'serving on [^:\s]+:(\d+)', line)
      if not m:
        err.seek(0)
        raise RuntimeError(f'{what} did not start: {line!r}\n{err.read()[-4000:]}')
      return proc, int(m.group(1))
    try:
      yield ready
    finally:
      stop_process(proc)


def run_processes(processes: int, params: dict, grads: dict, reps: int,
                  extra_flags: Sequence[str], raw: RawClients,
                  log: Callable[[str], None] = print) -> dict:
  """One worker's pushes to a job of `processes` server processes, and raw rounds, interleaved.

  Every push is for step 0 under a new worker id, so each is received, checked and
  added into the step's sum, and no step completes (no LAMB update in the figure);
  OptimizerClient, given process 0's address, sends each process its parts in parallel.
  """
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  from service.client.sharded import Placements  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    init = os.path.join(tmp, 'init.npz')
    np.savez(init, **params)
    job = stack.enter_context(server_job(processes, init, extra_flags))
    client = stack.enter_context(OptimizerClient(f'127.0.0.1:{job[0][1]}',
                                                 timeout=CALL_TIMEOUT_S))
    d = client._stub.DescribeModel(pb_describe(), timeout=60)  # pylint: disable=protected-access
    placements = Placements.of(d)
    parts = placements.split(list(grads.items())) if placements else [grads]
    count = [0]

    def push() -> tuple[float, list[float]]:
      count[0] += 1
      cpu = [proc_cpu_seconds(p.pid) for p, _ in job]
      t = time.perf_counter()
      r = client.push(0, grads, 1, f'bench-{count[0]}', model_id=d.model_id)
      dt = time.perf_counter() - t
      if r.accepted_step != 0 or r.applied:
        raise RuntimeError(f'push {count[0]}: expected it added into step 0, got {r}')
      return dt, [proc_cpu_seconds(p.pid) - c for (p, _), c in zip(job, cpu)]

    for _ in range(WARMUP_STEPS):  # the first push becomes the sum; first touches
      push()
    raw.round(grads)
    push_s, cpu_s, raw_s, raw_split_s = [], [], [], []
    for rep in range(reps):
      dt, cpu = push()
      push_s.append(dt)
      cpu_s.append(cpu)
      raw_s.append(raw.round(grads, [grads]))
      raw_split_s.append(raw.round(grads, parts) if len(parts) > 1 else raw_s[-1])
      log(f'    rep {rep}: push {dt:.3f}s (server CPU {", ".join(f"{c:.2f}" for c in cpu)} s), '
          f'raw 1 stream {raw_s[-1]:.3f}s, raw {len(parts)} streams {raw_split_s[-1]:.3f}s')
    bytes_per_process = [tree_bytes(p) for p in parts]
    return {'processes': processes, 'push_s': push_s, 'server_cpu_s': cpu_s, 'raw_s': raw_s,
            'raw_split_s': raw_split_s, 'bytes_per_process': bytes_per_process}


def pb_describe():
  from service.protocol import pb  # pylint: disable=import-outside-toplevel
  return pb.DescribeModelRequest()


def summarize_processes(run: dict, grad_bytes: int) -> dict:
  push_s = statistics.median(run['push_s'])
  raw_s, split_s = statistics.median(run['raw_s']), statistics.median(run['raw_split_s'])
  return {'processes': run['processes'], 'push_s': push_s, 'ingestion_Bps': grad_bytes / push_s,
          'raw_Bps': grad_bytes / raw_s, 'raw_split_Bps': grad_bytes / split_s,
          'ingestion_vs_raw': raw_s / push_s, 'ingestion_vs_raw_split': split_s / push_s,
          'server_cpu_s': [statistics.median(c[i] for c in run['server_cpu_s'])
                           for i in range(run['processes'])],
          'bytes_per_process': run['bytes_per_process']}


def processes_table(rows: list[dict]) -> str:
  lines = ['| server processes x devices | push s | ingestion MB/s | raw 1 stream MB/s | '
           'ingestion / raw | raw, a stream per process MB/s | ingestion / that | '
           'MB per process per push | server CPU s per push, by process |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for r in rows:
    p = r['processes']
    lines.append(
        f"| {p} x {8 // p} | {r['push_s']:.3f} | {r['ingestion_Bps'] / 1e6:.0f} | "
        f"{r['raw_Bps'] / 1e6:.0f} | {r['ingestion_vs_raw']:.2f} | "
        f"{r['raw_split_Bps'] / 1e6:.0f} | {r['ingestion_vs_raw_split']:.2f} | "
        f"{', '.join(f'{b / 1e6:.0f}' for b in r['bytes_per_process'])} | "
        f"{', '.join(f'{c:.2f}' for c in r['server_cpu_s'])} |")
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- report


def summarize(run: dict, grad_bytes: int, state_bytes: int, overhead: int) -> dict:
  w = run['workers']
  med = lambda key: statistics.median(s[key] for s in run['steps'])  # noqa: E731
  tails = [t for s in run['steps'] for t in s['commit_tails_s']]
  push_s = med('push_s')
  ingest = w * grad_bytes / push_s
  raw = w * grad_bytes / statistics.median(run['raw_s'])
  pull = w * grad_bytes / med('pull_s')  # the params have the gradients' bytes (float32)
  raw_pull = w * grad_bytes / statistics.median(run['raw_pull_s'])
  raw_copy = w * grad_bytes / statistics.median(run['raw_copy_s'])
  raw_pull_copy = w * grad_bytes / statistics.median(run['raw_pull_copy_s'])
  return {'workers': w, 'push_s': push_s, 'apply_s': med('apply_s'), 'pull_s': med('pull_s'),
          'ingestion_Bps': ingest, 'raw_Bps': raw, 'ingestion_vs_raw': ingest / raw,
          'pull_Bps': pull, 'raw_pull_Bps': raw_pull, 'pull_vs_raw': pull / raw_pull,
          'raw_copy_Bps': raw_copy, 'ingestion_vs_raw_copy': ingest / raw_copy,
          'raw_pull_copy_Bps': raw_pull_copy, 'pull_vs_raw_copy': pull / raw_pull_copy,
          'peak_rss': run['vmhwm'], 'rss_ratio': run['vmhwm'] / (state_bytes + overhead),
          'commit_tail_s': statistics.median(tails) if tails else None,
          'apply_rpc_s': med('apply_rpc_s'), 'first_pull_s': med('first_pull_s'),
          'server_cpu_s': med('server_cpu_s'), 'client_cpu_s': med('client_cpu_s'),
          'vmhwm_after_init': run['vmhwm_after_init'], 'vmrss_end': run['vmrss_end'],
          'init_s': run['init_s'], 'warmup_s': run['warmup_s']}


def markdown_table(rows: list[dict]) -> str:
  lines = ['| workers | push s | apply s | pull s | ingestion MB/s | raw push MB/s | '
           'ingestion / raw | pull MB/s | raw pull MB/s | pull / raw | peak RSS GB | '
           'RSS / (state + overhead) |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['workers']} | {r['push_s']:.2f} | {r['apply_s']:.2f} | "
                 f"{r['pull_s']:.2f} | {r['ingestion_Bps'] / 1e6:.0f} | "
                 f"{r['raw_Bps'] / 1e6:.0f} | {r['ingestion_vs_raw']:.2f} | "
                 f"{r['pull_Bps'] / 1e6:.0f} | {r['raw_pull_Bps'] / 1e6:.0f} | "
                 f"{r['pull_vs_raw']:.2f} | "
                 f"{r['peak_rss'] / 1e9:.2f} | {r['rss_ratio']:.2f} |")
  return '\n'.join(lines)


def print_details(rows: list[dict], state_bytes: int, overhead: int) -> None:
  print(f'state 16 B/param = {state_bytes / 1e9:.3f} GB; fixed overhead (tiny model VmHWM) '
        f'{overhead / 1e9:.3f} GB')
  for r in rows:
    tail = (f"{r['commit_tail_s']:.3f}s" if r['commit_tail_s'] is not None
            else 'n/a (one worker)')
    print(f"  W={r['workers']}: apply = RPC part {r['apply_rpc_s']:.3f}s + wait in the first "
          f"pull (first pull {r['first_pull_s']:.3f}s - a ready one); commit-only "
          f"tail of non-completing pushes {tail};\n       "
          f"server CPU {r['server_cpu_s']:.2f}s/step, client (this process) CPU "
          f"{r['client_cpu_s']:.2f}s/step; VmHWM after init {r['vmhwm_after_init'] / 1e9:.2f} GB, "
          f"VmRSS at end {r['vmrss_end'] / 1e9:.2f} GB; initialize {r['init_s']:.1f}s, "
          f"warm-up steps {r['warmup_s']:.1f}s;\n       "
          f"raw with the copy (the sink / the pulling client copies each message into a "
          f"buffer of its own): push {r['raw_copy_Bps'] / 1e6:.0f} MB/s (ingestion / that "
          f"{r['ingestion_vs_raw_copy']:.2f}), pull {r['raw_pull_copy_Bps'] / 1e6:.0f} MB/s "
          f"(pull / that {r['pull_vs_raw_copy']:.2f})")


def print_targets(rows: list[dict]) -> None:
  print('\nTargets (for orientation):')
  for r in rows:
    for key, text, ok in (
        ('ingestion_vs_raw', f'ingestion / raw >= {TARGETS["ingestion_vs_raw"]}',
         r['ingestion_vs_raw'] >= TARGETS['ingestion_vs_raw']),
        ('pull_vs_raw', f'pull / raw >= {TARGETS["pull_vs_raw"]}',
         r['pull_vs_raw'] >= TARGETS['pull_vs_raw']),
        ('rss_ratio', f'RSS / (state + overhead) <= {TARGETS["rss_ratio"]}',
         r['rss_ratio'] <= TARGETS['rss_ratio'])):
      print(f"  {'met ' if ok else 'MISS'}  W={r['workers']} {text}: {r[key]:.2f}")


def machine_facts() -> str:
  cpu = 'unknown CPU'
  with contextlib.suppress(OSError), open('/proc/cpuinfo', encoding='ascii') as f:
    cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
  mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  import google.protobuf  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  return (f'{os.cpu_count()} CPU cores ({cpu}, {platform.machine()}), {mem / 2**30:.0f} GiB RAM; '
          f'python {platform.python_version()}, grpcio {grpc.__version__}, protobuf '
          f'{google.protobuf.__version__}, jax {jax.__version__}')


# ----------------------------------------------------------------------------- main


def at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer >= `minimum` (else argparse's one-line error)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < minimum:
      raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {text!r}')
    return value
  return parse


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', choices=sorted(SIZES), default='100m')
  p.add_argument('--reps', type=at_least(1), default=5,
                 help='timed steps per worker count (median)')
  p.add_argument('--workers', type=at_least(1), nargs='*', default=list(WORKER_COUNTS),
                 help='worker counts to measure (default 1 4)')
  p.add_argument('--processes', type=int, nargs='*', default=[1, 2], choices=(1, 2, 4, 8),
                 help='server process counts of the processes axis (default 1 2; none: skip)')
  p.add_argument('--server-arg', action='append', default=[], metavar='FLAG',
                 help='extra flag for the server, e.g. --server-arg=--max-inflight-pushes=4')
  p.add_argument('--ordered-sum', action='store_true',
                 help='instead: each worker count on two servers, without and with '
                      '--ordered-sum, steps alternating, compared')
  p.add_argument('--json', metavar='PATH', help='also write all figures here')
  p.add_argument('--raw-server', action='store_true', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def ordered_sum_main(args: argparse.Namespace, params: dict, grads: dict,
                     t_start: float) -> int:
  """`--ordered-sum`: per worker count, two servers without and with it, steps alternating."""
  runs = []
  for w in args.workers:
    print(f'W={w}:')
    runs.append(run_ordered_pair(w, params, grads, args.reps, args.server_arg))
  rows = [summarize_ordered(r) for r in runs]
  print(f'\nordered sum, {args.size} ({tree_params(params) / 1e6:.1f}M float32 params, '
        f'{tree_bytes(grads) / 1e6:.0f} MB per push), {os.cpu_count()} CPU cores: per W, two '
        f'servers without and with --ordered-sum (both --max-inflight-pushes max(2, W) unless '
        f'given), their steps alternating; step s = push s + apply s; median of {args.reps}:\n')
  print(ordered_table(rows))
  wall = time.perf_counter() - t_start
  print(f'\nwall time {wall:.0f}s')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'size': args.size, 'model': SIZES[args.size], 'params': tree_params(params),
                 'grad_bytes': tree_bytes(grads), 'reps': args.reps,
                 'server_args': args.server_arg, 'ordered_runs': runs, 'ordered_rows': rows,
                 'wall_s': wall}, f, indent=2)
    print(f'wrote {args.json}')
  return 0


def _exit_on_signal(signum, frame) -> None:
  del frame
  raise SystemExit(f'signal {signum}')  # unwinds the finally blocks that stop the children


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.raw_server:
    return serve_raw(args.size)
  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, _exit_on_signal)
  t_start = time.perf_counter()
  print('command: python tests/benchmarks/bench_service.py ' + ' '.join(sys.argv[1:]))
  print(f'machine: {machine_facts()}')
  shapes = leaf_shapes(**SIZES[args.size])
  params = random_tree(shapes, 0, 0.02)
  grads = random_tree(shapes, 1, 1e-3)
  n_params, grad_bytes = tree_params(params), tree_bytes(grads)
  largest = max(shapes, key=lambda p: np.prod(shapes[p]))
  print(f'model {args.size} {SIZES[args.size]}: {n_params:,} float32 params in {len(shapes)} '
        f'leaves ({grad_bytes / 1e6:.0f} MB; largest {largest} {shapes[largest]}, '
        f'{np.prod(shapes[largest]) * 4 / 2**20:.1f} MiB)')
  print('server: python ' + ' '.join(service_argv(0, args.server_arg)[1:]).replace(
      '--num-workers 0', '--num-workers W'))
  print(f'workers are threads of this process; {args.reps} timed steps after {WARMUP_STEPS} '
        f'warm-up step(s); chunks of {CHUNK_BYTES} B')
  if args.ordered_sum:
    return ordered_sum_main(args, params, grads, t_start)

  tiny = random_tree(tiny_shapes(SIZES[args.size]['layers']), 2, 0.02)
  print(f'fixed overhead: tiny model, {tree_params(tiny):,} params, W=1')
  overhead_run = run_server(1, tiny, {k: 1e-3 * v for k, v in tiny.items()}, args.reps,
                            args.server_arg, log=lambda _: None)
  overhead = overhead_run['vmhwm']

  state_bytes = STATE_BYTES_PER_PARAM * n_params
  runs = []
  raw_argv = [sys.executable, os.path.abspath(__file__), '--raw-server', '--size', args.size]
  with child_process(raw_argv, 'raw gRPC baseline') as (_, raw_port):
    for w in args.workers:
      print(f'W={w}:')
      with concurrent.futures.ThreadPoolExecutor(w) as pool:
        raw = RawClients(raw_port, w, pool)
        try:
          runs.append(run_server(w, params, grads, args.reps, args.server_arg, raw=raw))
        finally:
          raw.close()
    process_runs = []
    if args.processes:
      print(f'processes axis: one worker, {", ".join(f"{p} x {8 // p}" for p in args.processes)} '
            f'(server processes x simulated devices each)')
    for p in args.processes:
      print(f'P={p}:')
      with concurrent.futures.ThreadPoolExecutor(p) as pool:
        raw = RawClients(raw_port, p, pool)
        try:
          process_runs.append(run_processes(p, params, grads, args.reps, args.server_arg, raw))
        finally:
          raw.close()
  rows = [summarize(r, grad_bytes, state_bytes, overhead) for r in runs]
  process_rows = [summarize_processes(r, grad_bytes) for r in process_runs]

  print()
  print_details(rows, state_bytes, overhead)
  print(f'\noptimizer service, synchronous step, {args.size} ({n_params / 1e6:.1f}M float32 '
        f'params, {grad_bytes / 1e6:.0f} MB per push), {os.cpu_count()} CPU cores, server on a '
        f'simulated 8-device CPU mesh, median of {args.reps}:\n')
  print(markdown_table(rows))
  print_targets(rows)
  if process_rows:
    print(f'\nprocesses axis: one worker pushing {grad_bytes / 1e6:.0f} MB (OptimizerClient '
          f'sends each process its parts in parallel), added into a step that never completes; '
          f'median of {args.reps}. All processes share this machine\'s {os.cpu_count()} cores '
          f'(with the client and the baseline): the cores, not the processes, bound these '
          f'figures -- on N hosts each process would have its own.\n')
    print(processes_table(process_rows))
  wall = time.perf_counter() - t_start
  print(f'\nwall time {wall:.0f}s')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'size': args.size, 'model': SIZES[args.size], 'params': n_params,
                 'leaves': len(shapes), 'grad_bytes': grad_bytes, 'reps': args.reps,
                 'server_args': args.server_arg, 'state_bytes': state_bytes,
                 'overhead_bytes': overhead, 'overhead_run': overhead_run, 'runs': runs,
                 'rows': rows, 'targets': TARGETS, 'wall_s': wall,
                 'process_runs': process_runs, 'process_rows': process_rows}, f, indent=2)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
