"""Your own model through the service: docs/service.md's example script, and `--model MODULE:FN`."""

import os
import subprocess
import sys
import textwrap

from service.client import OptimizerClient
from svc import ROOT, start_server_process


def test_the_example_script_trains_against_a_real_server():
  server, port = start_server_process('--devices', '2', '--learning-rate', '0.05')
  try:
    proc = subprocess.run(
        [sys.executable, '-m', 'service.examples.train_your_model', '--server',
         f'127.0.0.1:{port}', '--steps', '60'], cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      assert client.describe().step == 60
  finally:
    server.terminate()
    server.wait(timeout=60)
  words = proc.stdout.split()
  start, now = float(words[words.index('start,') - 3]), float(words[words.index('now') - 1])
  assert now < 0.2 * start, proc.stdout


def test_a_worker_trains_a_model_of_your_own_package(tmp_path):
  # A package outside the repository, on PYTHONPATH: `make` returns init/grad_fn/batch.
  (tmp_path / 'mypkg').mkdir()
  (tmp_path / 'mypkg' / '__init__.py').write_text('')
  (tmp_path / 'mypkg' / 'mymodel.py').write_text(textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np

      class Quadratic:
        def init(self, seed):
          return {'x': np.full(3, 5.0, np.float32)}
        def grad_fn(self):
          return jax.jit(jax.value_and_grad(lambda p, x, y: jnp.sum((p['x'] - x) ** 2)))
        def batch(self, step, worker, size):
          return np.zeros(3, np.float32), None

      def make(seed):
        return Quadratic()
  '''))
  server, port = start_server_process('--devices', '1', '--learning-rate', '0.05')
  try:
    proc = subprocess.run(
        [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
         '--worker-index', '0', '--steps', '8', '--init', '--model', 'mypkg.mymodel:make',
         '--log-level', 'WARNING'], cwd=ROOT,
        env={**os.environ, 'PYTHONPATH': f'{tmp_path}{os.pathsep}{ROOT}'},
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      pulled = client.pull()
  finally:
    server.terminate()
    server.wait(timeout=60)
  assert pulled.step == 8
  # LAMB moves x from 5 towards 0 (about lr * trust ratio ~ 0.25 a step).
  assert all(0 < v < 4.5 for v in pulled.params["['x']"]), pulled.params
