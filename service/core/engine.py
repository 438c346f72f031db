"""The engine: the facade of the service's core, which owns its lock and its threads.

Knows nothing of gRPC. Each job is a part of its own, and the engine calls
them under one lock:

  rules.Steps            which pushes a step takes and when it is complete (pure)
  admission.Admission    buffers and bytes of the pushes in flight; draining
  ledger.Ledger          the answered pushes (a retry is answered, never counted twice)
  model.ModelPlan        the model's shardings, layouts, optimizer and jitted step
  model.ModelState       params and LAMB state on the mesh
  accumulator            the step's gradient sum on the host (or, with --ordered-sum, its
                         pushes held until it is applied, then added by worker), recycled
                         buffers
  persistence            checkpoints: meta, save, restore, compatibility
  saving.Saver           the checkpoint writer and reporter threads
  push.PushSession       one push being received (`open_push`)
  pull.SharedStream      one step's pull, encoded once for every puller (`pull`)

Data path: `open_push(header)` (checks, admission) -> the session's `write`s
(chunks into host buffers in the mesh's block layout) -> its `commit`
(accumulate on the host, maybe apply the step). `pull(...)` yields a header,
then a consistent snapshot of the params as encoded messages, read from the
devices' blocks and encoded once for all the pulls of a step (core/pull.py).
A push that fails never touches the sum: it is only read or written at
commit, under the lock.

Multi-process: the mesh may span the processes of a `jax.distributed` job.
Each process then holds, receives, accumulates and sends only its own
devices' blocks of each leaf (`ModelPlan.local_specs`), and every process
dispatches the same steps in the same order, so the step's collectives meet.
What they must agree on -- which pushes a step counts, in which order, when
the straggler timeout closes a step, which steps are checkpointed -- process 0
decides and the others follow. The engine asks one seam, whatever the process
(core/coordination.py: `Coordination` for a lone process, `Job` over the
coordinator's key-value store).

The lock (`_cond`) guards the engine's state and is held only to decide and
to change it: never across a call to the coordinator, a disk write or a wait
on the devices (etcd raft's pattern: decide under the lock, do the I/O
outside). Such calls take what they need under the lock, release it, do the
I/O, and re-take it to re-check and apply what was decided:
  - the leader's decisions and the I/O that publishes them are serialized by
    a lock of their own (`_order`), so that their order is the order of the
    steps, while describes, pulls and long polls go on;
  - checkpoints are written by a thread of their own (core/saving.py),
    one at a time and in step order, from a state that is held meanwhile (no
    step donates its arrays until the save is written);
  - a wait for a recycled buffer's update to be computed is a wait on the
    condition (the apply-timer thread notifies it), which releases the lock.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
import typing
import uuid
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from service.config import WORKER_ID, WORKER_ID_RULE, ServerConfig
from service.core import coordination as coordination_lib
from service.core import optimizer, persistence, placement, saving
from service.core import pull as pull_lib
from service.core.accumulator import Accumulator
from service.core.admission import Admission
from service.core.checkpoint import Checkpointer, CheckpointInfo
from service.core.finite import all_finite
from service.core.ledger import Ledger
from service.core.model import ModelPlan, ModelState
from service.core.optimizer import make_schedule
from service.core.push import PushSession
from service.core.rules import StepRules, Steps, push_order
from service.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, ServiceError,
                            PermissionDenied, Unavailable)
from service.logs import fields
from service.protocol import ids
from service.protocol.chunks import DEFAULT_CHUNK_BYTES, HostParts
from service.protocol.specs import LeafSpec
from service.protocol.types import PushHeader, PushResult

log = logging.getLogger(__name__)

PARAM_DTYPES = (np.dtype(np.float32),)
MAX_EXAMPLES = 2**31 - 1  # of one push: far beyond any batch, and safe to scale by in float32
MAX_LOCAL_STEPS = 1_000_000  # of one push (a DiLoCo round); what the metrics count
MAX_WORKERS_SEEN = 1024  # the workers `workers_seen` remembers: the most recently seen ones


class EngineObserver:
  """What the engine reports as it goes (the server's metrics implement it); no-ops here."""

  def step_applied(self, step: int, seconds: float) -> None:
    """Step `step`'s update was computed, `seconds` after it was dispatched."""

  def checkpoint_started(self, step: int, blocking_seconds: float) -> None:
    """A save of `step` began; starting it (writing it, if synchronous) took the checkpoint
    writer `blocking_seconds`, while the state was held (the step loop goes on meanwhile)."""

  def checkpoint_saved(self, step: int, seconds: float) -> None:
    """The save of `step` is on disk, `seconds` after it began."""

  def checkpoint_failed(self, step: int, error: BaseException, in_a_row: int) -> None:
    """The save of `step` failed (`in_a_row`: failed saves since the last one written)."""


@dataclasses.dataclass(frozen=True)
class Description:
  """The model as clients see it.

  `placements`: in a multi-process job, per leaf, (split dimension, where each
  process's range of it starts), or None for a leaf every process holds
  whole; empty in a single process.
  """
  initialized: bool
  model_id: str
  leaves: tuple[LeafSpec, ...]
  step: int
  learning_rate: float
  placements: tuple = ()


class Position(typing.NamedTuple):
  """Where the engine is: whether a model exists, its id, its step; closed: shutting down."""
  initialized: bool
  model_id: str
  step: int
  closed: bool

  def require_model(self, model_id: str, field: str = 'model_id') -> None:
    """FailedPrecondition (reason wrong_model) unless `model_id` ('' for any) names this
    position's model: the caller's steps are of a history this server no longer has."""
    if not model_id or (self.initialized and model_id == self.model_id):
      return
    now = self.model_id if self.initialized else 'none (no model)'
    raise FailedPrecondition(f'{field} {model_id} is not the server\'s model {now}: pull '
                             f'the parameters again', reason='wrong_model')


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """The params of one step, readable while `Engine.reading` holds them."""
  model_id: str
  step: int
  specs: tuple[LeafSpec, ...]
  arrays: tuple[jax.Array, ...]


class InitSession:
  """One InitializeModel being received (`Engine.open_init`): its stream goes into `sink`;
  `commit()` creates the model. Closing it (also after a commit) lets another
  initialisation in."""

  def __init__(self, sink: HostParts, commit: Callable[[], str], release: Callable[[], None]):
    self.sink = sink
    self._commit, self._release = commit, release

  def commit(self) -> str:
    """Creates the model from what the sink received; its model_id."""
    return self._commit()

  def close(self) -> None:
    release, self._release = self._release, None
    if release is not None:
      release()

  def __enter__(self) -> 'InitSession':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Engine:
  """The optimizer's state machine. Thread-safe; every public method may block briefly.

  Args:
    config: the server's settings.
    devices: the devices to build the mesh of (default: this process's); the
      first `config.devices` of them if that is set.
    checkpointer: where checkpoints go (None: none). The engine uses it and
      waits for its saves, but does not close it: its creator does.
    observer: told of applied steps and checkpoints (the server's metrics).
    coordination: what the processes agree on: `service.runtime.coordination()`
      (its job's, if JAX runs several processes: then it is needed); default a
      lone process's. Tests pass a `coordination.Job` over a `MemoryStore`.
  """

  def __init__(self, config: ServerConfig, devices: Optional[Sequence[jax.Device]] = None,
               checkpointer: Optional[Checkpointer] = None,
               observer: Optional[EngineObserver] = None,
               coordination: Optional[coordination_lib.Coordination] = None):
    self.config = config
    self.observer = observer or EngineObserver()
    self._checkpointer = checkpointer
    self.mesh = placement.make_mesh(config.devices, devices)
    self._schedule, self.schedule_description = make_schedule(config)
    self._cond = threading.Condition()
    # The leader's decisions with the I/O that publishes them, one at a time, in step order;
    # taken before `_cond`, never while holding it.
    self._order = threading.Lock()
    if coordination is None and jax.process_count() > 1:
      raise ValueError('a multi-process engine needs its job\'s coordination '
                       '(service.runtime.coordination())')
    self._co = coordination if coordination is not None else coordination_lib.Coordination()
    self._told: list[Callable[[], None]] = []  # I/O owed after a decision (`_tell`)
    self._listeners: list[Callable[[Position], None]] = []  # told of changes (`add_listener`)
    self._waiting_lock = threading.Lock()  # guards `_waiting`
    # The model, once it exists: its plan, its state, the step's sum.
    self._plan: Optional[ModelPlan] = None
    self._state: Optional[ModelState] = None
    self._sum: Optional[Accumulator] = None
    self._model_id = ''
    self._steps = Steps(StepRules.of(config))
    self._ledger = Ledger()
    self._admission = Admission(config.max_inflight_pushes, config.max_inflight_bytes)
    self._allowed = config.worker_allowlist
    self._waiting = 0  # callers blocked in wait_for_step
    self._readers = 0  # open `reading` blocks on the current params
    self._saving = 0  # checkpoints queued or being written from the current state
    self._unwritten = 0  # checkpoints queued or being written, of any state
    self._adopting = False  # a model is being adopted (its id agreed on)
    self._init_claim: Optional[object] = None  # the InitializeModel being received
    self._params_version = 0  # bumped whenever the current params are replaced
    self._adoptions = 0  # models adopted (initialised or restored) so far
    self._shared_pull: Optional[tuple] = None  # (key, pull.SharedStream) of the latest pull
    self._closed = False
    self.stats = {'steps_applied': 0, 'steps_skipped': 0, 'pushes_accepted': 0}
    # worker_id -> (step its last counted push went into, time.monotonic() then).
    self._seen: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
    # Off the step loop: the straggler timeout; timing each update from its dispatch
    # until it is computed; writing and reporting checkpoints (`saving.Saver`).
    self._applied: queue.SimpleQueue = queue.SimpleQueue()
    self._saver = (saving.Saver(checkpointer, config, self._co, self.observer, self.stats,
                                self._save_finished) if checkpointer is not None else None)
    self._threads = [threading.Thread(target=fn, name=name, daemon=True) for fn, name in (
        (self._straggler_loop, 'straggler') if self._co.leader else
        (self._follow_loop, 'follower'),
        (self._time_applies, 'apply-timer'))]
    for t in self._threads:
      t.start()
    if self._saver is not None:
      self._saver.start()
      self._threads += self._saver.threads

  # ------------------------------------------------------------------ queries

  def health(self, stuck_s: float) -> Optional[str]:
    """Why the engine cannot serve, or None if it can: a thread it needs has ended, or
    its lock was not free within `stuck_s` seconds (a step or a call is wedged).

    Blocks up to `stuck_s` (call it off any thread that must not wait).
    """
    for t in self._threads:
      needed = t.name != 'straggler' or self._steps.rules.has_straggler_timeout
      if needed and not t.is_alive() and not self._closed:
        return f'its {t.name} thread has ended'
    if not self._cond.acquire(timeout=stuck_s):
      return f'its lock has been held for over {stuck_s:g}s (a step or a call is stuck)'
    self._cond.release()
    return None

  def describe(self) -> Description:
    with self._cond:
      plan, step, mid = self._plan, self._steps.step, self._model_id
    return Description(plan is not None, mid, plan.specs if plan else (), step,
                       float(self._schedule(step)), plan.placements if plan else ())

  def workers_seen(self) -> list[tuple[str, int, float]]:
    """(worker_id, step of its last counted push, seconds since), most recent last.

    The last `MAX_WORKERS_SEEN` workers whose pushes were counted into a step.
    """
    with self._cond:
      seen = list(self._seen.items())
    now = time.monotonic()
    return [(w, step, now - t) for w, (step, t) in seen]

  @property
  def job(self) -> Optional[coordination_lib.Coordination]:
    """The multi-process job this engine is a process of (None: a single process)."""
    return None if self._co.alone else self._co

  @property
  def step(self) -> int:
    with self._cond:
      return self._steps.step

  @property
  def pushes_in_flight(self) -> int:
    """Pushes admitted and not yet committed or dropped (each holds a staging buffer)."""
    with self._cond:
      return self._admission.pushes

  @property
  def inflight_bytes(self) -> int:
    """Bytes (in their wire dtypes) of the pushes in flight."""
    with self._cond:
      return self._admission.bytes

  @property
  def waiting(self) -> int:
    """Callers blocked in `wait_for_step` (long polls)."""
    with self._waiting_lock:
      return self._waiting

  def trust_ratios(self) -> Optional[np.ndarray]:
    """The per-leaf trust ratios of the last step applied since start (None: none yet)."""
    with self._cond:
      ratios = self._state.trust_ratios if self._state is not None else None
    return None if ratios is None else np.asarray(ratios.addressable_data(0))  # replicated

  def wait_for_step(self, step: int, timeout: Optional[float],
                    gone: Optional[Callable[[], bool]] = None) -> tuple[int, bool, str]:
    """Blocks until the model exists and its step is >= `step`, or `timeout` passes.

    `gone`: returns True once the caller no longer waits (its RPC ended); the
    caller then calls `wake()`, so that a cancelled long poll ends at once.
    Returns (current step, reached, model_id).
    """
    if step < 0:
      raise InvalidArgument(f'step must be >= 0, got {step}')
    with self.waiter(), self._cond:
      self._cond.wait_for(
          lambda: self._closed or (gone is not None and gone()) or (
              self._plan is not None and self._steps.step >= step), timeout)
      reached = self._plan is not None and self._steps.step >= step
      return self._steps.step, reached, self._model_id

  def wake(self) -> None:
    """Wakes every waiter to re-check its condition."""
    with self._cond:
      self._changed_locked()

  def position(self) -> Position:
    """Where the engine is now: its model, its step, whether it is closed."""
    with self._cond:
      return self._position_locked()

  def _position_locked(self) -> Position:
    return Position(self._plan is not None, self._model_id, self._steps.step, self._closed)

  def add_listener(self, listener: Callable[[Position], None]) -> None:
    """Calls `listener(position)` after every change a waiter may wait for: a step
    applied, a model adopted, room freed for a push, the engine closing.

    It is called under the engine's lock and must only schedule work (e.g.
    `loop.call_soon_threadsafe`), never block or call the engine: waiters that
    hold no thread (the asyncio server's) wait on it.
    """
    with self._cond:
      self._listeners.append(listener)
      listener(self._position_locked())

  def _changed_locked(self) -> None:
    self._cond.notify_all()
    if self._listeners:
      position = self._position_locked()
      for listener in self._listeners:
        listener(position)

  @contextlib.contextmanager
  def waiter(self) -> Iterator[None]:
    """Counts a caller waiting for a step elsewhere (e.g. an asyncio long poll) in
    `waiting`, while the block runs."""
    with self._waiting_lock:
      self._waiting += 1
    try:
      yield
    finally:
      with self._waiting_lock:
        self._waiting -= 1

  # ------------------------------------------------------------------ pulls

  @contextlib.contextmanager
  def reading(self) -> Iterator[Snapshot]:
    """A consistent snapshot of the params, kept intact while the block runs.

    Applies donate the params' memory to the new params unless a reader holds
    them, so the snapshot stays readable even if steps are applied meanwhile.
    The hold ends when the block exits; in a generator, also when the generator
    is closed or collected (e.g. a cancelled pull), since that exits the block.
    """
    with self._cond:
      self._require_model()
      snap = Snapshot(self._model_id, self._steps.step, self._plan.specs,
                      tuple(self._state.params))
      version = self._params_version
      self._readers += 1
    try:
      yield snap
    finally:
      with self._cond:
        if version == self._params_version:
          self._readers -= 1

  def pull(self, dtype: Optional[np.dtype] = None, *, newer_than: Optional[int] = None,
           model_id: str = '', chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> pull_lib.PullStream:
    """The current params as a stream: a `PullHeader`, then the encoded messages.

    Args:
      dtype: the dtype to send the leaves in (default: their own).
      newer_than: the step the caller has; if it has the current one (of the
        model `model_id`), only a header with `not_modified` is yielded.
      model_id: the model of the caller's copy.
      chunk_bytes: data bytes per chunk.

    Returns a `PullStream`: it yields `PullHeader`, then the serialized
    PullParametersResponse messages of the chunks and the commit (`pull.encode`). Pulls of the same step, dtype
    and chunk size that run at once share one encoding (`pull.SharedStream`).
    The step's params are held (not donated to the next step) until the
    encoding is done or every puller is gone.
    """
    with self._cond:
      self._require_model()
      mid, step, specs = self._model_id, self._steps.step, self._plan.local_specs
      if newer_than is not None and model_id == mid and step <= newer_than:
        header, reader = pull_lib.PullHeader(mid, step, (), not_modified=True), (x for x in ())
      else:
        specs = pull_lib.pulled_dtypes(specs, dtype)
        header = pull_lib.PullHeader(mid, step, specs)
        key = (mid, step, specs, chunk_bytes)
        shared = self._shared_pull
        reader = shared[1].join() if shared is not None and shared[0] == key else None
        if reader is None:
          reader = self._start_pull(key, specs, chunk_bytes).join()
    return pull_lib.PullStream(header, reader)

  def _start_pull(self, key, specs, chunk_bytes) -> pull_lib.SharedStream:
    """A shared encoding of the current params (under the lock); they are held meanwhile."""
    hold = contextlib.ExitStack()
    snap = hold.enter_context(self.reading())
    stream = pull_lib.SharedStream(pull_lib.encode(specs, snap.arrays, chunk_bytes),
                                   release=lambda: self._end_pull(stream, hold))
    self._shared_pull = (key, stream)
    return stream

  def _end_pull(self, stream: pull_lib.SharedStream, hold: contextlib.ExitStack) -> None:
    hold.close()  # the params are no longer read
    with self._cond:
      if self._shared_pull is not None and self._shared_pull[1] is stream:
        self._shared_pull = None

  # ------------------------------------------------------------------ model

  def open_init(self, specs: Sequence[LeafSpec], init_id: str = '') -> 'InitSession':
    """An InitializeModel of the whole leaves `specs` being received: its session.

    Checks the header first (`init_id`: see `initialize`). One initialisation is
    received at a time: while one is, or once the model exists, another gets
    ALREADY_EXISTS here, before a byte of its model is allocated. In a job,
    process 0 chooses that one and the others take only the stream it took
    (as with pushes), so every process creates the same model or none does.
    """
    key = self._init_key(init_id)
    for s in specs:
      if s.dtype not in PARAM_DTYPES:
        raise InvalidArgument(f'leaf {s.path}: parameters must be float32, got {s.dtype.name}')
    # Every process refuses alike, before any claim: the settings are the same everywhere.
    optimizer.check_patterns(self.config, [s.path for s in specs])
    if key is not None:  # a follower takes the stream process 0 took, or its refusal
      self._co.await_admitted(key, self.config.admission_timeout_s)
    claim = object()
    try:
      with self._cond:
        self._check_no_model_locked()
        if self._init_claim is not None:
          raise AlreadyExists('another InitializeModel is being received: once it is done, '
                              'pull the parameters (WaitForStep(0) waits for them)',
                              reason='init_in_progress')
        self._init_claim = claim
    except ServiceError as e:
      if key is not None:
        self._co.refuse(key, e)
      raise
    if key is not None:
      self._co.admitted(key)  # (process 0's) the others may take this stream now
    sink = HostParts(specs, ModelPlan(self.config, self.mesh, specs).slices)
    return InitSession(sink, lambda: self.initialize(specs, sink.arrays, init_id),
                       lambda: self._end_init(claim))

  def _end_init(self, claim: object) -> None:
    with self._cond:
      if self._init_claim is claim:
        self._init_claim = None

  def initialize(self, specs: Sequence[LeafSpec], host_params: Sequence[np.ndarray],
                 init_id: Optional[str] = None) -> str:
    """Creates the model of leaves `specs` from host buffers; ALREADY_EXISTS if it exists.

    Args:
      specs: the whole leaves.
      host_params: one per leaf, row-major: the whole leaf, or the part of it
        this process holds (in a multi-process job; see `ModelPlan.local_specs`).
      init_id: names a client's InitializeModel (None: the server's own, from
        --init-params). A multi-process job's processes each get the client's
        stream and create the model together, or none of them does.
    """
    key = None if init_id is None else self._init_key(init_id)
    try:
      for s, buf in zip(specs, host_params):
        if s.dtype not in PARAM_DTYPES:
          raise InvalidArgument(f'leaf {s.path}: parameters must be float32, got '
                                f'{s.dtype.name}')
        if not all_finite(buf):
          raise InvalidArgument(f'leaf {s.path} of the initial parameters contains NaN or Inf')
    except ServiceError as e:
      if key is not None:
        self._co.refuse(key, e)
      raise
    if key is not None:  # every process has its part, checked: process 0 says so
      decision = self._co.rule(key, None).decision or self._co.accept(key, 0, None)
      if not decision.accepted:
        raise decision.error
    with self._cond:
      self._check_no_model_locked()
    plan = ModelPlan(self.config, self.mesh, specs)
    local = []
    for s, here, sl, buf in zip(plan.specs, plan.local_specs, plan.slices, host_params):
      if tuple(buf.shape) == here.shape:
        local.append(buf)
      elif tuple(buf.shape) == s.shape:  # the whole leaf: this process's part of it
        local.append(buf[sl])
      else:
        raise InvalidArgument(f'leaf {s.path}: shape {list(buf.shape)}, expected '
                              f'{list(s.shape)} (or this process\'s part, {list(here.shape)})')
    model_id = self._adopt(plan, plan.place(local), 0, initial=True)
    log.info('model initialised: %d leaves, %d parameters, model_id %s', len(specs),
             sum(math.prod(s.shape) for s in specs), model_id,
             extra=fields(step=0, model_id=model_id))
    plan.compile()  # outside the lock; a step that comes first compiles it itself
    return model_id

  def _init_key(self, init_id: str) -> Optional[str]:
    """Where the job agrees on an InitializeModel (None: a lone process needs no key)."""
    return self._co.init_key(ids.check_id(init_id, 'header.init_id', ids.PUSH_ID_MAX))

  def _check_no_model_locked(self) -> None:
    if self._plan is not None:
      raise AlreadyExists(f'the model is already initialised (model_id {self._model_id}, '
                          f'step {self._steps.step})')
    if self._adopting:
      raise AlreadyExists('the model is being initialised (or restored) by another call')

  def _adopt(self, plan: ModelPlan, state: ModelState, step: int, initial: bool) -> str:
    """Makes (plan, state) of `step` the model, with a new model_id; returns it.

    `initial`: a new model (not one restored): ALREADY_EXISTS if there is one;
    its initial params are checkpointed (they are state too).
    """
    with self._cond:
      if initial:
        self._check_no_model_locked()
      elif self._adopting:
        raise AlreadyExists('a model is being initialised by another call')
      self._adopting = True
      self._adoptions += 1
      adoption = self._adoptions
    try:  # one id for the whole job: every process adopts its model at the same point
      model_id = self._co.model_id(adoption, uuid.uuid4().hex)
    finally:
      with self._cond:
        self._adopting = False
    with self._cond:
      if initial:
        self._check_no_model_locked()
      self._plan, self._state = plan, state
      self._sum = Accumulator(plan, self.config.max_inflight_pushes,
                              ordered=self.config.ordered_sum)
      self._steps = Steps(self._steps.rules, step)
      self._model_id = model_id
      self._params_replaced_locked()
      save = self._queue_save_locked(ask=False) if initial else None
      self._changed_locked()
    if save is not None:  # started before the model is answered as initialised
      save.done.wait()
    return model_id

  def _require_model(self) -> ModelPlan:
    if self._plan is None:
      raise FailedPrecondition('the model is not initialised: call InitializeModel first '
                               '(or start the server with --init-params)',
                               reason='not_initialized')
    return self._plan

  def _params_replaced_locked(self) -> None:
    """The current params are new arrays: nobody reads them yet."""
    self._params_version += 1
    self._readers = 0
    self._saving = 0

  # ------------------------------------------------------------------ pushes

  def open_push(self, header: PushHeader, timeout: Optional[float] = None) -> PushSession:
    """Checks a push's header and admits it: the session to write its data into.

    A retry of an answered push gets a session that is `answered` at once.
    Waits up to `timeout` (default admission_timeout_s) for room in flight;
    with 0, never waits: ResourceExhausted (busy) at once if there is no room
    (and, on a follower, if process 0 has not admitted the push yet).
    In a multi-process job, a refusal here refuses the push on every process.
    """
    try:
      return self._open_push(header, timeout)
    except ServiceError as e:
      self._refuse_everywhere(header, e)
      raise

  def _refuse_everywhere(self, header: PushHeader, error: BaseException) -> None:
    """Makes a push this process refused for good refused on every process (multi-process)."""
    model_id = self._model_id
    if model_id and header.push_id and self._co.final(error):
      self._co.refuse(self._co.push_key(model_id, header.worker_id, header.push_id), error)

  def _open_push(self, header: PushHeader, timeout: Optional[float]) -> PushSession:
    self._check_header(header)
    timeout = self.config.admission_timeout_s if timeout is None else timeout
    with self._cond:
      answered = self._check_push_locked(header)
      model_id = self._model_id
    if answered is not None:
      return PushSession(header, answered=answered)
    key = self._co.push_key(model_id, header.worker_id, header.push_id)
    # A follower admits only pushes process 0 admitted: else each process could fill its
    # room with pushes whose parts wait for room on the other, and none would ever count.
    self._co.await_admitted(key, timeout)
    with self._cond:
      answered = self._check_push_locked(header)  # the lock was released: again
      if answered is not None:
        return PushSession(header, answered=answered)
      if self._model_id != model_id:
        raise Unavailable('the model changed meanwhile; retry', reason='busy')
      session = self._session_locked(header, timeout)
    try:
      self._co.admitted(key)  # the leader's: the followers may admit it now
    except BaseException:
      with self._cond:
        self._release_locked(session)
      raise
    return session

  def _check_push_locked(self, header: PushHeader) -> Optional[PushResult]:
    """Checks a push against the model and its step; its answer if it is a retry."""
    if self._admission.draining:
      raise Unavailable('the server is shutting down; retry against its successor',
                        reason='shutting_down')
    plan = self._require_model()
    self._position_locked().require_model(header.model_id, 'header.model_id')
    answered = self._ledger.answer(header.worker_id, header.push_id, self._steps.step)
    if answered is not None:
      return answered
    self._check_leaves(plan, header.leaves)
    self._steps.check(header.worker_id, header.step)
    return None

  def _session_locked(self, header: PushHeader, timeout: float) -> PushSession:
    """Admits a checked push (waiting up to `timeout` for room): its session."""
    dtypes = [s.dtype for s in header.leaves]
    slot = self._admit_locked(header.nbytes, dtypes, timeout)
    buffers = self._sum.take_buffers(dtypes)  # at once: `_admit_locked` waited for them
    views = self._sum.wire_views(buffers)
    return PushSession(header, buffers=buffers, views=views, slot=slot,
                       reject_nonfinite=self.config.nonfinite == 'reject',
                       commit=self._commit, release=self._release)

  def _check_header(self, h: PushHeader) -> None:
    if not h.worker_id:
      raise InvalidArgument('header.worker_id is empty')
    if not WORKER_ID.fullmatch(h.worker_id):
      raise InvalidArgument(f'header.worker_id {h.worker_id[:140]!r} is not a valid worker id '
                            f'({WORKER_ID_RULE})')
    if self._allowed is not None and h.worker_id not in self._allowed:
      raise PermissionDenied(f'worker {h.worker_id} is not one of the allowed workers '
                             f'(allowed_workers)', reason='unknown_worker')
    index = ids.worker_index(h.worker_id)
    if index is not None and index >= self.config.num_workers:
      n = self.config.num_workers
      which = ids.worker_name(0) + (f' .. {ids.worker_name(n - 1)}' if n > 1 else '')
      raise InvalidArgument(f'header.worker_id {h.worker_id}: this server trains with {n} '
                            f'worker(s), {which}: the worker\'s --worker-index or --num-workers '
                            f'is not the server\'s', reason='unknown_worker')
    ids.check_id(h.push_id, 'header.push_id', ids.PUSH_ID_MAX)
    ids.check_id(h.model_id, 'header.model_id', ids.MODEL_ID_MAX)
    if not h.push_id and self._co.requires_ids:
      raise InvalidArgument('header.push_id is empty: a multi-process server matches the parts '
                            'of a push by it')
    if h.step < 0:
      raise InvalidArgument(f'header.step must be >= 0, got {h.step}')
    if not 0 < h.local_steps <= MAX_LOCAL_STEPS:
      raise InvalidArgument(f'header.local_steps must be in [0, {MAX_LOCAL_STEPS}], got '
                            f'{h.local_steps}')
    if not 0 < h.num_examples <= MAX_EXAMPLES:  # the sum scales each push by it, in float32
      raise InvalidArgument(f'header.num_examples must be in [1, {MAX_EXAMPLES}], got '
                            f'{h.num_examples}')

  @staticmethod
  def _check_leaves(plan: ModelPlan, wire_specs: Sequence[LeafSpec]) -> None:
    got = {s.path for s in wire_specs}
    for want in plan.local_specs:
      if want.path not in got:
        raise InvalidArgument(f'header.leaves: leaf {want.path} is missing')
    for i, s in enumerate(wire_specs):
      j = plan.paths.get(s.path)
      if j is None:
        raise InvalidArgument(f'header.leaves: unknown leaf {s.path}')
      if j != i:
        raise InvalidArgument(f'header.leaves: leaf {s.path} is at position {i}, expected {j} '
                              f'(the parameters\' order)')
      if s.shape != plan.local_specs[j].shape:  # this process's part of the leaf
        raise InvalidArgument(f'header.leaves: leaf {s.path} has shape {list(s.shape)}, '
                              f'expected {list(plan.local_specs[j].shape)}')

  def _admit_locked(self, nbytes: int, dtypes: Sequence[np.dtype], timeout: float):
    """Waits for room for a push of `nbytes` (and for buffers in `dtypes` that no update
    still reads); its admission slot."""
    adm = self._admission
    adm.check_size(nbytes)
    if not self._cond.wait_for(
        lambda: adm.draining or (adm.has_room(nbytes, self._sum.held) and
                                 self._sum.fence_to_take(dtypes) is None), timeout):
      raise adm.busy(self._sum.holding())
    adm.check_size(nbytes)  # draining meanwhile
    return adm.admit(nbytes)

  def _release(self, session: PushSession, error: Optional[BaseException] = None) -> None:
    """Frees a session's slot and gives back buffers it still holds (not committed).

    `error`: why the push ended before its commit, if it did (a refusal for
    good refuses it on every process of a multi-process job).
    """
    if session.result is None and error is not None:
      self._refuse_everywhere(session.header, error)
    with self._cond:
      self._release_locked(session)

  def _release_locked(self, session: PushSession) -> None:
    if session.buffers and self._sum is not None:
      self._sum.give_back(session.buffers)
    session.buffers = []
    if self._admission.release(session.slot):
      self._changed_locked()

  def _commit(self, session: PushSession) -> PushResult:
    """Adds a complete, checked push to its step; applies the step when it is complete.

    Consumes the session's buffers: the sum may adopt or scale them in place.
    The push counts once the processes agree (a lone process at once): a
    follower in the step the leader decided; the leader (or a lone process)
    decides under its lock, publishes the decision with the lock released and
    counts it after, its decisions one at a time (`_order`).
    """
    h = session.header
    with self._cond:
      self._require_model()
      answered = self._ledger.answer(h.worker_id, h.push_id, self._steps.step)
      if answered is not None:
        return answered
      model_id = self._model_id
    key = self._co.push_key(model_id, h.worker_id, h.push_id)
    ruling = self._co.rule(key, session.nonfinite_leaf)  # the other parts: may wait
    if ruling.decision is not None:  # decided by the leader (or refused by someone)
      # The leader counts only under `_order` (a retry may find its push accepted already).
      with self._order if self._co.leader else contextlib.nullcontext():
        try:
          return self._count_decided(session, ruling.decision)
        finally:
          self._tell()
    with self._order:
      with self._cond:
        error = None
        try:
          self._require_model()
          answered = self._ledger.answer(h.worker_id, h.push_id, self._steps.step)
          if answered is not None:
            return answered
          if self._model_id != model_id:
            raise Unavailable('the model changed meanwhile; retry', reason='busy')
          self._steps.check(h.worker_id, h.step)  # the step may have moved meanwhile
        except ServiceError as e:
          error = e
        step = self._steps.step
      decision = (self._co.refuse(key, error) if error is not None else
                  self._co.accept(key, step, ruling.poison))
      try:
        return self._count_decided(session, decision)
      finally:
        self._tell()

  def _count_decided(self, session: PushSession, decision: coordination_lib.Decision
                     ) -> PushResult:
    """Counts a push the processes accepted into `decision.step`, once this process is at
    that step (a follower counts pushes in the leader's order: step by step)."""
    if not decision.accepted:
      raise decision.error
    h = session.header
    with self._cond:
      self._cond.wait_for(lambda: self._closed or (
          self._steps.step >= decision.step and self._may_step_locked() and
          self._sum.fence_to_add(session.buffers, push_order(h.worker_id, h.push_id)) is None))
      answered = self._ledger.answer(h.worker_id, h.push_id, self._steps.step)
      if answered is not None:  # a retry of it was counted meanwhile
        return answered
      if self._steps.step != decision.step:
        raise Unavailable(f'the server is shutting down before step {decision.step}',
                          reason='shutting_down')
      if decision.poison is not None:
        self._steps.poison(f'leaf {decision.poison} of worker {h.worker_id}')
      return self._count_locked(session)

  def _may_step_locked(self) -> bool:
    """Whether a step may be applied now. In a job, not while a checkpoint is being written:
    a multi-process save runs collectives of its own (Orbax's), which must meet the steps'
    in the same order on every process. With --ordered-sum, not while the float32 buffer
    the held pushes' sum needs (if the first in order is not float32) is still read by the
    last update: the wait is on the condition, not on the devices under the lock."""
    return ((self._co.alone or self._unwritten == 0) and
            (self._sum is None or self._sum.fence_to_apply() is None))

  def _tell(self) -> None:
    """Does the I/O the decisions taken under the lock owe (the leader's votes, cleanups), in
    their order, with the lock released (the leader's under `_order`)."""
    with self._cond:
      told, self._told = self._told, []
    for fn in told:
      try:
        fn()
      except Exception as e:  # pylint: disable=broad-except  # the coordinator is going away
        log.warning('could not tell the other server processes: %s: %s', type(e).__name__, e)

  def _count_locked(self, session: PushSession) -> PushResult:
    """Counts a push its rules (and the job) accepted into the current step."""
    h = session.header
    self._sum.add(session.buffers, h.num_examples, session.encoded,
                  order=push_order(h.worker_id, h.push_id))
    self._release_locked(session)  # its buffers are the sum's (or held) now, or in the pool
    self.stats['pushes_accepted'] += 1
    accepted = self._steps.step
    self._seen[h.worker_id] = (accepted, time.monotonic())
    self._seen.move_to_end(h.worker_id)
    if len(self._seen) > MAX_WORKERS_SEEN:
      self._seen.popitem(last=False)
    complete = self._steps.add(h.worker_id, h.push_id, time.monotonic())
    if complete:
      self._apply_locked()
    result = PushResult(accepted, complete, self._steps.step, model_id=self._model_id)
    self._ledger.record(h.worker_id, h.push_id, accepted, result)
    return result

  def _apply_locked(self) -> None:
    step = self._steps.step
    if self._steps.poisoned_by is not None:
      log.warning('step %d skipped: NaN/Inf in %s', step, self._steps.poisoned_by,
                  extra=fields(step=step, reason='nonfinite'))
      self._sum.discard()
      self.stats['steps_skipped'] += 1
    else:
      t0 = time.monotonic()
      weight = self._sum.weight
      self._state = self._plan.step(self._state, self._sum.to_mesh(), weight,
                                    keep_params=self._readers > 0 or self._saving > 0,
                                    keep_state=self._saving > 0)
      self._sum.retire((self._state.trust_ratios,))
      self._params_replaced_locked()
      self._applied.put((step, t0, self._state.trust_ratios))
      self.stats['steps_applied'] += 1
    self._steps.advance()
    self._ledger.forget_before(self._steps.step - self.config.staleness_bound - 2)
    # The leader's records of pushes every process has counted (a no-op elsewhere).
    self._told.append(functools.partial(
        self._co.forget_before,
        self._steps.step - self.config.staleness_bound - self.config.max_inflight_pushes - 2))
    self._checkpoint_if_due_locked()
    self._changed_locked()

  def _straggler_loop(self) -> None:
    """Applies a sync step once the straggler timeout passed with a quorum of pushes."""
    if not self._steps.rules.has_straggler_timeout:
      return
    while True:
      with self._cond:
        if self._closed:
          return
        wait = self._steps.straggler_wait(time.monotonic())
        if wait is None or wait > 0 or not self._may_step_locked():
          self._cond.wait(1.0 if wait is None or wait <= 0 else wait)
          continue
      with self._order:  # no push is decided meanwhile: the step and its pushes stay
        with self._cond:
          wait = self._steps.straggler_wait(time.monotonic())
          if self._closed or wait is None or wait > 0 or not self._may_step_locked():
            continue
          step, pushes, model_id = (self._steps.step, len(self._steps.contributors),
                                    self._model_id)
        # The followers apply it too, with the same pushes.
        self._co.close_step(model_id, step, pushes)
        with self._cond:
          if not self._closed and self._steps.step == step and self._model_id == model_id:
            rules = self._steps.rules
            log.warning('step %d applied with %d of %d workers after the %.1fs straggler '
                        'timeout', step, pushes, rules.num_workers, rules.straggler_timeout_s,
                        extra=fields(step=step, reason='straggler'))
            self._apply_locked()
        self._tell()

  def _follow_loop(self) -> None:
    """A follower's part of the leader's decisions that no push carries (multi-process):
    steps the straggler timeout closed, checkpoints asked for."""
    while True:
      with self._cond:
        if self._closed:
          return
        model_id = self._model_id
      if not model_id:
        time.sleep(0.2)
        continue
      event = self._co.next_event(model_id, timeout_s=1.0)
      if event is None:
        continue
      kind, step, *rest = event
      with self._cond:
        if kind == 'close':  # once the pushes the leader counted are counted here too
          self._cond.wait_for(lambda: self._closed or self._steps.step > step or (
              len(self._steps.contributors) >= rest[0] and self._may_step_locked()))
          if self._steps.step == step and not self._closed:
            self._apply_locked()
        elif kind == 'save':
          self._cond.wait_for(lambda: self._closed or self._steps.step >= step)
          if self._steps.step == step and not self._closed:
            self._queue_save_locked(ask=False)
      self._tell()

  def _time_applies(self) -> None:
    while (item := self._applied.get()) is not None:
      step, t0, marker = item
      try:
        marker.block_until_ready()
      except Exception:  # pylint: disable=broad-except
        continue  # never computed (e.g. the process is exiting)
      with self._cond:  # buffers the update read may be handed out now
        self._changed_locked()
      self.observer.step_applied(step, time.monotonic() - t0)

  # ------------------------------------------------------------------ checkpoints

  def _checkpoint_if_due_locked(self) -> None:
    """After a step: its checkpoint, if due. The leader (or a lone process) asks its
    checkpointer's policy (in memory) and tells the followers; a follower's writer
    thread waits for that vote, holding the state meanwhile."""
    if self._checkpointer is None or self._plan is None:
      return
    step, model_id = self._steps.step, self._model_id
    if self._co.leader:
      due = self._checkpointer.should_save(step)
      self._told.append(functools.partial(self._co.vote_save, model_id, step, due))
      if due:
        self._queue_save_locked(ask=False)
    else:
      self._queue_save_locked(ask=True)

  def _queue_save_locked(self, ask: bool) -> Optional[saving.Save]:
    """Queues a checkpoint of the current state for the writer thread (None: there is
    nothing to save); the state is held (never donated) until it is written."""
    if self._saver is None or self._plan is None:
      return None
    save = saving.Save(self._model_id, self._steps.step, self._plan, self._state,
                       self._params_version, ask)
    self._saving += 1
    self._unwritten += 1
    self._saver.queue(save)
    return save

  def _save_finished(self, save: saving.Save) -> None:
    """The writer thread is done with `save`: its state is no longer held for it."""
    with self._cond:
      if save.version == self._params_version:
        self._saving -= 1
      self._unwritten -= 1
      self._changed_locked()

  def restore(self) -> bool:
    """Restores the newest readable checkpoint onto this mesh; False if there is none."""
    if self._checkpointer is None:
      return False
    found = persistence.restore_latest(self._checkpointer, self.config, self.mesh)
    if found is None:
      return False
    step, plan, state = found
    model_id = self._adopt(plan, state, step, initial=False)
    log.info('restored step %d from %s (%d leaves), model_id %s', step,
             self._checkpointer.path(step), len(plan.specs), model_id,
             extra=fields(step=step, model_id=model_id))
    plan.compile()
    return True

  def check_same_model(self, specs: Sequence[LeafSpec]) -> None:
    """Raises IncompatibleCheckpoint if `specs` are not the restored model's leaves."""
    persistence.check_same_model(self._plan.specs, specs)

  def save_now(self, wait: bool) -> tuple[int, str]:
    """Checkpoints the current step now (unless it is already saved).

    Returns once the save is started (written, with `wait`). The engine goes
    on meanwhile: the save is written from the step's state, held for it.
    """
    if self._checkpointer is None:
      raise FailedPrecondition('the server has no --checkpoint-dir')
    if not self._co.leader:
      raise FailedPrecondition('server process 0 decides when a multi-process server '
                               'checkpoints: send SaveCheckpoint to it', reason='not_leader')
    with self._order:  # in the order of the steps, for the followers too
      with self._cond:
        self._require_model()
        save = self._queue_save_locked(ask=False)
      self._co.ask_save(save.model_id, save.step)
    save.done.wait()
    try:
      if save.error is not None:
        raise save.error
      if wait:
        self._checkpointer.wait()
    except Exception as e:  # pylint: disable=broad-except  # the disk: full, gone, read-only
      raise Unavailable(f'the checkpoint of step {save.step} could not be written '
                        f'({type(e).__name__}: {e}); the server goes on and saves again at '
                        f'the next save point', reason='checkpoint_failed') from e
    return save.step, self._checkpointer.path(save.step)

  def list_checkpoints(self) -> list[CheckpointInfo]:
    if self._checkpointer is None:
      raise FailedPrecondition('the server has no --checkpoint-dir')
    return self._checkpointer.list()

  # ------------------------------------------------------------------ lifecycle

  def shutdown(self, grace: float) -> None:
    """Stops admitting pushes, lets those in flight finish (up to `grace` s), saves, waits."""
    with self._cond:
      self._admission.draining = True
      self._changed_locked()
      self._cond.wait_for(lambda: self._admission.pushes == 0, grace)
      if self._admission.pushes:
        log.warning('%d pushes still in flight after %.1fs; not waiting for them',
                    self._admission.pushes, grace)
      model_id, step, has_model = self._model_id, self._steps.step, self._plan is not None
    save = None
    if self._checkpointer is not None and has_model and self._same_step_everywhere(model_id,
                                                                                     step):
      with self._cond:
        if self._steps.step == step:
          save = self._queue_save_locked(ask=False)
        else:
          log.error('no final checkpoint: step %d was applied while the processes agreed on '
                    'step %d', self._steps.step, step)
      if save is not None:
        save.done.wait()
    if self._checkpointer is not None:
      self._checkpointer.wait()
      if save is not None or has_model:
        log.info('final checkpoint of step %d written', self.step,
                 extra=fields(step=self.step))
    self.close()

  def _same_step_everywhere(self, model_id: str, step: int) -> bool:
    """Whether every process of the job is at `step` (always, in one process): else a
    final checkpoint cannot be written together."""
    steps = self._co.same_step(model_id, step)
    if len(set(steps)) == 1:
      return True
    log.error('no final checkpoint: the server processes stopped at different steps (%s); '
              'the last checkpoint stands', ', '.join(f'process {i}: {s}'
                                                     for i, s in enumerate(steps)))
    return False

  def close(self) -> None:
    """Ends the engine's threads (the checkpointer stays open: its creator closes it)."""
    with self._cond:
      self._closed = True
      self._changed_locked()
    self._applied.put(None)
    if self._saver is not None:
      self._saver.close()
    for t in self._threads:
      t.join(timeout=30)
