"""The step engine: the model on the mesh, gradient accumulation, and LAMB steps.

Knows nothing of gRPC. The servicer hands it validated host buffers; the engine
accumulates each committed push (example-weighted) into one float32 host buffer
per leaf, moves the sum onto the mesh and applies `lamb_sharded.lamb` when a
step is complete, and serves consistent snapshots of the params.

Data path: header -> `begin_push` (admission, checks) -> the caller streams the
bytes into host buffers -> `commit_push` (accumulate on the host, maybe apply).

Why the accumulator is on the host: a push arrives in host memory anyway, and
the first push of a step (the only one, with one worker) becomes the
accumulator as it is -- no copy, no pass -- while later ones are added to it in
place. Only the sum goes onto the mesh, once per step. Host buffers are laid
out in the mesh's blocks (service/layout.py): a receiver scatters the wire's
row-major bytes so that each device's block of a leaf is contiguous, and on a
CPU mesh the devices then wrap the sum's blocks without copying them. Gradient
buffers are recycled (`placement.BufferPool`): at most max_inflight_pushes of them
exist, the step's sum holding one. A push that fails never touches the
accumulator: it is only read or written at commit, under the lock.

Multi-host later: `placement.to_mesh` builds each global array with
`jax.make_array_from_callback`, which asks only for the blocks this process's
devices hold, so a process that ingests (and accumulates) only its own blocks
-- the layout already keeps each block apart -- plugs in there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import queue
import threading
import time
import uuid
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lamb_sharded
from service.checkpoint import Checkpointer, CheckpointInfo, IncompatibleCheckpoint
from service.config import WORKER_ID, WORKER_ID_RULE, ServerConfig
from service.errors import (Aborted, AlreadyExists, FailedPrecondition, InvalidArgument,
                            PermissionDenied, ResourceExhausted, Unavailable)
from service import layout, placement
from service.placement import MESH_AXIS, partition_spec, to_mesh
from service.logs import fields
from service.wire import LeafSpec

log = logging.getLogger(__name__)

PARAM_DTYPES = (np.dtype(np.float32),)


_FINITE_BLOCK = 1 << 16  # elements per isfinite block: its bool temporary stays in cache


def all_finite(buffer: np.ndarray) -> bool:
  """No NaN or Inf in `buffer`: one pass of `isfinite`, block by block (a small temporary)."""
  flat = buffer.reshape(-1)
  return all(np.isfinite(flat[i:i + _FINITE_BLOCK]).all()
             for i in range(0, flat.size, _FINITE_BLOCK))


def make_schedule(config: ServerConfig) -> tuple[optax.Schedule, str]:
  """The learning-rate schedule and a human-readable description of it."""
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate), f'constant({config.learning_rate})'
  sched = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, max(config.decay_steps, 1),
      config.end_learning_rate)
  return sched, (f'warmup_cosine_decay(peak={config.learning_rate}, warmup={config.warmup_steps}, '
                 f'decay={config.decay_steps}, end={config.end_learning_rate})')


def make_optimizer(config: ServerConfig, mesh, specs) -> optax.GradientTransformation:
  schedule, _ = make_schedule(config)
  return lamb_sharded.lamb(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, eps_root=config.eps_root,
      weight_decay=config.weight_decay, mesh=mesh, param_specs=specs,
      max_grad_norm=config.max_grad_norm or None, record_trust_ratio=True)


class EngineObserver:
  """What the engine reports as it goes (the server's metrics implement it); no-ops here."""

  def step_applied(self, step: int, seconds: float) -> None:
    """Step `step`'s update was computed, `seconds` after it was dispatched."""

  def checkpoint_started(self, step: int, blocking_seconds: float) -> None:
    """A save of `step` began; it held the step loop for `blocking_seconds`."""

  def checkpoint_saved(self, step: int, seconds: float) -> None:
    """The save of `step` is on disk, `seconds` after it began."""


@dataclasses.dataclass(frozen=True)
class Description:
  initialized: bool
  model_id: str
  leaves: tuple[LeafSpec, ...]
  step: int
  learning_rate: float


@dataclasses.dataclass(frozen=True)
class PushResult:
  accepted_step: int
  applied: bool
  current_step: int
  duplicate: bool = False


@dataclasses.dataclass
class PushTicket:
  """An admitted push: its header, and its slot in the bounded set of buffers."""
  worker_id: str
  push_id: str
  step: int
  num_examples: int
  wire_specs: tuple[LeafSpec, ...]
  nbytes: int = 0  # of the push in its wire dtypes
  # Where the push's bytes go (one array per leaf, in the mesh's block layout);
  # commit_push consumes the list. `views`: what a receiver writes into (wire order).
  buffers: list[np.ndarray] = dataclasses.field(default_factory=list)
  views: list[np.ndarray] = dataclasses.field(default_factory=list)
  nonfinite_leaf: Optional[str] = None  # set when the stream carried NaN/Inf
  _released: bool = False

  def fill(self, arrays: Sequence[np.ndarray]) -> None:
    """Writes whole leaves (row-major, in the wire dtypes) into the push's buffers.

    For callers in this process; the server writes the chunks it receives
    through `views` instead.
    """
    for view, spec, x in zip(self.views, self.wire_specs, arrays):
      x = np.ascontiguousarray(x, spec.dtype).reshape(-1)
      if x.size * spec.dtype.itemsize != spec.nbytes:
        raise ValueError(f'leaf {spec.path}: {x.size} elements, expected shape {spec.shape}')
      layout.write(view, 0, x.view(np.uint8))


@dataclasses.dataclass(frozen=True)
class Snapshot:
  model_id: str
  step: int
  specs: tuple[LeafSpec, ...]
  arrays: tuple[jax.Array, ...]


class _Model:
  """Everything that exists once the model is initialised: its state on the mesh, and
  the step's gradient sum on the host (`acc`: float32, one array per leaf; None while
  no push of the step has committed).
  """

  def __init__(self, config: ServerConfig, mesh, specs: Sequence[LeafSpec]):
    self.specs = tuple(specs)
    self.paths = {s.path: i for i, s in enumerate(specs)}
    self.pspecs = [partition_spec(s.shape, mesh.devices.size) for s in specs]
    self.shardings = [NamedSharding(mesh, p) for p in self.pspecs]
    self.replicated = NamedSharding(mesh, P())
    self.tx = make_optimizer(config, mesh, self.pspecs)
    self.params: list[jax.Array] = []
    self.opt_state = None
    self.acc: Optional[list[np.ndarray]] = None
    self.weight = 0  # examples accumulated into acc
    self.trust_ratios: Optional[jax.Array] = None  # of the last step applied here
    # Host buffers: each device's block of a leaf contiguous (see service/layout.py).
    self.layouts = [placement.layout_of(s.shape, p, mesh.devices.size)
                    for s, p in zip(specs, self.pspecs)]
    self.pool = placement.BufferPool(self.layouts, config.max_inflight_pushes)
    self._retiring: list[np.ndarray] = []  # the sum of the step being applied

    def apply(params, opt_state, acc, inv_weight):
      grads = [(a * inv_weight).astype(p.dtype) for a, p in zip(acc, params)]
      updates, opt_state = self.tx.update(grads, opt_state, params)
      # The trust ratios once more, as an output of their own: opt_state is donated to
      # the next step, this copy stays readable (metrics) and marks the step computed.
      ratios = opt_state[0].trust_ratio
      return optax.apply_updates(params, updates), opt_state, ratios
    # The new params and moments take the old ones' memory (donated), so a step needs
    # no second copy of them. Params can be donated only while no pull reads them
    # (Engine.reading); otherwise `apply_keeping_params` leaves them to the readers.
    # The outputs are pinned to the inputs' shardings, so that every step runs the
    # executable compiled for the first (see `compile_apply`).
    state = self.abstract_state()
    out_shardings = jax.tree.map(lambda x: x.sharding,
                                 (state['params'], state['opt_state'])) + (self.replicated,)
    self.apply = jax.jit(apply, donate_argnums=(0, 1), out_shardings=out_shardings)
    self.apply_keeping_params = jax.jit(apply, donate_argnums=1, out_shardings=out_shardings)

  @classmethod
  def from_host(cls, config, mesh, specs, host_params) -> '_Model':
    model = cls(config, mesh, specs)
    # Copies the mesh owns: on CPU an aligned host block would be wrapped in place, and
    # the first step could then not donate the params' memory to the new ones (it would
    # allocate them afresh, a second copy of the params at the step's peak).
    model.params = [jax.device_put(to_mesh(x, sh), sh, may_alias=False)
                    for x, sh in zip(host_params, model.shardings)]
    # Step counters on the mesh too (replicated), so every step sees the same shardings.
    model.opt_state = optax.tree.map_params(
        model.tx, lambda x: x, jax.jit(model.tx.init)(model.params),
        transform_non_params=lambda x: jax.device_put(x, model.replicated))
    return model

  def compile_apply(self) -> None:
    """Compiles the step now, before any push: the first step does not wait for it.

    The compiler's working memory is freed when it is done, but the C allocator
    keeps it (a few hundred MB for a BERT-sized model) until something trims
    its heaps: it is handed back to the OS here, before the first step's peak.
    """
    state = self.abstract_state()
    acc = [jax.ShapeDtypeStruct(s.shape, np.float32, sharding=sh)
           for s, sh in zip(self.specs, self.shardings)]
    self.apply.lower(state['params'], state['opt_state'], acc, jnp.float32(1)).compile()
    placement.trim_heap()

  def abstract_state(self) -> dict:
    """The checkpointed state as ShapeDtypeStructs with this mesh's shardings."""
    params = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
              for s, sh in zip(self.specs, self.shardings)]
    shapes = jax.eval_shape(self.tx.init, params)
    opt_state = optax.tree.map_params(
        self.tx, lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes,
        self.shardings,
        transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=self.replicated))
    return {'params': params, 'opt_state': opt_state}

  def state(self) -> dict:
    return {'params': self.params, 'opt_state': self.opt_state}

  def add_push(self, buffers: list[np.ndarray], num_examples: int) -> None:
    """acc += num_examples * buffers, consuming `buffers` (the list is emptied).

    The first push of a step becomes the accumulator itself when it is float32
    (scaled in place unless its weight is 1): no copy, no pass. Later pushes
    are added in place, leaf by leaf, so no model-sized temporary is made.
    """
    n = np.float32(num_examples)
    if self.acc is None and all(b.dtype == np.float32 for b in buffers):
      if n != 1:
        for b in buffers:
          b *= n
      self.acc = buffers[:]
    elif self.acc is None:  # bfloat16 or float16 on the wire
      self.acc = self.pool.take()
      for a, b in zip(self.acc, buffers):
        np.multiply(b, n, out=a, dtype=np.float32)
      self.pool.give(buffers)
    else:
      for a, b in zip(self.acc, buffers):
        if n == 1:
          np.add(a, b, out=a, dtype=np.float32)
        else:  # a leaf-sized temporary at most
          a += np.multiply(b, n, dtype=np.float32)
      self.pool.give(buffers)
    buffers.clear()
    self.weight += num_examples

  def take_buffers(self, wire_specs: Sequence[LeafSpec]) -> list[np.ndarray]:
    """Host buffers for a push in its wire dtypes, in the mesh's block layout, recycled."""
    return self.pool.take([s.dtype for s in wire_specs])

  def wire_views(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per buffer, the view a receiver writes the leaf's wire bytes into."""
    return [lay.wire_view(b) for lay, b in zip(self.layouts, buffers)]

  def discard_acc(self) -> None:
    """Drops the step's sum (a skipped step); its buffer goes back to the pool."""
    if self.acc is not None:
      self.pool.give(self.acc)
    self.acc, self.weight = None, 0

  def take_acc(self) -> list[jax.Array]:
    """The gradient sum as global arrays on the mesh; empties the host accumulator.

    Each device gets its block of the host buffer (on CPU the mesh wraps the
    host memory without a copy). The host buffer goes back to the pool when
    `retire_acc` is called with the step's outputs: until those are computed,
    the update may still read it.
    """
    self._retiring, self.acc = self.acc, None
    self.weight = 0
    return [to_mesh(a, sh, lay) for a, sh, lay in zip(self._retiring, self.shardings,
                                                        self.layouts)]

  def retire_acc(self, fence: Sequence[jax.Array]) -> None:
    """Returns the last step's sum to the pool, to be reused once `fence` is computed.

    `fence`: outputs of the step that reads the sum, never donated later (the
    trust ratios: the params are donated to the next step, and a donated array
    can no longer be waited on).
    """
    self.pool.give(self._retiring, fence)
    self._retiring = []


def specs_to_meta(specs: Sequence[LeafSpec]) -> list[dict]:
  return [{'path': s.path, 'shape': list(s.shape), 'dtype': s.dtype.name} for s in specs]


def specs_from_meta(leaves: list[dict]) -> list[LeafSpec]:
  return [LeafSpec(x['path'], tuple(x['shape']), np.dtype(x['dtype'])) for x in leaves]


class Engine:
  """The optimizer's state machine. Thread-safe; every public method may block briefly."""

  def __init__(self, config: ServerConfig, devices: Optional[Sequence[jax.Device]] = None,
               checkpointer: Optional[Checkpointer] = None,
               observer: Optional[EngineObserver] = None):
    self.config = config
    self.observer = observer or EngineObserver()
    self._checkpointer = checkpointer
    self._draining = False
    devices = list(devices if devices is not None else jax.local_devices())
    if config.devices:
      if config.devices > len(devices):
        raise ValueError(f'devices={config.devices} but only {len(devices)} are available')
      devices = devices[:config.devices]
    self.mesh = jax.sharding.Mesh(np.array(devices), (MESH_AXIS,), axis_types=(AxisType.Auto,))
    self._schedule, self.schedule_description = make_schedule(config)
    self._cond = threading.Condition()
    self._model: Optional[_Model] = None
    self._model_id = ''
    self._step = 0
    self._contributors: dict[str, PushTicket] = {}
    self._first_push_at: Optional[float] = None
    self._poisoned_by: Optional[str] = None
    self._done: dict[tuple[str, str], tuple[int, PushResult]] = {}
    self._in_flight = 0
    self._in_flight_bytes = 0
    self._waiting = 0  # callers blocked in wait_for_step
    self._allowed = config.worker_allowlist
    self._readers = 0  # open `reading` blocks on the current params
    self._params_version = 0  # bumped whenever the current params are replaced
    self._closed = False
    self.stats = {'steps_applied': 0, 'steps_skipped': 0, 'pushes_accepted': 0}
    self._watchdog = threading.Thread(target=self._straggler_loop, name='straggler', daemon=True)
    self._watchdog.start()
    # Times each update from its dispatch until it is computed, off the step loop.
    self._applied: queue.SimpleQueue = queue.SimpleQueue()
    self._apply_timer = threading.Thread(target=self._time_applies, name='apply-timer',
                                         daemon=True)
    self._apply_timer.start()

  # ------------------------------------------------------------------ queries

  def describe(self) -> Description:
    with self._cond:
      model, step, mid = self._model, self._step, self._model_id
    return Description(model is not None, mid, model.specs if model else (), step,
                       float(self._schedule(step)))

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
      m = self._model
      snap = Snapshot(self._model_id, self._step, m.specs, tuple(m.params))
      version = self._params_version
      self._readers += 1
    try:
      yield snap
    finally:
      with self._cond:
        if version == self._params_version:
          self._readers -= 1

  def _params_replaced_locked(self) -> None:
    """The current params are new arrays: nobody reads them yet."""
    self._params_version += 1
    self._readers = 0

  def trust_ratios(self) -> Optional[np.ndarray]:
    """The per-leaf trust ratios of the last step applied since start (None: none yet)."""
    with self._cond:
      ratios = self._model.trust_ratios if self._model is not None else None
    return None if ratios is None else np.asarray(ratios)

  def wait_for_step(self, step: int, timeout: Optional[float],
                    gone: Optional[Callable[[], bool]] = None) -> tuple[int, bool, str]:
    """Blocks until the model exists and its step is >= `step`, or `timeout` passes.

    `gone`: returns True once the caller no longer waits (its RPC ended); the
    caller then calls `wake()`, so that a cancelled long poll ends at once.
    """
    if step < 0:
      raise InvalidArgument(f'step must be >= 0, got {step}')
    with self._cond:
      self._waiting += 1
      try:
        self._cond.wait_for(
            lambda: self._closed or (gone is not None and gone()) or (
                self._model is not None and self._step >= step), timeout)
      finally:
        self._waiting -= 1
      reached = self._model is not None and self._step >= step
      return self._step, reached, self._model_id

  def wake(self) -> None:
    """Wakes every waiter to re-check its condition."""
    with self._cond:
      self._cond.notify_all()

  # ------------------------------------------------------------------ model

  def initialize(self, specs: Sequence[LeafSpec], host_params: Sequence[np.ndarray]) -> str:
    """Creates the model from host buffers (one per spec); ALREADY_EXISTS if it exists."""
    for s, buf in zip(specs, host_params):
      if s.dtype not in PARAM_DTYPES:
        raise InvalidArgument(f'leaf {s.path}: parameters must be float32, got {s.dtype.name}')
      if not all_finite(buf):
        raise InvalidArgument(f'leaf {s.path} of the initial parameters contains NaN or Inf')
    with self._cond:
      if self._model is not None:
        raise AlreadyExists(f'the model is already initialised (model_id {self._model_id}, '
                            f'step {self._step})')
      model = self._model = _Model.from_host(self.config, self.mesh, specs, host_params)
      self._params_replaced_locked()
      self._model_id = model_id = uuid.uuid4().hex
      self._step = 0
      self._save_locked(force=True)  # the initial params are state too
      log.info('model initialised: %d leaves, %d parameters, model_id %s', len(specs),
               sum(math.prod(s.shape) for s in specs), self._model_id,
               extra=fields(step=0, model_id=self._model_id))
      self._cond.notify_all()
    model.compile_apply()  # outside the lock; a step that comes first compiles it itself
    return model_id

  def _require_model(self) -> _Model:
    if self._model is None:
      raise FailedPrecondition('the model is not initialised: call InitializeModel first '
                               '(or start the server with --init-params)',
                               reason='not_initialized')
    return self._model

  # ------------------------------------------------------------------ pushes

  def begin_push(self, worker_id: str, push_id: str, step: int, num_examples: int,
                 model_id: str, wire_specs: Sequence[LeafSpec], timeout: float
                 ) -> PushTicket | PushResult:
    """Checks a push's header and admits it; a PushResult means a duplicate (answer it)."""
    if not worker_id:
      raise InvalidArgument('header.worker_id is empty')
    if not WORKER_ID.fullmatch(worker_id):
      raise InvalidArgument(f'header.worker_id {worker_id[:140]!r} is not a valid worker id '
                            f'({WORKER_ID_RULE})')
    if self._allowed is not None and worker_id not in self._allowed:
      raise PermissionDenied(f'worker {worker_id} is not one of the allowed workers '
                             f'(allowed_workers)', reason='unknown_worker')
    if len(push_id) > 128:
      raise InvalidArgument(f'header.push_id has {len(push_id)} characters, over 128')
    if step < 0:
      raise InvalidArgument(f'header.step must be >= 0, got {step}')
    if num_examples <= 0:
      raise InvalidArgument(f'header.num_examples must be > 0, got {num_examples}')
    with self._cond:
      if self._draining:
        raise Unavailable('the server is shutting down; retry against its successor',
                          reason='shutting_down')
      model = self._require_model()
      if model_id and model_id != self._model_id:
        raise FailedPrecondition(f'header.model_id {model_id} is not the server\'s model '
                                 f'{self._model_id}: pull the parameters again',
                                 reason='wrong_model')
      done = self._done.get((worker_id, push_id)) if push_id else None
      if done is not None:
        return dataclasses.replace(done[1], current_step=self._step, duplicate=True)
      self._check_leaves(model, wire_specs)
      self._check_step(worker_id, step)
      nbytes = sum(s.nbytes for s in wire_specs)
      self._admit_locked(nbytes, timeout)
      buffers = model.take_buffers(wire_specs)
    return PushTicket(worker_id, push_id, step, num_examples, tuple(wire_specs), nbytes, buffers,
                      model.wire_views(buffers))

  def _held_locked(self) -> int:
    """Gradient buffers held: one per push being received, one for the step's sum."""
    return self._in_flight + (self._model is not None and self._model.acc is not None)

  def _admit_locked(self, nbytes: int, timeout: float) -> None:
    """Waits for room for a push of `nbytes`: a buffer of max_inflight_pushes, and bytes.

    The step's sum holds one of the max_inflight_pushes buffers from its first
    push until the step is applied (config validation keeps one for pushes).
    """
    cfg = self.config
    max_bytes = cfg.max_inflight_bytes
    if max_bytes and nbytes > max_bytes:
      raise ResourceExhausted(f'the push has {nbytes} bytes, over max_inflight_bytes '
                              f'{max_bytes}', reason='too_large')

    def room():
      return self._draining or (self._held_locked() < cfg.max_inflight_pushes and (
          not max_bytes or self._in_flight_bytes + nbytes <= max_bytes))
    if not self._cond.wait_for(room, timeout):
      summing = self._model is not None and self._model.acc is not None
      beside = " beside the step's sum" if summing else ''
      raise ResourceExhausted(
          f'{self._in_flight} pushes ({self._in_flight_bytes} bytes) are already in flight'
          f'{beside} (max_inflight_pushes {cfg.max_inflight_pushes}, max_inflight_bytes '
          f'{max_bytes or "unbounded"}); retry later', reason='busy')
    if self._draining:
      raise Unavailable('the server is shutting down; retry against its successor',
                        reason='shutting_down')
    self._in_flight += 1
    self._in_flight_bytes += nbytes

  def release(self, ticket: PushTicket) -> None:
    """Frees the ticket's slot unless its push committed (call it whatever happened)."""
    with self._cond:
      self._release_locked(ticket)

  def _release_locked(self, ticket: PushTicket) -> None:
    if not ticket._released:
      ticket._released = True
      if ticket.buffers and self._model is not None:  # not committed: keep them for reuse
        self._model.pool.give(ticket.buffers)
      ticket.buffers, ticket.views = [], []
      self._in_flight -= 1
      self._in_flight_bytes -= ticket.nbytes
      self._cond.notify_all()

  @property
  def pushes_in_flight(self) -> int:
    """Pushes admitted and not yet committed or dropped (each holds a staging buffer)."""
    with self._cond:
      return self._in_flight

  @property
  def waiting(self) -> int:
    """Callers blocked in `wait_for_step` (long polls)."""
    with self._cond:
      return self._waiting

  @property
  def inflight_bytes(self) -> int:
    """Bytes (in their wire dtypes) of the pushes in flight."""
    with self._cond:
      return self._in_flight_bytes

  def _check_leaves(self, model: _Model, wire_specs: Sequence[LeafSpec]) -> None:
    got = {s.path: s for s in wire_specs}
    for want in model.specs:
      if want.path not in got:
        raise InvalidArgument(f'header.leaves: leaf {want.path} is missing')
    for i, s in enumerate(wire_specs):
      j = model.paths.get(s.path)
      if j is None:
        raise InvalidArgument(f'header.leaves: unknown leaf {s.path}')
      if j != i:
        raise InvalidArgument(f'header.leaves: leaf {s.path} is at position {i}, expected {j} '
                              f'(the parameters\' order)')
      if s.shape != model.specs[j].shape:
        raise InvalidArgument(f'header.leaves: leaf {s.path} has shape {list(s.shape)}, '
                              f'expected {list(model.specs[j].shape)}')

  def _check_step(self, worker_id: str, step: int) -> None:
    current = self._step
    if step > current:
      raise FailedPrecondition(f'header.step {step} is ahead of the server\'s current step '
                               f'{current}', reason='future_step')
    if self.config.step_mode == 'sync':
      if step < current:
        raise Aborted(f'step {step} was already applied; the current step is {current}: pull '
                      f'the parameters and push gradients for step {current}',
                      reason='stale_step')
      if worker_id in self._contributors:
        raise AlreadyExists(f'worker {worker_id} already pushed for step {current} (with '
                            f'push_id {self._contributors[worker_id].push_id!r})',
                            reason='worker_already_pushed')
    elif current - step > self.config.staleness_bound:
      raise Aborted(f'gradients of step {step} are too stale: the current step is {current} and '
                    f'the staleness bound is {self.config.staleness_bound}', reason='stale_step')

  def check_finite(self, ticket: PushTicket, spec: LeafSpec, buffer: np.ndarray) -> None:
    """Called as each leaf of a push completes: NaN/Inf rejects the push or marks it."""
    if all_finite(buffer):
      return
    if self.config.nonfinite == 'reject':
      raise InvalidArgument(f'leaf {spec.path} of worker {ticket.worker_id}\'s push for step '
                            f'{ticket.step} contains NaN or Inf', reason='nonfinite',
                            leaf=spec.path)
    ticket.nonfinite_leaf = ticket.nonfinite_leaf or spec.path

  def commit_push(self, ticket: PushTicket) -> PushResult:
    """Adds a complete, checked push to the step; applies the step when it is complete.

    Consumes the ticket's buffers (filled through `ticket.views`, or `ticket.fill`):
    the accumulator may adopt or scale them in place, and the ticket's lists are
    emptied so that no caller's reference keeps a consumed push's memory alive.
    """
    with self._cond:
      model = self._require_model()
      if ticket.push_id and (ticket.worker_id, ticket.push_id) in self._done:
        done = self._done[(ticket.worker_id, ticket.push_id)][1]
        return dataclasses.replace(done, current_step=self._step, duplicate=True)
      self._check_step(ticket.worker_id, ticket.step)  # the step may have moved meanwhile
      if ticket.nonfinite_leaf is not None:
        self._poisoned_by = self._poisoned_by or (
            f'leaf {ticket.nonfinite_leaf} of worker {ticket.worker_id}')
      model.add_push(ticket.buffers, ticket.num_examples)
      self._release_locked(ticket)  # its buffers are the sum's now, or back in the pool
      self._contributors[ticket.worker_id] = ticket
      self.stats['pushes_accepted'] += 1
      if self._first_push_at is None:
        self._first_push_at = time.monotonic()
      accepted = self._step
      applied = False
      if self.config.step_mode == 'async' or len(self._contributors) >= self.config.num_workers:
        self._apply_locked()
        applied = True
      result = PushResult(accepted, applied, self._step)
      if ticket.push_id:
        self._done[(ticket.worker_id, ticket.push_id)] = (accepted, result)
      return result

  def _apply_locked(self) -> None:
    model = self._model
    if self._poisoned_by is not None:
      log.warning('step %d skipped: NaN/Inf in %s', self._step, self._poisoned_by,
                  extra=fields(step=self._step, reason='nonfinite'))
      model.discard_acc()
      self.stats['steps_skipped'] += 1
    else:
      t0 = time.monotonic()
      inv_weight = jnp.float32(1.0 / model.weight)
      apply = model.apply_keeping_params if self._readers else model.apply
      model.params, model.opt_state, model.trust_ratios = apply(
          model.params, model.opt_state, model.take_acc(), inv_weight)
      model.retire_acc((model.trust_ratios,))
      self._params_replaced_locked()
      self._applied.put((self._step, t0, model.trust_ratios))
      self.stats['steps_applied'] += 1
    self._step += 1
    self._contributors.clear()
    self._first_push_at = None
    self._poisoned_by = None
    horizon = self._step - self.config.staleness_bound - 2
    self._done = {k: v for k, v in self._done.items() if v[0] >= horizon}
    self._save_locked(force=False)
    self._cond.notify_all()

  def _straggler_loop(self) -> None:
    """Applies a sync step once the straggler timeout passed with a quorum of pushes."""
    cfg = self.config
    if cfg.step_mode != 'sync' or cfg.straggler_timeout_s <= 0:
      return
    with self._cond:
      while not self._closed:
        if self._first_push_at is None:
          self._cond.wait(1.0)
          continue
        due = self._first_push_at + cfg.straggler_timeout_s
        now = time.monotonic()
        if now < due:
          self._cond.wait(due - now)
        elif len(self._contributors) >= cfg.effective_quorum:
          log.warning('step %d applied with %d of %d workers after the %.1fs straggler timeout',
                      self._step, len(self._contributors), cfg.num_workers,
                      cfg.straggler_timeout_s, extra=fields(step=self._step, reason='straggler'))
          self._apply_locked()
        else:
          self._cond.wait(1.0)

  def _time_applies(self) -> None:
    while True:
      item = self._applied.get()
      if item is None:
        return
      step, t0, marker = item
      try:
        marker.block_until_ready()
      except Exception:  # pylint: disable=broad-except
        continue  # never computed (e.g. the process is exiting)
      self.observer.step_applied(step, time.monotonic() - t0)

  # ------------------------------------------------------------------ checkpoints

  def _meta(self) -> dict:
    cfg = self.config
    return {'leaves': specs_to_meta(self._model.specs),
            'hyperparameters': {k: getattr(cfg, k) for k in (
                'learning_rate', 'schedule', 'warmup_steps', 'decay_steps', 'end_learning_rate',
                'b1', 'b2', 'eps', 'eps_root', 'weight_decay', 'max_grad_norm')}}

  def _save_locked(self, force: bool) -> bool:
    if self._checkpointer is None or self._model is None:
      return False
    t0 = time.monotonic()
    saved = self._checkpointer.save(self._step, self._model.state(), self._meta(), force=force)
    if saved:
      blocked = time.monotonic() - t0
      self.stats['checkpoint_blocking_s'] = blocked
      log.info('checkpoint of step %d started (step loop blocked %.3fs)', self._step, blocked,
               extra=fields(step=self._step, seconds=round(blocked, 4)))
      self.observer.checkpoint_started(self._step, blocked)
      threading.Thread(target=self._await_save, args=(self._step, t0), daemon=True,
                       name=f'checkpoint-{self._step}').start()
    return saved

  def _await_save(self, step: int, t0: float) -> None:
    """Reports the save of `step` once it is on disk (asynchronous saves finish later)."""
    try:
      while self._checkpointer.is_saving():
        time.sleep(0.02)
    except Exception:  # pylint: disable=broad-except
      return  # the checkpointer was closed meanwhile
    self.observer.checkpoint_saved(step, time.monotonic() - t0)

  def restore(self) -> bool:
    """Restores the newest readable checkpoint onto this mesh; False if there is none."""
    if self._checkpointer is None:
      return False

    def target_for(meta):
      specs = specs_from_meta(meta['leaves'])
      return _Model(self.config, self.mesh, specs).abstract_state()

    found = self._checkpointer.restore_latest(target_for)
    if found is None:
      return False
    step, state, meta = found
    with self._cond:
      model = _Model(self.config, self.mesh, specs_from_meta(meta['leaves']))
      model.params, model.opt_state = list(state['params']), state['opt_state']
      self._model, self._step, self._model_id = model, step, uuid.uuid4().hex
      self._params_replaced_locked()
      self._cond.notify_all()
    log.info('restored step %d from %s (%d leaves), model_id %s', step,
             self._checkpointer.path(step), len(model.specs), self._model_id,
             extra=fields(step=step, model_id=self._model_id))
    model.compile_apply()
    return True

  def check_same_model(self, specs: Sequence[LeafSpec]) -> None:
    """Raises IncompatibleCheckpoint if `specs` are not the restored model's leaves."""
    have = {s.path: s for s in self._model.specs}
    for s in specs:
      if s.path not in have:
        raise IncompatibleCheckpoint(f'the checkpoint has no leaf {s.path}')
      if have[s.path].shape != s.shape:
        raise IncompatibleCheckpoint(f'leaf {s.path} has shape {list(have[s.path].shape)} in '
                                     f'the checkpoint, {list(s.shape)} here')
    extra = set(have) - {s.path for s in specs}
    if extra:
      raise IncompatibleCheckpoint(f'the checkpoint has leaf {sorted(extra)[0]} that is not here')

  def save_now(self, wait: bool) -> tuple[int, str]:
    """Checkpoints the current step now (unless it is already saved)."""
    if self._checkpointer is None:
      raise FailedPrecondition('the server has no --checkpoint-dir')
    with self._cond:
      self._require_model()
      self._save_locked(force=True)
      step = self._step
    if wait:
      self._checkpointer.wait()
    return step, self._checkpointer.path(step)

  def list_checkpoints(self) -> list[CheckpointInfo]:
    if self._checkpointer is None:
      raise FailedPrecondition('the server has no --checkpoint-dir')
    return self._checkpointer.list()

  def shutdown(self, grace: float) -> None:
    """Stops admitting pushes, lets those in flight finish (up to `grace` s), saves, waits."""
    with self._cond:
      self._draining = True
      self._cond.wait_for(lambda: self._in_flight == 0, grace)
      if self._in_flight:
        log.warning('%d pushes still in flight after %.1fs; not waiting for them',
                    self._in_flight, grace)
      saved = self._save_locked(force=True)
    if self._checkpointer is not None:
      self._checkpointer.wait()
      if saved or self._model is not None:
        log.info('final checkpoint of step %d written', self._step,
                 extra=fields(step=self._step))
    self.close()

  def close(self) -> None:
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._applied.put(None)
    if self._checkpointer is not None:
      self._checkpointer.close()
