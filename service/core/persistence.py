"""What the server persists, and whether it fits: checkpoint metadata, restore, compatibility.

A checkpoint (service/core/checkpoint.py) holds the state and a JSON `meta`:
the model's leaves and the optimizer's hyperparameters. A restore reads the
meta first, builds the model's plan on this server's mesh from it, and
restores the arrays straight into the plan's shardings. A .npz of initial
parameters (`--init-params`, `lamb-sharded export`) is the portable form.
"""

from __future__ import annotations

import logging
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


def meta(config: ServerConfig, specs: Sequence[LeafSpec]) -> dict:
  """The JSON metadata a checkpoint of this model carries beside its arrays."""
  return {'leaves': specs_to_meta(specs),
          'hyperparameters': {k: getattr(config, k) for k in HYPERPARAMETERS}}


def save(checkpointer: Checkpointer, config: ServerConfig, step: int, plan: ModelPlan,
         state: ModelState, *, force: bool) -> bool:
  """Saves `step` if the checkpointer's policy says so (always with `force`, unless it exists)."""
  return checkpointer.save(step, state.checkpointed(), meta(config, plan.specs), force=force)


def restore_latest(checkpointer: Checkpointer, config: ServerConfig, mesh: jax.sharding.Mesh
                   ) -> Optional[tuple[int, ModelPlan, ModelState]]:
  """The newest readable checkpoint onto `mesh`: (step, plan, state); None if there is none.

  UnreadableCheckpoints if there are checkpoints and none can be read (unless
  `config.discard_unreadable_checkpoints`: then they are deleted, and None);
  NewerFormat for one written by a newer version.
  """
  plans = {}

  def target_for(m: dict):
    plans['plan'] = plan = ModelPlan(config, mesh, specs_from_meta(m['leaves']))
    return plan.abstract_state()

  found = checkpointer.restore_latest(
      target_for, discard_unreadable=config.discard_unreadable_checkpoints)
  if found is None:
    return None
  step, tree, _ = found
  plan = plans['plan']
  return step, plan, plan.restored(tree)


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
