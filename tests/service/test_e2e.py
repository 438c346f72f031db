"""End to end: a real server process, real worker processes, numbers checked locally."""

import os
import subprocess
import sys

import jax
import numpy as np

from service.client import OptimizerClient
from service.examples.models import Regression
from svc import ROOT, flags, local_reference, start_server_process

STEPS = 20
BATCH = {0: 16, 1: 32, 2: 48}  # unequal, so the mean must be example-weighted
LAMB_FLAGS = dict(learning_rate=0.02, schedule='warmup_cosine', warmup_steps=4, decay_steps=STEPS,
                  weight_decay=0.01)


def test_three_worker_processes_train_like_local_lamb():
  server, port = start_server_process('--devices', '8', '--num-workers', '3',
                                      *flags(LAMB_FLAGS))
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
    want = local_reference(STEPS, BATCH, LAMB_FLAGS)
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
