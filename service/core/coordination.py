"""What the processes of a server agree on: one seam, two implementations.

The engine asks the seam every question whose answer the processes must
share -- may this push be admitted, which step does it go into, when does the
straggler timeout close a step, which steps are checkpointed, what is the
model's id -- and never asks whether there is a job:

  Coordination   a lone process: every decision is its own and immediate
  Job            a process of a multi-process job, over a `Store`

Every call may wait (a job's calls go to the coordinator): the engine makes
them with its lock released.

A job's record is a key-value store where a key written without overwrite
cannot be written again (JAX's coordinator; `MemoryStore` in tests):

  push/<model>/<push>/admitted   process 0 took the push in (the others admit it after)
  push/<model>/<push>/part/<i>   process i has its part, complete and checked
  push/<model>/<push>/decision   accepted into step t, or refused (and why)
  save/<model>/<t>               whether step t is checkpointed
  events/<model>/<n>             the leader's other decisions, in order: "close t n"
                                 (the straggler timeout applied step t with n
                                 pushes), "save t" (checkpoint step t now)
  model_id/<n>/<i>               process i's candidate id of the n-th model adopted
  final/<model>/<i>              process i's step before its final checkpoint
  shutdown                       some process was asked to stop

A push is accepted only by the leader, once every process has offered its
part: so it is counted everywhere or nowhere. Any process that refuses its
part for good (a malformed chunk, a NaN, a closed step) writes the refusal
as the decision at once; the first decision written wins, so a late accept
and a refusal can never both stand. A part lost for a passing reason (a
busy server, a broken stream) is simply not offered: the client retries it
with the same push id, and the leader waits `PART_TIMEOUT_S` for it. The
leader assigns each accepted push its step in the order it applies them,
and the followers apply them in that order. A value in the store that does
not parse is logged and ignored (treated as not there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from typing import Optional, Protocol

from service import errors

log = logging.getLogger(__name__)

PART_TIMEOUT_S = 30.0  # how long the leader waits for the other processes' parts of a push
POLL_S = 0.2  # the leader's waits re-check for a refusal this often

_PASSING = ('RESOURCE_EXHAUSTED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED')  # a retry may pass
_ERRORS = {cls.code: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, errors.ServiceError)}
_PREFIX = 'lamb_sharded'


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
    """The decision `text` encodes; ValueError if it encodes none."""
    try:
      d = json.loads(text)
      if 'step' in d:
        if not isinstance(d['step'], int) or not isinstance(d.get('poison'), (str, type(None))):
          raise ValueError('bad step or poison')
        return cls(True, d['step'], d.get('poison'))
      error = _ERRORS.get(d['code'], errors.ServiceError)(
          str(d['message']), reason=d.get('reason') or '', leaf=d.get('leaf') or '')
      return cls(False, error=error)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
      raise ValueError(f'not a decision: {text[:80]!r} ({type(e).__name__}: {e})') from None


@dataclasses.dataclass(frozen=True)
class Ruling:
  """What the processes said of a push's parts: a `decision` someone wrote already (a
  follower always gets one), or None and every part's NaN/Inf marker (`poisons`): the
  caller (the leader, or a lone process) then decides, with `accept` or `refuse`."""
  decision: Optional[Decision]
  poisons: tuple = ()

  @property
  def poison(self) -> Optional[str]:
    return next((p for p in self.poisons if p is not None), None)


def final(error: BaseException) -> bool:
  """Whether `error` refuses a push for good (a retry of the same bytes would fail too)."""
  return isinstance(error, errors.ServiceError) and error.code not in _PASSING


class Coordination:
  """A lone process: what it decides, it decides alone, at once; nothing is stored.

  The base of every implementation: the engine calls these methods, with its
  lock released, whatever the process is.
  """
  index = 0
  count = 1
  requires_ids = False  # whether pushes and InitializeModel must name themselves

  @property
  def leader(self) -> bool:
    """Whether this process decides (process 0); a lone process does."""
    return self.index == 0

  @property
  def alone(self) -> bool:
    return self.count == 1

  final = staticmethod(final)

  # ---------------------------------------------------------------- pushes

  def push_key(self, model_id: str, worker_id: str, push_id: str) -> Optional[str]:
    """Where the push's record is (None: a lone process keeps none)."""
    return None

  def init_key(self, init_id: str) -> Optional[str]:
    """Where an InitializeModel named `init_id` is agreed on (None: nowhere)."""
    return None

  def admitted(self, key: Optional[str]) -> None:
    """The leader admitted the push `key`: the followers may too."""

  def await_admitted(self, key: Optional[str], timeout_s: float) -> None:
    """A follower's wait until the leader admitted `key` (at most a quick look with 0)."""

  def rule(self, key: Optional[str], poison: Optional[str]) -> Ruling:
    """This process has its part of `key`, complete and checked (`poison`: the leaf with
    NaN/Inf, if any): what the processes say of it."""
    return Ruling(None, (poison,))

  def accept(self, key: Optional[str], step: int, poison: Optional[str]) -> Decision:
    """The leader accepts `key` into `step` (unless it was refused first); the decision."""
    return Decision(True, step, poison)

  def refuse(self, key: Optional[str], error: errors.ServiceError) -> Decision:
    """Refuses `key` everywhere, unless it is decided already; the decision."""
    return Decision(False, error=error)

  def forget_before(self, step: int) -> None:
    """The leader drops the records of pushes decided into steps before `step`."""

  # ---------------------------------------------------------------- steps

  def vote_save(self, model_id: str, step: int, due: bool) -> None:
    """The leader's answer to whether `step` is checkpointed, for the followers."""

  def save_due(self, model_id: str, step: int) -> bool:
    """A follower's wait for the leader's `vote_save` of `step` (False if none comes)."""
    return False

  def close_step(self, model_id: str, step: int, pushes: int) -> None:
    """The leader tells the followers: the straggler timeout applies `step` with `pushes`."""

  def ask_save(self, model_id: str, step: int) -> None:
    """The leader tells the followers: checkpoint `step` now."""

  def next_event(self, model_id: str, timeout_s: float) -> Optional[tuple]:
    """A follower's next event of the leader's: ('close', step, pushes) or ('save', step);
    None if none came within `timeout_s`."""
    time.sleep(timeout_s)
    return None

  def model_id(self, adoption: int, candidate: str) -> str:
    """The id of the `adoption`-th model adopted, one for every process (the leader's)."""
    return candidate

  # ---------------------------------------------------------------- the job

  def same_step(self, model_id: str, step: int) -> list[int]:
    """Every process's step, by index, before a final checkpoint (they must all be equal)."""
    return [step]

  def request_shutdown(self) -> None:
    """Asks every process of the job to drain and stop (this one was signalled)."""

  def shutdown_requested(self) -> Optional[int]:
    """The process that asked the job to stop, if one did."""
    return None


Alone = Coordination


class Store(Protocol):
  """A key-value store where a key written without `overwrite` cannot be written again."""

  def set(self, key: str, value: str, overwrite: bool) -> bool:
    """Writes `value`; False (nothing written) if `key` exists and not `overwrite`."""

  def try_get(self, key: str) -> Optional[str]:
    """The value of `key` (None: there is none)."""

  def blocking_get(self, key: str, timeout_s: float) -> Optional[str]:
    """The value of `key` once there is one (None: none within `timeout_s`)."""

  def delete(self, key: str) -> None:
    """Removes `key` (nothing if there is none)."""


class CoordinatorStore:
  """The `Store` of JAX's coordinator (`jax.distributed`'s key-value store)."""

  def __init__(self, client):
    self._kv = client

  def set(self, key: str, value: str, overwrite: bool) -> bool:
    try:
      self._kv.key_value_set(key, value, allow_overwrite=overwrite)
      return True
    except Exception:  # pylint: disable=broad-except  # ALREADY_EXISTS
      if overwrite or self.try_get(key) is None:
        raise
      return False

  def try_get(self, key: str) -> Optional[str]:
    try:
      return self._kv.key_value_try_get(key)
    except Exception:  # pylint: disable=broad-except  # NOT_FOUND
      return None

  def blocking_get(self, key: str, timeout_s: float) -> Optional[str]:
    try:
      return self._kv.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
    except Exception:  # pylint: disable=broad-except  # DEADLINE_EXCEEDED
      return None

  def delete(self, key: str) -> None:
    try:
      self._kv.key_value_delete(key)
    except Exception:  # pylint: disable=broad-except  # gone already
      pass


class MemoryStore:
  """A `Store` in this process's memory (tests: a job's processes as threads)."""

  def __init__(self):
    self._values: dict[str, str] = {}
    self._cond = threading.Condition()

  def set(self, key: str, value: str, overwrite: bool) -> bool:
    with self._cond:
      if not overwrite and key in self._values:
        return False
      self._values[key] = value
      self._cond.notify_all()
      return True

  def try_get(self, key: str) -> Optional[str]:
    with self._cond:
      return self._values.get(key)

  def blocking_get(self, key: str, timeout_s: float) -> Optional[str]:
    with self._cond:
      self._cond.wait_for(lambda: key in self._values, max(0.0, timeout_s))
      return self._values.get(key)

  def delete(self, key: str) -> None:
    with self._cond:
      self._values.pop(key, None)

  def keys(self) -> list[str]:
    with self._cond:
      return sorted(self._values)


class Job(Coordination):
  """Process `index` of a job of `count` processes, agreeing through `store`.

  Args:
    store: the job's key-value store (a `Store`; JAX's coordinator client is wrapped).
    index: this process's index; process 0 leads.
    count: how many processes the job has.
    part_timeout_s: how long the leader waits for a push's other parts, and a
      follower for a decision or a vote (plus 10 s).
    poll_s: how often the leader's waits re-check for a refusal.
  """
  requires_ids = True

  def __init__(self, store, index: int, count: int, *, part_timeout_s: float = PART_TIMEOUT_S,
               poll_s: float = POLL_S):
    if not hasattr(store, 'blocking_get'):
      store = CoordinatorStore(store)
    self._kv, self.index, self.count = store, index, count
    self.part_timeout_s, self.poll_s = part_timeout_s, poll_s
    self._lock = threading.Lock()
    self._events_read: dict[str, int] = {}  # model id -> events read so far (a follower's)
    self._events_written: dict[str, int] = {}  # model id -> events written so far (the leader's)
    self._decided: list[tuple[int, str]] = []  # (step, push key) decided, to clean up

  @classmethod
  def current(cls) -> Optional['Job']:
    """This process's job (None: JAX runs a single process)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() == 1:
      return None
    from service import runtime  # pylint: disable=import-outside-toplevel
    return cls(CoordinatorStore(runtime.coordinator_client()), jax.process_index(),
               jax.process_count())

  # ---------------------------------------------------------------- pushes

  def push_key(self, model_id: str, worker_id: str, push_id: str) -> str:
    """Where the push's record is (ids of any characters: hashed)."""
    digest = hashlib.sha256(f'{worker_id}\0{push_id}'.encode()).hexdigest()[:32]
    return f'{_PREFIX}/push/{model_id}/{digest}'

  def init_key(self, init_id: str) -> str:
    if not init_id:
      raise errors.InvalidArgument('header.init_id is empty: a multi-process server matches '
                                   'the streams its processes get by it')
    return self.push_key('init', 'InitializeModel', init_id)

  def admitted(self, key: str) -> None:
    if self.leader:
      self._kv.set(f'{key}/admitted', '1', overwrite=True)

  def await_admitted(self, key: str, timeout_s: float) -> None:
    """The push's error if it was refused meanwhile; ResourceExhausted (busy) if the leader
    did not admit it within `timeout_s` (0: one look, no wait). The leader admits alone."""
    if self.leader:
      return
    deadline = time.monotonic() + timeout_s
    while True:
      left = deadline - time.monotonic()
      if left > 0:
        found = self._kv.blocking_get(f'{key}/admitted', min(self.poll_s, left))
      else:
        found = self._kv.try_get(f'{key}/admitted')
      if found is not None:
        return
      decision = self._decision(key)
      if decision is not None:
        raise decision.error or errors.Aborted('the push was decided already')
      if time.monotonic() >= deadline:
        raise errors.ResourceExhausted(
            f'server process 0 did not admit this push within {timeout_s:.0f}s (it is busy, or '
            f'its part never came); retry later', reason='busy')

  def rule(self, key: str, poison: Optional[str]) -> Ruling:
    if self.leader:
      return self._gather(key, poison)
    self._kv.set(f'{key}/part/{self.index}', json.dumps({'poison': poison}),
                 overwrite=True)  # a retry of the part offers it again
    return Ruling(self._await_decision(key))

  def _gather(self, key: str, poison: Optional[str]) -> Ruling:
    """The leader's wait for every other process's part of `key`; a part that does not come
    in `part_timeout_s` refuses the push."""
    deadline = time.monotonic() + self.part_timeout_s
    poisons = [poison]
    for i in range(1, self.count):
      while True:
        decision = self._decision(key)
        if decision is not None:  # refused by someone meanwhile
          return Ruling(decision)
        part = self._kv.blocking_get(f'{key}/part/{i}', self.poll_s)
        if part is not None:
          try:
            found = json.loads(part)['poison']
            if not isinstance(found, (str, type(None))):
              raise ValueError(f'poison {found!r}')
          except (TypeError, KeyError, ValueError) as e:
            log.warning('ignoring a malformed part in the job\'s store at %s/part/%d: %s',
                        key, i, e)
          else:
            poisons.append(found)
            break
        if time.monotonic() > deadline:
          return Ruling(self.refuse(key, errors.Aborted(
              f'server process {i} did not receive its part of the push within '
              f'{self.part_timeout_s:.0f}s (retry the whole push)', reason='part_missing')))
    return Ruling(None, tuple(poisons))

  def _await_decision(self, key: str) -> Decision:
    """A follower's wait for the leader's decision on `key` (refused if none comes)."""
    timeout_s = self.part_timeout_s + 10
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
      text = self._kv.blocking_get(f'{key}/decision', left)
      if text is None:
        break
      try:
        return Decision.decode(text)
      except ValueError as e:
        log.warning('ignoring a malformed decision in the job\'s store at %s: %s', key, e)
        time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
    return self.refuse(key, errors.Unavailable(
        f'no decision from server process 0 within {timeout_s:.0f}s', reason='no_decision'))

  def _decision(self, key: str) -> Optional[Decision]:
    text = self._kv.try_get(f'{key}/decision')
    if text is None:
      return None
    try:
      return Decision.decode(text)
    except ValueError as e:
      log.warning('ignoring a malformed decision in the job\'s store at %s: %s', key, e)
      return None

  def refuse(self, key: str, error: errors.ServiceError) -> Decision:
    message = f'server process {self.index} refused its part: {error}'
    refusal = Decision(False, error=type(error)(message, reason=error.reason, leaf=error.leaf))
    return self._decide(key, refusal)

  def accept(self, key: str, step: int, poison: Optional[str]) -> Decision:
    decision = self._decide(key, Decision(True, step, poison))
    if decision.accepted:
      with self._lock:
        self._decided.append((step, key))
    return decision

  def _decide(self, key: str, decision: Decision) -> Decision:
    """Writes `decision` unless one is written already: the one that stands."""
    if self._kv.set(f'{key}/decision', decision.encode(), overwrite=False):
      return decision
    found = self._decision(key)
    if found is None:  # what was written first does not parse: nothing can be accepted
      return Decision(False, error=errors.Aborted(
          'the push\'s decision in the job\'s store is unreadable; retry with a new push id',
          reason='no_decision'))
    return found

  def forget_before(self, step: int) -> None:
    with self._lock:
      drop = [key for s, key in self._decided if s < step]
      self._decided = [(s, key) for s, key in self._decided if s >= step]
    for key in drop:
      self._kv.delete(f'{key}/decision')
      for suffix in ('admitted', *(f'part/{i}' for i in range(1, self.count))):
        self._kv.delete(f'{key}/{suffix}')

  # ---------------------------------------------------------------- steps

  def vote_save(self, model_id: str, step: int, due: bool) -> None:
    self._kv.set(f'{_PREFIX}/save/{model_id}/{step}', 'yes' if due else 'no', overwrite=True)
    self._kv.delete(f'{_PREFIX}/save/{model_id}/{step - 8}')

  def save_due(self, model_id: str, step: int) -> bool:
    key = f'{_PREFIX}/save/{model_id}/{step}'
    value = self._kv.blocking_get(key, self.part_timeout_s)
    if value not in ('yes', 'no'):
      log.warning('no checkpoint vote for step %d from server process 0 (%r); not saving it',
                  step, value)
    return value == 'yes'

  def close_step(self, model_id: str, step: int, pushes: int) -> None:
    self._publish(model_id, 'close', step, pushes)

  def ask_save(self, model_id: str, step: int) -> None:
    self._publish(model_id, 'save', step)

  def _publish(self, model_id: str, *event) -> None:
    with self._lock:
      n = self._events_written.get(model_id, 0)
      self._events_written[model_id] = n + 1
    self._kv.set(f'{_PREFIX}/events/{model_id}/{n}', ' '.join(map(str, event)),
                 overwrite=False)

  def next_event(self, model_id: str, timeout_s: float) -> Optional[tuple]:
    n = self._events_read.get(model_id, 0)
    text = self._kv.blocking_get(f'{_PREFIX}/events/{model_id}/{n}', timeout_s)
    if text is None:
      return None
    self._events_read[model_id] = n + 1
    try:
      kind, *args = text.split()
      event = (kind, *map(int, args))
      if (kind, len(args)) not in (('close', 2), ('save', 1)):
        raise ValueError('unknown event')
      return event
    except ValueError as e:
      log.warning('ignoring a malformed event %d in the job\'s store: %r (%s)', n, text[:80], e)
      return None

  def model_id(self, adoption: int, candidate: str) -> str:
    key = f'{_PREFIX}/model_id/{adoption}'
    self._kv.set(f'{key}/{self.index}', candidate, overwrite=True)
    if self.leader:
      return candidate
    found = self._kv.blocking_get(f'{key}/0', 60.0)
    if not found:
      raise errors.Unavailable('server process 0 did not adopt the model within 60s',
                               reason='no_decision')
    return found

  # ---------------------------------------------------------------- the job

  def same_step(self, model_id: str, step: int) -> list[int]:
    key = f'{_PREFIX}/final/{model_id}'
    self._kv.set(f'{key}/{self.index}', str(step), overwrite=True)
    steps = []
    for i in range(self.count):
      value = self._kv.blocking_get(f'{key}/{i}', self.part_timeout_s)
      try:
        steps.append(int(value))
      except (TypeError, ValueError):
        log.warning('no step from server process %d before the final checkpoint (%r)', i,
                    value)
        steps.append(-1)
    return steps

  def request_shutdown(self) -> None:
    self._kv.set(f'{_PREFIX}/shutdown', str(self.index), overwrite=True)

  def shutdown_requested(self) -> Optional[int]:
    value = self._kv.try_get(f'{_PREFIX}/shutdown')
    if value is None:
      return None
    try:
      return int(value)
    except ValueError:
      log.warning('ignoring a malformed shutdown request in the job\'s store: %r', value[:80])
      return None


def current() -> Coordination:
  """This process's coordination: its job's, or a lone process's."""
  return Job.current() or Coordination()
