"""The servicer of lamb_sharded.v1.OptimizerService: a thin layer over the engine.

Each RPC is three moves: decode the request into domain values, one call into
the core (`service.core.engine.Engine`), encode the answer -- and the core's
errors become gRPC status codes. A push is one session object from the engine
(`open_push`), a pull one generator (`pull`). The servicer counts and logs
what it answers (metrics); the server's assembly (ports, credentials,
interceptors, health, reflection) is in `service.server.app`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Optional, Sequence

import grpc

from service.core.engine import Engine, PullHeader
from service.errors import AlreadyExists, InvalidArgument, ServiceError
from service.logs import fields
from service.protocol import SERVICE_NAME, pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.protocol.chunks import ChunkReceiver, clamp_chunk_bytes, chunk_parser
from service.protocol.dtypes import numpy_dtype
from service.protocol.specs import specs_from_proto
from service.protocol.types import PushHeader, PushResult
from service.server import limits
from service.server.metrics import Metrics

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, err: ServiceError):
  context.abort(getattr(grpc.StatusCode, err.code), str(err))


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


def _read_stream(requests: Iterator, what: str):
  """Splits a header/chunks/commit stream: returns (header, chunk iterator, commit holder)."""
  try:
    first = _parsed(next(requests), f'{what}: message 1')
  except StopIteration:
    raise InvalidArgument(f'{what}: empty stream (expected a header first)') from None
  if first.WhichOneof('kind') != 'header':
    raise InvalidArgument(f'{what}: the first message must be a header, got '
                          f'{first.WhichOneof("kind") or "an empty message"}')
  commit: list = []

  def chunks():
    for i, msg in enumerate(requests, start=2):
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


class OptimizerServicer(pb_grpc.OptimizerServiceServicer):
  """lamb_sharded.v1.OptimizerService over an Engine."""

  def __init__(self, engine: Engine, metrics: Optional[Metrics] = None,
               endpoints: Sequence[str] = ()):
    """`endpoints`: of a multi-process server, every process's HOST:PORT, by index."""
    self._engine = engine
    self._endpoints = tuple(endpoints)
    self._metrics = metrics or Metrics()
    cfg = engine.config
    self._idle_s, self._max_s = cfg.stream_idle_timeout_s, cfg.max_stream_seconds
    self._pulls = limits.PullWatch(self._idle_s, self._max_s, self._pull_cut_off)

  def close(self) -> None:
    self._pulls.close()

  def _reader(self, request_iterator, what: str) -> limits.StreamReader:
    return limits.StreamReader(request_iterator, what, self._idle_s,
                                time.monotonic() + self._max_s)

  def _pull_cut_off(self, reason: str, seconds: float) -> None:
    self._metrics.streams_cut_off.labels('PullParameters', reason).inc()
    log.warning('pull cut off after %.1fs: %s', seconds,
                'the client stopped reading' if reason == 'idle' else 'open too long',
                extra=fields(rpc='PullParameters', reason=reason))

  def DescribeModel(self, request, context):
    if isinstance(request, _Unparsable):
      _abort(context, InvalidArgument(f'DescribeModel: {request.description}'))
    d = self._engine.describe()
    cfg = self._engine.config
    return pb.DescribeModelResponse(
        initialized=d.initialized, model_id=d.model_id,
        leaves=[s.to_proto() for s in d.leaves], step=d.step,
        step_mode=(pb.STEP_MODE_SYNCHRONOUS if cfg.step_mode == 'sync'
                   else pb.STEP_MODE_ASYNCHRONOUS),
        num_workers=cfg.num_workers, quorum=cfg.effective_quorum,
        staleness_bound=cfg.staleness_bound,
        hyperparameters=pb.LambHyperparameters(
            learning_rate_schedule=self._engine.schedule_description,
            learning_rate=d.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            eps_root=cfg.eps_root, weight_decay=cfg.weight_decay),
        processes=[pb.ServerProcess(index=i, endpoint=e) for i, e in enumerate(self._endpoints)],
        placements=[_placement(s.path, p) for s, p in zip(d.leaves, d.placements)],
        workers=[pb.WorkerSeen(worker_id=w, last_step=step, seconds_ago=ago)
                 for w, step, ago in self._engine.workers_seen()])

  def InitializeModel(self, request_iterator, context):
    reader = None
    try:
      d = self._engine.describe()
      if d.initialized:  # refuse before reading the stream (the engine checks again)
        raise AlreadyExists(f'the model is already initialised (model_id {d.model_id}, '
                            f'step {d.step})')
      reader = self._reader(request_iterator, 'InitializeModel')
      header, chunks, commit = _read_stream(reader, 'InitializeModel')
      specs = specs_from_proto(header.leaves, 'header.leaves')
      if not specs:
        raise InvalidArgument('header.leaves is empty')
      receiver = ChunkReceiver(specs, 'InitializeModel',
                               self._engine.initial_sink(specs, header.init_id))
      try:
        for chunk in chunks:
          receiver.add(chunk)
      finally:
        self._metrics.received_bytes.labels('InitializeModel').inc(receiver.total_bytes)
      receiver.finish(commit[0] if commit else None)
      model_id = self._engine.initialize(specs, receiver.sink.arrays, header.init_id)
      return pb.InitializeModelResponse(model_id=model_id, step=0)
    except ServiceError as e:
      if e.reason in ('idle', 'stream_too_long'):
        self._metrics.streams_cut_off.labels('InitializeModel', e.reason).inc()
      log.warning('InitializeModel refused: %s', e,
                  extra=fields(rpc='InitializeModel', code=e.code, reason=e.reason, leaf=e.leaf))
      _abort(context, e)
    finally:
      if reader is not None:
        reader.close()

  def PushGradients(self, request_iterator, context):
    t0 = time.monotonic()
    header, received = None, 0
    reader = self._reader(request_iterator, 'PushGradients')
    try:
      message, chunks, commit = _read_stream(reader, 'PushGradients')
      header = _push_header(message)
      reader.what = header.what
      with self._engine.open_push(header) as push:
        if not push.answered:
          try:
            for chunk in chunks:
              push.write(chunk)
          finally:
            received = push.received_bytes
          push.commit(commit[0] if commit else None)
          self._metrics.push_seconds.observe(time.monotonic() - t0)
        result = push.result
      if result.duplicate:  # a retry of an answered push: answered again, not counted
        self._metrics.pushes_duplicate.inc()
      log.debug('push accepted (step %s)', 'applied' if result.applied else 'pending',
                extra=fields(step=header.step, worker=header.worker_id,
                             push_id=header.push_id or None))
      return _push_response(result)
    except ServiceError as e:
      self._push_refused(e, header)
      _abort(context, e)
    except grpc.RpcError:  # the client went away mid-stream
      self._push_refused(None, header)
      raise
    finally:
      reader.close()
      self._metrics.received_bytes.labels('PushGradients').inc(received)

  def _push_refused(self, e: Optional[ServiceError], header: Optional[PushHeader]) -> None:
    """Counts and logs a push that was not accepted (e None: cancelled by the client)."""
    reason = e.reason if e is not None else 'cancelled'
    self._metrics.pushes_rejected.labels(reason).inc()
    if reason in ('idle', 'stream_too_long'):
      self._metrics.streams_cut_off.labels('PushGradients', reason).inc()
    worker = header.worker_id if header is not None else None
    step = header.step if header is not None else None
    log.log(logging.INFO if e is None else logging.WARNING, 'push refused: %s',
            e if e is not None else 'the client cancelled it; its data was discarded',
            extra=fields(step=step, worker=worker or None, leaf=getattr(e, 'leaf', None),
                         reason=reason, code=e.code if e is not None else 'CANCELLED'))

  def PullParameters(self, request, context):
    t0 = time.monotonic()
    watch = self._pulls.register(context)
    try:
      request = _parsed(request, 'PullParameters')
      dtype = None if request.dtype == 0 else numpy_dtype(request.dtype, 'request.dtype')
      stream = self._engine.pull(
          dtype, newer_than=(request.if_newer_than_step
                             if request.HasField('if_newer_than_step') else None),
          model_id=request.if_model_id, chunk_bytes=clamp_chunk_bytes(request.max_chunk_bytes))
      with contextlib.closing(stream):
        header = next(stream)
        yield _pull_header(header)
        for message in stream:  # already serialized, each chunk's data copied once
          yield message
          self._pulls.progress(watch)
      self._metrics.sent_bytes.labels('PullParameters').inc(sum(s.nbytes for s in header.leaves))
      self._metrics.pull_seconds.observe(time.monotonic() - t0)
    except ServiceError as e:
      _abort(context, e)
    finally:
      self._pulls.unregister(watch)

  def SaveCheckpoint(self, request, context):
    try:
      request = _parsed(request, 'SaveCheckpoint')
      step, path = self._engine.save_now(wait=request.wait)
      return pb.SaveCheckpointResponse(step=step, path=path)
    except ServiceError as e:
      _abort(context, e)

  def ListCheckpoints(self, request, context):
    try:
      _parsed(request, 'ListCheckpoints')
      return pb.ListCheckpointsResponse(checkpoints=[
          pb.CheckpointInfo(step=c.step, path=c.path, complete=c.complete,
                            size_bytes=c.size_bytes)
          for c in self._engine.list_checkpoints()])
    except ServiceError as e:
      _abort(context, e)

  def WaitForStep(self, request, context):
    try:
      request = _parsed(request, 'WaitForStep')
      timeout = min(context.time_remaining() or self._max_s, self._max_s)
      asked = _duration_seconds(request.timeout, 'timeout') if request.HasField('timeout') else 0
      if asked > 0:
        timeout = min(asked, timeout)
      context.add_callback(self._engine.wake)  # a cancelled long poll ends at once
      current, reached, model_id = self._engine.wait_for_step(
          request.step, timeout, gone=lambda: not context.is_active())
      return pb.WaitForStepResponse(current_step=current, reached=reached, model_id=model_id)
    except ServiceError as e:
      _abort(context, e)


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


def _push_header(message: pb.PushGradientsHeader) -> PushHeader:
  """The domain header of a push's first message."""
  return PushHeader(message.worker_id, message.push_id, message.step, message.num_examples,
                    message.model_id,
                    tuple(specs_from_proto(message.leaves, 'header.leaves', encoded_ok=True)))


def _push_response(r: PushResult) -> pb.PushGradientsResponse:
  return pb.PushGradientsResponse(accepted_step=r.accepted_step, applied=r.applied,
                                  current_step=r.current_step, duplicate=r.duplicate)


def _placement(path: str, placement) -> pb.LeafPlacement:
  if placement is None:
    return pb.LeafPlacement(path=path)
  dim, starts = placement
  return pb.LeafPlacement(path=path, split_dim=dim, starts=starts)


def _pull_header(h: PullHeader) -> pb.PullParametersResponse:
  return pb.PullParametersResponse(header=pb.PullParametersHeader(
      model_id=h.model_id, step=h.step, not_modified=h.not_modified,
      leaves=[s.to_proto() for s in h.leaves]))
