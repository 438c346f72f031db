"""Benchmark: compressed pushes -- wire bytes, the server's decode cost, ingestion.

What is measured
----------------
The transformer-shaped model of bench_service.py (`--size 100m`: 108.9M
float32 parameters in 148 leaves, BERT-base shaped; `--size 10m`: 10.6M), its
gradient pushed as OptimizerClient.push sends it with each `compression`:

  1. Wire bytes per push: float32, bf16, int8, int4 (leaves of fewer than one
     block, 256 elements, travel as float32), and the ratio to float32.
  2. The server's per-push work in ns per parameter: the receive checks of
     an int8 / int4 push (each leaf's encoded bytes fed in 1 MiB chunks to
     `codecs.EncodedLeaf`, as a push session does: scales gathered and
     checked, codes range-checked and kept), then its decode into the step's
     float32 sum in the 8-device mesh's block layout, as the accumulator
     does it when the push counts (`accumulator.decode_jobs` on its adding
     threads: written, for a step's first push; added, for the others).
     Beside them the float32 receive copy (the wire bytes written through the
     buffers' wire views), the float32 accumulate (sum += push, on one thread
     and on the adding threads) and the bf16 accumulate. Buffers are touched
     before timing (the server recycles its buffers); median of `--reps`.
  3. Ingestion through the real server, started as a process:

         python -m service.cli serve --host 127.0.0.1 --port 0 --devices 8 \\
             --num-workers 100000 --metrics-port 0 --log-level WARNING

     with one client pushing the gradient for step 0 under a new worker id
     each time (int8/int4 with error feedback, as a worker pushes them): every
     push after the first is received, decoded and added into
     the step's float32 sum, and the step never completes (no LAMB update in
     the figure). Rates are f32-equivalent: parameters per second x 4 bytes.
     "server" times a push from the moment gRPC takes its first message (the
     client's encoding, done before, excluded) until its answer; "with client
     encode" from the call. The baseline: bench_service.py's bare grpcio
     client-streaming sink (`--raw-server`, a separate process) receiving the
     float32 bytes in 1 MiB messages, interleaved in the same run. Median of
     `--reps`. Beside it, the same sink fed as many bytes as an int8 (int4)
     push sends: its time bounds what any server could reach on those bytes
     (the "bound" column: the ratio if receiving, checking and decoding cost
     nothing beyond gRPC's receive).
  4. Ingestion with `--workers` W clients pushing at once (default 4; 0 leaves
     it out): each codec's push is recorded once, then replayed by W client
     threads on their own channels under fresh worker and push ids, so no
     client encodes during a round (a worker does that on its own CPU) and
     the server's receives overlap each other's decoding. Rate: W x params
     x 4 bytes / round s, against W raw streams of the float32 bytes at
     once, interleaved. Median of `--reps`.

Usage:
    python tests/benchmarks/bench_codecs.py --size 10m --reps 3    # quick
    python tests/benchmarks/bench_codecs.py --size 100m --reps 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import bench_service as bs  # noqa: E402  (its model, processes and raw baseline)

CODECS = ('f32', 'bf16', 'int8', 'int4')
COMPRESSION = {'f32': None, 'bf16': 'bf16', 'int8': 'int8', 'int4': 'int4'}
CHUNK = 1 << 20
DEVICES = 8


def wire_bytes(shapes: dict[str, tuple]) -> dict[str, int]:
  """Bytes per push of each codec, as OptimizerClient.push sends them."""
  from service.protocol import codecs  # pylint: disable=import-outside-toplevel
  out = {}
  for name in CODECS:
    total = 0
    for s in shapes.values():
      n = int(np.prod(s))
      if name in ('int8', 'int4') and n >= codecs.BLOCK:
        total += codecs.nbytes(n, codecs.BY_NAME[name])
      else:
        total += n * (2 if name == 'bf16' else 4)
    out[name] = total
  return out


def _median_s(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def server_costs(grads: dict[str, np.ndarray], reps: int) -> dict[str, float]:
  """ns per parameter of the server's per-push work, by kind."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from service.core import accumulator, layout, placement  # pylint: disable=import-outside-toplevel
  from service.protocol import codecs  # pylint: disable=import-outside-toplevel
  layouts = [placement.layout_of(g.shape, placement.partition_spec(g.shape, DEVICES), DEVICES)
             for g in grads.values()]
  dst = layout.host_buffers(layouts, [np.float32] * len(layouts))
  acc = layout.host_buffers(layouts, [np.float32] * len(layouts))
  views = [lay.wire_view(b) for lay, b in zip(layouts, dst)]
  for b in dst + acc:
    b.fill(0)  # touched: the server's buffers are recycled
  n = sum(g.size for g in grads.values())
  flat = [g.reshape(-1) for g in grads.values()]
  out = {}

  def receive_f32():
    for v, g in zip(views, flat):
      raw = g.view(np.uint8)
      for off in range(0, raw.size, CHUNK):
        layout.write(v, off, raw[off:off + CHUNK])
  out['f32 receive (copy into the block layout)'] = _median_s(receive_f32, reps)

  threads = accumulator.adding_threads()
  sums = [lay.wire_view(b, np.float32) for lay, b in zip(layouts, acc)]
  for name in ('int8', 'int4'):
    enc = codecs.BY_NAME[name]
    encoded = [codecs.encode(g, enc) for g in flat if g.size >= codecs.BLOCK]
    big = [i for i, g in enumerate(flat) if g.size >= codecs.BLOCK]
    leaves = []

    def receive(enc=enc, encoded=encoded, big=big, leaves=leaves):
      leaves.clear()  # as the server receives a push: 1 MiB chunks, checked, kept
      for i, data in zip(big, encoded):
        leaf = codecs.EncodedLeaf(flat[i].size, enc, 'leaf')
        for off in range(0, data.size, CHUNK):
          leaf.feed(off, data[off:off + CHUNK])
        leaves.append(leaf)

    def decode(add, big=big, leaves=leaves):  # then, as it counts: into the sum
      accumulator.run_jobs([job for i, leaf in zip(big, leaves)
                            for job in accumulator.decode_jobs(leaf, sums[i], np.float32(1),
                                                               add)])
    out[f'{name} receive (scales and codes checked)'] = _median_s(receive, reps)
    out[f'{name} decode into the sum (its first push)'] = _median_s(lambda: decode(False), reps)
    out[f'{name} decode-add into the sum (sum += push)'] = _median_s(lambda: decode(True), reps)
    t = time.perf_counter()
    for g in flat:
      codecs.encode(g, enc)
    out[f'{name} encode (client, once)'] = time.perf_counter() - t

  def accumulate(src=dst):
    for a, b in zip(acc, src):
      np.add(a, b, out=a, dtype=np.float32)
  out['f32 accumulate (sum += push, one thread)'] = _median_s(accumulate, reps)
  jobs = [job for a, b in zip(acc, dst) for job in accumulator.add_jobs(a, b)]
  out[f'f32 accumulate (sum += push, {threads} threads)'] = _median_s(
      lambda: accumulator.run_jobs(jobs), reps)
  bf = [b.astype(ml_dtypes.bfloat16) for b in dst]
  out['bf16 accumulate (sum += push, one thread)'] = _median_s(lambda: accumulate(bf), reps)
  return {k: v / n * 1e9 for k, v in out.items()}


class _StreamTimer:
  """Wraps the client's stub: records when gRPC took a push's first message."""

  def __init__(self, stub):
    self._stub, self.started_at = stub, None

  def PushGradients(self, requests, **kwargs):  # pylint: disable=invalid-name
    def timed():
      for i, m in enumerate(requests):
        if i == 0:
          self.started_at = time.perf_counter()
        yield m
    return self._stub.PushGradients(timed(), **kwargs)

  def __getattr__(self, name):
    return getattr(self._stub, name)


def ingestion(params: dict, grads: dict, reps: int, log=print) -> dict[str, dict]:
  """Pushes through a real server, and raw rounds, interleaved; seconds per push."""
  from service.client import ErrorFeedback, OptimizerClient  # pylint: disable=import-outside-toplevel
  names = ('f32', 'int8', 'int4')
  times = {k: {'server': [], 'total': [], 'cpu': []} for k in names}
  raw_s = []
  # The raw sink fed as many bytes as an int8 / int4 push sends: the rate a push of those
  # bytes would have if receiving, checking and decoding them cost nothing.
  wire = wire_bytes({k: v.shape for k, v in grads.items()})
  floors = {k: {'x': np.zeros(wire[k] // 4, np.float32)} for k in ('int8', 'int4')}
  floor_s = {k: [] for k in floors}
  argv = bs.service_argv(100_000, [])
  raw_argv = [sys.executable, os.path.abspath(bs.__file__), '--raw-server']
  with contextlib.ExitStack() as stack:
    proc, port = stack.enter_context(bs.child_process(argv, 'server'))
    _, raw_port = stack.enter_context(bs.child_process(raw_argv, 'raw gRPC sink'))
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
    raw = bs.RawClients(raw_port, 1, pool)
    stack.callback(raw.close)
    client = stack.enter_context(OptimizerClient(f'127.0.0.1:{port}', timeout=600))
    timer = _StreamTimer(client._stub)  # pylint: disable=protected-access
    client._stub = timer  # pylint: disable=protected-access
    model_id = client.initialize(params)
    count = [0]
    feedback = ErrorFeedback()  # one worker's residuals, whatever the worker id of a push

    def push(name: str) -> tuple[float, float, float]:
      count[0] += 1
      cpu = bs.proc_cpu_seconds(proc.pid)
      t = time.perf_counter()
      r = client.push(0, grads, 1, f'bench-{count[0]}', model_id=model_id,
                      compression=COMPRESSION[name], error_feedback=feedback)
      done = time.perf_counter()
      assert r.accepted_step == 0 and not r.applied, r
      return done - timer.started_at, done - t, bs.proc_cpu_seconds(proc.pid) - cpu

    for name in names + names:  # warm-up: the first push becomes the sum; first touches
      push(name)
    raw.round(grads)
    for rep in range(reps):
      line = []
      for name in names:
        server_s, total_s, cpu_s = push(name)
        times[name]['server'].append(server_s)
        times[name]['total'].append(total_s)
        times[name]['cpu'].append(cpu_s)
        line.append(f'{name} {server_s:.3f}s')
      raw_s.append(raw.round(grads))
      for k, tree in floors.items():
        floor_s[k].append(raw.round(tree))
      log(f'  rep {rep}: ' + ', '.join(line) + f', raw f32 {raw_s[-1]:.3f}s, raw of the int8 '
          f'bytes {floor_s["int8"][-1]:.3f}s, of the int4 bytes {floor_s["int4"][-1]:.3f}s')
  out = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
  out['raw'] = {'server': statistics.median(raw_s)}
  for k, v in floor_s.items():
    out[k]['floor'] = statistics.median(v)
  return out


class _Recorder:
  """Wraps the client's stub: keeps the request messages of the last push it sent."""

  def __init__(self, stub):
    self._stub, self.messages = stub, None

  def PushGradients(self, requests, **kwargs):  # pylint: disable=invalid-name
    self.messages = list(requests)
    return self._stub.PushGradients(iter(self.messages), **kwargs)

  def __getattr__(self, name):
    return getattr(self._stub, name)


def concurrent_ingestion(params: dict, grads: dict, workers: int, reps: int,
                         log=print) -> dict[str, float]:
  """W clients pushing at once, each a push already encoded; seconds per round of W pushes.

  Each codec's push is recorded once (as `OptimizerClient.push` sends it, int8/int4 with
  error feedback), then replayed by W client threads on their own channels under fresh
  worker and push ids: the server receives, checks, decodes and adds W pushes at once,
  and no client encodes during the round (a worker does that on its own CPU). Beside
  them, W raw streams of the float32 bytes at once, interleaved.
  """
  import uuid  # pylint: disable=import-outside-toplevel
  from service.client import ErrorFeedback, OptimizerClient  # pylint: disable=import-outside-toplevel
  from service.protocol import pb  # pylint: disable=import-outside-toplevel
  names = ('f32', 'int8', 'int4')
  times: dict[str, list] = {k: [] for k in (*names, 'raw')}
  with contextlib.ExitStack() as stack:
    _, port = stack.enter_context(bs.child_process(bs.service_argv(100_000, []), 'server'))
    _, raw_port = stack.enter_context(bs.child_process(
        [sys.executable, os.path.abspath(bs.__file__), '--raw-server'], 'raw gRPC sink'))
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(workers))
    raw = bs.RawClients(raw_port, workers, pool)
    stack.callback(raw.close)
    clients = [stack.enter_context(OptimizerClient(f'127.0.0.1:{port}', timeout=600))
               for _ in range(workers)]
    model_id = clients[0].initialize(params)
    recorder = _Recorder(clients[0]._stub)  # pylint: disable=protected-access
    clients[0]._stub = recorder  # pylint: disable=protected-access
    recorded = {}
    for name in names:  # the first push becomes the sum; the others are added to it
      clients[0].push(0, grads, 1, f'record-{name}', model_id=model_id,
                      compression=COMPRESSION[name], error_feedback=ErrorFeedback())
      recorded[name] = recorder.messages
    clients[0]._stub = recorder._stub  # pylint: disable=protected-access

    def replay(client, name: str) -> None:
      header, *rest = recorded[name]
      fresh = pb.PushGradientsRequest()
      fresh.CopyFrom(header)
      fresh.header.worker_id, fresh.header.push_id = uuid.uuid4().hex, uuid.uuid4().hex
      r = client._stub.PushGradients(iter([fresh, *rest]), timeout=600)  # pylint: disable=protected-access
      assert r.accepted_step == 0 and not r.applied, r

    def one_round(name: str) -> float:
      t = time.perf_counter()
      for f in [pool.submit(replay, c, name) for c in clients]:
        f.result()
      return time.perf_counter() - t

    for name in names:  # warm-up: first touches
      one_round(name)
    raw.round(grads)
    for rep in range(reps):
      for name in names:
        times[name].append(one_round(name))
      times['raw'].append(raw.round(grads))
      log(f'  rep {rep}: ' + ', '.join(f'{k} {v[-1]:.3f}s' for k, v in times.items()))
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Optional[list] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', choices=sorted(bs.SIZES), default='100m')
  p.add_argument('--reps', type=bs.at_least(1), default=5)
  p.add_argument('--skip-ingestion', action='store_true', help='tables 1 and 2 only')
  p.add_argument('--workers', type=bs.at_least(0), default=4,
                 help='concurrent pushers of the last table (0: leave it out)')
  args = p.parse_args(argv)
  print('command: python tests/benchmarks/bench_codecs.py ' + ' '.join(sys.argv[1:]))
  print(f'machine: {bs.machine_facts()}')
  shapes = bs.leaf_shapes(**bs.SIZES[args.size])
  params = bs.random_tree(shapes, 0, 0.02)
  grads = bs.random_tree(shapes, 1, 1e-3)
  n = bs.tree_params(grads)
  print(f'model {args.size}: {n:,} float32 params in {len(shapes)} leaves\n')

  wire = wire_bytes(shapes)
  print('| codec | wire bytes per push | bytes / param | ratio to f32 | f32 / codec |')
  print('|---|---:|---:|---:|---:|')
  for name, b in wire.items():
    print(f'| {name} | {b:,} | {b / n:.3f} | {b / wire["f32"]:.3f} | {wire["f32"] / b:.2f}x |')

  costs = server_costs(grads, args.reps)
  print(f'\nserver per push, ns per parameter (median of {args.reps}):\n')
  print('| work | ns / param |')
  print('|---|---:|')
  for k, v in costs.items():
    print(f'| {k} | {v:.2f} |')

  if not args.skip_ingestion:
    print('\ningestion through the real server (1 client; f32-equivalent MB/s = params/s x 4):')
    t = ingestion(params, grads, args.reps)
    f32_mb = n * 4 / 1e6
    raw_rate = f32_mb / t['raw']['server']
    print(f'\nraw grpcio client stream of the f32 bytes: {raw_rate:,.0f} MB/s '
          f'({t["raw"]["server"]:.3f} s per push), median of {args.reps}\n')
    print('| pushes | server s | f32-equiv MB/s (server) | / raw f32 | raw of its bytes s | '
          'bound: / raw f32 at that | server CPU ns/param | with client encode s | '
          'f32-equiv MB/s | / raw f32 |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for name in ('f32', 'int8', 'int4'):
      s, tot, cpu = t[name]['server'], t[name]['total'], t[name]['cpu']
      floor = t[name].get('floor', t['raw']['server'])
      print(f'| {name} | {s:.3f} | {f32_mb / s:,.0f} | {f32_mb / s / raw_rate:.2f} | '
            f'{floor:.3f} | {t["raw"]["server"] / floor:.2f} | '
            f'{cpu / n * 1e9:.1f} | {tot:.3f} | {f32_mb / tot:,.0f} | '
            f'{f32_mb / tot / raw_rate:.2f} |')
    print('\n("raw of its bytes": the raw sink fed as many bytes as the push sends; "bound": the '
          'ratio the push would reach if\nreceiving, checking and decoding it cost no more than '
          'the raw sink\'s counting of those bytes.)')
    if args.workers:
      w = args.workers
      print(f'\n{w} clients pushing at once, each push already encoded (f32-equivalent '
            f'MB/s = {w} x params / round s x 4):')
      c = concurrent_ingestion(params, grads, w, args.reps)
      raw_rate = w * f32_mb / c['raw']
      print(f'\n{w} raw grpcio client streams of the f32 bytes at once: {raw_rate:,.0f} MB/s '
            f'({c["raw"]:.3f} s per round), median of {args.reps}\n')
      print(f'| {w} pushes at once | s per round | f32-equiv MB/s | / raw f32 |')
      print('|---|---:|---:|---:|')
      for name in ('f32', 'int8', 'int4'):
        rate = w * f32_mb / c[name]
        print(f'| {name} | {c[name]:.3f} | {rate:,.0f} | {rate / raw_rate:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
