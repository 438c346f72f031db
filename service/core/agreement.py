"""What the processes of a multi-process server agree on, through JAX's coordinator.

Each process of the job receives its own part of every push. A step may only
count a push that every process took, and every process must apply the same
steps with the same pushes in the same order (the step's collectives cross
the processes). Process 0, the leader, decides; the others follow; nobody
guesses from its own view or clock. The record is the coordinator's key-value
store (`jax.distributed`), where a key written once cannot be written again:

  push/<model>/<push>/admitted   process 0 took the push in (the others admit it after)
  push/<model>/<push>/part/<i>   process i has its part, complete and checked
  push/<model>/<push>/decision   accepted into step t, or refused (and why)
  save/<model>/<t>               whether step t is checkpointed
  events/<model>/<n>             the leader's other decisions, in order: "close t n"
                                 (the straggler timeout applied step t with n
                                 pushes), "save t" (checkpoint step t now)
  shutdown                       some process was asked to stop

A push is accepted only by the leader, once every process has offered its
part: so it is counted everywhere or nowhere. Any process that refuses its
part for good (a malformed chunk, a NaN, a closed step) writes the refusal
as the decision at once; the first decision written wins, so a late accept
and a refusal can never both stand. A part lost for a passing reason (a
busy server, a broken stream) is simply not offered: the client retries it
with the same push id, and the leader waits `PART_TIMEOUT_S` for it. The leader assigns each
accepted push its step under the engine's lock, in the order it applies
them, and the followers apply them in that order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Optional

from service import errors

log = logging.getLogger(__name__)

PART_TIMEOUT_S = 30.0  # how long the leader waits for the other processes' parts of a push
_POLL_MS = 200  # the leader's waits re-check for a refusal this often

_PASSING = ('RESOURCE_EXHAUSTED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED')  # a retry may pass
_ERRORS = {cls.code: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, errors.ServiceError)}


@dataclasses.dataclass(frozen=True)
class Decision:
  """What became of a push: accepted into `step` (NaN/Inf from `poison`, if set), or refused."""
  accepted: bool
  step: int = -1
  poison: Optional[str] = None
  error: Optional[errors.ServiceError] = None

  def encode(self) -> str:
    if self.accepted:
      return json.dumps({'step': self.step, 'poison': self.poison})
    return json.dumps({'code': self.error.code, 'message': str(self.error),
                       'reason': self.error.reason, 'leaf': self.error.leaf})

  @classmethod
  def decode(cls, text: str) -> 'Decision':
    d = json.loads(text)
    if 'step' in d:
      return cls(True, d['step'], d['poison'])
    error = _ERRORS.get(d['code'], errors.ServiceError)(d['message'], reason=d['reason'],
                                                          leaf=d['leaf'])
    return cls(False, error=error)


class Job:
  """One process's view of the job's agreement (`Job.current()`: None in a single process)."""

  def __init__(self, client, index: int, count: int):
    self._kv, self.index, self.count = client, index, count
    self._events_read = {}  # model id -> events read so far (a follower's)
    self._events_written = {}  # model id -> events written so far (the leader's)
    self._decided: list[tuple[int, str]] = []  # (step, push key) decided, to clean up

  @classmethod
  def current(cls) -> Optional['Job']:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
      return None
    from service import runtime  # pylint: disable=import-outside-toplevel
    return cls(runtime.coordinator_client(), jax.process_index(), jax.process_count())

  @property
  def leader(self) -> bool:
    return self.index == 0

  # ---------------------------------------------------------------- pushes

  @staticmethod
  def push_key(model_id: str, worker_id: str, push_id: str) -> str:
    """Where the push's record is (ids of any characters: hashed)."""
    digest = hashlib.sha256(f'{worker_id}\0{push_id}'.encode()).hexdigest()[:32]
    return f'lamb_sharded/push/{model_id}/{digest}'

  def admitted(self, key: str) -> None:
    """The leader admitted the push `key` (took it in flight): the followers may too."""
    self._kv.key_value_set(f'{key}/admitted', '1', allow_overwrite=True)

  def await_admitted(self, key: str, timeout_s: float) -> None:
    """A follower's wait until the leader admitted `key`; the push's error if it was
    refused meanwhile, ResourceExhausted if the leader did not admit it in time."""
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        self._kv.blocking_key_value_get(f'{key}/admitted', _POLL_MS)
        return
      except Exception:  # pylint: disable=broad-except  # not yet
        pass
      found = self._try_get(f'{key}/decision')
      if found is not None:
        raise Decision.decode(found).error or errors.Aborted('the push was decided already')
      if time.monotonic() > deadline:
        raise errors.ResourceExhausted(
            f'server process 0 did not admit this push within {timeout_s:.0f}s (it is busy, or '
            f'its part never came); retry later', reason='busy')

  def offer(self, key: str, poison: Optional[str]) -> None:
    """This process has its part of the push `key`, complete and checked."""
    self._kv.key_value_set(f'{key}/part/{self.index}', json.dumps({'poison': poison}),
                           allow_overwrite=True)  # a retry of the part offers it again

  @staticmethod
  def final(error: BaseException) -> bool:
    """Whether `error` refuses a push for good (a retry of the same bytes would fail too)."""
    return isinstance(error, errors.ServiceError) and error.code not in _PASSING

  def refuse(self, key: str, error: errors.ServiceError) -> Decision:
    """Refuses the push `key` everywhere, unless it is decided already; the decision."""
    message = f'server process {self.index} refused its part: {error}'
    refusal = Decision(False, error=type(error)(message, reason=error.reason, leaf=error.leaf))
    return self._decide(key, refusal)

  def gather(self, key: str, timeout_s: float = PART_TIMEOUT_S
             ) -> tuple[Optional[Decision], list[Optional[str]]]:
    """The leader's wait for every other process's part of `key`.

    Returns (a decision someone already wrote, e.g. a refusal; or None, and the
    parts' poison markers). A part that does not come in `timeout_s` refuses
    the push.
    """
    deadline = time.monotonic() + timeout_s
    poisons = []
    for i in range(1, self.count):
      while True:
        found = self._try_get(f'{key}/decision')
        if found is not None:  # refused by someone meanwhile
          return Decision.decode(found), []
        try:
          part = self._kv.blocking_key_value_get(f'{key}/part/{i}', _POLL_MS)
          poisons.append(json.loads(part)['poison'])
          break
        except Exception:  # pylint: disable=broad-except  # not there yet
          if time.monotonic() > deadline:
            return self.refuse(key, errors.Aborted(
                f'server process {i} did not receive its part of the push within '
                f'{timeout_s:.0f}s (retry the whole push)', reason='part_missing')), []
    return None, poisons

  def accept(self, key: str, step: int, poison: Optional[str]) -> Decision:
    """The leader accepts `key` into `step` (unless it was refused first); the decision."""
    decision = self._decide(key, Decision(True, step, poison))
    if decision.accepted:
      self._decided.append((step, key))
    return decision

  def await_decision(self, key: str, timeout_s: float = PART_TIMEOUT_S + 10) -> Decision:
    """A follower's wait for the leader's decision on `key` (refused if none comes)."""
    try:
      return Decision.decode(self._kv.blocking_key_value_get(f'{key}/decision',
                                                             int(timeout_s * 1000)))
    except Exception:  # pylint: disable=broad-except  # no decision in time
      return self.refuse(key, errors.Unavailable(
          f'no decision from server process 0 within {timeout_s:.0f}s', reason='no_decision'))

  def _try_get(self, key: str) -> Optional[str]:
    try:
      return self._kv.key_value_try_get(key)
    except Exception:  # pylint: disable=broad-except  # NOT_FOUND
      return None

  def _decide(self, key: str, decision: Decision) -> Decision:
    try:
      self._kv.key_value_set(f'{key}/decision', decision.encode(), allow_overwrite=False)
      return decision
    except Exception:  # pylint: disable=broad-except  # decided already: that one stands
      return Decision.decode(self._kv.blocking_key_value_get(f'{key}/decision', 10_000))

  def forget_before(self, step: int) -> None:
    """The leader drops the records of pushes decided into steps before `step`."""
    keep = []
    for s, key in self._decided:
      if s < step:
        self._delete(key)
      else:
        keep.append((s, key))
    self._decided = keep

  # ---------------------------------------------------------------- steps

  def save_due(self, model_id: str, step: int, due) -> bool:
    """Whether step `step` is checkpointed: `due()` on the leader, its answer everywhere."""
    key = f'lamb_sharded/save/{model_id}/{step}'
    if self.leader:
      value = 'yes' if due() else 'no'
      self._kv.key_value_set(key, value, allow_overwrite=True)
      self._delete(f'lamb_sharded/save/{model_id}/{step - 8}')
      return value == 'yes'
    return self._kv.blocking_key_value_get(key, int(PART_TIMEOUT_S * 1000)) == 'yes'

  def publish(self, model_id: str, *event) -> None:
    """The leader's next event for the followers (e.g. 'close', step, pushes)."""
    n = self._events_written.get(model_id, 0)
    self._kv.key_value_set(f'lamb_sharded/events/{model_id}/{n}', ' '.join(map(str, event)))
    self._events_written[model_id] = n + 1

  def next_event(self, model_id: str, timeout_s: float) -> Optional[tuple]:
    """A follower's next event of the leader's (None if none came within `timeout_s`)."""
    n = self._events_read.get(model_id, 0)
    try:
      text = self._kv.blocking_key_value_get(f'lamb_sharded/events/{model_id}/{n}',
                                             int(timeout_s * 1000))
    except Exception:  # pylint: disable=broad-except  # none yet
      return None
    self._events_read[model_id] = n + 1
    kind, *args = text.split()
    return (kind, *map(int, args))

  # ---------------------------------------------------------------- the job

  def request_shutdown(self) -> None:
    """Asks every process of the job to drain and stop (this one was signalled)."""
    self._kv.key_value_set('lamb_sharded/shutdown', str(self.index), allow_overwrite=True)

  def shutdown_requested(self) -> Optional[int]:
    """The process that asked the job to stop, if one did."""
    value = self._try_get('lamb_sharded/shutdown')
    return None if value is None else int(value)

  def same_step(self, model_id: str, step: int) -> list[int]:
    """Every process's step, by index, before a final checkpoint (they must all be equal)."""
    key = f'lamb_sharded/final/{model_id}'
    self._kv.key_value_set(f'{key}/{self.index}', str(step), allow_overwrite=True)
    return [int(self._kv.blocking_key_value_get(f'{key}/{i}', int(PART_TIMEOUT_S * 1000)))
            for i in range(self.count)]

  def _delete(self, key: str) -> None:
    try:
      self._kv.key_value_delete(key)
    except Exception:  # pylint: disable=broad-except  # gone already
      pass
