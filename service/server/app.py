"""Assembling the server: the engine, its checkpointer, the servicer, ports, credentials,
interceptors, health, reflection and metrics -- and taking it down again.

`start(config)` returns a `RunningServer` at once; `serve_forever(config)` runs one
until SIGTERM/SIGINT. Whoever creates a resource here also closes it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.config import ServerConfig
from service.core.checkpoint import Checkpointer
from service.core.engine import Engine
from service.core.persistence import load_npz
from service.protocol import MAX_RECEIVE_BYTES, SERVICE_NAME
from service.protocol.tokens import load_tokens
from service.server import auth
from service.server.metrics import Metrics
from service.server.servicer import OptimizerServicer, add_servicer
from service.server.signals import awaiting_signals

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 16 << 10  # bigger request metadata: RESOURCE_EXHAUSTED from gRPC


class RunningServer:
  """A started server: its port, its engine; `stop()` shuts it down.

  With TLS, `health_port` is the plaintext port serving only grpc.health.v1.Health
  (None without TLS: the health service is then on `port`).
  """

  def __init__(self, server: grpc.Server, engine: Engine, port: int,
               health_servicer: health.HealthServicer, servicer: OptimizerServicer,
               metrics: Metrics, metrics_port: Optional[int] = None,
               health_server: Optional[grpc.Server] = None,
               health_port: Optional[int] = None,
               checkpointer: Optional[Checkpointer] = None):
    self.server, self.engine, self.port = server, engine, port
    self._health = health_servicer
    self._servicer = servicer
    self.metrics, self.metrics_port = metrics, metrics_port
    self.health_server, self.health_port = health_server, health_port
    self._checkpointer = checkpointer

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
      if self._checkpointer is not None:
        self._checkpointer.close()

  def wait(self) -> None:
    self.server.wait_for_termination()


def _checkpointer(config: ServerConfig) -> Optional[Checkpointer]:
  if not config.checkpoint_dir:
    return None
  return Checkpointer(config.checkpoint_dir, every_steps=config.checkpoint_every_steps,
                      every_seconds=config.checkpoint_every_seconds,
                      keep=config.keep_checkpoints, asynchronous=config.async_checkpoints)


def start(config: ServerConfig) -> RunningServer:
  """Starts the server on config.host:config.port (0: ephemeral) and returns at once."""
  # Security settings first: a misconfigured secret fails before any state is touched.
  tokens = load_tokens(config.auth_token_file, config.auth_token_env)
  tls = bool(config.tls_cert)
  credentials = (auth.server_credentials(config.tls_cert, config.tls_key,
                                         config.tls_client_ca) if tls else None)
  if not tokens:
    log.warning('no authentication configured (--auth-token-file/--auth-token-env): any '
                'client that can reach the port can push gradients and pull parameters')
  elif not tls:
    log.warning('bearer tokens without TLS (--tls-cert/--tls-key): tokens cross the network '
                'in the clear')
  metrics = Metrics()
  checkpointer = _checkpointer(config)
  engine = Engine(config, checkpointer=checkpointer, observer=metrics)
  metrics.watch(engine)
  restored = engine.restore()
  if config.init_params:
    specs, arrays = load_npz(config.init_params)
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
  interceptor = auth.BearerAuthInterceptor(
      tokens, on_refused=lambda method: metrics.rpcs_unauthenticated.inc()) if tokens else None
  server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=config.grpc_threads),
      interceptors=[interceptor] if interceptor else None, options=options,
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
                       health_server, health_port, checkpointer)


def serve_forever(config: ServerConfig) -> int:
  """Runs until SIGTERM/SIGINT; prints the bound port first (for callers using port 0)."""
  running = start(config)
  extra = []
  if running.health_port is not None:
    extra.append(f'health: plaintext port {running.health_port}')
  if running.metrics_port is not None:
    extra.append(f'metrics: port {running.metrics_port}')
  detail = f' ({", ".join(extra)})' if extra else ''
  with awaiting_signals(signal.SIGTERM, signal.SIGINT) as wait:
    # The handlers are in place before the line that tells a supervisor we are up.
    print(f'lamb-sharded serving on {config.host}:{running.port}{detail}', flush=True)
    signum = wait()
  log.info('signal %d (%s): shutting down', signum, signal.Signals(signum).name)
  running.stop()
  return 0
