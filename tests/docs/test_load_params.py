"""`load_params`: the .npz that `lamb-sharded export` writes, read back into a pytree
(docs/checkpoints.md, "Export, and loading the file back")."""

import collections
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from service.core.persistence import load_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
from svc import ROOT, running_server  # noqa: E402  pylint: disable=wrong-import-position

Layer = collections.namedtuple('Layer', 'w b')


def _model(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  return {'enc': {'w': f32(16, 4), 'b': f32(4)},
          'layers': [Layer(f32(4, 4), f32(4)), Layer(f32(4, 8), f32(8))],
          "it's": f32(3)}


def test_an_exported_checkpoint_loads_back_as_the_model(tmp_path):
  params = _model()
  ckpt = tmp_path / 'ckpt'
  with running_server(devices=2, checkpoint_dir=str(ckpt), checkpoint_every_steps=0,
                      checkpoint_every_seconds=0, learning_rate=0.1) as (_, client):
    client.initialize(params)
    client.push(0, jax.tree.map(np.ones_like, params), 1, 'w')
    client.save_checkpoint(wait=True)
    want = client.pull(like=params).params
  out = tmp_path / 'params.npz'
  subprocess.run([sys.executable, '-m', 'service.cli', 'export', '--checkpoint-dir', str(ckpt),
                  '--out', str(out)], check=True, cwd=ROOT, capture_output=True,
                 env={**os.environ, 'PYTHONPATH': ROOT})

  got = load_params(str(out), like=params)  # the model's own structure: lists, NamedTuples
  assert jax.tree.structure(got) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, got, want)

  nested = load_params(str(out))  # without `like`: nested dicts, a 0..n-1 level a list
  assert sorted(nested) == ['enc', "it's", 'layers'] and isinstance(nested['layers'], list)
  np.testing.assert_array_equal(nested['layers'][1]['w'], want['layers'][1].w)
  np.testing.assert_array_equal(nested['enc']['b'], want['enc']['b'])
  np.testing.assert_array_equal(nested["it's"], want["it's"])


def test_what_does_not_fit_is_refused_naming_it(tmp_path):
  path = tmp_path / 'p.npz'
  np.savez(path, **{"['w']": np.zeros(2, np.float32), "['b']": np.zeros(1, np.float32)})
  with pytest.raises(ValueError, match=r"are not those of `like`"):
    load_params(str(path), like={'w': 0})
  np.savez(path, **{'w': np.zeros(2, np.float32)})  # not a leaf path
  with pytest.raises(ValueError, match=r"key 'w' is not a leaf path.*like="):
    load_params(str(path))
