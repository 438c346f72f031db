"""Assembling the server: the engine, its checkpointer, the servicer, ports, credentials,
interceptors, health, reflection and metrics -- and taking it down again.

`start(config)` returns a `RunningServer` at once; `serve_forever(config)` runs one
until SIGTERM/SIGINT. Whoever creates a resource here also closes it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import runtime
from service.config import ServerConfig
from service.core.checkpoint import Checkpointer
from service.core.engine import Engine
from service.core.persistence import load_npz
from service.errors import ConfigError, StartupError
from service.protocol import MAX_RECEIVE_BYTES, SERVICE_NAME
from service.protocol.tokens import load_tokens
from service.server import auth, peers
from service.server.metrics import Metrics
from service.server.progress import ProgressLog
from service.server.servicer import OptimizerServicer, add_servicer
from service.server.signals import awaiting_signals

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 16 << 10  # bigger request metadata: RESOURCE_EXHAUSTED from gRPC
HEARTBEAT_S = 10  # a server process silent this long is lost to the job


def _join_job(config: ServerConfig) -> None:
  """Makes this process one of a multi-process server's (`jax.distributed`); no-op for one."""
  job = config.job()
  if job is None:
    return
  coordinator, index = job
  bind = f'{config.host}:{coordinator.rsplit(":", 1)[1]}'
  runtime.initialize_distributed(coordinator, config.num_processes, index, bind_address=bind,
                                 heartbeat_timeout_s=HEARTBEAT_S)
  log.info('process %d of %d of the job coordinated at %s', index, config.num_processes,
           coordinator)


def _endpoint(config: ServerConfig, port: int) -> str:
  """Where clients reach this process (its advertised address, or its host's name)."""
  if config.advertise_address:
    return config.advertise_address
  host = config.host if config.host not in ('0.0.0.0', '::', '') else socket.getfqdn()
  return f'{host}:{port}'


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
               checkpointer: Optional[Checkpointer] = None,
               executor: Optional[concurrent.futures.Executor] = None,
               progress: Optional[ProgressLog] = None,
               peer_watch: Optional[peers.PeerWatch] = None):
    self.server, self.engine, self.port = server, engine, port
    self._health = health_servicer
    self._servicer = servicer
    self.metrics, self.metrics_port = metrics, metrics_port
    self.health_server, self.health_port = health_server, health_port
    self._checkpointer = checkpointer
    self._executor = executor
    self._progress = progress
    self._peer_watch = peer_watch

  def stop(self, grace: Optional[float] = None) -> None:
    """Graceful: not serving any more, pushes in flight finish, final checkpoint, stop.

    In a multi-process server, every other process is asked to stop too: they
    drain and write the final checkpoint together.
    """
    if self._peer_watch is not None:
      self._peer_watch.request_stop()
    self._health.enter_graceful_shutdown()
    if self._progress is not None:
      self._progress.close()
    try:
      self.engine.shutdown(self.engine.config.shutdown_grace_s if grace is None else grace)
      self.server.stop(grace).wait()
    finally:
      self._servicer.close()
      self.metrics.close()
      if self.health_server is not None:
        self.health_server.stop(grace).wait()
      if self._peer_watch is not None:
        self._peer_watch.close()
      if self._checkpointer is not None:
        self._checkpointer.close()
      if self._executor is not None:  # the RPC handlers' threads: every call has ended
        self._executor.shutdown(wait=True)

  def wait(self) -> None:
    self.server.wait_for_termination()


def _checkpointer(config: ServerConfig) -> Optional[Checkpointer]:
  if not config.checkpoint_dir:
    return None
  return Checkpointer(config.checkpoint_dir, every_steps=config.checkpoint_every_steps,
                      every_seconds=config.checkpoint_every_seconds,
                      keep=config.keep_checkpoints, asynchronous=config.async_checkpoints)


def _bind(server: grpc.Server, host: str, port: int, flag: str,
          credentials: Optional[grpc.ServerCredentials] = None) -> int:
  """Binds `server` to host:port (0: ephemeral); StartupError naming the port and its flag.

  The server must have been made with `grpc.so_reuseport` 0: gRPC sets SO_REUSEPORT
  by default, and then a second server binds a port already served and the kernel
  shares the connections between the two.
  """
  address = f'{host}:{port}'
  why = _why_not_bindable(host, port) if port else None  # before gRPC logs its own error
  if why is not None:
    raise StartupError(f'{flag} {port}: cannot listen on {address}: {why}')
  try:
    bound = (server.add_secure_port(address, credentials) if credentials is not None
             else server.add_insecure_port(address))
  except RuntimeError:
    bound = 0
  if bound == 0:
    raise StartupError(f'{flag} {port}: cannot listen on {address}: '
                       f'{_why_not_bindable(host, port) or "gRPC could not bind it"}')
  return bound


def _why_not_bindable(host: str, port: int) -> Optional[str]:
  """Why host:port cannot be bound, as the OS says it (None: it can be, now)."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except OSError as e:
    return f'the address does not resolve ({e})'
  family, kind, _, _, sockaddr = infos[0]
  with socket.socket(family, kind) as s:
    # As gRPC binds: SO_REUSEADDR (a port whose old connections linger in TIME_WAIT,
    # e.g. after a restart, is free), not SO_REUSEPORT (a port being listened on is not).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(sockaddr)
    except OSError as e:
      return ('the port is in use (another server?)' if e.errno == errno.EADDRINUSE
              else e.strerror or str(e))
  return None


def _server_options(config: ServerConfig) -> list:
  options = [('grpc.so_reuseport', 0),
             ('grpc.max_receive_message_length', MAX_RECEIVE_BYTES),
             ('grpc.max_send_message_length', MAX_RECEIVE_BYTES),
             ('grpc.max_metadata_size', MAX_METADATA_BYTES),
             ('grpc.max_concurrent_streams', config.max_streams_per_connection)]
  if config.keepalive_s > 0:
    options += [('grpc.keepalive_time_ms', int(config.keepalive_s * 1000)),
                ('grpc.keepalive_timeout_ms', 20_000)]
  return options


def start(config: ServerConfig) -> RunningServer:
  """Starts the server on config.host:config.port (0: ephemeral) and returns at once.

  The ports are bound first, before any state is built or restored: a port in use
  fails at once (StartupError naming it and its flag). Whatever was made before a
  failure is closed again.
  """
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
  _join_job(config)
  with contextlib.ExitStack() as undo:  # popped (kept open) once everything is up
    metrics = Metrics()
    interceptor = auth.BearerAuthInterceptor(
        tokens, on_refused=lambda method: metrics.rpcs_unauthenticated.inc()) if tokens else None
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.grpc_threads,
                                                     thread_name_prefix='grpc-handler')
    undo.callback(executor.shutdown, wait=False, cancel_futures=True)
    server = grpc.server(
        executor,
        interceptors=[interceptor] if interceptor else None, options=_server_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    undo.callback(lambda: server.stop(None))
    port = _bind(server, config.host, config.port, '--port', credentials)
    health_server, health_port = None, None
    if tls:  # probes (e.g. Kubernetes' gRPC probes) speak neither TLS nor tokens
      health_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                                  options=[('grpc.so_reuseport', 0)])
      undo.callback(lambda: health_server.stop(None))
      health_port = _bind(health_server, config.host, config.health_port, '--health-port')
    metrics_port = None
    if config.metrics_port >= 0:
      try:
        metrics_port = metrics.serve(config.host, config.metrics_port)
      except OSError as e:
        raise StartupError(
            f'--metrics-port {config.metrics_port}: cannot listen on '
            f'{config.host}:{config.metrics_port}: '
            f'{"the port is in use (another server?)" if e.errno == errno.EADDRINUSE else e}'
            '; --metrics-port -1 serves no metrics') from None
      undo.callback(metrics.close)
    checkpointer = _checkpointer(config)
    if checkpointer is not None:
      undo.callback(checkpointer.close)
    engine = Engine(config, checkpointer=checkpointer, observer=metrics)
    undo.callback(engine.close)
    metrics.watch(engine)
    restored = engine.restore()
    if config.init_params:
      try:
        specs, arrays = load_npz(config.init_params)
      except Exception as e:  # pylint: disable=broad-except  # not an .npz, pickled, corrupt...
        raise ConfigError(f'--init-params {config.init_params}: not a .npz of parameters '
                          f'({type(e).__name__}: {e})') from None
      if restored:  # resume: the checkpoint wins, if it is of the same model
        engine.check_same_model(specs)
        log.info('resuming from the checkpoint; --init-params %s not used', config.init_params)
      else:
        engine.initialize(specs, arrays)
    # A multi-process server's processes learn each other's endpoints through the job.
    endpoints = (runtime.exchange('endpoint', _endpoint(config, port))
                 if config.num_processes > 1 else ())
    watch = peers.watch(engine.job, endpoints, _exit_lost, _stop_asked)
    if watch is not None:
      undo.callback(watch.close)
    servicer = OptimizerServicer(engine, metrics, endpoints)
    undo.callback(servicer.close)
    add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ('', SERVICE_NAME):
      health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if health_server is not None:
      health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    if metrics_port is not None:
      log.info('Prometheus metrics on http://%s:%d/metrics', config.host, metrics_port)
    server.start()
    if health_server is not None:
      health_server.start()
      log.info('health service (plaintext) on %s:%d', config.host, health_port)
    undo.pop_all()
  log.info('serving %s on %s:%d (%s%s), mesh of %d devices', SERVICE_NAME, config.host, port,
           ('mutual TLS' if config.tls_client_ca else 'TLS') if tls else 'plaintext',
           ', bearer tokens' if tokens else '', engine.mesh.devices.size)
  progress = ProgressLog(metrics, config.progress_every_seconds)  # its first line: later
  return RunningServer(server, engine, port, health_servicer, servicer, metrics, metrics_port,
                       health_server, health_port, checkpointer, executor, progress, watch)


def _exit_lost(message: str) -> None:
  """Ends this process of a job that lost another one: one line, at once, `peers.LOST_EXIT`.

  Nothing is drained or saved: the step's collectives would wait for the lost
  process, and the job restarts from its last checkpoint anyway.
  """
  log.error('%s', message)
  print(f'lamb-sharded serve: error: {message}', file=sys.stderr, flush=True)
  logging.shutdown()
  os._exit(peers.LOST_EXIT)  # pylint: disable=protected-access


def _stop_asked(index: int) -> None:
  """Another process of the job was asked to stop: this one stops as if signalled."""
  log.info('server process %d was asked to stop: stopping with it', index)
  os.kill(os.getpid(), signal.SIGTERM)


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
  # Nothing of the server may still run while the interpreter finalises (a thread
  # inside XLA or TensorStore then aborts the process): say so if something does.
  left = [t.name for t in threading.enumerate()
          if t is not threading.main_thread() and t.is_alive()]
  if left:
    log.warning('threads still running at exit: %s', ', '.join(sorted(left)))
  return 0
