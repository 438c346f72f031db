"""`serve --moments int8` / `int4`: LAMB's moments as 8- or 4-bit blocks in the server, its
checkpoints and their restore onto another device count (whose shards cut a leaf's blocks
otherwise), and the refusal of a checkpoint of other moments."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import lamb_sharded
from service.config import ServerConfig
from service.core.optimizer import make_optimizer
from service.examples import status
from svc import ROOT, running_server

LAMB = dict(learning_rate=0.02, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.01)
# The server splits a leaf along its largest dimension the device count divides; a leaf
# split along its last axis gets the blocks its shards allow. ['big']: 64 x 256, split along
# 256 on 4 devices (64 columns each): blocks of 64 there, of 128 on 1 device. ['odd']:
# 2 x 2400, 600 columns a device on 4, which no block of 32..128 divides: float32 on 4
# devices, quantized on 1. ['b']: too small to quantize (< 4096 entries), float32 everywhere.
SHAPES = {'big': (64, 256), 'odd': (2, 2400), 'b': (256,)}
STEPS = 3
WIDTHS = ['int8', 'int4']
# One more rounding when restored onto other blocks, as a fraction of a leaf's largest
# entry (of m, or of sqrt(v)): half a step at the top of E4M3 (2^-4) or half the widest
# gap of the 4-bit dynamic map (0.1125); int4's sqrt(v) levels k/16 round an entry by at
# most a level (1/16).
REQUANT_ATOL = {'int8': {'mu': 2.0 ** -4, 'nu': 2.0 ** -4},
                'int4': {'mu': 0.1125, 'nu': 1 / 16}}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _train(client, steps):
  for step in steps:
    pulled = client.pull(like=_params())
    assert pulled.step == step
    client.push(step, _grads(step), 8, 'worker-0', model_id=pulled.model_id)
  return client.pull(like=_params())


def _moments(running) -> tuple[list, list]:
  """The server's LAMB moments, decoded to float, one host array per leaf."""
  state = running.engine._state.opt_state[0]  # pylint: disable=protected-access
  decoded = lamb_sharded.dequantize_moments(state)
  return ([np.asarray(x) for x in decoded.mu], [np.asarray(x) for x in decoded.nu])


@pytest.mark.parametrize('width', WIDTHS)
def test_quantized_moments_step_as_the_library_does_and_hold_quantized_state(width):
  with running_server(devices=1, moments=width, **LAMB) as (running, client):
    client.initialize(_params())
    served = _train(client, range(STEPS))
    state = running.engine._state.opt_state[0]  # pylint: disable=protected-access
    kinds = [type(m).__name__ for m in state.mu]
    codes = {str(m.codes.dtype) for m in state.mu + state.nu if hasattr(m, 'codes')}
    info = status.gather(f'127.0.0.1:{running.port}')
  # The leaves in the params' (sorted) order: b, big, odd.
  assert kinds == ['ArrayImpl', 'QuantizedMoment', 'QuantizedMoment'], kinds
  assert codes == {'int8' if width == 'int8' else 'uint8'}  # 4-bit codes: two a byte
  assert info['moments'] == width and f'lamb, {width} moments' in status.as_text(info)
  # The same steps by lamb_sharded (one device, the same blocks): the same parameters.
  tx = make_optimizer(ServerConfig(moments=width, **LAMB), None, None)
  params = _params()
  opt = tx.init(params)
  for step in range(STEPS):
    updates, opt = tx.update(_grads(step), opt, params)
    params = optax.apply_updates(params, updates)
  for k in SHAPES:
    np.testing.assert_allclose(served.params[k], params[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize('width', WIDTHS)
@pytest.mark.parametrize('devices', [4, 1])
def test_a_checkpoint_of_quantized_moments_restores_onto_another_device_count(tmp_path, devices,
                                                                              width):
  ckpt = str(tmp_path / 'ckpt')
  with running_server(devices=4, moments=width, checkpoint_dir=ckpt, **LAMB) as (running, c):
    c.initialize(_params())
    at_stop = _train(c, range(STEPS))
    saved = _moments(running)
    kinds = [type(m).__name__ for m in running.engine._state.opt_state[0].mu]  # pylint: disable=protected-access
    assert kinds == ['ArrayImpl', 'QuantizedMoment', 'ArrayImpl'], kinds
  # Stopped: its final checkpoint, of step STEPS.
  with running_server(devices=devices, moments=width, checkpoint_dir=ckpt, **LAMB) as (
      running, c):
    restored_params = c.pull(like=_params())
    assert restored_params.step == STEPS
    restored = _moments(running)
    after = _train(c, [STEPS])
  for k in SHAPES:
    np.testing.assert_array_equal(restored_params.params[k], at_stop.params[k], err_msg=k)
  for which, a_list, b_list in (('mu', saved[0], restored[0]), ('nu', saved[1], restored[1])):
    for k, a, b in zip(sorted(SHAPES), a_list, b_list):
      if devices == 4:  # the same blocks: bit for bit
        np.testing.assert_array_equal(a, b, err_msg=f'{which} {k}')
      elif which == 'mu':  # re-encoded in 1 device's blocks: one more rounding
        atol = np.abs(a).max() * REQUANT_ATOL[width]['mu']
        np.testing.assert_allclose(b, a, atol=atol, rtol=0, err_msg=f'{which} {k}')
      else:  # v: the rounding is of sqrt(v)
        atol = np.sqrt(a).max() * REQUANT_ATOL[width]['nu']
        np.testing.assert_allclose(np.sqrt(b), np.sqrt(a), atol=atol, rtol=0,
                                   err_msg=f'{which} {k}')
  for k in SHAPES:  # and it trains on: a step of at most about the learning rate an entry
    moved = np.abs(after.params[k] - at_stop.params[k]).max()
    assert 0 < moved < 2 * LAMB['learning_rate'] * (1 + np.abs(at_stop.params[k]).max()), k


@pytest.mark.parametrize('saved,here', [('float32', 'int8'), ('int4', 'int8'),
                                        ('int8', 'int4')])
def test_moments_are_part_of_the_state_a_checkpoint_restores_under(tmp_path, saved, here):
  ckpt = str(tmp_path / 'ckpt')
  with running_server(devices=1, checkpoint_dir=ckpt, moments=saved) as (_, client):
    client.initialize(_params())
    assert client.save_checkpoint(wait=True)[0] == 0
  proc = subprocess.run(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--metrics-port', '-1', '--devices', '1', '--checkpoint-dir', ckpt, '--moments', here],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(lines) == 1, proc.stderr
  assert f'written with --moments {saved}, and this server has --moments {here}' in lines[0]


@pytest.mark.parametrize('width', WIDTHS)
def test_quantized_moments_are_lambs_only(width):
  with pytest.raises(ValueError, match=rf"--moments: {width} moments are LAMB's \(--optimizer "
                                       r"lamb\), not nesterov's"):
    ServerConfig(moments=width, optimizer='nesterov').validate()
  assert jax.tree.leaves(ServerConfig(moments=width).validate().moments) == [width]
