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
  events/<model>/read/<i>        how many events follower i has read (the leader deletes those
                                 every follower has read)
  model_id/<n>/0                 the leader's id of the n-th model adopted
  final/<model>/<i>              process i's step before its final checkpoint
  shutdown                       process i was asked to stop: "<i> final" (for good) or
                                 "<i> restart" (preempted: the job is to be started again)

Anyone who reaches the coordinator's port can write and delete keys (JAX's
coordinator has no authentication): so a job's store is a `SignedStore`,
where every value carries an HMAC-SHA256 of the job's session, its key and
itself under a secret every process reads from the same file or environment
variable (never from the store). A value that is unsigned, forged or signed
under another secret or session (a replay from an earlier run of the job) is
logged once and read as absent; every value that verifies is still parsed
defensively (a malformed one is logged and ignored), so no entry in the
store is ever acted on unverified or kills a thread.

The store's keys stay bounded: the leader deletes the records of accepted
pushes once every process counted them (`forget_before`) and the events every
follower has read; whoever settles a push as refused deletes its record after
`linger_s` (every process is done waiting on it by then); votes older than 8
steps and the previous adoption's model id go as new ones are written.

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

import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import re
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
_MODEL_ID = re.compile(r'[A-Za-z0-9_.-]{1,128}')
EVENT_SKIP_S = 5.0  # how long an event may be absent (or forged) once the next is in: passed over


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
        if (type(d['step']) is not int or d['step'] < 0  # pylint: disable=unidiomatic-typecheck
            or not isinstance(d.get('poison'), (str, type(None)))):
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

  def request_shutdown(self, final: bool = False) -> None:
    """Asks every process of the job to drain and stop (this one was signalled): for good if
    `final` (the operator's stop), else to be started again (preempted)."""

  def shutdown_requested(self) -> Optional[tuple[int, bool]]:
    """(the process that asked the job to stop, whether for good), if one did."""
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


def _quoted(text: Optional[str], limit: int = 80) -> str:
  """`text` for a log line: quoted (no newline or control character), at most `limit` chars."""
  if text is None:
    return 'None'
  return repr(text[:limit]) + ('...' if len(text) > limit else '')


class SignedStore:
  """A `Store` whose values are authenticated: HMAC-SHA256 under the job's secret.

  Every value is written as `<hex mac>:<value>`, the MAC over the session, the key
  and the value; a value read that does not verify (unsigned, forged, another
  secret's or session's) is logged once per key and read as absent.

  Args:
    store: the store beneath (JAX's coordinator's, or a `MemoryStore`).
    secret: the job's secret, the same in every process (from a file or the
      environment, never from the store).
    session: what this run of the job signs under besides (`session_of` the
      processes' nonces): a value recorded in an earlier run does not verify.
    poll_s: how often `blocking_get` looks again while the key holds a forgery.
  """
  MAX_LOGGED = 1024  # keys whose forgery is logged; beyond, one line says there are more

  def __init__(self, store, secret: bytes, session: str = '', poll_s: float = 0.05):
    if not secret:
      raise ValueError('a job\'s store needs a secret')
    self._store, self._secret, self.session, self._poll_s = store, secret, session, poll_s
    self._logged: set[str] = set()
    self._log_lock = threading.Lock()

  def _mac(self, key: str, value: str) -> str:
    message = '\0'.join((self.session, key, value)).encode('utf-8', 'surrogatepass')
    return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

  def _open(self, key: str, signed: Optional[str]) -> Optional[str]:
    """The value `signed` carries if its MAC verifies; None (logged once per key) if not."""
    if signed is None:
      return None
    mac, sep, value = signed.partition(':') if isinstance(signed, str) else ('', '', '')
    if sep and len(mac) == 64 and hmac.compare_digest(mac, self._mac(key, value)):
      return value
    with self._log_lock:
      if key in self._logged or len(self._logged) > self.MAX_LOGGED:
        return None
      self._logged.add(key)
      more = len(self._logged) > self.MAX_LOGGED
    log.warning('ignoring an unauthenticated value in the job\'s store at %s: %s (not signed '
                'with the job\'s secret%s)%s', _quoted(key, 200),
                _quoted(signed if isinstance(signed, str) else repr(signed)),
                ' in this run' if self.session else '',
                '; more keys hold such values, no longer logged' if more else '')
    return None

  def set(self, key: str, value: str, overwrite: bool) -> bool:
    return self._store.set(key, f'{self._mac(key, value)}:{value}', overwrite)

  def try_get(self, key: str) -> Optional[str]:
    return self._open(key, self._store.try_get(key))

  def blocking_get(self, key: str, timeout_s: float) -> Optional[str]:
    deadline = time.monotonic() + timeout_s
    while True:
      signed = self._store.blocking_get(key, max(0.0, deadline - time.monotonic()))
      if signed is None:
        return None
      value = self._open(key, signed)
      left = deadline - time.monotonic()
      if value is not None or left <= 0:
        return value
      time.sleep(min(self._poll_s, left))  # a forgery: until the deadline, as if absent

  def delete(self, key: str) -> None:
    self._store.delete(key)

  def keys(self) -> list[str]:
    return self._store.keys()


def session_of(nonces) -> str:
  """The session every process signs under: a digest of each process's nonce, by index."""
  return hashlib.sha256('\0'.join(nonces).encode()).hexdigest()[:32]


class Job(Coordination):
  """Process `index` of a job of `count` processes, agreeing through `store`.

  Args:
    store: the job's key-value store (a `Store`; JAX's coordinator client is wrapped).
    index: this process's index; process 0 leads.
    count: how many processes the job has.
    part_timeout_s: how long the leader waits for a push's other parts, and a
      follower for a decision or a vote (plus 10 s).
    poll_s: how often the leader's waits re-check for a refusal.
    linger_s: how long the record of a refused push stays (default: twice the longest
      wait on it, 2 * (part_timeout_s + 10)), for the processes still waiting on it.
  """
  requires_ids = True

  def __init__(self, store, index: int, count: int, *, part_timeout_s: float = PART_TIMEOUT_S,
               poll_s: float = POLL_S, linger_s: Optional[float] = None):
    if not hasattr(store, 'blocking_get'):
      store = CoordinatorStore(store)
    self._kv, self.index, self.count = store, index, count
    self.part_timeout_s, self.poll_s = part_timeout_s, poll_s
    self.linger_s = 2 * (part_timeout_s + 10) if linger_s is None else linger_s
    self._lock = threading.Lock()
    self._events_read: dict[str, int] = {}  # model id -> events read so far (a follower's)
    self._events_written: dict[str, int] = {}  # model id -> events written so far (the leader's)
    self._events_deleted: dict[str, int] = {}  # model id -> events deleted so far (the leader's)
    self._skip_since: dict[str, float] = {}  # model id -> when the next event was seen first
    self._decided: list[tuple[int, str]] = []  # (step, push key) decided, to clean up
    self._litter: collections.deque = collections.deque()  # (when, keys) to delete then

  # ---------------------------------------------------------------- cleaning up

  def _drop_later(self, *keys: str) -> None:
    """Deletes `keys` after `linger_s` (and whatever else is due now)."""
    with self._lock:
      self._litter.append((time.monotonic() + self.linger_s, keys))
    self._sweep()

  def _sweep(self) -> None:
    now, due = time.monotonic(), []
    with self._lock:
      while self._litter and self._litter[0][0] <= now:
        due.extend(self._litter.popleft()[1])
    for key in due:
      self._kv.delete(key)

  def _settled(self, key: str, decision: Decision) -> Decision:
    """`decision` stands for `key`: a refusal's record (and this process's part) go later;
    an accepted push's go with `forget_before`, the leader's."""
    if not decision.accepted:
      parts = range(1, self.count) if self.leader else (self.index,)
      self._drop_later(f'{key}/decision', f'{key}/admitted',
                       *(f'{key}/part/{i}' for i in parts))
    return decision

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
      self._drop_later(f'{key}/admitted')  # a push that never gets decided leaves none

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
        self._settled(key, decision)
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
    return Ruling(self._settled(key, self._await_decision(key)))

  def _gather(self, key: str, poison: Optional[str]) -> Ruling:
    """The leader's wait for every other process's part of `key`; a part that does not come
    in `part_timeout_s` refuses the push."""
    deadline = time.monotonic() + self.part_timeout_s
    poisons = [poison]
    for i in range(1, self.count):
      while True:
        decision = self._decision(key)
        if decision is not None:  # refused by someone meanwhile
          return Ruling(self._settled(key, decision))
        part = self._kv.blocking_get(f'{key}/part/{i}', self.poll_s)
        if part is not None:
          try:
            found = json.loads(part)['poison']
            if not isinstance(found, (str, type(None))):
              raise ValueError(f'poison {found!r}')
          except (TypeError, KeyError, ValueError) as e:
            log.warning('ignoring a malformed part in the job\'s store at %s/part/%d: %s (%s)',
                        key, i, _quoted(part), e)
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
        self._drop_later(f'{key}/part/{self.index}')
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
      return self._settled(key, decision)
    found = self._decision(key)
    if found is None:  # what was written first does not parse or verify: nothing can be accepted
      return self._settled(key, Decision(False, error=errors.Aborted(
          'the push\'s decision in the job\'s store is unreadable; retry with a new push id',
          reason='no_decision')))
    return self._settled(key, found)

  def forget_before(self, step: int) -> None:
    with self._lock:
      drop = [key for s, key in self._decided if s < step]
      self._decided = [(s, key) for s, key in self._decided if s >= step]
    for key in drop:
      self._kv.delete(f'{key}/decision')
      for suffix in ('admitted', *(f'part/{i}' for i in range(1, self.count))):
        self._kv.delete(f'{key}/{suffix}')
    self._sweep()

  # ---------------------------------------------------------------- steps

  def vote_save(self, model_id: str, step: int, due: bool) -> None:
    self._kv.set(f'{_PREFIX}/save/{model_id}/{step}', 'yes' if due else 'no', overwrite=True)
    self._kv.delete(f'{_PREFIX}/save/{model_id}/{step - 8}')

  def save_due(self, model_id: str, step: int) -> bool:
    key = f'{_PREFIX}/save/{model_id}/{step}'
    value = self._kv.blocking_get(key, self.part_timeout_s)
    if value not in ('yes', 'no'):
      log.warning('no checkpoint vote for step %d from server process 0 (%s); not saving it',
                  step, _quoted(value))
    return value == 'yes'

  def close_step(self, model_id: str, step: int, pushes: int) -> None:
    self._publish(model_id, 'close', step, pushes)

  def ask_save(self, model_id: str, step: int) -> None:
    self._publish(model_id, 'save', step)

  def _publish(self, model_id: str, *event) -> None:
    """Writes the leader's next event; an index someone else wrote first (a forgery: the
    followers skip it) is passed over. Then deletes the events every follower has read."""
    prefix = f'{_PREFIX}/events/{model_id}'
    for _ in range(100):
      with self._lock:
        n = self._events_written.get(model_id, 0)
        self._events_written[model_id] = n + 1
      if self._kv.set(f'{prefix}/{n}', ' '.join(map(str, event)), overwrite=False):
        break
      log.warning('event %d of model %s was written by someone else: writing the next one',
                  n, _quoted(model_id))
    read = [self._count(f'{prefix}/read/{i}') for i in range(1, self.count)]
    with self._lock:
      start = self._events_deleted.get(model_id, 0)
      end = max(start, min(read, default=0))
      self._events_deleted[model_id] = end
    for i in range(start, end):
      self._kv.delete(f'{prefix}/{i}')

  def _count(self, key: str) -> int:
    """The count (an int >= 0) at `key`; 0 if there is none or it is malformed."""
    text = self._kv.try_get(key)
    if text is None:
      return 0
    if not (text.isascii() and text.isdigit() and len(text) < 19):
      log.warning('ignoring a malformed count in the job\'s store at %s: %s', key, _quoted(text))
      return 0
    return int(text)

  def next_event(self, model_id: str, timeout_s: float) -> Optional[tuple]:
    prefix = f'{_PREFIX}/events/{model_id}'
    n = self._events_read.get(model_id, 0)
    text = self._kv.blocking_get(f'{prefix}/{n}', timeout_s)
    if text is None:
      # Absent, or a forgery: passed over once the leader's next one has been there a while.
      if self._kv.try_get(f'{prefix}/{n + 1}') is None:
        self._skip_since.pop(model_id, None)
        return None
      since = self._skip_since.setdefault(model_id, time.monotonic())
      if time.monotonic() - since < EVENT_SKIP_S:
        return None
      log.warning('event %d of model %s is missing or unauthenticated while event %d is there: '
                  'passed over', n, _quoted(model_id), n + 1)
      self._read(model_id, n)
      return None
    self._read(model_id, n)
    try:
      kind, *args = text.split()
      event = (kind, *map(int, args))
      if (kind, len(args)) not in (('close', 2), ('save', 1)) or min(event[1:]) < 0:
        raise ValueError('unknown event')
      return event
    except ValueError as e:
      log.warning('ignoring a malformed event %d in the job\'s store: %s (%s)', n, _quoted(text),
                  e)
      return None

  def _read(self, model_id: str, n: int) -> None:
    """Event `n` is read (or passed over): the leader may delete it once every follower did."""
    self._skip_since.pop(model_id, None)
    self._events_read[model_id] = n + 1
    self._kv.set(f'{_PREFIX}/events/{model_id}/read/{self.index}', str(n + 1), overwrite=True)

  def model_id(self, adoption: int, candidate: str) -> str:
    if self.leader:
      self._kv.set(f'{_PREFIX}/model_id/{adoption}/0', candidate, overwrite=True)
      self._kv.delete(f'{_PREFIX}/model_id/{adoption - 2}/0')  # every follower read it
      return candidate
    found = self._kv.blocking_get(f'{_PREFIX}/model_id/{adoption}/0', 60.0)
    if found is not None and not _MODEL_ID.fullmatch(found):
      log.warning('ignoring a malformed model id in the job\'s store: %s', _quoted(found))
      found = None
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
        log.warning('no step from server process %d before the final checkpoint (%s)', i,
                    _quoted(value))
        steps.append(-1)
    return steps

  def request_shutdown(self, final: bool = False) -> None:
    self._kv.set(f'{_PREFIX}/shutdown', f'{self.index} {"final" if final else "restart"}',
                 overwrite=True)

  def shutdown_requested(self) -> Optional[tuple[int, bool]]:
    value = self._kv.try_get(f'{_PREFIX}/shutdown')
    if value is None:
      return None
    try:
      text, kind = value.split(' ')
      index = int(text)
      if not 0 <= index < self.count or kind not in ('final', 'restart'):
        raise ValueError(f'no process {index}, or not final/restart')
      return index, kind == 'final'
    except ValueError:
      log.warning('ignoring a malformed shutdown request in the job\'s store: %s',
                  _quoted(value))
      return None
