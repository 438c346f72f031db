"""The step rules: which pushes a step takes, and when it is complete. Pure Python.

Synchronous (`sync`): step t takes one push from each of `num_workers` workers,
computed at step t; with a straggler timeout, a quorum of them is enough once
the timeout has passed since the step's first push. Asynchronous (`async`):
every push makes a step, if it was computed at most `staleness_bound` steps ago.
`Steps` keeps the current step's bookkeeping and raises the service's errors
for pushes the rules refuse; the engine calls it under its lock. With
--ordered-sum, a step's pushes are added in `push_order`, not as they came.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from service.config import ServerConfig
from service.errors import Aborted, AlreadyExists, FailedPrecondition
from service.protocol import ids


def push_order(worker_id: str, push_id: str) -> tuple:
  """Where a push goes in an ordered sum (--ordered-sum): the workers `worker-N` by N, then
  any other worker ids as strings; a worker's pushes by push id. The same everywhere: every
  process of a multi-process server adds its part of the same pushes in the same order.

  >>> sorted(['worker-10', 'trainer-a', 'worker-2'], key=lambda w: push_order(w, ''))
  ['worker-2', 'worker-10', 'trainer-a']
  """
  index = ids.worker_index(worker_id)
  return (0, index, '', push_id) if index is not None else (1, 0, worker_id, push_id)


@dataclasses.dataclass(frozen=True)
class StepRules:
  """The configured rules (see `ServerConfig`)."""
  mode: str = 'sync'
  num_workers: int = 1
  quorum: int = 1  # sync, after the straggler timeout
  straggler_timeout_s: float = 0.0  # 0: wait for every worker
  staleness_bound: int = 0  # async

  @classmethod
  def of(cls, config: ServerConfig) -> 'StepRules':
    return cls(config.step_mode, config.num_workers, config.effective_quorum,
               config.straggler_timeout_s, config.staleness_bound)

  @property
  def has_straggler_timeout(self) -> bool:
    return self.mode == 'sync' and self.straggler_timeout_s > 0


class Steps:
  """The current step and who contributed to it.

  Example:
    >>> steps = Steps(StepRules(num_workers=2))
    >>> steps.add('a', push_id='p1', now=0.0), steps.add('b', push_id='p2', now=0.5)
    (False, True)
    >>> steps.advance()
    1
  """

  def __init__(self, rules: StepRules, step: int = 0):
    self.rules = rules
    self.step = step
    self.contributors: dict[str, str] = {}  # worker id -> push id, of the current step
    self.first_push_at: Optional[float] = None  # time.monotonic() of the step's first push
    self.poisoned_by: Optional[str] = None  # what carried NaN/Inf into the step (skip_step)

  def check(self, worker_id: str, step: int) -> None:
    """Raises the error the rules give a push of `worker_id` computed at `step`, if any."""
    current, rules = self.step, self.rules
    if step > current:
      raise FailedPrecondition(f'header.step {step} is ahead of the server\'s current step '
                               f'{current}', reason='future_step')
    if rules.mode == 'sync':
      if step < current:
        raise Aborted(f'step {step} was already applied; the current step is {current}: pull '
                      f'the parameters and push gradients for step {current}',
                      reason='stale_step')
      if worker_id in self.contributors:
        raise AlreadyExists(f'worker {worker_id} already pushed for step {current} (with '
                            f'push_id {self.contributors[worker_id]!r})',
                            reason='worker_already_pushed')
    elif current - step > rules.staleness_bound:
      raise Aborted(f'gradients of step {step} are too stale: the current step is {current} and '
                    f'the staleness bound is {rules.staleness_bound}', reason='stale_step')

  def add(self, worker_id: str, push_id: str, now: float) -> bool:
    """Counts a push the rules allowed (`check`); True if it completes the step."""
    self.contributors[worker_id] = push_id
    if self.first_push_at is None:
      self.first_push_at = now
    return self.rules.mode == 'async' or len(self.contributors) >= self.rules.num_workers

  def poison(self, where: str) -> None:
    """Marks the step as carrying NaN/Inf from `where` (with nonfinite=skip_step)."""
    self.poisoned_by = self.poisoned_by or where

  def straggler_wait(self, now: float) -> Optional[float]:
    """Seconds until the straggler timeout may apply the step; 0: apply it now; None: no
    timeout is running (no push yet, or no straggler timeout configured)."""
    if not self.rules.has_straggler_timeout or self.first_push_at is None:
      return None
    due = self.first_push_at + self.rules.straggler_timeout_s - now
    if due > 0:
      return due
    return 0.0 if len(self.contributors) >= self.rules.quorum else None

  def advance(self) -> int:
    """The step was applied (or skipped): the next one starts empty. Returns it."""
    self.step += 1
    self.contributors.clear()
    self.first_push_at = None
    self.poisoned_by = None
    return self.step
