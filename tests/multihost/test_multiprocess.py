"""Meshes that span two processes (`jax.distributed`): lamb_sharded, and the optimizer engine.

Two real processes on 127.0.0.1 with 4 simulated CPU devices each form one
8-device mesh (`service.runtime.initialize_distributed`): the per-layer norms'
all-reduce then crosses the processes. Each process is bounded by a timeout
and only the processes started here are ended, by PID.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import optax
import pytest

from service import runtime

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mp_engine  # noqa: E402  pylint: disable=wrong-import-position
import mp_lamb  # noqa: E402  pylint: disable=wrong-import-position
import mp_server  # noqa: E402  pylint: disable=wrong-import-position


def _run_job(out: pathlib.Path, script: str = 'mp_lamb.py', timeout: float = 120.0) -> list[str]:
  port = mp_server.job_port()
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  runtime.simulate_cpu_devices(4, env)
  procs = [subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'multihost' / script),
                             str(port), str(i), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def test_two_processes_step_like_optax_lamb_with_one_cross_process_all_reduce(tmp_path):
  out = tmp_path / 'params.npz'
  _run_job(out)
  got = np.load(out)
  tx = optax.lamb(1e-2, weight_decay=0.01)
  params = mp_lamb.host_params()
  state = tx.init(params)
  for t in range(3):
    updates, state = tx.update(mp_lamb.host_grads(t), state, params)
    params = optax.apply_updates(params, updates)
  for k, v in params.items():
    np.testing.assert_allclose(got[k], np.asarray(v), rtol=2e-6, atol=2e-7, err_msg=k)
  assert int(got['count']) == 3
  assert int(got['all_reduces']) == 1  # every leaf's norms in one collective, across processes


def test_a_process_id_outside_the_job_is_refused_before_jax_starts():
  with pytest.raises(ValueError, match=r'process_id 2 is not in \[0, num_processes=2\)'):
    runtime.initialize_distributed('127.0.0.1:1', 2, 2)


def test_two_engine_processes_take_only_their_slices_and_apply_the_same_steps(tmp_path):
  # Each process is given only its own devices' slices of every leaf (a split leaf's half,
  # a replicated leaf whole), and the steps end where one process on one device ends.
  _run_job(tmp_path / 'engine', 'mp_engine.py')
  parts = [np.load(tmp_path / f'engine.{i}.npz') for i in range(2)]
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  tx = make_optimizer(ServerConfig(**mp_engine.CONFIG), None, None)
  params = mp_engine.params()
  state = tx.init(params)
  for step in range(mp_engine.STEPS):
    g = [mp_engine.grads(step, w) for w in range(mp_engine.WORKERS)]
    mean = {k: sum(x[k] for x in g) / mp_engine.WORKERS for k in params}
    updates, state = tx.update(mean, state, params)
    params = optax.apply_updates(params, updates)
  for k, want in params.items():
    got = np.empty_like(np.asarray(want))
    for part in parts:
      value, start = part[f'value:{k}'], part[f'start:{k}']
      got[tuple(slice(s, s + n) for s, n in zip(start, value.shape))] = value
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-6, atol=2e-7, err_msg=k)
  # Bytes per process: half of each split leaf, the replicated one whole, per push.
  split = sum(4 * np.prod(s) for k, s in mp_engine.SHAPES.items() if k != "['odd']")
  each = mp_engine.STEPS * mp_engine.WORKERS * (split // 2 + 4 * 7)
  assert [int(p['pushed']) for p in parts] == [each, each]
  assert [int(p['step']) for p in parts] == [mp_engine.STEPS] * 2
