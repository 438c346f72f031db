"""Assembling the server: the engine, its checkpointer, the servicer, ports, credentials,
interceptors, health, reflection and metrics -- and taking it down again.

`start(config)` returns a `RunningServer` at once; `serve_forever(config)` runs one
until SIGTERM/SIGINT. Whoever creates a resource here also closes it.

The server is `grpc.aio`'s, on an event loop of its own thread (`_Loop`): the
RPCs are coroutines, and their blocking work runs on a pool of
`--grpc-threads` threads (service.server.offload).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import gc
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
from service.core import checkpoint
from service.core.checkpoint import Checkpointer
from service.core.engine import Engine
from service.core.persistence import load_npz
from service.errors import ConfigError, FailedPrecondition, StartupError
from service.protocol import MAX_RECEIVE_BYTES, SERVICE_NAME
from service.protocol.tokens import load_entries
from service.server import auth, offload, peers
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
  runtime.initialize_distributed(coordinator, config.num_processes, index,
                                 secret=config.job_secret(), bind_address=bind,
                                 heartbeat_timeout_s=HEARTBEAT_S)
  log.info('process %d of %d of the job coordinated at %s', index, config.num_processes,
           coordinator)


def _endpoint(config: ServerConfig, port: int) -> str:
  """Where clients reach this process (its advertised address, or its host's name)."""
  if config.advertise_address:
    return config.advertise_address
  host = config.host if config.host not in ('0.0.0.0', '::', '') else socket.getfqdn()
  return f'{host}:{port}'


class _Loop:
  """An asyncio event loop on a thread of its own: the server's RPCs run on it."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, name='grpc-loop',
                                    daemon=True)
    self._thread.start()

  def run(self, coroutine, timeout: Optional[float] = None):
    """Runs `coroutine` on the loop and returns its result (from another thread)."""
    return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

  def call(self, fn, *args):
    """`fn(*args)` on the loop's thread (objects of grpc.aio are made and used there)."""
    async def call():
      return fn(*args)
    return self.run(call())

  def close(self) -> None:
    if self._thread.is_alive():
      self.loop.call_soon_threadsafe(self.loop.stop)
      self._thread.join(timeout=30)
    if not self._thread.is_alive():
      self.loop.close()


class RunningServer:
  """A started server: its port, its engine; `stop()` shuts it down.

  With TLS, `health_port` is the plaintext port serving only grpc.health.v1.Health
  (None without TLS: the health service is then on `port`).
  """

  def __init__(self, loop: _Loop, server: grpc.aio.Server, engine: Engine, port: int,
               health_servicer: health.aio.HealthServicer, metrics: Metrics,
               metrics_port: Optional[int] = None,
               health_server: Optional[grpc.aio.Server] = None,
               health_port: Optional[int] = None,
               checkpointer: Optional[Checkpointer] = None,
               pool: Optional[concurrent.futures.Executor] = None,
               progress: Optional[ProgressLog] = None,
               peer_watch: Optional[peers.PeerWatch] = None,
               health_watch: Optional[asyncio.Task] = None):
    self._loop = loop
    self._health_watch = health_watch
    self.server, self.engine, self.port = server, engine, port
    self._health = health_servicer
    self.metrics, self.metrics_port = metrics, metrics_port
    self.health_server, self.health_port = health_server, health_port
    self._checkpointer = checkpointer
    self._pool = pool
    self._progress = progress
    self._peer_watch = peer_watch
    self._stopped = False

  def stop(self, grace: Optional[float] = None, final: bool = True) -> None:
    """Graceful: not serving any more, pushes in flight finish, final checkpoint, stop.

    In a multi-process server, every other process is asked to stop too (for good if
    `final`, else to be started again): they drain and write the final checkpoint
    together. Stopping again does nothing.
    """
    if self._stopped:
      return
    self._stopped = True
    if self._peer_watch is not None:
      self._peer_watch.request_stop(final)
    if self._health_watch is not None:
      self._loop.loop.call_soon_threadsafe(self._health_watch.cancel)
    self._loop.run(self._health.enter_graceful_shutdown())
    if self._progress is not None:
      self._progress.close()
    try:
      self.engine.shutdown(self.engine.config.shutdown_grace_s if grace is None else grace)
      self._loop.run(self.server.stop(grace))
    finally:
      self.metrics.close()
      if self.health_server is not None:
        self._loop.run(self.health_server.stop(grace))
      if self._peer_watch is not None:
        self._peer_watch.close()
      if self._checkpointer is not None:
        self._checkpointer.close()
      if self._pool is not None:  # every call has ended: nothing is left to run on it
        self._pool.shutdown(wait=True)
      # grpc.aio's poller thread runs while a server object lives: let them go, once the
      # loop has stopped (the poller's fd, closed under a running loop, was read closed).
      self._loop.close()
      self.server = self.health_server = None
      gc.collect()

  def wait(self) -> None:
    self._loop.run(self.server.wait_for_termination())


def _checkpointer(config: ServerConfig) -> Optional[Checkpointer]:
  """The checkpointer of --checkpoint-dir (None: none), once a file could be written there."""
  if not config.checkpoint_dir:
    return None
  try:
    checkpoint.check_writable(config.checkpoint_dir)
  except OSError as e:
    raise StartupError(f'--checkpoint-dir {config.checkpoint_dir}: cannot write there '
                       f'({e.strerror or e}); checkpoints could not be saved') from None
  return Checkpointer(config.checkpoint_dir, every_steps=config.checkpoint_every_steps,
                      every_seconds=config.checkpoint_every_seconds,
                      keep=config.keep_checkpoints, asynchronous=config.async_checkpoints)


def _bind(server: grpc.aio.Server, host: str, port: int, flag: str,
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
  entries = load_entries(config.auth_token_file, config.auth_token_env)
  tokens = [token for token, _ in entries]
  bindings = {token: workers for token, workers in entries if workers is not None}
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
    loop = _Loop()
    undo.callback(loop.close)
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(config.grpc_threads, config.max_inflight_pushes + 4),
        thread_name_prefix='grpc-work')
    undo.callback(pool.shutdown, wait=False, cancel_futures=True)
    server = loop.call(lambda: grpc.aio.server(
        interceptors=[interceptor] if interceptor else None, options=_server_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs))
    undo.callback(lambda: loop.run(server.stop(None)))
    port = loop.call(_bind, server, config.host, config.port, '--port', credentials)
    health_server, health_port = None, None
    if tls:  # probes (e.g. Kubernetes' gRPC probes) speak neither TLS nor tokens
      health_server = loop.call(lambda: grpc.aio.server(options=[('grpc.so_reuseport', 0)]))
      undo.callback(lambda: loop.run(health_server.stop(None)))
      health_port = loop.call(_bind, health_server, config.host, config.health_port,
                              '--health-port')
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
    engine = Engine(config, checkpointer=checkpointer, observer=metrics,
                    coordination=runtime.coordination())
    undo.callback(engine.close)
    metrics.watch(engine)
    try:
      restored = engine.restore()
    except checkpoint.UnreadableCheckpoints as e:  # a new run would have Orbax delete them
      raise StartupError(
          f'--checkpoint-dir {config.checkpoint_dir}: {e}; not starting a new run over them '
          f'(its saves would delete them): repair or move them, or pass '
          f'--discard-unreadable-checkpoints true to delete them and start afresh') from None
    except (checkpoint.NewerFormat, checkpoint.IncompatibleCheckpoint) as e:
      raise StartupError(f'--checkpoint-dir {config.checkpoint_dir}: {e}') from None
    except FailedPrecondition as e:  # a setting that does not fit the restored model
      raise ConfigError(f'{e} (the model of the checkpoint in {config.checkpoint_dir})') from None
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
        try:
          engine.initialize(specs, arrays)
        except FailedPrecondition as e:
          raise ConfigError(f'{e} (the model of --init-params {config.init_params})') from None
    # A multi-process server's processes learn each other's endpoints through the job.
    endpoints = (runtime.exchange('endpoint', _endpoint(config, port))
                 if config.num_processes > 1 else ())
    watch = peers.watch(engine.job, endpoints, _exit_lost, _stop_asked)
    if watch is not None:
      undo.callback(watch.close)
    servicer = loop.call(OptimizerServicer, engine, pool, metrics, endpoints, bindings)
    health_servicer = loop.call(health.aio.HealthServicer)
    loop.run(_add_services(server, servicer, health_servicer, health_server))
    if metrics_port is not None:
      log.info('Prometheus metrics on http://%s:%d/metrics', config.host, metrics_port)
    loop.run(server.start())
    health_watch = loop.call(lambda: loop.loop.create_task(offload.watch_health(
        engine, health_servicer, pool, config.health_stuck_s, ('', SERVICE_NAME), log)))
    if health_server is not None:
      loop.run(health_server.start())
      log.info('health service (plaintext) on %s:%d', config.host, health_port)
    undo.pop_all()
  log.info('serving %s on %s:%d (%s%s), mesh of %d devices', SERVICE_NAME, config.host, port,
           ('mutual TLS' if config.tls_client_ca else 'TLS') if tls else 'plaintext',
           ', bearer tokens' if tokens else '', engine.mesh.devices.size)
  if config.ordered_sum:
    log.info('ordered sum: a step holds its pushes (up to %d, a gradient buffer each) and adds '
             'them by worker once it is complete; the same pushes give bit-identical '
             'parameters whatever order they arrive in', config.num_workers)
  progress = ProgressLog(metrics, config.progress_every_seconds)  # its first line: later
  return RunningServer(loop, server, engine, port, health_servicer, metrics, metrics_port,
                       health_server, health_port, checkpointer, pool, progress, watch,
                       health_watch)


async def _add_services(server: grpc.aio.Server, servicer: OptimizerServicer,
                        health_servicer: health.aio.HealthServicer,
                        health_server: Optional[grpc.aio.Server]) -> None:
  """The optimizer service, health and reflection on `server` (and health alone on the
  plaintext `health_server`, with TLS)."""
  add_servicer(servicer, server)
  health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
  for name in ('', SERVICE_NAME):
    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
  reflection.enable_server_reflection(
      (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
  if health_server is not None:
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)


def _exit_lost(message: str) -> None:
  """Ends this process of a job that lost another one: one line, at once, `peers.LOST_EXIT`.

  Nothing is drained or saved: the step's collectives would wait for the lost
  process, and the job restarts from its last checkpoint anyway.
  """
  log.error('%s', message)
  print(f'lamb-sharded serve: error: {message}', file=sys.stderr, flush=True)
  logging.shutdown()
  os._exit(peers.LOST_EXIT)  # pylint: disable=protected-access


def _stop_asked(index: int, final: bool) -> None:
  """Another process of the job was asked to stop: this one stops as if signalled alike
  (SIGINT: for good; SIGTERM: to be started again)."""
  log.info('server process %d was asked to stop%s: stopping with it', index,
           ' for good' if final else '')
  os.kill(os.getpid(), signal.SIGINT if final else signal.SIGTERM)


def serve_forever(config: ServerConfig) -> int:
  """Runs until SIGTERM/SIGINT; prints the bound port first (for callers using port 0).

  Returns the exit status: 0, except for a process of a multi-process server stopped by
  SIGTERM (preempted, drained, its pod deleted): `peers.STOPPED_EXIT`, a failure its
  indexed Job restarts (and whose podFailurePolicy ignores), since the job is not done.
  SIGINT (Ctrl-C, `kill -INT`: the operator's stop) ends every process with 0.
  """
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
  final = signum != signal.SIGTERM or config.num_processes == 1
  log.info('signal %d (%s): shutting down%s', signum, signal.Signals(signum).name,
           '' if final else '; exiting with status %d so that the job is started again '
           '(SIGINT stops it for good)' % peers.STOPPED_EXIT)
  running.stop(final=final)
  # Nothing of the server may still run while the interpreter finalises (a thread
  # inside XLA or TensorStore then aborts the process): say so if something does.
  left = [t.name for t in threading.enumerate()
          if t is not threading.main_thread() and t.is_alive()]
  if left:
    log.warning('threads still running at exit: %s', ', '.join(sorted(left)))
  return 0 if final else peers.STOPPED_EXIT
