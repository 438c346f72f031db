"""Checkpoints off the step loop: a writer thread and a reporter thread.

The engine queues a `Save` of a step's state (held, never donated, until it is
written); the writer thread writes the queued saves one at a time, in step
order, without the engine's lock (a follower's save first asks the leader's
vote); the reporter thread reports each once it is on disk (an asynchronous
save finishes later), and counts a streak of failed saves: the first is logged,
the others only counted, until one is written. Pushes never see a failed save;
the next save point (or the final save) tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Optional

from service.config import ServerConfig
from service.core import coordination as coordination_lib
from service.core import persistence
from service.core.checkpoint import Checkpointer
from service.core.model import ModelPlan, ModelState
from service.logs import fields

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Save:
  """A checkpoint for the writer thread: `state` of `step`, held (not donated) until written.

  `version`: the engine's version of the params it holds. `ask`: whether the
  leader's vote decides it (a follower's); else it is due. `done` is set once
  it is written (started, for an asynchronous checkpointer) or skipped;
  `error`, what failed.
  """
  model_id: str
  step: int
  plan: ModelPlan
  state: ModelState
  version: int
  ask: bool
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  error: Optional[BaseException] = None


class Saver:
  """Writes queued `Save`s and reports them; `threads` are its writer and its reporter.

  Args:
    checkpointer: where the saves go.
    config: the server's settings (the checkpoint's meta).
    co: the job's coordination (a follower asks the leader whether a save is due).
    observer: told of started, saved and failed checkpoints (`EngineObserver`).
    stats: the engine's counters (`checkpoint_blocking_s` is set here).
    finished: called with each `Save` once it is written, skipped or failed, before
      its `done` is set (the engine stops holding its state).
  """

  def __init__(self, checkpointer: Checkpointer, config: ServerConfig,
               co: coordination_lib.Coordination, observer, stats: dict,
               finished: Callable[[Save], None]):
    self._checkpointer, self._config, self._co = checkpointer, config, co
    self._observer, self._stats, self._finished = observer, stats, finished
    self._to_write: queue.SimpleQueue = queue.SimpleQueue()  # `Save`s, in step order
    self._written: queue.SimpleQueue = queue.SimpleQueue()  # (step, start) to report
    self._failures = 0  # failed saves since the last one written (a streak)
    self._failures_lock = threading.Lock()
    self.threads = [threading.Thread(target=self._write, name='checkpoint-writer', daemon=True),
                    threading.Thread(target=self._report, name='checkpoint-reporter',
                                     daemon=True)]

  def start(self) -> None:
    for t in self.threads:
      t.start()

  def queue(self, save: Save) -> None:
    """Queues `save` behind those of earlier steps."""
    self._to_write.put(save)

  def close(self) -> None:
    """Writes what is queued, reports it, and ends both threads."""
    self._to_write.put(None)
    self.threads[0].join(timeout=30)
    self._written.put(None)
    self.threads[1].join(timeout=30)

  def _write(self) -> None:
    """Writes the queued checkpoints, one at a time, in step order, without the lock."""
    last = None  # (model_id, step) of the last save started
    while (save := self._to_write.get()) is not None:
      try:
        if save.ask and not self._co.save_due(save.model_id, save.step):
          continue
        if last == (save.model_id, save.step):
          continue
        t0 = time.monotonic()
        if persistence.save(self._checkpointer, self._config, save.step, save.plan,
                            save.state, force=True):
          last = (save.model_id, save.step)
          took = time.monotonic() - t0
          self._stats['checkpoint_blocking_s'] = took
          log.info('checkpoint of step %d started (%.3fs to write or start it, beside the '
                   'step loop)', save.step, took, extra=fields(step=save.step,
                                                                seconds=round(took, 4)))
          self._observer.checkpoint_started(save.step, took)
          self._written.put((save.step, t0))
      except Exception as e:  # pylint: disable=broad-except
        save.error = e
        self._failed(save.step, e)
      finally:
        self._finished(save)
        save.state = None  # its arrays may go
        save.done.set()

  def _report(self) -> None:
    """Reports each save once it is on disk (an asynchronous one finishes later)."""
    while (item := self._written.get()) is not None:
      step, t0 = item
      try:
        self._checkpointer.wait()
        # Its error may have gone to another waiter (SaveCheckpoint's); the leader's view
        # of the directory is the one that finalises it.
        if self._co.leader and not self._checkpointer.written(step):
          raise OSError(f'the save of step {step} ended without a checkpoint on disk')
      except Exception as e:  # pylint: disable=broad-except
        self._failed(step, e)
        continue
      with self._failures_lock:
        failed, self._failures = self._failures, 0
      if failed:
        log.warning('checkpoints are written again (step %d), after %d failed saves', step,
                    failed, extra=fields(step=step, reason='checkpoint_recovered'))
      self._observer.checkpoint_saved(step, time.monotonic() - t0)

  def _failed(self, step: int, e: BaseException) -> None:
    """A save that failed: logged once per streak of failures (the first), counted in the
    metrics; the next save point (or the final save) tries again. Pushes never see it."""
    with self._failures_lock:
      self._failures += 1
      in_a_row = self._failures
    text = str(e).strip().splitlines()
    why = f'{type(e).__name__}: {text[0][:300] if text else ""}'
    if in_a_row == 1:
      log.error('checkpoint of step %d failed: %s; the server goes on, and tries again at the '
                'next save point (further failures are counted in '
                'lamb_sharded_checkpoint_failures_total, not logged, until one succeeds)',
                step, why, extra=fields(step=step, reason='checkpoint_failed'))
    else:
      log.debug('checkpoint of step %d failed (%d in a row): %s', step, in_a_row, why,
                extra=fields(step=step, reason='checkpoint_failed'))
    self._observer.checkpoint_failed(step, e, in_a_row)
