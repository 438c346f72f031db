"""A fleet: 200 synchronous workers, each step the example-weighted mean of exactly 200 pushes.

The server's RPC handler pool (16 threads) is deliberately smaller than the
fleet: a worker waiting for the next step must not hold a handler, or the
pushes that would complete the step are never served (issue 21; a thread-pool
server stalls here, its pushes and waits ending in DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import collections
import threading
import time

import jax.numpy as jnp
import numpy as np
import optax
import psutil
import pytest

from service.client import OptimizerClient
from service.protocol import pb
from svc import own_connection, running_server, stub

WORKERS = 200
STEPS = 5
GRPC_THREADS = 16
RPC_TIMEOUT_S = 20.0  # each push and wait; the whole fleet is bounded by STEPS of them
# eps of the gradients' order: the update is not LAMB's sign-like g / |g| of the first step,
# so that a push missing from (or added to) a step's mean changes the params beyond ATOL.
HYPERPARAMETERS = dict(learning_rate=0.01, eps=0.01, weight_decay=0.01)
ATOL = 2e-6  # params of order 1 in float32; the server sums the pushes in arrival order
P0 = {"['w']": np.linspace(-1, 1, 128, dtype=np.float32).reshape(16, 8),
      "['b']": np.linspace(0.5, 1.5, 8, dtype=np.float32)}


def gradient(worker: int, step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([worker, step])
  return {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in P0.items()}


def examples(worker: int) -> int:
  return 1 + worker % 7


def run_fleet(workers: int, grpc_threads: int):
  """`workers` threads, each an OptimizerClient of its own connection, pushing STEPS steps.

  Returns (the PushResults by step, the params worker 0 pulled after each step,
  the server's DescribeModel, the errors by worker).
  """
  results: dict[int, list] = collections.defaultdict(list)
  pulled, errors = [], {}
  start = threading.Barrier(workers)

  def work(i: int, client: OptimizerClient) -> None:
    try:
      start.wait(RPC_TIMEOUT_S)
      for t in range(STEPS):
        r = client.push(t, gradient(i, t), examples(i), f'w{i:03d}')
        results[t].append(r)
        if not r.applied:
          current, reached = client.wait_for_step(t + 1, timeout=RPC_TIMEOUT_S)
          if not reached:
            raise TimeoutError(f'step {t + 1} not reached in {RPC_TIMEOUT_S}s (at {current})')
        if i == 0:  # the step after t is complete and the next cannot be without w000
          pulled.append(client.pull())
    except Exception as e:  # pylint: disable=broad-except
      errors[i] = e

  with running_server(devices=1, num_workers=workers, grpc_threads=grpc_threads,
                      max_inflight_pushes=4, max_concurrent_rpcs=4 * workers,
                      **HYPERPARAMETERS) as (running, client):
    client.initialize(P0)
    target = f'127.0.0.1:{running.port}'
    clients = [OptimizerClient(target, channel=own_connection(target), timeout=RPC_TIMEOUT_S)
               for _ in range(workers)]
    try:
      for c in clients:
        c.describe(wait_for_ready=True)
      connections = [c for c in psutil.Process().net_connections('tcp')
                     if c.raddr and c.raddr.port == running.port]
      assert len(connections) >= workers, f'{len(connections)} connections for {workers} workers'
      threads = [threading.Thread(target=work, args=(i, c), name=f'w{i:03d}')
                 for i, c in enumerate(clients)]
      t0 = time.monotonic()
      for t in threads:
        t.start()
      for t in threads:
        t.join(max(1.0, t0 + 2 * STEPS * RPC_TIMEOUT_S + 30 - time.monotonic()))
      assert not any(t.is_alive() for t in threads), 'workers still running after every deadline'
      described = stub(running.port).DescribeModel(pb.DescribeModelRequest(), timeout=10)
    finally:
      for c in clients:
        c.close()
  return results, pulled, described, errors


def replay(workers: int, hyperparameters) -> list[dict[str, np.ndarray]]:
  """optax.lamb with the server's hyperparameters, fed each step's example-weighted mean."""
  h = hyperparameters
  tx = optax.lamb(h.learning_rate, b1=h.b1, b2=h.b2, eps=h.eps, eps_root=h.eps_root,
                  weight_decay=h.weight_decay)
  params = {k: jnp.asarray(v) for k, v in P0.items()}
  state = tx.init(params)
  total = sum(examples(i) for i in range(workers))
  out = []
  for t in range(STEPS):
    mean = {k: sum(examples(i) * gradient(i, t)[k].astype(np.float64) for i in range(workers))
            / total for k in P0}
    updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in mean.items()},
                               state, params)
    params = optax.apply_updates(params, updates)
    out.append({k: np.asarray(v) for k, v in params.items()})
  return out


def errors_summary(errors: dict, workers: int, step: int) -> str:
  """'N of M workers failed at server step s: {code: count}; first: ...' (one line)."""
  def kind(e):
    return e.code().name if hasattr(e, 'code') else type(e).__name__

  def text(e):
    return e.details() if hasattr(e, 'details') else str(e)
  kinds = collections.Counter(kind(e) for e in errors.values())
  i, first = min(errors.items())
  return (f'{len(errors)} of {workers} workers failed at server step {step}: {dict(kinds)}; '
          f'first: w{i:03d}: {kind(first)} {text(first)}')


def test_200_synchronous_workers_with_16_handler_threads():
  results, pulled, described, errors = run_fleet(WORKERS, GRPC_THREADS)
  if errors:
    pytest.fail(errors_summary(errors, WORKERS, described.step), pytrace=False)
  assert described.step == STEPS
  for t in range(STEPS):  # exactly the fleet's pushes in each step, one of them completing it
    assert [r.accepted_step for r in results[t]] == [t] * WORKERS
    assert sum(r.applied for r in results[t]) == 1
  assert sorted((w.worker_id, w.last_step) for w in described.workers) == [
      (f'w{i:03d}', STEPS - 1) for i in range(WORKERS)]
  assert described.hyperparameters.learning_rate_schedule.startswith('constant')
  want = replay(WORKERS, described.hyperparameters)
  assert [p.step for p in pulled] == list(range(1, STEPS + 1))
  for t, (got, expected) in enumerate(zip(pulled, want)):
    for k, v in expected.items():
      np.testing.assert_allclose(got.params[k], v, rtol=0, atol=ATOL, err_msg=f'step {t} {k}')
