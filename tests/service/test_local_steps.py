"""Low-communication training (DiLoCo): workers take local steps and push pseudo-gradients;
the server applies its --optimizer (lamb, nesterov, sgd) as the outer step. Checked against
a local replay with optax over several rounds, through real servers and workers."""

import os
import subprocess
import sys
import urllib.request

import grpc
import jax
import numpy as np
import optax
import pytest

from service.client import OptimizerClient
from service.client.local import LocalSteps, inner_optimizer
from service.examples import status
from service.examples.models import Regression
from svc import ROOT, push_messages, running_server, stub

H = 4  # local steps per round
ROUNDS = 3
BATCH = {0: 8, 1: 24}  # examples per inner step of each worker: the weights differ
INNER_LR = 0.01
OUTER = {'nesterov': dict(optimizer='nesterov', learning_rate=0.7, momentum=0.9),
         'sgd': dict(optimizer='sgd', learning_rate=1.0),
         'lamb': dict(optimizer='lamb', learning_rate=0.01, b1=0.9, b2=0.99, eps=1e-6)}
RTOL, ATOL = 1e-4, 1e-6  # float32; the same operations, on a mesh of one device vs plain jit


def _outer_tx(name):
  c = OUTER[name]
  if name == 'nesterov':
    return optax.sgd(c['learning_rate'], momentum=c['momentum'], nesterov=True)
  if name == 'sgd':
    return optax.sgd(c['learning_rate'])
  return optax.lamb(c['learning_rate'], b1=c['b1'], b2=c['b2'], eps=c['eps'])


def _batch(model, w):
  return lambda t, k: model.batch(t * H + k, w, BATCH[w])


def _replay(outer: str, reset_inner: bool = False):
  """Two workers' rounds and the outer optimizer, in one process: the reference."""
  model = Regression()
  params = jax.tree.map(np.asarray, model.init(0))
  grad_fn = jax.value_and_grad(model.loss)
  inner = inner_optimizer('adamw', INNER_LR)
  states = {w: None for w in BATCH}
  tx = _outer_tx(outer)
  outer_state = tx.init(params)
  for t in range(ROUNDS):
    deltas, weights = [], []
    for w in BATCH:
      p = params
      if states[w] is None or reset_inner:
        states[w] = inner.init(p)
      for k in range(H):
        x, y = _batch(model, w)(t, k)
        _, g = grad_fn(p, x, y)
        u, states[w] = inner.update(g, states[w], p)
        p = optax.apply_updates(p, u)
      deltas.append(jax.tree.map(lambda a, b: a - b, params, p))
      weights.append(H * BATCH[w])
    mean = jax.tree.map(lambda *d: sum(wt * x for wt, x in zip(weights, d)) / sum(weights),
                        *deltas)
    updates, outer_state = tx.update(mean, outer_state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('outer', list(OUTER))
def test_the_outer_step_is_optax_on_the_example_weighted_mean_of_the_pseudo_gradients(outer):
  model = Regression()
  params = jax.tree.map(np.asarray, model.init(0))
  grad_fn = jax.value_and_grad(model.loss)
  with running_server(devices=1, num_workers=2, **OUTER[outer]) as (running, client):
    client.initialize(params)
    trainers = {w: LocalSteps(OptimizerClient(f'127.0.0.1:{running.port}', timeout=30),
                              grad_fn, inner_optimizer('adamw', INNER_LR), H, f'worker-{w}',
                              like=params) for w in BATCH}
    for t in range(ROUNDS):  # sync: worker 0's push waits for worker 1's, which applies
      rounds = [trainers[w].round(_batch(model, w)) for w in BATCH]
      assert [r.step for r in rounds] == [t, t]
      assert [r.result.applied for r in rounds] == [False, True]
      assert [r.examples for r in rounds] == [H * BATCH[w] for w in BATCH]
    served = client.pull(like=params)
    for trainer in trainers.values():
      # The inner state persisted across rounds: adamw counted every inner step.
      assert int(trainer.inner_state[0].count) == ROUNDS * H
      trainer.client.close()
  assert served.step == ROUNDS
  ref = _replay(outer)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(served.params)[0],
                          jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
  # The replay sees what matters: an inner state reset each round ends elsewhere.
  fresh = _replay(outer, reset_inner=True)
  assert any(not np.allclose(a, b, rtol=RTOL, atol=ATOL)
             for a, b in zip(jax.tree.leaves(served.params), jax.tree.leaves(fresh)))


def test_a_pseudo_gradient_push_follows_the_rules_of_a_gradient_push():
  leaves = [("['w']", np.ones(4, np.float32))]
  with running_server(devices=1, optimizer='nesterov', learning_rate=0.5) as (running, client):
    client.initialize({'w': np.zeros(4, np.float32)})
    s = stub(running.port)
    for bad in (-1, 1_000_001):
      header = push_messages(leaves, worker_id='worker-0', push_id=f'bad{bad}')
      header[0].header.local_steps = bad
      with pytest.raises(grpc.RpcError) as e:
        s.PushGradients(iter(header), timeout=30)
      assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      assert 'header.local_steps must be in [0, 1000000]' in e.value.details()
    assert client.pull().step == 0  # nothing applied
    msgs = push_messages(leaves, worker_id='worker-0', push_id='round-0', num_examples=40)
    msgs[0].header.local_steps = 10
    first = s.PushGradients(iter(msgs), timeout=30)
    again = s.PushGradients(iter(msgs), timeout=30)  # a retry: answered again, counted once
    assert (first.applied, first.duplicate, again.duplicate) == (True, False, True)
    # nesterov, lr 0.5, momentum 0.9, first step: w - lr * (g + 0.9 * g)
    np.testing.assert_allclose(client.pull().params["['w']"], -0.5 * 1.9 * np.ones(4),
                               rtol=1e-6)
    with pytest.raises(grpc.RpcError) as e:  # a round from a step gone by: refused alike
      s.PushGradients(iter(push_messages(leaves, worker_id='worker-0', push_id='late',
                                         step=0)), timeout=30)
    assert e.value.code() == grpc.StatusCode.ABORTED
    text = urllib.request.urlopen(  # pylint: disable=consider-using-with
        f'http://127.0.0.1:{running.metrics_port}/metrics', timeout=10).read().decode()
    assert 'lamb_sharded_local_steps_total 10.0' in text, text
    info = status.gather(f'127.0.0.1:{running.port}')
    assert (info['optimizer'], info['momentum']) == ('nesterov', pytest.approx(0.9))
    assert 'optimizer    nesterov, momentum 0.9' in status.as_text(info)


def _worker(port, steps, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
       '--worker-index', '0', '--steps', str(steps), '--batch-size', '8', '--init',
       '--local-steps', str(H), '--inner-learning-rate', str(INNER_LR), *extra],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=240, check=False)


def test_worker_local_steps_train_and_a_restarted_worker_goes_on():
  """`lamb-sharded worker --local-steps H` trains through a server whose optimizer is the
  outer one; a new worker process (its inner state and residuals lost) picks up the round
  the server waits for, and the outer steps go on."""
  with running_server(devices=1, **OUTER['nesterov']) as (running, client):
    first = _worker(running.port, 2, '--compression', 'int8')
    assert first.returncode == 0, first.stderr
    at_2 = client.pull()
    assert at_2.step == 2
    second = _worker(running.port, 4, '--compression', 'int8',  # the restart
                     '--pull-dtype', 'bfloat16')
    assert second.returncode == 0, second.stderr
    at_4 = client.pull()
    assert at_4.step == 4
    assert any(not np.array_equal(at_2.params[k], at_4.params[k]) for k in at_4.params)
    text = urllib.request.urlopen(  # pylint: disable=consider-using-with
        f'http://127.0.0.1:{running.metrics_port}/metrics', timeout=10).read().decode()
    assert f'lamb_sharded_local_steps_total {4.0 * H}' in text  # 4 rounds of H local steps


def test_a_checkpoint_of_another_optimizer_is_refused_in_one_line(tmp_path):
  ckpt = str(tmp_path / 'ckpt')
  with running_server(devices=1, checkpoint_dir=ckpt) as (_, client):
    client.initialize({'w': np.zeros(4, np.float32)})
    assert client.save_checkpoint(wait=True)[0] == 0
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--metrics-port', '-1', '--devices', '1', '--checkpoint-dir', ckpt,
       '--optimizer', 'nesterov'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'written with --optimizer lamb, and this server has --optimizer nesterov' in lines[0]


@pytest.mark.parametrize('outer', ['nesterov', 'sgd'])
def test_a_server_with_an_outer_optimizer_saves_and_restores_its_checkpoint(tmp_path, outer):
  """A checkpoint of nesterov's or sgd's state is written and restored (not only LAMB's)."""
  ckpt = str(tmp_path / 'ckpt')
  params = {'w': np.arange(4, dtype=np.float32)}
  with running_server(devices=1, checkpoint_dir=ckpt, **OUTER[outer]) as (_, client):
    client.initialize(params)
    assert client.save_checkpoint(wait=True)[0] == 0
  with running_server(devices=1, checkpoint_dir=ckpt, **OUTER[outer]) as (_, client):
    restored = client.pull(like=params)
    assert restored.step == 0
    np.testing.assert_array_equal(restored.params['w'], params['w'])
