"""What the server persists, and whether it fits: checkpoint metadata, restore, compatibility.

A checkpoint (service/core/checkpoint.py) holds the state and a JSON `meta`:
the model's leaves and the optimizer's hyperparameters. A restore reads the
meta first, builds the model's plan on this server's mesh from it, and
restores the arrays straight into the plan's shardings. A .npz of initial
parameters (`--init-params`, `lamb-sharded export`) is the portable form;
`load_params` reads one back into a pytree.
"""

from __future__ import annotations

import ast
import logging
import re
from typing import Optional, Sequence

import jax
import numpy as np

from service.config import ServerConfig
from service.core.checkpoint import Checkpointer, IncompatibleCheckpoint
from service.core.model import ModelPlan, ModelState
from service.core.optimizer import HYPERPARAMETERS
from service.protocol.specs import LeafSpec

log = logging.getLogger(__name__)


def specs_to_meta(specs: Sequence[LeafSpec]) -> list[dict]:
  return [{'path': s.path, 'shape': list(s.shape), 'dtype': s.dtype.name} for s in specs]


def specs_from_meta(leaves: list[dict]) -> list[LeafSpec]:
  return [LeafSpec(x['path'], tuple(x['shape']), np.dtype(x['dtype'])) for x in leaves]


def meta(config: ServerConfig, specs: Sequence[LeafSpec], moment_layout=None) -> dict:
  """The JSON metadata a checkpoint of this model carries beside its arrays (with quantized
  moments, the shapes of their scales: `ModelPlan.moment_layout`)."""
  out = {'leaves': specs_to_meta(specs),
         'hyperparameters': {k: getattr(config, k) for k in HYPERPARAMETERS}}
  if moment_layout is not None:
    out['moment_layout'] = moment_layout
  return out


def save(checkpointer: Checkpointer, config: ServerConfig, step: int, plan: ModelPlan,
         state: ModelState, *, force: bool) -> bool:
  """Saves `step` if the checkpointer's policy says so (always with `force`, unless it exists)."""
  return checkpointer.save(step, state.checkpointed(),
                           meta(config, plan.specs, plan.moment_layout()), force=force)


def restore_latest(checkpointer: Checkpointer, config: ServerConfig, mesh: jax.sharding.Mesh
                   ) -> Optional[tuple[int, ModelPlan, ModelState]]:
  """The newest readable checkpoint onto `mesh`: (step, plan, state); None if there is none.

  UnreadableCheckpoints if there are checkpoints and none can be read (unless
  `config.discard_unreadable_checkpoints`: then they are deleted, and None);
  NewerFormat for one written by a newer version.
  """
  plans = {}

  def target_for(m: dict):
    check_same_state(m.get('hyperparameters') or {}, config)
    check_codes_readable(m)
    plans['plan'] = plan = ModelPlan(config, mesh, specs_from_meta(m['leaves']))
    return plan.saved_target(m.get('moment_layout'))

  found = checkpointer.restore_latest(
      target_for, discard_unreadable=config.discard_unreadable_checkpoints)
  if found is None:
    return None
  step, tree, _ = found
  plan = plans['plan']
  return step, plan, plan.restored(tree)


# Settings that shape the optimizer's state: a checkpoint restores only under the same.
STATE_SETTINGS = ('optimizer', 'moments')
# What checkpoints that do not record them were written with.
DEFAULTS = {'optimizer': 'lamb', 'moments': 'float32'}


def check_same_state(hyperparameters: dict, config: ServerConfig) -> None:
  """IncompatibleCheckpoint naming the setting if the checkpoint's optimizer state has
  another form than this server's (another --optimizer)."""
  for name in STATE_SETTINGS:
    theirs = hyperparameters.get(name, DEFAULTS[name])
    if theirs != getattr(config, name):
      flag = '--' + name.replace('_', '-')
      raise IncompatibleCheckpoint(
          f'its checkpoints were written with {flag} {theirs}, and this server has {flag} '
          f'{getattr(config, name)}: its optimizer state has another form (start with {flag} '
          f'{theirs}, or another --checkpoint-dir)')


# The first checkpoint format whose 4-bit moments are packed as this version packs them.
PACKED4_FORMAT = 2


def check_codes_readable(meta: dict) -> None:
  """IncompatibleCheckpoint if the checkpoint holds 4-bit moments packed in a layout of an
  older format, which this version would read as other codes (same shapes, other values)."""
  fmt = meta.get('format', 1)
  moments = (meta.get('hyperparameters') or {}).get('moments', DEFAULTS['moments'])
  if (moments == 'int4' and fmt < PACKED4_FORMAT
      and any(shape is not None for shape in meta.get('moment_layout') or [])):
    raise IncompatibleCheckpoint(
        f'its checkpoints are of format {fmt}, whose 4-bit moments (--moments int4) pack their '
        f'codes in another order than this version (format {PACKED4_FORMAT}): restore them with '
        f'the version that wrote them, or start a new run in another --checkpoint-dir')


def check_same_model(have: Sequence[LeafSpec], specs: Sequence[LeafSpec]) -> None:
  """IncompatibleCheckpoint naming the leaf unless `specs` are `have`'s leaves (a checkpoint's)."""
  by_path = {s.path: s for s in have}
  for s in specs:
    if s.path not in by_path:
      raise IncompatibleCheckpoint(f'the checkpoint has no leaf {s.path}')
    if by_path[s.path].shape != s.shape:
      raise IncompatibleCheckpoint(f'leaf {s.path} has shape {list(by_path[s.path].shape)} in '
                                   f'the checkpoint, {list(s.shape)} here')
  extra = set(by_path) - {s.path for s in specs}
  if extra:
    raise IncompatibleCheckpoint(f'the checkpoint has leaf {sorted(extra)[0]} that is not here')


def load_npz(path: str) -> tuple[list[LeafSpec], list[np.ndarray]]:
  """Leaves of a .npz file (keys: leaf paths, in the file's order) as float32."""
  with np.load(path) as data:
    names = list(data.files)
    arrays = [np.asarray(data[k], np.float32) for k in names]
  return [LeafSpec(k, a.shape, a.dtype) for k, a in zip(names, arrays)], arrays


# One key of a `jax.tree_util.keystr` path: ['name'] or ["it's"], [3], or .attr.
_PATH_KEY = re.compile(r"""\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\d+)\]|\.([A-Za-z_]\w*)""")


def load_params(path: str, like=None):
  """The parameters of a .npz that `lamb-sharded export` wrote, as a pytree.

  Args:
    path: the .npz file; its keys are leaf paths (`jax.tree_util.keystr`, e.g. "['enc']['w']").
    like: a pytree with the same leaf paths (its leaves are not read): the arrays are put into
      its structure (lists, tuples, NamedTuples...). Without it: nested dicts keyed by the
      paths' keys, a level keyed 0..n-1 a list.

  Returns:
    The pytree of NumPy arrays.

  Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'params.npz')
    >>> np.savez(path, **{"['enc']['w']": np.ones((4, 2), np.float32)})  # as export writes
    >>> load_params(path)['enc']['w'].shape
    (4, 2)
  """
  with np.load(path) as data:
    by_path = {k: data[k] for k in data.files}
  if like is not None:
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    if sorted(paths) != sorted(by_path):
      raise ValueError(f'{path}: its leaves {sorted(by_path)} are not those of `like` '
                       f'{sorted(paths)}')
    return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p in paths])
  tree: dict = {}
  for key, array in by_path.items():
    keys, pos = [], 0
    while pos < len(key) and (m := _PATH_KEY.match(key, pos)):
      keys.append(ast.literal_eval(m.group(1)) if m.group(1) else m.group(2))
      pos = m.end()
    if not keys or pos != len(key):
      raise ValueError(f'{path}: key {key!r} is not a leaf path (such as "[\'enc\'][\'w\']"); '
                       'pass like= a pytree of the model')
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = array

  def lists(node):
    if not isinstance(node, dict):
      return node
    node = {k: lists(v) for k, v in node.items()}
    return [node[i] for i in range(len(node))] if set(node) == set(range(len(node))) else node
  return lists(tree)
