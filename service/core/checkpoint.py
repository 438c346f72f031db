"""Checkpoints of the server's state with Orbax: atomic, asynchronous, keep the last K.

A thin layer over `orbax.checkpoint.CheckpointManager`, and the only module that
knows Orbax exists: which steps a directory holds and where each one is, the
manager is asked (never its directory names read). Each checkpoint is one
step directory holding two items: `state` (the params and the LAMB state, as
sharded arrays, restored straight onto whatever mesh the restoring server has)
and `meta` (JSON: the step, the model's leaves, the hyperparameters). Orbax
writes a step into a temporary directory and renames it when complete, so a
crash at any moment -- in the middle of an asynchronous save too -- never
leaves a directory that is then restored as if it were complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from service import logs

log = logging.getLogger(__name__)

FORMAT = 1


class IncompatibleCheckpoint(ValueError):
  """A checkpoint that does not fit the model it would be restored into."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  step: int
  path: str
  complete: bool
  size_bytes: int


def latest_step(directory: str) -> Optional[int]:
  """The newest complete checkpoint's step in `directory` (None: none, or no directory)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def _dir_size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total


class Checkpointer:
  """Saves and restores {'params', 'opt_state'} + JSON metadata, by step."""

  def __init__(self, directory: str, *, every_steps: int = 0, every_seconds: float = 0.0,
               keep: int = 3, asynchronous: bool = True):
    """Args:
      directory: where the step directories go (created if missing).
      every_steps: save when step % every_steps == 0 (0: not by steps).
      every_seconds: save when this long has passed since the last save (0: not by time).
      keep: how many checkpoints to keep (the newest).
      asynchronous: write in the background (the step loop is blocked only for
        the copy of the arrays to host memory).
    """
    self.directory = os.path.abspath(directory)
    self._writing: Optional[int] = None  # the step of the last save started
    policies = []
    if every_steps > 0:
      policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every_steps))
    if every_seconds > 0:
      policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
          minimum_interval_secs=every_seconds))
    # With no policy, only forced saves (save now, final save on shutdown) happen.
    policy = ocp.checkpoint_managers.AnySavePolicy(policies) if policies else \
        ocp.checkpoint_managers.SpecificStepsPolicy(())
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=policy,
            enable_async_checkpointing=asynchronous, create=True,
            cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, ascending."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the policy saves `step` (a multi-process server asks process 0's)."""
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves `step` if the policy says so (always with `force`, unless it exists)."""
    if step in self._manager.all_steps():
      return False
    meta = {'format': FORMAT, 'step': step, **meta}
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      self._writing = step
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous save in progress (if any) is on disk."""
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_latest(self, target_for: Callable[[dict], Any]
                     ) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint: (step, state, meta), or None if none.

    Args:
      target_for: meta -> the abstract target (`jax.ShapeDtypeStruct`s with the
        shardings to restore onto). It raises IncompatibleCheckpoint when the
        checkpoint does not fit; that error propagates (nothing is loaded).

    A checkpoint that cannot be read (truncated, corrupted) is skipped with a
    warning in the log, falling back to the previous one.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint %d in %s is unreadable (%s: %s); falling back to the previous '
                    'one', step, self.directory, type(e).__name__, e,
                    extra=logs.fields(step=step, reason='unreadable_checkpoint'))
        continue
      target = target_for(meta)
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint %d in %s is unreadable (%s: %s); falling back to the previous '
                    'one', step, self.directory, type(e).__name__, e,
                    extra=logs.fields(step=step, reason='unreadable_checkpoint'))
        continue
      return step, restored.state, meta
    return None

  def load_params(self, step: Optional[int] = None) -> tuple[int, dict[str, np.ndarray]]:
    """The parameters of a checkpoint (default: the newest) as host arrays by leaf path."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f'no complete checkpoint of step {step} in {self.directory} '
                              f'(there are: {steps})')
    meta = self.read_meta(step)
    tree = self._manager.item_metadata(step)['state'].tree
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    state = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    return step, {leaf['path']: np.asarray(a)
                  for leaf, a in zip(meta['leaves'], state['params'])}

  def list(self) -> list[CheckpointInfo]:
    """The complete checkpoints, and the one still being written (if any), by step."""
    out = [CheckpointInfo(step, self.path(step), True, _dir_size(self.path(step)))
           for step in self.steps()]
    writing = self._writing
    if (writing is not None and writing not in self._manager.all_steps()
        and self._manager.is_saving_in_progress()):
      out.append(CheckpointInfo(writing, self.path(writing), False, 0))
    return sorted(out, key=lambda c: c.step)

  def path(self, step: int) -> str:
    """Where the checkpoint of `step` is (once complete), as Orbax names it."""
    return os.fspath(ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(),
                                              step))

  def close(self) -> None:
    self._manager.close()
