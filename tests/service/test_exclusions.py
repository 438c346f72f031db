"""Weight decay and layer adaptation per leaf in the service (--exclude-from-weight-decay,
--exclude-from-layer-adaptation: regular expressions on leaf paths), against optax."""

import os
import subprocess
import sys

import grpc
import jax
import numpy as np
import optax
import pytest

from service import config as config_lib
from service.examples import status
from service.examples.models import Regression
from svc import ROOT, running_server

BIASES = r"'b'\]$"  # "['layer0']['b']", ...: the biases of the regression MLP
FIRST_LAYER = r"\['layer0'\]"
SETTINGS = dict(learning_rate=0.05, weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-6,
                exclude_from_weight_decay=[BIASES],
                exclude_from_layer_adaptation=[BIASES, FIRST_LAYER])
STEPS = 4
RTOL, ATOL = 2e-5, 1e-6  # float32, a few steps of the same operations in another order


def test_excluded_leaves_train_as_optax_with_the_same_masks():
  model = Regression()
  params = jax.tree.map(np.asarray, model.init(0))
  grad_fn = model.grad_fn()

  def grads_of_step(step, p):
    return jax.tree.map(np.asarray, grad_fn(p, *model.batch(step, 0, 32))[1])

  with running_server(devices=1, **SETTINGS) as (_, client):
    client.initialize(params)
    for step in range(STEPS):
      pulled = client.pull(like=params)
      client.push(step, grads_of_step(step, pulled.params), 32, 'worker-0',
                  model_id=pulled.model_id)
    served = client.pull(like=params)
  assert served.step == STEPS
  # The reference computes each step's gradient at its own params, as the worker did.
  ref = _replay(params, grads_of_step)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(served.params)[0],
                          jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))
  # Without the exclusions the result differs: the test sees the masks.
  plain = _replay(params, grads_of_step, masks=False)
  assert any(not np.allclose(a, b, rtol=RTOL, atol=ATOL)
             for a, b in zip(jax.tree.leaves(served.params), jax.tree.leaves(plain)))


def _replay(params, grads_of_step, masks=True):
  """optax's LAMB pieces with the same masks: no decay on the biases; the trust ratio 1 on
  the biases and the first layer (optax.masked around scale_by_trust_ratio)."""
  decay = jax.tree_util.tree_map_with_path(
      lambda p, _: not (masks and jax.tree_util.keystr(p).endswith("['b']")), params)
  adapt = jax.tree_util.tree_map_with_path(
      lambda p, _: not (masks and (jax.tree_util.keystr(p).endswith("['b']") or
                                   jax.tree_util.keystr(p).startswith("['layer0']"))), params)
  tx = optax.chain(
      optax.scale_by_adam(b1=SETTINGS['b1'], b2=SETTINGS['b2'], eps=SETTINGS['eps']),
      optax.add_decayed_weights(SETTINGS['weight_decay'], decay),
      optax.masked(optax.scale_by_trust_ratio(), adapt),
      optax.scale_by_learning_rate(SETTINGS['learning_rate']))
  state = tx.init(params)
  for step in range(STEPS):
    updates, state = tx.update(grads_of_step(step, params), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_describe_and_status_show_the_leaves_each_setting_selects():
  with running_server(devices=1, **SETTINGS) as (running, client):
    before = status.gather(f'127.0.0.1:{running.port}')
    assert before['exclusions']['weight_decay'] == {'patterns': [BIASES], 'leaves': []}
    client.initialize(Regression().init(0))
    r = status.gather(f'127.0.0.1:{running.port}')
  biases = ["['layer0']['b']", "['layer1']['b']", "['layer2']['b']"]
  assert r['exclusions']['weight_decay'] == {'patterns': [BIASES], 'leaves': biases}
  assert r['exclusions']['layer_adaptation']['leaves'] == ["['layer0']['b']", "['layer0']['w']",
                                                          "['layer1']['b']", "['layer2']['b']"]
  text = status.as_text(r)
  assert (f"no weight decay      3 leaves: ['layer0']['b'], ['layer1']['b'], ['layer2']['b'] "
          f"(matching {BIASES})") in text, text
  assert 'no layer adaptation' in text, text


def test_a_pattern_matching_no_leaf_refuses_the_model_and_keeps_the_server_up():
  with running_server(devices=1, exclude_from_weight_decay=['LayerNorm']) as (_, client):
    with pytest.raises(grpc.RpcError) as e:
      client.initialize(Regression().init(0))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--exclude-from-weight-decay 'LayerNorm' matches no leaf" in e.value.details()
    assert "['layer0']['b']" in e.value.details()  # what the leaves are called
    assert not client.describe().initialized
    client.initialize({'LayerNorm': {'scale': np.ones(3, np.float32)}})  # a model it fits
    assert client.describe().initialized


def test_serve_refuses_init_params_that_a_pattern_does_not_fit(tmp_path):
  npz = tmp_path / 'init.npz'
  np.savez(npz, **{"['w']": np.ones(3, np.float32)})
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--metrics-port', '-1', '--devices', '1', '--init-params', str(npz),
       '--exclude-from-layer-adaptation', 'bias'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert "--exclude-from-layer-adaptation 'bias' matches no leaf" in lines[0], lines
  assert str(npz) in lines[0], lines


def test_patterns_from_flags_and_yaml(tmp_path):
  assert config_lib.parse(['--exclude-from-weight-decay', 'bias', '--exclude-from-weight-decay',
                           'norm']).exclude_from_weight_decay == ['bias', 'norm']
  yaml = tmp_path / 'server.yaml'
  yaml.write_text('exclude_from_weight_decay: [bias, LayerNorm]\n'
                  'exclude_from_layer_adaptation: bias\n')
  config = config_lib.parse(['--config', str(yaml)])
  assert config.exclude_from_weight_decay == ['bias', 'LayerNorm']
  assert config.exclude_from_layer_adaptation == ['bias']
  with pytest.raises(config_lib.ConfigError, match=r"--exclude-from-weight-decay: '\[' is not "
                                                   r'a regular expression'):
    config_lib.parse(['--exclude-from-weight-decay', '['])
