"""The gRPC server: a thin servicer over the step engine, plus health and reflection.

The servicer only parses streams, translates wire messages to engine calls and
engine errors to gRPC status codes; the engine holds all the state. Around it:
bearer-token auth, TLS, limits on RPCs, streams and silent clients, and
Prometheus metrics on their own HTTP port.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from typing import Iterator, Optional

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import security, streams, wire
from service.logs import fields
from service.metrics import Metrics
from service._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.checkpoint import Checkpointer
from service.config import ServerConfig
from service.engine import Engine, PushResult
from service.placement import host_pieces
from service.errors import AlreadyExists, InvalidArgument, ServiceError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name['OptimizerService'].full_name
# Chunks carry at most 3 MiB of data; the envelope adds a few bytes.
MAX_RECEIVE_BYTES = wire.MAX_MESSAGE_BYTES + (64 << 10)
MAX_METADATA_BYTES = 16 << 10  # bigger request metadata: RESOURCE_EXHAUSTED from gRPC


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
  wire.upload_parser, which leaves each chunk's data in the received bytes
  instead of copying it twice; every other one by protobuf. All are `_lenient`:
  bytes that do not parse reach the handler as an `_Unparsable`.
  """
  handlers = {}
  for method in pb.DESCRIPTOR.services_by_name['OptimizerService'].methods:
    request = getattr(pb, method.input_type.name)
    response = getattr(pb, method.output_type.name)
    parse = (wire.upload_parser(request) if 'chunk' in request.DESCRIPTOR.fields_by_name
             else request.FromString)
    handlers[method.name] = _HANDLER_KINDS[method.client_streaming, method.server_streaming](
        getattr(servicer, method.name), request_deserializer=_lenient(parse, request),
        response_serializer=response.SerializeToString)
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
  server.add_registered_method_handlers(SERVICE_NAME, handlers)


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

  def __init__(self, engine: Engine, metrics: Optional[Metrics] = None):
    self._engine = engine
    self._metrics = metrics or Metrics()
    cfg = engine.config
    self._idle_s, self._max_s = cfg.stream_idle_timeout_s, cfg.max_stream_seconds
    self._pulls = streams.PullWatch(self._idle_s, self._max_s, self._pull_cut_off)

  def close(self) -> None:
    self._pulls.close()

  def _reader(self, request_iterator, what: str) -> streams.StreamReader:
    return streams.StreamReader(request_iterator, what, self._idle_s,
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
            eps_root=cfg.eps_root, weight_decay=cfg.weight_decay))

  def InitializeModel(self, request_iterator, context):
    reader = None
    try:
      d = self._engine.describe()
      if d.initialized:  # refuse before reading the stream (the engine checks again)
        raise AlreadyExists(f'the model is already initialised (model_id {d.model_id}, '
                            f'step {d.step})')
      reader = self._reader(request_iterator, 'InitializeModel')
      header, chunks, commit = _read_stream(reader, 'InitializeModel')
      specs = wire.specs_from_proto(header.leaves, 'header.leaves')
      if not specs:
        raise InvalidArgument('header.leaves is empty')
      receiver = wire.ChunkReceiver(specs, 'InitializeModel')
      try:
        for chunk in chunks:
          receiver.add(chunk)
      finally:
        self._metrics.received_bytes.labels('InitializeModel').inc(receiver.total_bytes)
      buffers = receiver.finish(commit[0] if commit else None)
      model_id = self._engine.initialize(specs, buffers)
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
    ticket, header, receiver = None, None, None
    reader = self._reader(request_iterator, 'PushGradients')
    try:
      header, chunks, commit = _read_stream(reader, 'PushGradients')
      what = f'push of worker {header.worker_id} for step {header.step}'
      reader.what = what
      specs = wire.specs_from_proto(header.leaves, 'header.leaves')
      admitted = self._engine.begin_push(
          header.worker_id, header.push_id, header.step, header.num_examples, header.model_id,
          specs, timeout=self._engine.config.admission_timeout_s)
      if isinstance(admitted, PushResult):  # a retry of an accepted push
        self._metrics.pushes_duplicate.inc()
        return self._push_response(admitted)
      ticket = admitted
      receiver = wire.ChunkReceiver(
          specs, what,
          on_leaf_complete=lambda spec, buf: self._engine.check_finite(ticket, spec, buf),
          buffers=ticket.buffers, wire_views=ticket.views)
      for chunk in chunks:
        receiver.add(chunk)
      receiver.finish(commit[0] if commit else None)  # checks it; keeps no buffer
      result = self._engine.commit_push(ticket)
      if result.duplicate:
        self._metrics.pushes_duplicate.inc()
      self._metrics.push_seconds.observe(time.monotonic() - t0)
      log.debug('push accepted (step %s)', 'applied' if result.applied else 'pending',
                extra=fields(step=header.step, worker=header.worker_id,
                             push_id=header.push_id or None))
      return self._push_response(result)
    except ServiceError as e:
      self._push_refused(e, header)
      _abort(context, e)
    except grpc.RpcError:  # the client went away mid-stream
      self._push_refused(None, header)
      raise
    finally:
      reader.close()
      if receiver is not None:
        self._metrics.received_bytes.labels('PushGradients').inc(receiver.total_bytes)
      if ticket is not None:
        self._engine.release(ticket)

  def _push_refused(self, e: Optional[ServiceError], header) -> None:
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

  @staticmethod
  def _push_response(r: PushResult) -> pb.PushGradientsResponse:
    return pb.PushGradientsResponse(accepted_step=r.accepted_step, applied=r.applied,
                                    current_step=r.current_step, duplicate=r.duplicate)

  def PullParameters(self, request, context):
    t0 = time.monotonic()
    watch = self._pulls.register(context)
    try:
      request = _parsed(request, 'PullParameters')
      with self._engine.reading() as snap:
        if (request.HasField('if_newer_than_step') and request.if_model_id == snap.model_id
            and snap.step <= request.if_newer_than_step):
          yield pb.PullParametersResponse(header=pb.PullParametersHeader(
              model_id=snap.model_id, step=snap.step, not_modified=True))
          return
        out_dtype = (None if request.dtype == 0
                     else wire.numpy_dtype(request.dtype, 'request.dtype'))
        specs = [wire.LeafSpec(s.path, s.shape, out_dtype or s.dtype) for s in snap.specs]
        yield pb.PullParametersResponse(header=pb.PullParametersHeader(
            model_id=snap.model_id, step=snap.step, leaves=[s.to_proto() for s in specs]))
        sent = self._metrics.sent_bytes.labels('PullParameters')

        piece_bytes = wire.clamp_chunk_bytes(request.max_chunk_bytes)

        def arrays():  # leaf by leaf, a chunk's worth at a time: no host copy of a leaf
          for s, a in zip(specs, snap.arrays):
            sent.inc(s.nbytes)
            yield s.path, (p.astype(s.dtype, copy=False) for p in host_pieces(
                a, piece_bytes * a.dtype.itemsize // s.dtype.itemsize))
        for message in wire.chunk_messages(pb.PullParametersResponse, arrays(), piece_bytes):
          yield message
          self._pulls.progress(watch)
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
      if request.HasField('timeout') and request.timeout.ToTimedelta().total_seconds() > 0:
        timeout = min(request.timeout.ToTimedelta().total_seconds(), timeout)
      context.add_callback(self._engine.wake)  # a cancelled long poll ends at once
      current, reached, model_id = self._engine.wait_for_step(
          request.step, timeout, gone=lambda: not context.is_active())
      return pb.WaitForStepResponse(current_step=current, reached=reached, model_id=model_id)
    except ServiceError as e:
      _abort(context, e)


class RunningServer:
  """A started server: its port, its engine; `stop()` shuts it down.

  With TLS, `health_port` is the plaintext port serving only grpc.health.v1.Health
  (None without TLS: the health service is then on `port`).
  """

  def __init__(self, server: grpc.Server, engine: Engine, port: int,
               health_servicer: health.HealthServicer, servicer: OptimizerServicer,
               metrics: Metrics, metrics_port: Optional[int] = None,
               health_server: Optional[grpc.Server] = None,
               health_port: Optional[int] = None):
    self.server, self.engine, self.port = server, engine, port
    self._health = health_servicer
    self._servicer = servicer
    self.metrics, self.metrics_port = metrics, metrics_port
    self.health_server, self.health_port = health_server, health_port

  def stop(self, grace: Optional[float] = None) -> None:
    """Graceful: not serving any more, pushes in flight finish, final checkpoint, stop."""
    self._health.enter_graceful_shutdown()
    try:
      self.engine.shutdown(self.engine.config.shutdown_grace_s if grace is None else grace)
      self.server.stop(grace).wait()
    finally:
      self._servicer.close()
      self.metrics.close()
      if self.health_server is not None:
        self.health_server.stop(grace).wait()

  def wait(self) -> None:
    self.server.wait_for_termination()


def start(config: ServerConfig, engine: Optional[Engine] = None) -> RunningServer:
  """Starts the server on config.host:config.port (0: ephemeral) and returns at once."""
  # Security settings first: a misconfigured secret fails before any state is touched.
  tokens = security.load_tokens(config.auth_token_file, config.auth_token_env)
  tls = bool(config.tls_cert)
  credentials = (security.server_credentials(config.tls_cert, config.tls_key,
                                             config.tls_client_ca) if tls else None)
  if not tokens:
    log.warning('no authentication configured (--auth-token-file/--auth-token-env): any '
                'client that can reach the port can push gradients and pull parameters')
  elif not tls:
    log.warning('bearer tokens without TLS (--tls-cert/--tls-key): tokens cross the network '
                'in the clear')
  metrics = Metrics()
  if engine is None:
    checkpointer = None
    if config.checkpoint_dir:
      checkpointer = Checkpointer(
          config.checkpoint_dir, every_steps=config.checkpoint_every_steps,
          every_seconds=config.checkpoint_every_seconds, keep=config.keep_checkpoints,
          asynchronous=config.async_checkpoints)
    engine = Engine(config, checkpointer=checkpointer, observer=metrics)
  else:
    engine.observer = metrics
  metrics.watch(engine)
  restored = engine.restore()
  if config.init_params:
    specs, arrays = load_params_file(config.init_params)
    if restored:  # resume: the checkpoint wins, if it is of the same model
      engine.check_same_model(specs)
      log.info('resuming from the checkpoint; --init-params %s not used', config.init_params)
    else:
      engine.initialize(specs, arrays)
  options = [('grpc.max_receive_message_length', MAX_RECEIVE_BYTES),
             ('grpc.max_send_message_length', MAX_RECEIVE_BYTES),
             ('grpc.max_metadata_size', MAX_METADATA_BYTES),
             ('grpc.max_concurrent_streams', config.max_streams_per_connection)]
  if config.keepalive_s > 0:
    options += [('grpc.keepalive_time_ms', int(config.keepalive_s * 1000)),
                ('grpc.keepalive_timeout_ms', 20_000)]
  auth = security.BearerAuthInterceptor(
      tokens, on_refused=lambda method: metrics.rpcs_unauthenticated.inc()) if tokens else None
  server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=config.grpc_threads),
      interceptors=[auth] if auth else None, options=options,
      maximum_concurrent_rpcs=config.max_concurrent_rpcs)
  servicer = OptimizerServicer(engine, metrics)
  add_servicer(servicer, server)
  health_servicer = health.HealthServicer()
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  for name in ('', SERVICE_NAME):
    health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
  reflection.enable_server_reflection(
      (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
  address = f'{config.host}:{config.port}'
  port = (server.add_secure_port(address, credentials) if tls
          else server.add_insecure_port(address))
  if port == 0:
    raise RuntimeError(f'could not bind {address}')
  health_server, health_port = None, None
  if tls:  # probes (e.g. Kubernetes' gRPC probes) speak neither TLS nor tokens
    health_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_port = health_server.add_insecure_port(f'{config.host}:{config.health_port}')
    if health_port == 0:
      raise RuntimeError(f'could not bind the health port {config.host}:{config.health_port}')
  metrics_port = None
  if config.metrics_port >= 0:
    metrics_port = metrics.serve(config.host, config.metrics_port)
    log.info('Prometheus metrics on http://%s:%d/metrics', config.host, metrics_port)
  server.start()
  if health_server is not None:
    health_server.start()
    log.info('health service (plaintext) on %s:%d', config.host, health_port)
  log.info('serving %s on %s:%d (%s%s), mesh of %d devices', SERVICE_NAME, config.host, port,
           ('mutual TLS' if config.tls_client_ca else 'TLS') if tls else 'plaintext',
           ', bearer tokens' if tokens else '', engine.mesh.devices.size)
  return RunningServer(server, engine, port, health_servicer, servicer, metrics, metrics_port,
                       health_server, health_port)


def load_params_file(path: str) -> tuple[list[wire.LeafSpec], list[np.ndarray]]:
  """Leaves of a .npz file (keys: leaf paths, in the file's order) as float32."""
  with np.load(path) as data:
    names = list(data.files)
    arrays = [np.asarray(data[k], np.float32) for k in names]
  return [wire.LeafSpec(k, a.shape, a.dtype) for k, a in zip(names, arrays)], arrays


def serve_forever(config: ServerConfig) -> int:
  """Runs until SIGTERM/SIGINT; prints the bound port first (for callers using port 0)."""
  running = start(config)
  extra = []
  if running.health_port is not None:
    extra.append(f'health: plaintext port {running.health_port}')
  if running.metrics_port is not None:
    extra.append(f'metrics: port {running.metrics_port}')
  detail = f' ({", ".join(extra)})' if extra else ''
  print(f'lamb-sharded serving on {config.host}:{running.port}{detail}', flush=True)
  stopped = threading.Event()

  def on_signal(signum, frame):
    del frame
    log.info('signal %d: shutting down', signum)
    stopped.set()
  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  stopped.wait()
  running.stop()
  return 0
