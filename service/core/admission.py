"""Admission: how many pushes, and how many of their bytes, are received at once.

Every push being received holds one of `max_inflight_pushes` model-sized host
buffers, and so does the step's sum from its first push until the step is
applied (with --ordered-sum, each push the step holds until it is applied);
`max_inflight_bytes` (0: unbounded) bounds the pushes' wire bytes too.
Once draining (shutdown), nothing more is admitted. The engine holds its lock
around every call and waits on its condition for `has_room`.
"""

from __future__ import annotations

import dataclasses

from service.errors import ResourceExhausted, Unavailable


@dataclasses.dataclass
class Slot:
  """One admitted push's share of the bounds, until `Admission.release` frees it."""
  nbytes: int
  held: bool = True


class Admission:
  """The counts of pushes and bytes in flight, and the bounds on them.

  Example:
    >>> a = Admission(max_pushes=2, max_bytes=0)
    >>> a.has_room(100, held=1)
    True
    >>> slot = a.admit(100); a.has_room(100, held=1)
    False
    >>> a.release(slot), a.release(slot)  # freed once, whoever asks again
    (True, False)
  """

  def __init__(self, max_pushes: int, max_bytes: int = 0):
    self.max_pushes, self.max_bytes = max_pushes, max_bytes
    self.pushes = 0  # admitted and not yet committed or dropped
    self.bytes = 0
    self.draining = False

  def check_size(self, nbytes: int) -> None:
    """RESOURCE_EXHAUSTED if a push of `nbytes` could never be admitted; UNAVAILABLE if draining."""
    if self.draining:
      raise Unavailable('the server is shutting down; retry against its successor',
                        reason='shutting_down')
    if self.max_bytes and nbytes > self.max_bytes:
      raise ResourceExhausted(f'the push has {nbytes} bytes, over max_inflight_bytes '
                              f'{self.max_bytes}', reason='too_large')

  def has_room(self, nbytes: int, held: int) -> bool:
    """Whether a push of `nbytes` fits now (`held`: the model-sized buffers the step
    holds besides the pushes in flight: its sum's, or its held pushes')."""
    return (self.pushes + held < self.max_pushes
            and (not self.max_bytes or self.bytes + nbytes <= self.max_bytes))

  def busy(self, beside: str = '') -> ResourceExhausted:
    """The error of a push that found no room within its admission timeout (`beside`:
    what the step holds, e.g. "the step's sum")."""
    beside = f' beside {beside}' if beside else ''
    return ResourceExhausted(
        f'{self.pushes} pushes ({self.bytes} bytes) are already in flight{beside} '
        f'(max_inflight_pushes {self.max_pushes}, max_inflight_bytes '
        f'{self.max_bytes or "unbounded"}); retry later', reason='busy')

  def admit(self, nbytes: int) -> Slot:
    """Counts a push of `nbytes` in (the caller checked `has_room`)."""
    self.pushes += 1
    self.bytes += nbytes
    return Slot(nbytes)

  def release(self, slot: Slot) -> bool:
    """Frees `slot` if it is still held; True if it was."""
    if not slot.held:
      return False
    slot.held = False
    self.pushes -= 1
    self.bytes -= slot.nbytes
    return True
