"""The answered pushes: a retried push is answered as the first one was, never counted twice."""

from __future__ import annotations

import dataclasses
from typing import Optional

from service.protocol.types import PushResult


class Ledger:
  """Answers of pushes by (worker id, push id), kept for the steps a retry can still come in.

  Example:
    >>> ledger = Ledger()
    >>> ledger.record('w0', 'p1', 3, PushResult(3, True, 4, model_id='m1'))
    >>> ledger.answer('w0', 'p1', current_step=5)
    PushResult(accepted_step=3, applied=True, current_step=5, duplicate=True, model_id='m1')
    >>> ledger.forget_before(4); ledger.answer('w0', 'p1', current_step=5) is None
    True
  """

  def __init__(self):
    self._answers: dict[tuple[str, str], tuple[int, PushResult]] = {}

  def answer(self, worker_id: str, push_id: str, current_step: int) -> Optional[PushResult]:
    """The answer to a retry of an answered push, as of `current_step`; None if not answered."""
    if not push_id:
      return None
    found = self._answers.get((worker_id, push_id))
    if found is None:
      return None
    return dataclasses.replace(found[1], current_step=current_step, duplicate=True)

  def record(self, worker_id: str, push_id: str, step: int, result: PushResult) -> None:
    """Remembers the answer to a push counted into `step` (nothing without a push id)."""
    if push_id:
      self._answers[(worker_id, push_id)] = (step, result)

  def forget_before(self, step: int) -> None:
    """Drops the answers of pushes counted into steps before `step`."""
    self._answers = {k: v for k, v in self._answers.items() if v[0] >= step}
