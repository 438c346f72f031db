"""Checkpoints with Orbax: restore anywhere, survive kill -9 and SIGTERM, refuse what does not fit."""

import concurrent.futures
import glob
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import jax
import numpy as np
import pytest

from service.core.checkpoint import Checkpointer
from service.client import OptimizerClient
from service.config import ServerConfig
from service.core.engine import Engine
from service.examples.models import Regression
from svc import (ROOT, flags, free_port, local_reference, params_of, push_arrays, running_server,
                 start_server_process, start_workers)

LAMB = dict(learning_rate=0.02, schedule='warmup_cosine', warmup_steps=4, decay_steps=30,
            weight_decay=0.01)
P0 = {"['w']": np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4),
      "['b']": np.linspace(0.5, 1, 8, dtype=np.float32)}


def _state_host(engine):
  state = engine._state  # pylint: disable=protected-access
  return jax.tree.map(np.asarray, state.checkpointed())


def test_restore_onto_other_meshes_gives_identical_values(tmp_path):
  cfg = ServerConfig(learning_rate=0.1, checkpoint_dir=str(tmp_path))
  saved = None
  for devices in (8, 4, 1, 8):
    checkpointer = Checkpointer(str(tmp_path))
    engine = Engine(ServerConfig(**{**cfg.__dict__, 'devices': devices}),
                    checkpointer=checkpointer)
    if saved is None:
      engine.initialize(*_specs_and_arrays(P0))
      for i in range(3):
        push_arrays(engine, 'w', i, {k: np.full(v.shape, 0.1 * (i + 1), np.float32)
                                     for k, v in P0.items()})
      engine.save_now(wait=True)
      saved = _state_host(engine)
    else:
      assert engine.restore()
      assert engine.describe().step == 3
      assert engine.mesh.devices.size == devices
      got = _state_host(engine)
      assert jax.tree.structure(got) == jax.tree.structure(saved)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
      mu = engine._state.opt_state[0].mu[0]  # pylint: disable=protected-access
      assert len(mu.sharding.device_set) == devices
    engine.close()
    checkpointer.close()


def _specs_and_arrays(tree):
  from service.protocol.specs import LeafSpec  # pylint: disable=import-outside-toplevel
  return [LeafSpec(k, v.shape, v.dtype) for k, v in tree.items()], list(tree.values())


def test_save_list_export_and_init_params_round_trip(tmp_path):
  ckpt = tmp_path / 'ckpt'
  with running_server(devices=2, checkpoint_dir=str(ckpt), checkpoint_every_steps=0,
                      checkpoint_every_seconds=0, learning_rate=0.1) as (_, client):
    client.initialize(P0)
    client.push(0, {k: np.ones_like(v) for k, v in P0.items()}, 1, 'w')
    step, path = client.save_checkpoint(wait=True)
    assert step == 1 and path.endswith('/1')
    listed = client.list_checkpoints()
    # Step 0 (saved on initialisation) and step 1 (saved now).
    assert [(c.step, c.complete) for c in listed] == [(0, True), (1, True)]
    assert all(c.size_bytes > 0 for c in listed)
    _, want = params_of(client)
  out = tmp_path / 'params.npz'
  cli = [sys.executable, '-m', 'service.cli']
  env = {**os.environ, 'PYTHONPATH': ROOT}
  subprocess.run(cli + ['export', '--checkpoint-dir', str(ckpt), '--out', str(out)],
                 check=True, env=env, cwd=ROOT, capture_output=True)
  with np.load(out) as data:
    assert list(data.files) == list(P0)
    for k in P0:
      np.testing.assert_array_equal(data[k], want[k])
  # A fresh server (no checkpoint dir) starts from the exported file.
  with running_server(devices=1, init_params=str(out)) as (_, client):
    step, got = params_of(client)
    assert step == 0
    for k in P0:
      np.testing.assert_array_equal(got[k], want[k])


def test_incompatible_checkpoint_is_refused(tmp_path):
  ckpt = tmp_path / 'ckpt'
  with running_server(devices=1, checkpoint_dir=str(ckpt)) as (_, client):
    client.initialize(P0)
    client.save_checkpoint(wait=True)
  other = tmp_path / 'other.npz'
  np.savez(other, **{"['w']": np.zeros((4, 4), np.float32), "['b']": np.zeros(8, np.float32)})
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--devices', '1', '--metrics-port', '-1', '--checkpoint-dir', str(ckpt),
       '--init-params', str(other)],
      env={**os.environ, 'PYTHONPATH': ROOT}, cwd=ROOT, capture_output=True, text=True,
      timeout=60)
  assert proc.returncode != 0
  assert "leaf ['w'] has shape [16, 4] in the checkpoint, [4, 4] here" in proc.stderr
  # Nothing was loaded or written: the checkpoint is as it was.
  assert Checkpointer(str(ckpt)).steps() == [0]  # saved on initialisation (and on stop)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  ckpt = tmp_path / 'ckpt'
  with running_server(devices=2, checkpoint_dir=str(ckpt), checkpoint_every_steps=1,
                      learning_rate=0.1) as (_, client):
    client.initialize(P0)
    for step in range(3):
      client.push(step, {k: np.full_like(v, step + 1) for k, v in P0.items()}, 1, 'w')
      if step == 1:
        _, at_two = params_of(client)
  steps = Checkpointer(str(ckpt)).steps()
  assert steps[-1] == 3  # saves at 0 (init), 1, 2, 3; the final one on stop is step 3 again
  for f in glob.glob(str(ckpt / '3' / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      with open(f, 'r+b') as fh:
        fh.truncate(max(0, os.path.getsize(f) // 3))
  caplog.set_level('WARNING')
  with running_server(devices=4, checkpoint_dir=str(ckpt)) as (_, client):
    step, got = params_of(client)
  assert step == 2
  for k in P0:
    np.testing.assert_array_equal(got[k], at_two[k])
  assert any('checkpoint 3' in r.message and 'falling back' in r.message for r in caplog.records)


def _kill_tree(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait(timeout=30)


def test_sigterm_writes_the_last_applied_step(tmp_path):
  ckpt = tmp_path / 'ckpt'
  batch = {0: 16, 1: 24}
  port = free_port()
  server, _ = start_server_process('--port', str(port), '--devices', '4', '--num-workers', '2',
                                   '--checkpoint-dir', str(ckpt),
                                   '--checkpoint-every-steps', '0',
                                   '--checkpoint-every-seconds', '0', *flags(LAMB))
  workers = start_workers(port, batch, 10**6)
  try:
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      client.wait_for_step(5, timeout=120)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
  finally:
    _kill_tree(workers + [server])
  steps = Checkpointer(str(ckpt)).steps()
  # Step 0 (saved on initialisation) and the final save: the last applied step.
  assert len(steps) == 2 and steps[0] == 0 and steps[1] >= 5
  last = steps[1]
  _, params = Checkpointer(str(ckpt)).load_params(last)
  want = local_reference(last, batch, LAMB)
  for (path, w) in zip(params, jax.tree.leaves(want)):
    np.testing.assert_allclose(params[path], w, rtol=1e-5, atol=1e-6, err_msg=path)


def test_a_wait_for_a_step_the_killed_server_lost_ends_at_its_successor(tmp_path):
  """kill -9 while worker a waits for the step its push began: the successor restores
  the checkpoint without that push, under a new model_id. A wait in a's model -- carried
  over to the successor by the retry policy, or made anew -- ends at once
  (FAILED_PRECONDITION): it would wait for a step only the lost push could complete."""
  ckpt = tmp_path / 'ckpt'
  port = free_port()
  args = ('--port', str(port), '--devices', '2', '--num-workers', '2', '--checkpoint-dir',
          str(ckpt), *flags(LAMB))
  server, _ = start_server_process(*args)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  try:
    with OptimizerClient(f'127.0.0.1:{port}', timeout=60) as client:
      client.initialize(P0)
      g = {k: np.ones_like(v) for k, v in P0.items()}
      assert [client.push(0, g, 1, w).applied for w in 'ab'] == [False, True]
      client.save_checkpoint(wait=True)  # of step 1
      r = client.push(1, g, 1, 'a')
      assert not r.applied and r.model_id == client.describe().model_id
      assert client.wait_for_step(2, timeout=0.3, model_id=r.model_id) == (1, False)
      carried = pool.submit(client.wait_for_step, 2, 60, r.model_id)
      time.sleep(0.3)  # in the server
      server.send_signal(signal.SIGKILL)
      server.wait(timeout=30)
      server, _ = start_server_process(*args)
      info = client.describe(wait_for_ready=True, timeout=60)
      assert info.step == 1 and info.model_id != r.model_id
      # Any model: it waits (for a push of a that a does not know is lost).
      assert client.wait_for_step(2, timeout=0.5) == (1, False)
      t0 = time.monotonic()
      with pytest.raises(grpc.RpcError) as e:
        client.wait_for_step(2, timeout=60, model_id=r.model_id)
      assert time.monotonic() - t0 < 10
      assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
      assert f'model_id {r.model_id} is not the server\'s model {info.model_id}' in \
          e.value.details()
      with pytest.raises(grpc.RpcError) as e:  # within seconds, not after its 60 s
        carried.result(timeout=30)
      assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.FAILED_PRECONDITION), e.value
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
    _kill_tree([server])


def test_kill_9_five_times_loses_nothing(tmp_path):
  """kill -9 the server at random moments (one during an async save); the run ends as if never killed."""
  steps, batch = 40, {0: 16, 1: 32}
  ckpt = tmp_path / 'ckpt'
  port = free_port()
  args = ('--port', str(port), '--devices', '8', '--num-workers', '2', '--checkpoint-dir',
          str(ckpt), '--checkpoint-every-steps', '3', '--keep-checkpoints', '2', *flags(LAMB))
  rng = random.Random(1234)
  server, _ = start_server_process(*args)
  workers = start_workers(port, batch, steps, extra=('--timeout', '120'))
  kills, during_save = 0, 0
  # The later kills land at random steps (and a random moment after), all before the
  # last: the workers are still there to carry the run on (they end at step `steps`).
  targets = sorted(rng.sample(range(6, steps - 2), 4))
  try:
    with OptimizerClient(f'127.0.0.1:{port}', timeout=120) as client:
      while kills < 5:
        if kills == 0:  # the first kill lands while an asynchronous save is being written
          deadline = time.monotonic() + 60
          while not glob.glob(str(ckpt / '*tmp*')) and time.monotonic() < deadline:
            time.sleep(0.002)
          during_save += bool(glob.glob(str(ckpt / '*tmp*')))
        else:
          client.wait_for_step(targets[kills - 1], timeout=120)
          time.sleep(rng.uniform(0, 0.05))
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        kills += 1
        server, _ = start_server_process(*args)
        client.describe(wait_for_ready=True, timeout=60)
      for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out
      pulled = client.pull(like=Regression(seed=0).init(0))
    assert kills == 5 and during_save == 1
    assert pulled.step == steps
    want = local_reference(steps, batch, LAMB)
    for (path, got), w in zip(jax.tree_util.tree_flatten_with_path(pulled.params)[0],
                              jax.tree.leaves(want)):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
  finally:
    _kill_tree(workers + [server])
