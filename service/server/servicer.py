"""The servicer of lamb_sharded.v1.OptimizerService: a thin layer over the engine.

Each RPC is three moves: decode the request into domain values, one call into
the core (`service.core.engine.Engine`), encode the answer -- and the core's
errors become gRPC status codes. A push is one session object from the engine
(`open_push`), a pull one generator (`pull`). The servicer counts and logs
what it answers (metrics); the server's assembly (ports, credentials,
interceptors, health, reflection) is in `service.server.app`.

It serves on `grpc.aio`: an RPC that waits (a long poll, a push waiting for
room) is a coroutine and holds no thread, so a fleet of workers waiting for a
step costs memory, not threads. What may block -- the engine's calls, copying
a large push's chunks, encoding a pull -- runs on a bounded pool
(`offload.Lane`), so one large message never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Mapping, Optional, Sequence

import grpc

from service.core import optimizer
from service.core.engine import Engine
from service.core.pull import NOT_READY, PullHeader
from service.core.push import PushSession
from service.errors import (AlreadyExists, InvalidArgument, PermissionDenied, ResourceExhausted,
                            ServiceError)
from service.logs import fields
from service.protocol import SERVICE_NAME, ids, pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.protocol.chunks import ChunkReceiver, clamp_chunk_bytes, chunk_parser
from service.protocol.dtypes import numpy_dtype
from service.protocol.specs import specs_from_proto
from service.protocol.types import PushHeader, PushResult
from service.server import auth, offload
from service.server.limits import StreamLimits
from service.server.metrics import Metrics

log = logging.getLogger(__name__)

_CUT_OFF = ('idle', 'stream_too_long', 'too_slow')  # reasons a stream's limits cut it off
# A leaf of at most this many bytes is checked for NaN/Inf on the event loop.
_INLINE_BYTES = 256 << 10


class _Unparsable:
  """What a request that is not a valid protobuf message deserialises to (see `_lenient`)."""

  def __init__(self, message_type: str, size: int, error: Exception):
    self.description = (f'a message of {size} bytes that does not parse as {message_type} '
                        f'({type(error).__name__})')


def _lenient(parse, message_class):
  """`parse` (bytes -> a `message_class`), turning bytes that do not parse into an `_Unparsable`.

  gRPC answers a deserializer's exception with INTERNAL; this way the handler
  answers INVALID_ARGUMENT, naming the message, as for any other bad input.
  """
  def deserialize(data: bytes):
    try:
      return parse(data)
    except Exception as e:  # pylint: disable=broad-except  # DecodeError, RuntimeWarning...
      return _Unparsable(message_class.DESCRIPTOR.name, len(data), e)
  return deserialize


def _parsed(request, what: str):
  """`request`, or InvalidArgument if it did not parse."""
  if isinstance(request, _Unparsable):
    raise InvalidArgument(f'{what}: {request.description}', reason='unparsable')
  return request


_HANDLER_KINDS = {  # (client streaming, server streaming) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(servicer: pb_grpc.OptimizerServiceServicer, server: grpc.Server) -> None:
  """pb_grpc.add_OptimizerServiceServicer_to_server, with our own request parsers.

  Requests with a `chunk` field (InitializeModel, PushGradients) are parsed by
  `service.protocol.chunks.chunk_parser`, which leaves each chunk's data in the
  received bytes instead of copying it twice; every other one by protobuf. All
  are `_lenient`: bytes that do not parse reach the handler as an `_Unparsable`.
  Responses a handler yields already serialized (PullParameters' chunks) are
  passed on as they are.
  """
  handlers = {}
  for method in pb.DESCRIPTOR.services_by_name['OptimizerService'].methods:
    request = getattr(pb, method.input_type.name)
    response = getattr(pb, method.output_type.name)
    parse = (chunk_parser(request) if 'chunk' in request.DESCRIPTOR.fields_by_name
             else request.FromString)
    handlers[method.name] = _HANDLER_KINDS[method.client_streaming, method.server_streaming](
        getattr(servicer, method.name), request_deserializer=_lenient(parse, request),
        response_serializer=_passing_bytes)
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
  server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _passing_bytes(message) -> bytes:
  """A response serializer for handlers that yield messages or already-serialized bytes."""
  return message if isinstance(message, bytes) else message.SerializeToString()


async def _read_stream(limits: StreamLimits, context, what: str):
  """Splits a header/chunks/commit stream: returns (header, async chunk iterator, commit
  holder). Every read is bounded by the stream's limits."""
  first = await limits.read(context)
  if first is None:
    raise InvalidArgument(f'{what}: empty stream (expected a header first)')
  first = _parsed(first, f'{what}: message 1')
  if first.WhichOneof('kind') != 'header':
    raise InvalidArgument(f'{what}: the first message must be a header, got '
                          f'{first.WhichOneof("kind") or "an empty message"}')
  commit: list = []

  async def chunks():
    i = 1
    while (msg := await limits.read(context)) is not None:
      i += 1
      kind = _parsed(msg, f'{what}: message {i}').WhichOneof('kind')
      if commit:
        raise InvalidArgument(f'{what}: a message ({kind}) after the commit')
      if kind == 'chunk':
        yield msg.chunk
      elif kind == 'commit':
        commit.append(msg.commit)
      else:
        raise InvalidArgument(f'{what}: unexpected message kind {kind or "(empty)"} after the '
                              f'header')
  return first.header, chunks(), commit


async def _abort(context: grpc.aio.ServicerContext, err: ServiceError):
  await context.abort(getattr(grpc.StatusCode, err.code), str(err))


class OptimizerServicer(pb_grpc.OptimizerServiceServicer):
  """lamb_sharded.v1.OptimizerService over an Engine, for a `grpc.aio` server.

  Made on the server's event loop. Waits (long polls, a push waiting for room)
  hold no thread; engine calls and byte work run on `pool` (`offload.Lane`).
  """

  def __init__(self, engine: Engine, pool: concurrent.futures.Executor,
               metrics: Optional[Metrics] = None, endpoints: Sequence[str] = (),
               bindings: Optional[Mapping[str, frozenset]] = None):
    """`endpoints`: of a multi-process server, every process's HOST:PORT, by index;
    `bindings`: bearer token -> the only worker ids it may push as."""
    self._engine = engine
    self._bindings = dict(bindings or {})
    self._pool = pool
    self._endpoints = tuple(endpoints)
    self._metrics = metrics or Metrics()
    cfg = engine.config
    self._idle_s, self._max_s = cfg.stream_idle_timeout_s, cfg.max_stream_seconds
    self._watch = offload.EngineWatch(engine, asyncio.get_running_loop())
    # Pushes trying for room at once: a fleet's pushes queue here (FIFO, no thread), and
    # only these few retry when room is freed.
    self._trying = asyncio.Semaphore(max(1, cfg.max_inflight_pushes))
    job = engine.job
    self._follower = job is not None and not job.leader

  def _lane(self) -> offload.Lane:
    return offload.Lane(self._pool)

  def _limits(self, what: str) -> StreamLimits:
    return StreamLimits(what, self._idle_s, self._max_s)

  async def DescribeModel(self, request, context):
    if isinstance(request, _Unparsable):
      await _abort(context, InvalidArgument(f'DescribeModel: {request.description}'))
    d, seen = await self._lane().run(lambda: (self._engine.describe(),
                                              self._engine.workers_seen()))
    cfg = self._engine.config
    return pb.DescribeModelResponse(
        initialized=d.initialized, model_id=d.model_id,
        leaves=[s.to_proto() for s in d.leaves], step=d.step,
        step_mode=(pb.STEP_MODE_SYNCHRONOUS if cfg.step_mode == 'sync'
                   else pb.STEP_MODE_ASYNCHRONOUS),
        num_workers=cfg.num_workers, quorum=cfg.effective_quorum,
        staleness_bound=cfg.staleness_bound, ordered_sum=cfg.ordered_sum,
        hyperparameters=pb.LambHyperparameters(
            learning_rate_schedule=self._engine.schedule_description,
            learning_rate=d.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            eps_root=cfg.eps_root, weight_decay=cfg.weight_decay,
            exclude_from_weight_decay=cfg.exclude_from_weight_decay or (),
            exclude_from_layer_adaptation=cfg.exclude_from_layer_adaptation or (),
            leaves_without_weight_decay=_selected(cfg, 'exclude_from_weight_decay', d.leaves),
            leaves_without_layer_adaptation=_selected(cfg, 'exclude_from_layer_adaptation',
                                                      d.leaves),
            optimizer=cfg.optimizer, momentum=cfg.momentum if cfg.optimizer == 'nesterov'
            else 0.0, moments=cfg.moments),
        processes=[pb.ServerProcess(index=i, endpoint=e) for i, e in enumerate(self._endpoints)],
        placements=[_placement(s.path, p) for s, p in zip(d.leaves, d.placements)],
        workers=[pb.WorkerSeen(worker_id=w, last_step=step, seconds_ago=ago)
                 for w, step, ago in seen])

  async def InitializeModel(self, request_iterator, context):
    del request_iterator  # read through `context`, with limits
    limits = self._limits('InitializeModel')
    lane = self._lane()
    try:
      position = self._watch.position
      if position.initialized:  # refuse before reading the stream (the engine checks again)
        raise AlreadyExists(f'the model is already initialised (model_id {position.model_id}, '
                            f'step {position.step})')
      header, chunks, commit = await _read_stream(limits, context, 'InitializeModel')
      specs = specs_from_proto(header.leaves, 'header.leaves')
      if not specs:
        raise InvalidArgument('header.leaves is empty')
      limits.expect(sum(s.nbytes for s in specs), self._engine.config.min_push_bytes_per_second)
      session = await lane.open(self._engine.open_init, specs, header.init_id)
      try:
        receiver = ChunkReceiver(specs, 'InitializeModel', session.sink)
        try:
          async for chunk in chunks:
            await lane.run(receiver.add, chunk)
        finally:
          self._metrics.received_bytes.labels('InitializeModel').inc(receiver.total_bytes)
        await lane.run(receiver.finish, commit[0] if commit else None)
        model_id = await lane.run(session.commit)
      finally:
        lane.then(session.close)  # after a call still running, if the RPC was cancelled
      return pb.InitializeModelResponse(model_id=model_id, step=0)
    except ServiceError as e:
      if e.reason in _CUT_OFF:
        self._metrics.streams_cut_off.labels('InitializeModel', e.reason).inc()
      # Several workers started with --init (the Kubernetes pattern): all but the first
      # find a model, the normal case, not a warning.
      level = logging.INFO if isinstance(e, AlreadyExists) else logging.WARNING
      log.log(level, 'InitializeModel refused: %s', e,
              extra=fields(rpc='InitializeModel', code=e.code, reason=e.reason, leaf=e.leaf))
      await _abort(context, e)

  async def PushGradients(self, request_iterator, context):
    del request_iterator  # read through `context`, with limits
    t0 = time.monotonic()
    header, session, error = None, None, None
    limits = self._limits('PushGradients')
    lane = self._lane()
    try:
      message, chunks, commit = await _read_stream(limits, context, 'PushGradients')
      header = _push_header(message)
      limits.what = header.what
      bound = auth.bound_workers(context.invocation_metadata(), self._bindings)
      if bound is not None and header.worker_id not in bound:
        raise PermissionDenied(
            f'this token may push as {", ".join(sorted(bound)[:5])}'
            f'{" ..." if len(bound) > 5 else ""} only, not as worker {header.worker_id}',
            reason='worker_not_bound')
      limits.expect(header.nbytes, self._engine.config.min_push_bytes_per_second)
      session = await self._open_push(header, lane)
      if not session.answered:
        # A chunk is copied into its buffer on the loop as it arrives (at most 4 MiB: a
        # hop to a thread per chunk cost more, in the GIL's hand-offs, than the copy); the
        # chunk that completes a leaf of a large push goes to the pool, as the leaf's
        # NaN/Inf check then reads the whole leaf.
        big = {s.path: s.nbytes for s in header.leaves if s.nbytes > _INLINE_BYTES}
        async for chunk in chunks:
          if chunk.path in big and chunk.offset + len(chunk.data) >= big[chunk.path]:
            await lane.run(session.write, chunk)
          else:
            session.write(chunk)
        await lane.run(session.commit, commit[0] if commit else None)
        self._metrics.push_seconds.observe(time.monotonic() - t0)
      result = session.result
      if result.duplicate:  # a retry of an answered push: answered again, not counted
        self._metrics.pushes_duplicate.inc()
      else:
        self._metrics.local_steps.inc(header.local_steps)
      log.debug('push accepted (step %s)', 'applied' if result.applied else 'pending',
                extra=fields(step=header.step, worker=header.worker_id,
                             push_id=header.push_id or None))
      return _push_response(result)
    except ServiceError as e:
      error = e
      self._push_refused(e, header)
      await _abort(context, e)
    except asyncio.CancelledError as e:  # the client went away mid-stream
      error = e
      self._push_refused(None, header)
      raise
    finally:
      if session is not None:
        self._metrics.received_bytes.labels('PushGradients').inc(session.received_bytes)
        closed = lane.then(session.close, error)  # after a write still running, if any
        if not isinstance(error, asyncio.CancelledError):
          await asyncio.shield(closed)

  async def _open_push(self, header: PushHeader, lane: offload.Lane) -> PushSession:
    """Admits a push, waiting (without a thread) up to admission_timeout_s for room.

    A few pushes at a time try (`_trying`); the others queue for their turn. A
    follower of a multi-process job does not queue: it polls for process 0's
    admission of the push, which frees its room in the order process 0 chose.
    """
    deadline = time.monotonic() + self._engine.config.admission_timeout_s
    delay = 0.005
    async with contextlib.nullcontext() if self._follower else self._trying:
      while True:
        changed = self._watch.changed()
        try:
          return await lane.open(self._engine.open_push, header, 0)
        except ResourceExhausted as e:
          left = deadline - time.monotonic()
          if e.reason != 'busy' or left <= 0:
            raise
        await offload.wait_changed(changed, min(left, delay if self._follower else 1.0))
        delay = min(delay * 2, 0.2)

  def _push_refused(self, e: Optional[ServiceError], header: Optional[PushHeader]) -> None:
    """Counts and logs a push that was not accepted (e None: cancelled by the client)."""
    reason = e.reason if e is not None else 'cancelled'
    self._metrics.pushes_rejected.labels(reason).inc()
    if reason in _CUT_OFF:
      self._metrics.streams_cut_off.labels('PushGradients', reason).inc()
    worker = header.worker_id if header is not None else None
    step = header.step if header is not None else None
    log.log(logging.INFO if e is None else logging.WARNING, 'push refused: %s',
            e if e is not None else 'the client cancelled it; its data was discarded',
            extra=fields(step=step, worker=worker or None, leaf=getattr(e, 'leaf', None),
                         reason=reason, code=e.code if e is not None else 'CANCELLED'))

  async def PullParameters(self, request, context):
    t0 = time.monotonic()
    limits = self._limits('PullParameters')
    lane = self._lane()
    stream = None
    try:
      request = _parsed(request, 'PullParameters')
      dtype = None if request.dtype == 0 else numpy_dtype(request.dtype, 'request.dtype')
      ids.check_id(request.if_model_id, 'request.if_model_id', ids.MODEL_ID_MAX)
      stream = self._engine.pull(
          dtype, newer_than=(request.if_newer_than_step
                             if request.HasField('if_newer_than_step') else None),
          model_id=request.if_model_id, chunk_bytes=clamp_chunk_bytes(request.max_chunk_bytes))
      header = await lane.run(next, stream)  # takes the engine's lock
      await limits.write(context, _pull_header(header))
      while True:
        # A lone puller encodes its next message here, between sends (a hop to a thread
        # per message cost more, in the GIL's hand-offs, than encoding it: pulls ran at
        # 0.6-0.7 of raw gRPC so, 0.8 so); one waiting for a shared encoding waits on the pool.
        try:
          message = stream.poll()
        except StopIteration:
          break
        if message is NOT_READY:
          message = await lane.run(next, stream, None)
        if message is None:
          break
        await limits.write(context, message)  # already serialized, each chunk's data copied once
      self._metrics.sent_bytes.labels('PullParameters').inc(sum(s.nbytes for s in header.leaves))
      self._metrics.pull_seconds.observe(time.monotonic() - t0)
    except ServiceError as e:
      if e.reason in ('idle', 'stream_too_long'):  # the client stopped reading, or too slowly
        self._pull_cut_off(e.reason, time.monotonic() - t0)
        await context.abort(grpc.StatusCode.CANCELLED, str(e))
      else:
        await _abort(context, e)
    finally:
      if stream is not None:
        lane.then(stream.close)  # the step's params are held until then

  def _pull_cut_off(self, reason: str, seconds: float) -> None:
    self._metrics.streams_cut_off.labels('PullParameters', reason).inc()
    log.warning('pull cut off after %.1fs: %s', seconds,
                'the client stopped reading' if reason == 'idle' else 'open too long',
                extra=fields(rpc='PullParameters', reason=reason))

  async def SaveCheckpoint(self, request, context):
    try:
      request = _parsed(request, 'SaveCheckpoint')
      step, path = await self._lane().run(self._engine.save_now, request.wait)
      return pb.SaveCheckpointResponse(step=step, path=path)
    except ServiceError as e:
      await _abort(context, e)

  async def ListCheckpoints(self, request, context):
    try:
      _parsed(request, 'ListCheckpoints')
      checkpoints = await self._lane().run(self._engine.list_checkpoints)
      return pb.ListCheckpointsResponse(checkpoints=[
          pb.CheckpointInfo(step=c.step, path=c.path, complete=c.complete,
                            size_bytes=c.size_bytes)
          for c in checkpoints])
    except ServiceError as e:
      await _abort(context, e)

  async def WaitForStep(self, request, context):
    """A long poll: an `await` on the engine's position, no thread held."""
    try:
      request = _parsed(request, 'WaitForStep')
      if request.step < 0:
        raise InvalidArgument(f'step must be >= 0, got {request.step}')
      timeout = min(context.time_remaining() or self._max_s, self._max_s)
      asked = _duration_seconds(request.timeout, 'timeout') if request.HasField('timeout') else 0
      if asked > 0:
        timeout = min(asked, timeout)
      with self._engine.waiter():
        p = await self._watch.wait_for_step(request.step, timeout, request.model_id)
      p.require_model(request.model_id)
      return pb.WaitForStepResponse(current_step=p.step, model_id=p.model_id,
                                    reached=p.initialized and p.step >= request.step)
    except ServiceError as e:
      await _abort(context, e)


# google.protobuf.Duration's range: +-10,000 years (its documentation).
_MAX_DURATION_SECONDS = 315_576_000_000


def _duration_seconds(d, name: str) -> float:
  """A request's Duration field `name` as seconds >= 0; InvalidArgument if it is not one.

  Not `ToTimedelta()`: it raises OverflowError (gRPC would answer UNKNOWN) for seconds
  beyond timedelta's range, and accepts nanos of the wrong sign.
  """
  if not 0 <= d.seconds <= _MAX_DURATION_SECONDS or not 0 <= d.nanos < 1_000_000_000:
    raise InvalidArgument(f'{name} must be a Duration >= 0 with seconds in [0, '
                          f'{_MAX_DURATION_SECONDS}] and nanos in [0, 999999999], got '
                          f'seconds={d.seconds} nanos={d.nanos}')
  return d.seconds + d.nanos / 1e9


def _selected(config, name: str, leaves) -> list[str]:
  """The paths of `leaves` that setting `name` (exclude_from_*) selects."""
  paths = [s.path for s in leaves]
  return [p for p, e in zip(paths, optimizer.excluded(config, name, paths)) if e]


def _push_header(message: pb.PushGradientsHeader) -> PushHeader:
  """The domain header of a push's first message."""
  return PushHeader(message.worker_id, message.push_id, message.step, message.num_examples,
                    message.model_id,
                    tuple(specs_from_proto(message.leaves, 'header.leaves', encoded_ok=True)),
                    local_steps=message.local_steps or 1)


def _push_response(r: PushResult) -> pb.PushGradientsResponse:
  return pb.PushGradientsResponse(accepted_step=r.accepted_step, applied=r.applied,
                                  current_step=r.current_step, duplicate=r.duplicate,
                                  model_id=r.model_id)


def _placement(path: str, placement) -> pb.LeafPlacement:
  if placement is None:
    return pb.LeafPlacement(path=path)
  dim, starts = placement
  return pb.LeafPlacement(path=path, split_dim=dim, starts=starts)


def _pull_header(h: PullHeader) -> pb.PullParametersResponse:
  return pb.PullParametersResponse(header=pb.PullParametersHeader(
      model_id=h.model_id, step=h.step, not_modified=h.not_modified,
      leaves=[s.to_proto() for s in h.leaves]))
