"""End to end: a real server process, real worker processes, numbers checked locally."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax

from service.client import OptimizerClient
from service.config import ServerConfig
from service.engine import make_optimizer
from service.models import Regression
from svc import ROOT, start_server_process

STEPS = 20
BATCH = {0: 16, 1: 32, 2: 48}  # unequal, so the mean must be example-weighted
LAMB_FLAGS = dict(learning_rate=0.02, schedule='warmup_cosine', warmup_steps=4, decay_steps=STEPS,
                  weight_decay=0.01)


def _flags(d):
  return [x for k, v in d.items() for x in (f'--{k.replace("_", "-")}', str(v))]


def _local_reference():
  """lamb_sharded on one device, fed the example-weighted mean of the workers' gradients."""
  model = Regression(seed=0)
  tx = make_optimizer(ServerConfig(**LAMB_FLAGS), None, None)
  params = jax.tree.map(np.asarray, model.init(0))
  state = tx.init(params)
  grad_fn = model.grad_fn()
  for step in range(STEPS):
    acc = None
    for w, n in BATCH.items():
      x, y = model.batch(step, w, n)
      _, g = grad_fn(params, x, y)
      acc = jax.tree.map(lambda a, b, n=n: n * b if a is None else a + n * b,
                         acc if acc is not None else jax.tree.map(lambda _: None, g), g,
                         is_leaf=lambda v: v is None)
    mean = jax.tree.map(lambda a: a * np.float32(1 / sum(BATCH.values())), acc)
    updates, state = tx.update(mean, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_three_worker_processes_train_like_local_lamb():
  server, port = start_server_process('--devices', '8', '--num-workers', '3',
                                      *_flags(LAMB_FLAGS))
  workers = []
  try:
    for w, n in BATCH.items():
      workers.append(subprocess.Popen(
          [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
           '--worker-index', str(w), '--num-workers', '3', '--steps', str(STEPS),
           '--batch-size', str(n), '--log-level', 'WARNING'] + (['--init'] if w == 0 else []),
          cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in workers:
      out, _ = p.communicate(timeout=240)
      assert p.returncode == 0, out
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      pulled = client.pull(like=Regression(seed=0).init(0))
    assert pulled.step == STEPS
    want = _local_reference()
    for (path, got), w in zip(jax.tree_util.tree_flatten_with_path(pulled.params)[0],
                              jax.tree.leaves(want)):
      scale = float(np.max(np.abs(w)))
      assert float(np.max(np.abs(got - w))) <= 1e-5 * scale, jax.tree_util.keystr(path)
  finally:
    for p in workers:
      if p.poll() is None:
        p.kill()
    server.terminate()
    server.wait(timeout=30)
  assert server.returncode == 0  # SIGTERM: a clean shutdown
