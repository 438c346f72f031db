"""The gRPC server: a thin servicer over the step engine, plus health and reflection.

The servicer only parses streams, translates wire messages to engine calls and
engine errors to gRPC status codes; the engine holds all the state.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
from typing import Iterator, Optional

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import security, wire
from service._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.checkpoint import Checkpointer
from service.config import ServerConfig
from service.engine import Engine, PushResult, to_host
from service.errors import AlreadyExists, InvalidArgument, ServiceError

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name['OptimizerService'].full_name
# Chunks carry at most 3 MiB of data; the envelope adds a few bytes.
MAX_RECEIVE_BYTES = wire.MAX_MESSAGE_BYTES + (64 << 10)


_HANDLER_KINDS = {  # (client streaming, server streaming) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(servicer: pb_grpc.OptimizerServiceServicer, server: grpc.Server) -> None:
  """pb_grpc.add_OptimizerServiceServicer_to_server, but uploads skip protobuf for chunks.

  Requests with a `chunk` field (InitializeModel, PushGradients) are parsed by
  wire.upload_parser, which leaves each chunk's data in the received bytes
  instead of copying it twice; every other method is registered as the
  generated code does.
  """
  handlers = {}
  for method in pb.DESCRIPTOR.services_by_name['OptimizerService'].methods:
    request = getattr(pb, method.input_type.name)
    response = getattr(pb, method.output_type.name)
    parse = (wire.upload_parser(request) if 'chunk' in request.DESCRIPTOR.fields_by_name
             else request.FromString)
    handlers[method.name] = _HANDLER_KINDS[method.client_streaming, method.server_streaming](
        getattr(servicer, method.name), request_deserializer=parse,
        response_serializer=response.SerializeToString)
  server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
  server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _abort(context: grpc.ServicerContext, err: ServiceError):
  context.abort(getattr(grpc.StatusCode, err.code), str(err))


def _read_stream(requests: Iterator, what: str):
  """Splits a header/chunks/commit stream: returns (header, chunk iterator, commit holder)."""
  try:
    first = next(requests)
  except StopIteration:
    raise InvalidArgument(f'{what}: empty stream (expected a header first)') from None
  if first.WhichOneof('kind') != 'header':
    raise InvalidArgument(f'{what}: the first message must be a header, got '
                          f'{first.WhichOneof("kind") or "an empty message"}')
  commit: list = []

  def chunks():
    for msg in requests:
      kind = msg.WhichOneof('kind')
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

  def __init__(self, engine: Engine):
    self._engine = engine

  def DescribeModel(self, request, context):
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
    try:
      d = self._engine.describe()
      if d.initialized:  # refuse before reading the stream (the engine checks again)
        raise AlreadyExists(f'the model is already initialised (model_id {d.model_id}, '
                            f'step {d.step})')
      header, chunks, commit = _read_stream(request_iterator, 'InitializeModel')
      specs = wire.specs_from_proto(header.leaves, 'header.leaves')
      if not specs:
        raise InvalidArgument('header.leaves is empty')
      receiver = wire.ChunkReceiver(specs, 'InitializeModel')
      for chunk in chunks:
        receiver.add(chunk)
      buffers = receiver.finish(commit[0] if commit else None)
      model_id = self._engine.initialize(specs, buffers)
      return pb.InitializeModelResponse(model_id=model_id, step=0)
    except ServiceError as e:
      _abort(context, e)

  def PushGradients(self, request_iterator, context):
    ticket = None
    try:
      header, chunks, commit = _read_stream(request_iterator, 'PushGradients')
      specs = wire.specs_from_proto(header.leaves, 'header.leaves')
      admitted = self._engine.begin_push(
          header.worker_id, header.push_id, header.step, header.num_examples, header.model_id,
          specs, timeout=self._engine.config.admission_timeout_s)
      if isinstance(admitted, PushResult):  # a retry of an accepted push
        return self._push_response(admitted)
      ticket = admitted
      receiver = wire.ChunkReceiver(
          specs, f'push of worker {header.worker_id} for step {header.step}',
          on_leaf_complete=lambda spec, buf: self._engine.check_finite(ticket, spec, buf),
          buffers=ticket.buffers)
      for chunk in chunks:
        receiver.add(chunk)
      # Straight into the engine: no reference here may keep the push's buffers alive.
      return self._push_response(self._engine.commit_push(
          ticket, receiver.finish(commit[0] if commit else None)))
    except ServiceError as e:
      _abort(context, e)
    finally:
      if ticket is not None:
        self._engine.release(ticket)

  @staticmethod
  def _push_response(r: PushResult) -> pb.PushGradientsResponse:
    return pb.PushGradientsResponse(accepted_step=r.accepted_step, applied=r.applied,
                                    current_step=r.current_step, duplicate=r.duplicate)

  def PullParameters(self, request, context):
    try:
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
        arrays = ((s.path, to_host(a).astype(s.dtype, copy=False))
                  for s, a in zip(specs, snap.arrays))
        yield from wire.chunk_messages(pb.PullParametersResponse, arrays,
                                       wire.clamp_chunk_bytes(request.max_chunk_bytes))
    except ServiceError as e:
      _abort(context, e)

  def SaveCheckpoint(self, request, context):
    try:
      step, path = self._engine.save_now(wait=request.wait)
      return pb.SaveCheckpointResponse(step=step, path=path)
    except ServiceError as e:
      _abort(context, e)

  def ListCheckpoints(self, request, context):
    try:
      return pb.ListCheckpointsResponse(checkpoints=[
          pb.CheckpointInfo(step=c.step, path=c.path, complete=c.complete,
                            size_bytes=c.size_bytes)
          for c in self._engine.list_checkpoints()])
    except ServiceError as e:
      _abort(context, e)

  def WaitForStep(self, request, context):
    try:
      timeout = context.time_remaining()
      if request.HasField('timeout') and request.timeout.ToTimedelta().total_seconds() > 0:
        t = request.timeout.ToTimedelta().total_seconds()
        timeout = t if timeout is None else min(t, timeout)
      current, reached, model_id = self._engine.wait_for_step(request.step, timeout)
      return pb.WaitForStepResponse(current_step=current, reached=reached, model_id=model_id)
    except ServiceError as e:
      _abort(context, e)


class RunningServer:
  """A started server: its port, its engine; `stop()` shuts it down.

  With TLS, `health_port` is the plaintext port serving only grpc.health.v1.Health
  (None without TLS: the health service is then on `port`).
  """

  def __init__(self, server: grpc.Server, engine: Engine, port: int,
               health_servicer: health.HealthServicer,
               health_server: Optional[grpc.Server] = None,
               health_port: Optional[int] = None):
    self.server, self.engine, self.port = server, engine, port
    self._health = health_servicer
    self.health_server, self.health_port = health_server, health_port

  def stop(self, grace: Optional[float] = None) -> None:
    """Graceful: not serving any more, pushes in flight finish, final checkpoint, stop."""
    self._health.enter_graceful_shutdown()
    try:
      self.engine.shutdown(self.engine.config.shutdown_grace_s if grace is None else grace)
      self.server.stop(grace).wait()
    finally:
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
  if engine is None:
    checkpointer = None
    if config.checkpoint_dir:
      checkpointer = Checkpointer(
          config.checkpoint_dir, every_steps=config.checkpoint_every_steps,
          every_seconds=config.checkpoint_every_seconds, keep=config.keep_checkpoints,
          asynchronous=config.async_checkpoints)
    engine = Engine(config, checkpointer=checkpointer)
  restored = engine.restore()
  if config.init_params:
    specs, arrays = load_params_file(config.init_params)
    if restored:  # resume: the checkpoint wins, if it is of the same model
      engine.check_same_model(specs)
      log.info('resuming from the checkpoint; --init-params %s not used', config.init_params)
    else:
      engine.initialize(specs, arrays)
  server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=config.grpc_threads),
      interceptors=[security.BearerAuthInterceptor(tokens)] if tokens else None,
      options=[('grpc.max_receive_message_length', MAX_RECEIVE_BYTES),
               ('grpc.max_send_message_length', MAX_RECEIVE_BYTES)])
  add_servicer(OptimizerServicer(engine), server)
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
  server.start()
  if health_server is not None:
    health_server.start()
    log.info('health service (plaintext) on %s:%d', config.host, health_port)
  log.info('serving %s on %s:%d (%s%s), mesh of %d devices', SERVICE_NAME, config.host, port,
           ('mutual TLS' if config.tls_client_ca else 'TLS') if tls else 'plaintext',
           ', bearer tokens' if tokens else '', engine.mesh.devices.size)
  return RunningServer(server, engine, port, health_servicer, health_server, health_port)


def load_params_file(path: str) -> tuple[list[wire.LeafSpec], list[np.ndarray]]:
  """Leaves of a .npz file (keys: leaf paths, in the file's order) as float32."""
  with np.load(path) as data:
    names = list(data.files)
    arrays = [np.asarray(data[k], np.float32) for k in names]
  return [wire.LeafSpec(k, a.shape, a.dtype) for k, a in zip(names, arrays)], arrays


def serve_forever(config: ServerConfig) -> int:
  """Runs until SIGTERM/SIGINT; prints the bound port first (for callers using port 0)."""
  running = start(config)
  health = ('' if running.health_port is None
            else f' (health: plaintext port {running.health_port})')
  print(f'lamb-sharded serving on {config.host}:{running.port}{health}', flush=True)
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
