"""Load: 16 concurrent workers push 200 synchronous steps; nothing lost, nothing twice.

A real server (in this process, a mesh of 2 simulated devices, at most 4 pushes
received at once) serves a small model of a few thousand parameters. 16 workers
-- 4 threads in each of 4 worker processes, each thread its own
`OptimizerClient` -- push, for every step t of 200, a deterministic float32
gradient (NumPy seeded by (worker, step)) weighted num_examples = worker + 1,
then long-poll `WaitForStep(t + 1)` unless their push completed the step. Each
worker reports every push: its latency, the gradient bytes it sent, and the
server's answer (accepted step, applied, duplicate).

What is proven, each by an assertion that can fail:

1. Every step had exactly the right contributions: the parameters pulled at the
   end equal, within float32 rounding (rtol 1e-5, atol 1e-5 of each leaf's
   largest magnitude), a local replay of the same LAMB
   (`service.core.optimizer.make_optimizer`) fed each step's example-weighted mean of the
   16 gradients. The replay is shown to tell: one push of the lightest worker
   lost at a single step moves the result far outside the tolerance.
2. The server's counters, scraped from its Prometheus /metrics, match what the
   workers sent: 200 steps applied (none skipped), 3200 pushes accepted (= the
   accepted pushes the workers saw), no duplicates, no rejections, and the
   PushGradients bytes received = the gradient bytes the workers sent.
3. Every step 0..199 was accepted exactly 16 times, once from each worker, and
   completed by exactly one of them.

The p50/p99 push latency (as the workers timed it, and the server's histogram)
is printed as a small table: run with `-s`, or see it under `-rP`. Only sane
bounds are asserted on it, never timings.
"""

import collections
import json
import math
import os
import runpy
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import optax
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServerConfig
from service.core.optimizer import make_optimizer
from svc import ROOT, running_server

PROCESSES = 4
THREADS = 4  # workers per process
WORKERS = PROCESSES * THREADS  # 16
STEPS = 200
DEADLINE_S = 150  # the worker processes give up by themselves after this
# A small model: 2,605 parameters (10,420 bytes per push in float32) in 3 leaves, two
# split over the 2 devices and one replicated (5 is odd). Few leaves keep the server's
# per-push cost (a chunk message and a copy onto the mesh per leaf) low.
SHAPES = (("['w']", (64, 40)), ("['b']", (40,)), ("['scale']", (5,)))
LAMB = dict(learning_rate=0.05, schedule='warmup_cosine', warmup_steps=20, decay_steps=STEPS,
            weight_decay=0.01)
# float32 rounding, per leaf: rtol 1e-5, atol 1e-5 of the leaf's largest magnitude. 200
# steps drift the params to magnitudes of ~6; elements that pass near zero keep absolute
# errors of a few ulp of that scale, and the order the server sums a step's pushes in
# (their arrival order) alone moves them by ~1e-6, so a bare atol of 1e-6 would be flaky.
RTOL = ATOL_OF_SCALE = 1e-5

# One worker process: `threads` workers, each its own client. Also loaded (runpy) by
# the test for `gradient`, so that the replay uses the very gradients pushed.
WORKER_SCRIPT = r'''
import json, os, sys, threading, time

import numpy as np

from service.client import OptimizerClient


def gradient(w, t, shapes):
  # The gradient worker w pushes for step t: deterministic, float32.
  rng = np.random.default_rng([w, t])
  return {path: rng.standard_normal(tuple(shape), dtype=np.float32) for path, shape in shapes}


def run_worker(target, w, steps, shapes, deadline, out):
  # Pushes steps 0..steps-1 as worker w, recording each push in out['records'] as
  # [step, latency_s, bytes, accepted_step, applied, duplicate, current_step].
  client = OptimizerClient(target, timeout=30)
  try:
    for t in range(steps):
      grads = gradient(w, t, shapes)
      t0 = time.perf_counter()
      r = client.push(t, grads, w + 1, f'load-{w}', push_id=f'load-{w}-{t}')
      latency = time.perf_counter() - t0
      out['records'].append([t, latency, sum(g.nbytes for g in grads.values()),
                             r.accepted_step, r.applied, r.duplicate, r.current_step])
      if not r.applied:  # another worker completes step t: long-poll for it
        left = deadline - time.monotonic()
        if left <= 0:
          raise TimeoutError(f'the deadline passed before step {t + 1}')
        current, reached = client.wait_for_step(t + 1, timeout=min(left, 60.0))
        if not reached:
          raise TimeoutError(f'step {t + 1} not reached (the server is at {current})')
  except Exception as e:  # reported; the process exits non-zero
    out['error'] = f'{type(e).__name__}: {e}'
  finally:
    client.close()


def main(target, first, threads, steps, shapes_json, path, deadline_s):
  shapes = json.loads(shapes_json)
  deadline = time.monotonic() + float(deadline_s)
  outs = {w: {'worker': w, 'records': [], 'error': None}
          for w in range(int(first), int(first) + int(threads))}
  workers = [threading.Thread(target=run_worker, daemon=True,
                              args=(target, w, int(steps), shapes, deadline, outs[w]))
             for w in outs]
  for th in workers:
    th.start()
  for th in workers:
    th.join(max(0.0, deadline - time.monotonic()))
  for th, out in zip(workers, outs.values()):
    if th.is_alive() and out['error'] is None:
      out['error'] = 'still running at the deadline'
  with open(path + '.tmp', 'w') as fh:
    json.dump(list(outs.values()), fh)
  os.replace(path + '.tmp', path)
  sys.stdout.flush()
  os._exit(0 if all(o['error'] is None for o in outs.values()) else 1)  # daemons too


if __name__ == '__main__':
  main(*sys.argv[1:])
'''

Push = collections.namedtuple(
    'Push', 'worker step latency nbytes accepted_step applied duplicate current_step')


def _write_worker_script(tmp_path):
  path = tmp_path / 'load_worker.py'
  path.write_text(WORKER_SCRIPT)
  return path


def _initial_params() -> dict:
  rng = np.random.default_rng(1234)
  return {p: (0.5 * rng.standard_normal(s)).astype(np.float32) for p, s in SHAPES}


def _start_worker_processes(script, port, out_dir) -> list:
  return [subprocess.Popen(
      [sys.executable, str(script), f'127.0.0.1:{port}', str(i * THREADS), str(THREADS),
       str(STEPS), json.dumps(SHAPES), str(out_dir / f'workers-{i}.json'), str(DEADLINE_S)],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(PROCESSES)]


def _collect(procs, out_dir) -> list[Push]:
  """Every push the workers made; fails with the processes' output if any failed."""
  outputs = [proc.communicate(timeout=DEADLINE_S + 60)[0] for proc in procs]
  reports = []
  for i, out in enumerate(outputs):
    path = out_dir / f'workers-{i}.json'
    assert path.exists(), f'worker process {i} wrote no report:\n{out[-3000:]}'
    reports += json.loads(path.read_text())
  errors = {r['worker']: r['error'] for r in reports if r['error']}
  assert not errors, f'{errors}\n' + '\n'.join(o[-2000:] for o in outputs)
  assert [proc.returncode for proc in procs] == [0] * PROCESSES
  assert sorted(r['worker'] for r in reports) == list(range(WORKERS))
  return [Push(r['worker'], *rec) for r in reports for rec in r['records']]


def _scrape(port: int) -> dict:
  """The server's /metrics as {(sample name, sorted labels): value}."""
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    text = r.read().decode()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def _step_means(gradient, drop=None) -> list[dict]:
  """Each step's example-weighted mean of the 16 gradients; `drop`: (worker, step) left out."""
  means = []
  for t in range(STEPS):
    acc = {p: np.zeros(s, np.float32) for p, s in SHAPES}
    total = 0
    for w in range(WORKERS):
      if (w, t) == drop:
        continue
      total += w + 1
      for p, g in gradient(w, t, SHAPES).items():
        acc[p] += np.float32(w + 1) * g
    means.append({p: a * np.float32(1 / total) for p, a in acc.items()})
  return means


def _local_lamb():
  """replay(params, means): lamb_sharded on one device with the server's LAMB settings."""
  tx = make_optimizer(ServerConfig(**LAMB), None, None)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def replay(params, means):
    state = tx.init(params)
    for mean in means:
      params, state = step(params, state, mean)
    return {p: np.asarray(v) for p, v in params.items()}
  return replay


def _atol(leaf: np.ndarray) -> float:
  return ATOL_OF_SCALE * float(np.max(np.abs(leaf)))


def _tolerances(got, want) -> float:
  """max |got - want| in units of the tolerance (<= 1: within it)."""
  return max(float(np.max(np.abs(got[p] - want[p]) / (_atol(want[p]) + RTOL * np.abs(want[p]))))
             for p, _ in SHAPES)


def _quantile(sorted_values, q):
  return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def _histogram_quantile(samples, name, q):
  """The upper bound of the bucket holding quantile q of a Prometheus histogram."""
  buckets = sorted((float(dict(labels)['le']), v) for (n, labels), v in samples.items()
                   if n == f'{name}_bucket')
  count = samples[(f'{name}_count', ())]
  return next((bound for bound, cumulative in buckets if cumulative >= q * count), math.inf)


def test_16_workers_200_sync_steps_every_push_counted_once(tmp_path):
  script = _write_worker_script(tmp_path)
  gradient = runpy.run_path(str(script), run_name='load_worker')['gradient']
  p0 = _initial_params()
  procs = []
  t0 = time.monotonic()
  with running_server(num_workers=WORKERS, devices=2, max_inflight_pushes=4, metrics_port=0,
                      **LAMB) as (running, client):
    try:
      client.initialize(p0)
      procs = _start_worker_processes(script, running.port, tmp_path)
      pushes = _collect(procs, tmp_path)
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait(timeout=30)
    wall = time.monotonic() - t0
    pulled = client.pull()
    metrics = _scrape(running.metrics_port)

  # (3) Every step accepted exactly 16 times, once from each worker, completed by one push.
  for w in range(WORKERS):
    assert [p.accepted_step for p in pushes if p.worker == w] == list(range(STEPS)), w
  assert not [p for p in pushes if p.duplicate]  # no retry of an accepted push
  assert all(p.step == p.accepted_step for p in pushes)
  assert collections.Counter(p.accepted_step for p in pushes) == {t: WORKERS for t in range(STEPS)}
  assert collections.Counter(p.accepted_step for p in pushes if p.applied) == \
      {t: 1 for t in range(STEPS)}

  # (2) The server's counters match what the workers sent.
  sent_bytes = sum(p.nbytes for p in pushes)
  assert sent_bytes == WORKERS * STEPS * 4 * sum(math.prod(s) for _, s in SHAPES)
  assert pulled.step == STEPS
  assert metrics[('lamb_sharded_steps_applied_total', ())] == STEPS
  assert metrics[('lamb_sharded_steps_skipped_total', ())] == 0
  assert metrics[('lamb_sharded_step', ())] == STEPS
  assert metrics[('lamb_sharded_pushes_accepted_total', ())] == len(pushes) == WORKERS * STEPS
  assert metrics[('lamb_sharded_pushes_duplicate_total', ())] == 0
  rejected = {k: v for k, v in metrics.items()
              if k[0] == 'lamb_sharded_pushes_rejected_total' and v}
  assert not rejected, rejected
  assert metrics[('lamb_sharded_received_bytes_total', (('rpc', 'PushGradients'),))] == sent_bytes
  assert metrics[('lamb_sharded_push_seconds_count', ())] == len(pushes)

  # (1) Every step had exactly the right contributions: the final params are a local replay's.
  replay = _local_lamb()
  want = replay(p0, _step_means(gradient))
  for path, _ in SHAPES:
    np.testing.assert_allclose(pulled.params[path], want[path], rtol=RTOL,
                               atol=_atol(want[path]), err_msg=path)
  # ... and the replay tells: the lightest worker's push lost at one step is far outside.
  lost = replay(p0, _step_means(gradient, drop=(0, STEPS // 2)))
  assert _tolerances(lost, want) > 10, _tolerances(lost, want)

  # The report: push latency as the workers timed it, and as the server's histogram has it.
  latencies = sorted(p.latency for p in pushes)
  p50, p99 = _quantile(latencies, 0.50), _quantile(latencies, 0.99)
  assert all(math.isfinite(x) and x > 0 for x in latencies) and p50 <= p99 <= latencies[-1]
  s50 = _histogram_quantile(metrics, 'lamb_sharded_push_seconds', 0.50)
  s99 = _histogram_quantile(metrics, 'lamb_sharded_push_seconds', 0.99)
  assert s50 <= s99 < math.inf
  print(f'\nload: {WORKERS} workers ({PROCESSES} processes x {THREADS} threads), {STEPS} sync '
        f'steps, {len(pushes)} pushes of {sent_bytes // len(pushes)} B in {wall:.1f}s '
        f'({STEPS / wall:.1f} steps/s)\n'
        f'  {"push latency":<30}{"p50":>10}{"p99":>10}{"max":>10}\n'
        f'  {"workers (end to end)":<30}{p50 * 1e3:>8.1f}ms{p99 * 1e3:>8.1f}ms'
        f'{latencies[-1] * 1e3:>8.1f}ms\n'
        f'  {"server histogram (bucket le)":<30}{s50 * 1e3:>8.1f}ms{s99 * 1e3:>8.1f}ms\n'
        f'  final params vs local replay: {_tolerances(pulled.params, want):.3f} of the '
        f'tolerance; with one push lost: {_tolerances(lost, want):.0f}x')
