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

What a directory may hold, and what becomes of it (docs/checkpoints.md, "Checkpoint faults"):
a checkpoint that cannot be read is skipped for an older one; if none of them
can be read, `restore_latest` raises UnreadableCheckpoints (the server does not
start a new run over them, unless told to discard them); a checkpoint of a
newer FORMAT raises NewerFormat. Entries that are not Orbax step directories
are neither read nor deleted (Orbax only lists, writes and deletes its own).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from service import logs

log = logging.getLogger(__name__)

# 1: the first. 2: 4-bit moments packed as lamb_sharded packs them now (codes j and
# j + L/2 of a block of L in one byte; format 1 packed codes 2j and 2j + 1).
FORMAT = 2


class IncompatibleCheckpoint(ValueError):
  """A checkpoint that does not fit the model it would be restored into."""


class UnreadableCheckpoints(ValueError):
  """A directory holds checkpoints and none of them can be restored.

  `steps`: theirs; the message says why the newest could not be read.
  """

  def __init__(self, message: str, steps: list[int]):
    super().__init__(message)
    self.steps = steps


class NewerFormat(ValueError):
  """A checkpoint written by a newer lamb-sharded (its `format` is above FORMAT)."""


def check_writable(directory: str) -> None:
  """Creates `directory` if missing and writes (then removes) a file in it.

  Raises OSError (with the OS's reason) if it cannot: e.g. a file where a
  directory is expected, a read-only filesystem, no permission, no space.
  """
  os.makedirs(directory, exist_ok=True)
  fd, probe = tempfile.mkstemp(prefix='.lamb-sharded-write-probe-', dir=directory)
  try:
    os.write(fd, b'probe')
    os.fsync(fd)
  finally:
    os.close(fd)
    os.remove(probe)


class _QuietOrbaxTracebacks(logging.Filter):
  """Drops Orbax's own tracebacks of a failed save (several per save, ~100 lines each):
  every such failure reaches the engine as an exception from `save` or `wait`, and is
  logged there once per streak of failures. At DEBUG they are kept."""

  _ORBAX = os.path.dirname(os.path.abspath(ocp.__file__))

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.exc_info and record.levelno >= logging.ERROR
        and record.pathname.startswith(self._ORBAX)
        and not logging.getLogger().isEnabledFor(logging.DEBUG)):
      return False
    return True


if not any(isinstance(f, _QuietOrbaxTracebacks) for f in logging.getLogger('absl').filters):
  logging.getLogger('absl').addFilter(_QuietOrbaxTracebacks())


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
  absl = logging.getLogger('absl')  # Orbax notes that a read-only manager is read only
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      return manager.latest_step()
    finally:
      manager.close()
  finally:
    absl.setLevel(level)


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  return text[0][:limit] if text else ''


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
            cleanup_tmp_directories=True,
            # A save that failed leaves Orbax's "in progress" mark set (0.12.8, synchronous
            # saves), which would stop the time policy from ever saving again; saves are
            # one at a time anyway (the engine's writer thread).
            enable_should_save_is_saving_in_progress_check=False))

  def steps(self) -> list[int]:
    """The complete (finalised) checkpoints' steps, ascending.

    The manager's steps include a save still being written; Orbax says which
    of them are finalised (renamed from their temporary directory, or with
    their commit marker, as the filesystem does it).
    """
    return [s for s in sorted(self._manager.all_steps()) if self._finalized(s)]

  def written(self, step: int) -> bool:
    """Whether the save of `step` (started earlier) ended on disk: finalised, or since
    deleted as older than the `keep` newest."""
    steps = self._manager.all_steps()
    return self._finalized(step) or (bool(steps) and step < min(steps))

  def _finalized(self, step: int) -> bool:
    try:
      return ocp.step.is_path_finalized(self.path(step))
    except (OSError, ValueError):  # not there (yet, or any more)
      return False

  def should_save(self, step: int) -> bool:
    """Whether the policy saves `step` (a multi-process server asks process 0's)."""
    return step not in self._manager.all_steps() and self._manager.should_save(step)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves `step` if the policy says so (always with `force`, unless it exists)."""
    if step in self._manager.all_steps():
      return False
    try:  # a previous save's failure is its own (its waiter reports it), not this one's
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    meta = {'format': FORMAT, 'step': step, **meta}
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    """Blocks until the asynchronous save in progress (if any) is on disk."""
    self._manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_latest(self, target_for: Callable[[dict], Any], *,
                     discard_unreadable: bool = False) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest readable checkpoint: (step, state, meta), or None if none.

    Args:
      target_for: meta -> the abstract target (`jax.ShapeDtypeStruct`s with the
        shardings to restore onto). It raises IncompatibleCheckpoint when the
        checkpoint does not fit; that error propagates (nothing is loaded).
      discard_unreadable: if no checkpoint can be read, delete them all (through
        Orbax) and return None, instead of raising UnreadableCheckpoints.

    A checkpoint that cannot be read (truncated, corrupted) is skipped with a
    warning in the log, falling back to the previous one. If none can be read,
    UnreadableCheckpoints: a new run started over them would have Orbax delete
    them as it keeps the newest. A checkpoint of a newer format raises NewerFormat
    (whichever is newest: this server would overwrite a newer server's run).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    first_error = None
    for step in steps:
      try:
        meta = self.read_meta(step)
        fmt = meta.get('format') if isinstance(meta, dict) else None
        if not isinstance(fmt, int) or not isinstance(meta.get('leaves'), list):
          raise ValueError(f'its meta is not a lamb-sharded one (format {fmt!r})')
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or (step, e)
        self._skipped(step, e)
        continue
      if fmt > FORMAT:
        raise NewerFormat(f'checkpoint {step} is of format {fmt}, and this lamb-sharded reads '
                          f'format {FORMAT} (it was written by a newer version): run that '
                          f'version, or move the directory away to start a new run')
      target = target_for(meta)
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # pylint: disable=broad-except
        first_error = first_error or (step, e)
        self._skipped(step, e)
        continue
      return step, restored.state, meta
    if not steps:
      return None
    step, e = first_error
    if discard_unreadable:
      for s in steps:
        self._manager.delete(s)
      log.warning('none of the %d checkpoints in %s can be restored: deleted them (steps %s), '
                  'as asked; starting without a model', len(steps), self.directory,
                  sorted(steps), extra=logs.fields(reason='unreadable_checkpoints_discarded'))
      return None
    raise UnreadableCheckpoints(
        f'none of its {len(steps)} checkpoints (steps {sorted(steps)}) can be restored '
        f'(step {step}: {type(e).__name__}: {_first_line(e)})', sorted(steps))

  def _skipped(self, step: int, e: Exception) -> None:
    log.warning('checkpoint %d in %s is unreadable (%s: %s); falling back to the previous '
                'one', step, self.directory, type(e).__name__, _first_line(e),
                extra=logs.fields(step=step, reason='unreadable_checkpoint'))

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
    """The finalised checkpoints, and those still being written (complete=False), by step."""
    out = []
    for step in sorted(self._manager.all_steps()):
      if self._finalized(step):
        out.append(CheckpointInfo(step, self.path(step), True, _dir_size(self.path(step))))
      else:
        out.append(CheckpointInfo(step, self.path(step), False, 0))
    return out

  def path(self, step: int) -> str:
    """Where the checkpoint of `step` is (once complete), as Orbax names it."""
    return os.fspath(ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(),
                                              step))

  def close(self) -> None:
    self._manager.close()
