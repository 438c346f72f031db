"""The server's configuration: one dataclass, every field a CLI flag and a YAML key.

Precedence: the dataclass defaults, then the YAML file given with `--config`,
then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Any, Optional, Sequence

import yaml

from service.errors import ConfigError
from service.logs import FORMATS as LOG_FORMATS

STEP_MODES = ('sync', 'async')
OPTIMIZERS = ('lamb', 'nesterov', 'sgd')
MOMENTS = ('float32', 'int8', 'int4')
# Settings that are lists of regular expressions on leaf paths.
PATTERNS = ('exclude_from_weight_decay', 'exclude_from_layer_adaptation')
# Settings that are durations in seconds, and the longest any may be.
DURATIONS = ('straggler_timeout_s', 'checkpoint_every_seconds', 'keepalive_s', 'health_stuck_s',
             'max_stream_seconds', 'stream_idle_timeout_s', 'admission_timeout_s',
             'shutdown_grace_s', 'progress_every_seconds')
MAX_DURATION_S = 365 * 24 * 3600.0
SCHEDULES = ('constant', 'warmup_cosine')
NONFINITE_POLICIES = ('reject', 'skip_step')
LOG_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')
WORKER_ID = re.compile(r'[!-~](?:[ -~]{0,126}[!-~])?')
WORKER_ID_RULE = '1 to 128 printable ASCII characters, not starting or ending with a space'


def setting(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A field of ServerConfig: its default and its one line of --help (the field's metadata)."""
  return dataclasses.field(default=default, metadata={'help': help})


@dataclasses.dataclass
class ServerConfig:
  """Settings of `lamb-sharded serve` (each field is the flag --field-name)."""
  # Network.
  host: str = setting('0.0.0.0', 'address to listen on')
  port: int = setting(50051, 'gRPC port (0: an ephemeral port, printed on start)')
  # RPCs are coroutines of one event loop (grpc.aio): a waiting RPC holds no thread.
  # What may block (engine calls, copying a large push's chunks, encoding a pull) runs
  # on a pool of grpc_threads threads (at least max_inflight_pushes + 4).
  grpc_threads: int = setting(16, 'threads doing the RPCs\' blocking work (waiting RPCs hold none)')
  # Prometheus metrics over HTTP on host:metrics_port (0: ephemeral; -1: off).
  metrics_port: int = setting(9090, 'HTTP port of the Prometheus metrics (0: ephemeral, -1: off)')
  # Logs on stderr: level, and 'text' or 'json' (one object a line).
  log_level: str = setting('INFO', 'logging level')
  log_format: str = setting('text', 'log lines as text, or as one JSON object a line')
  progress_every_seconds: float = setting(
      30.0, 'log a progress line this often: step, pushes/s, MB/s received, apply time, '
      'last checkpoint (0: off)')
  # Limits, so that no client can exhaust the server. RPCs beyond max_concurrent_rpcs get
  # RESOURCE_EXHAUSTED; a push or initialisation stream with no message for
  # stream_idle_timeout_s, or any stream open longer than max_stream_seconds, is cut off
  # (a push's partial data is discarded). keepalive_s: how often the server pings an idle
  # connection to find dead peers (0: never).
  max_concurrent_rpcs: int = setting(
      4096, 'RPCs served at once, long polls included (a fleet of N workers needs N); '
      'more get RESOURCE_EXHAUSTED')
  max_streams_per_connection: int = setting(64, 'concurrent streams one client connection may open')
  stream_idle_timeout_s: float = setting(
      30.0, 'cut off a push/initialisation stream silent this long')
  max_stream_seconds: float = setting(900.0, 'cut off any stream open this long')
  min_push_bytes_per_second: float = setting(
      1 << 20, 'cut off a push/initialisation stream that sends its announced bytes slower '
      'than this, beyond stream_idle_timeout_s (0: no bound)')
  health_stuck_s: float = setting(
      60.0, 'Health.Check answers NOT_SERVING while the engine\'s lock has been held this long '
      '(a stuck step) or a thread it needs has ended')
  keepalive_s: float = setting(
      60.0, 'ping idle connections this often to find dead peers (0: never)')
  # Worker ids allowed to push, comma-separated (none: any well-formed id).
  allowed_workers: Optional[str] = setting(
      None, 'comma-separated worker ids allowed to push (default: any)')
  # Security. Bearer tokens (one per line; blank lines and #comments ignored) from a file
  # and/or an environment variable; none: no authentication (a warning at start).
  auth_token_file: Optional[str] = setting(
      None, 'file of bearer tokens, one per line (# comments); enables auth')
  auth_token_env: Optional[str] = setting(
      None, 'environment variable holding bearer tokens; enables auth')
  # TLS: the server's PEM certificate (chain) and key; with a client CA, mutual TLS.
  tls_cert: Optional[str] = setting(None, 'PEM certificate (chain) of the server; enables TLS')
  tls_key: Optional[str] = setting(None, 'PEM private key of the server')
  tls_client_ca: Optional[str] = setting(
      None, 'PEM CA that client certificates must chain to (mutual TLS)')
  # With TLS: a plaintext port serving only grpc.health.v1.Health (probes); 0: ephemeral.
  health_port: int = setting(
      8081, 'with TLS: plaintext port serving only the health service (0: ephemeral)')
  # Checkpoints (Orbax): where, how often (by steps and/or seconds), how many to keep.
  checkpoint_dir: Optional[str] = setting(
      None, 'directory of Orbax checkpoints; the newest is restored on start')
  checkpoint_every_steps: int = setting(100, 'save every this many steps (0: not by steps)')
  checkpoint_every_seconds: float = setting(
      600.0, 'save when this long passed since the last save (0: not by time)')
  keep_checkpoints: int = setting(3, 'how many checkpoints to keep')
  async_checkpoints: bool = setting(True, 'write checkpoints in the background (true/false)')
  # If --checkpoint-dir holds checkpoints and none of them can be restored, the server
  # refuses to start (a new run's saves would make Orbax delete them); true: delete them
  # and start without a model. A checkpoint of a newer format is refused whatever this says.
  discard_unreadable_checkpoints: bool = setting(
      False, 'if no checkpoint in --checkpoint-dir can be restored, delete them all and '
      'start afresh (default: refuse to start) (true/false)')
  shutdown_grace_s: float = setting(
      30.0, 'on SIGTERM: how long pushes in flight may finish before the final save')
  # A .npz file of initial parameters (keys: leaf paths); else InitializeModel.
  init_params: Optional[str] = setting(
      None, '.npz of initial parameters (keys: leaf paths), unless a checkpoint exists')
  # A multi-process server (one JAX job over several hosts, `jax.distributed`): every
  # process is started alike, with its own index; process 0 serves the coordinator.
  num_processes: int = setting(1, 'server processes of the job (1: a single process)')
  process_id: int = setting(
      -1, 'this process\'s index in the job (-1: $JOB_COMPLETION_INDEX, else 0)')
  coordinator_address: Optional[str] = setting(
      None, 'HOST:PORT of process 0\'s JAX coordinator (default: $JAX_COORDINATOR_ADDRESS)')
  advertise_address: Optional[str] = setting(
      None, 'HOST:PORT clients reach this process at (default: this host\'s name and port)')
  # The job's secret (the same in every process): every value the processes exchange through
  # the coordinator's store is signed with it (HMAC-SHA256), since anyone who reaches the
  # coordinator's port can write there. Needed with num_processes > 1; at least 16 bytes.
  job_secret_file: Optional[str] = setting(
      None, 'file holding the job\'s secret (num_processes > 1: this or --job-secret-env)')
  job_secret_env: Optional[str] = setting(
      None, 'environment variable holding the job\'s secret (num_processes > 1)')
  # The mesh: 0 for every local device.
  devices: int = setting(
      0, 'devices of the mesh, per process (0: every local device; on a CPU host: simulated)')
  # Step semantics.
  num_workers: int = setting(1, 'workers pushing each synchronous step')
  step_mode: str = setting(
      'sync', 'sync: one step per num_workers pushes; async: one step per push')
  quorum: int = setting(
      0,
      'sync: pushes enough to apply a step after the straggler timeout (0: all)')
  straggler_timeout_s: float = setting(
      0.0, "sync: seconds after a step's first push to apply with a quorum (0: never)")
  staleness_bound: int = setting(0, 'async: accept gradients computed at most this many steps ago')
  # Sync: float32 addition is not associative, so a step's sum depends on the order its
  # pushes arrive in. With ordered_sum, a step holds its pushes (one gradient buffer each:
  # max_inflight_pushes >= num_workers) and adds them when it is applied, by worker
  # (worker-0, worker-1, ..., then other ids), so the same pushes give the same params.
  ordered_sum: bool = setting(
      False, 'sync: hold a step\'s pushes and add them in worker order once the step is '
      'complete, so the same pushes give bit-identical params whatever order they arrive in '
      '(a gradient buffer per worker: needs max_inflight_pushes >= num_workers) (true/false)')
  # Model-sized gradient buffers on the host: each push being received holds one (the
  # model's size in the wire dtype), and so does the step's sum from its first push until
  # the step is applied (with ordered_sum, each push the step holds until it is applied
  # instead). The bound on the server's memory beyond params and moments;
  # further pushes wait up to admission_timeout_s for a buffer. With 2 and several
  # workers, pushes are received one at a time beside the sum.
  max_inflight_pushes: int = setting(
      2,
      ("model-sized gradient buffers: one per push being received, one for the step's sum "
       'until it is applied (with --ordered-sum: one per push the step holds)'))
  max_inflight_bytes: int = setting(
      0,
      'bytes of pushes received at once (0: bounded by count only)')
  admission_timeout_s: float = setting(
      30.0, 'how long a push waits for a slot before RESOURCE_EXHAUSTED')
  nonfinite: str = setting('reject', 'NaN/Inf in a push: reject the push, or skip the step')
  # The optimizer the server applies to what workers push: gradients, or (workers taking
  # local steps, DiLoCo) pseudo-gradients, for which it is the outer optimizer.
  optimizer: str = setting(
      'lamb', 'lamb; nesterov (SGD with Nesterov momentum: DiLoCo\'s outer optimizer); sgd '
      '(with --learning-rate 1 and pseudo-gradients: federated averaging)')
  momentum: float = setting(0.9, 'nesterov: the momentum')
  # LAMB's moments in memory (and checkpoints): float32, or 8- or 4-bit codes with a
  # float32 scale per block of 128 (lamb_sharded's mu_dtype/nu_dtype='int8' or 'int4';
  # docs/low-bit-state.md).
  moments: str = setting('float32', 'LAMB\'s moments: float32 (8 bytes a parameter for both), '
                         'int8 (about 2.07) or int4 (about 1.07)')
  # LAMB.
  learning_rate: float = setting(1e-3, 'learning rate (the peak, with warmup_cosine)')
  schedule: str = setting('constant', 'learning-rate schedule')
  warmup_steps: int = setting(0, 'warmup_cosine: linear warmup steps')
  decay_steps: int = setting(10000, 'warmup_cosine: total steps of the schedule')
  end_learning_rate: float = setting(0.0, 'warmup_cosine: final learning rate')
  b1: float = setting(0.9, 'LAMB: decay of the first moment')
  b2: float = setting(0.999, 'LAMB: decay of the second moment')
  eps: float = setting(1e-6, 'LAMB: added outside the square root')
  eps_root: float = setting(0.0, 'LAMB: added inside the square root')
  weight_decay: float = setting(0.0, 'LAMB: decoupled weight decay')
  max_grad_norm: float = setting(0.0, 'global gradient-norm clipping before the moments (0: off)')
  # Per leaf, by regular expressions searched in the leaves' paths (e.g. "\\['b'\\]$",
  # "LayerNorm"), as TF Addons' LAMB takes them: the flag once per pattern, a YAML list.
  # Each pattern must match a leaf of the model (checked when the model is known).
  exclude_from_weight_decay: Optional[list[str]] = setting(
      None, 'LAMB: no weight decay for the leaves whose path matches this regular expression '
      '(repeat the flag for more)')
  exclude_from_layer_adaptation: Optional[list[str]] = setting(
      None, 'LAMB: trust ratio fixed at 1 for the leaves whose path matches this regular '
      'expression (repeat the flag for more)')

  def validate(self) -> 'ServerConfig':
    """Checks every setting; ConfigError names the flag."""
    def need(cond, name, msg):
      if not cond:
        raise ConfigError(f'{_flag(name)}: {msg}', name)
    for f in dataclasses.fields(self):  # YAML may hold a value of any type
      _check_type(f, getattr(self, f.name))
    need(0 <= self.port < 65536, 'port', f'{self.port} is not in [0, 65535]')
    need(bool(self.tls_cert) == bool(self.tls_key), 'tls_cert' if self.tls_cert else 'tls_key',
         '--tls-cert and --tls-key go together')
    need(not self.tls_client_ca or bool(self.tls_cert), 'tls_client_ca',
         'mutual TLS needs --tls-cert and --tls-key')
    need(0 <= self.health_port < 65536, 'health_port',
         f'{self.health_port} is not in [0, 65535]')
    need(not self.tls_cert or self.health_port == 0 or self.health_port != self.port,
         'health_port', f'{self.health_port} is also the gRPC port (--port)')
    need(self.grpc_threads >= 1, 'grpc_threads', f'must be >= 1, got {self.grpc_threads}')
    need(self.num_workers >= 1, 'num_workers', f'must be >= 1, got {self.num_workers}')
    need(self.step_mode in STEP_MODES, 'step_mode', f'must be one of {STEP_MODES}')
    need(0 <= self.quorum <= self.num_workers, 'quorum',
         f'must be in [0, num_workers={self.num_workers}], got {self.quorum}')
    need(self.straggler_timeout_s >= 0, 'straggler_timeout_s', 'must be >= 0')
    need(self.staleness_bound >= 0, 'staleness_bound', 'must be >= 0')
    need(self.max_inflight_pushes >= 1, 'max_inflight_pushes', 'must be >= 1')
    need(self.max_inflight_pushes >= 2 or self.step_mode == 'async' or self.num_workers == 1,
         'max_inflight_pushes', 'max_inflight_pushes must be >= 2 with several workers in sync '
         'mode (the step\'s sum holds one buffer until the step is applied)')
    need(not self.ordered_sum or self.step_mode == 'sync', 'ordered_sum',
         'only a synchronous step sums several pushes (--step-mode async applies each push as '
         'a step of its own, in arrival order): drop --ordered-sum or use --step-mode sync')
    need(not self.ordered_sum or self.max_inflight_pushes >= self.num_workers, 'ordered_sum',
         f'a step holds each of its pushes until it is applied, a gradient buffer each: '
         f'--max-inflight-pushes ({self.max_inflight_pushes}) must be >= --num-workers '
         f'({self.num_workers})')
    need(self.max_inflight_bytes >= 0, 'max_inflight_bytes', 'must be >= 0')
    need(self.admission_timeout_s >= 0, 'admission_timeout_s', 'must be >= 0')
    need(self.shutdown_grace_s >= 0, 'shutdown_grace_s', 'must be >= 0')
    need(-1 <= self.metrics_port < 65536, 'metrics_port',
         f'{self.metrics_port} is not in [-1, 65535]')
    need(self.metrics_port <= 0 or self.metrics_port not in (self.port, self.health_port),
         'metrics_port', f'{self.metrics_port} is also the gRPC or health port')
    need(self.log_format in LOG_FORMATS, 'log_format', f'must be one of {LOG_FORMATS}')
    need(self.log_level.upper() in LOG_LEVELS, 'log_level', f'must be one of {LOG_LEVELS}')
    need(self.max_concurrent_rpcs >= 1, 'max_concurrent_rpcs', 'must be >= 1')
    need(self.max_streams_per_connection >= 1, 'max_streams_per_connection', 'must be >= 1')
    need(self.stream_idle_timeout_s > 0, 'stream_idle_timeout_s', 'must be > 0')
    need(self.max_stream_seconds > 0, 'max_stream_seconds', 'must be > 0')
    need(math.isfinite(self.min_push_bytes_per_second) and self.min_push_bytes_per_second >= 0,
         'min_push_bytes_per_second', 'must be a finite number >= 0')
    need(self.keepalive_s >= 0, 'keepalive_s', 'must be >= 0')
    need(self.health_stuck_s > 0, 'health_stuck_s', 'must be > 0')
    need(self.progress_every_seconds >= 0, 'progress_every_seconds', 'must be >= 0')
    for w in self.worker_allowlist or ():
      need(WORKER_ID.fullmatch(w) is not None, 'allowed_workers',
           f'{w!r} is not a valid worker id ({WORKER_ID_RULE})')
    need(self.nonfinite in NONFINITE_POLICIES, 'nonfinite',
         f'must be one of {NONFINITE_POLICIES}')
    need(self.schedule in SCHEDULES, 'schedule', f'must be one of {SCHEDULES}')
    need(self.optimizer in OPTIMIZERS, 'optimizer', f'must be one of {OPTIMIZERS}')
    need(self.moments in MOMENTS, 'moments', f'must be one of {MOMENTS}')
    need(self.moments == 'float32' or self.optimizer == 'lamb', 'moments',
         f'{self.moments} moments are LAMB\'s (--optimizer lamb), not {self.optimizer}\'s')
    need(math.isfinite(self.momentum) and 0 <= self.momentum < 1, 'momentum',
         f'must be in [0, 1), got {self.momentum}')
    need(self.devices >= 0, 'devices', 'must be >= 0')
    need(self.num_processes >= 1, 'num_processes', f'must be >= 1, got {self.num_processes}')
    need(-1 <= self.process_id < self.num_processes, 'process_id',
         f'must be in [0, num_processes={self.num_processes}) (or -1), got {self.process_id}')
    for name in ('learning_rate', 'b1', 'b2', 'eps', 'eps_root', 'weight_decay',
                 'max_grad_norm', 'end_learning_rate', *DURATIONS):
      need(math.isfinite(getattr(self, name)), name, f'must be a finite number, got '
           f'{getattr(self, name)}')
    for name in DURATIONS:  # beyond, a deadline leaves the platform's time range
      need(getattr(self, name) <= MAX_DURATION_S, name,
           f'must be at most {MAX_DURATION_S:.0f} seconds (a year), got {getattr(self, name)}')
    need(self.learning_rate >= 0, 'learning_rate', 'must be >= 0')
    need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, 'b1' if not 0 <= self.b1 < 1 else 'b2',
         f'must be in [0, 1), got {self.b1 if not 0 <= self.b1 < 1 else self.b2}')
    need(self.eps >= 0 and self.eps_root >= 0, 'eps' if self.eps < 0 else 'eps_root',
         'must be >= 0')
    need(self.weight_decay >= 0, 'weight_decay', 'must be >= 0')
    need(self.max_grad_norm >= 0, 'max_grad_norm', 'must be >= 0')
    for name in PATTERNS:
      for pattern in getattr(self, name) or ():
        try:
          re.compile(pattern)
        except re.error as e:
          raise ConfigError(f'{_flag(name)}: {pattern!r} is not a regular expression '
                            f'({e})', name) from None
    need(self.warmup_steps >= 0, 'warmup_steps', 'must be >= 0')
    need(self.decay_steps >= 1, 'decay_steps', f'must be >= 1, got {self.decay_steps}')
    need(self.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1')
    need(self.checkpoint_every_steps >= 0, 'checkpoint_every_steps', 'must be >= 0')
    need(self.checkpoint_every_seconds >= 0, 'checkpoint_every_seconds', 'must be >= 0')
    return self

  def job(self, environ=None) -> Optional[tuple[str, int]]:
    """(coordinator HOST:PORT, this process's index) of a multi-process server; None for one.

    Read from the flags, else from $JAX_COORDINATOR_ADDRESS and $JOB_COMPLETION_INDEX
    (a Kubernetes indexed Job); ConfigError naming the flag if they do not say.
    """
    if self.num_processes == 1:
      return None
    environ = os.environ if environ is None else environ
    coordinator = self.coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS')
    if not coordinator:
      raise ConfigError(f'--coordinator-address: needed with --num-processes '
                        f'{self.num_processes} (or set $JAX_COORDINATOR_ADDRESS)')
    host, _, port = coordinator.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f'--coordinator-address: {coordinator!r} is not HOST:PORT')
    self.job_secret(environ)
    index = self.process_id
    if index < 0:
      text = environ.get('JOB_COMPLETION_INDEX', '0')
      if not text.isdigit() or not int(text) < self.num_processes:
        raise ConfigError(f'--process-id: not given, and $JOB_COMPLETION_INDEX {text!r} is not '
                          f'in [0, {self.num_processes})')
      index = int(text)
    return coordinator, index

  def job_secret(self, environ=None) -> Optional[bytes]:
    """The job's secret (surrounding whitespace stripped): from --job-secret-file, else
    --job-secret-env; ConfigError naming the setting if a multi-process server has none, or
    one shorter than 16 bytes. None for a single process."""
    if self.num_processes == 1:
      return None
    environ = os.environ if environ is None else environ
    if self.job_secret_file:
      name = 'job_secret_file'
      try:
        with open(self.job_secret_file, 'rb') as fh:
          secret = fh.read().strip()
      except OSError as e:
        raise ConfigError(f'--job-secret-file: {self.job_secret_file}: {e.strerror}') from None
    elif self.job_secret_env:
      name = 'job_secret_env'
      secret = environ.get(self.job_secret_env, '').strip().encode()
    else:
      raise ConfigError(f'--job-secret-file: needed with --num-processes {self.num_processes} '
                        '(or --job-secret-env): the processes sign what they exchange through '
                        'the coordinator with it')
    if len(secret) < 16:
      where = (self.job_secret_file if name == 'job_secret_file'
               else f'${self.job_secret_env}')
      raise ConfigError(f'{_flag(name)}: the job\'s secret in {where} is '
                        f'{"empty" if not secret else f"{len(secret)} bytes"}; it needs at '
                        'least 16 (e.g. `head -c 32 /dev/urandom | base64`)')
    return secret

  def check_files(self) -> 'ServerConfig':
    """ConfigError naming the flag if a file it names does not exist, or a PEM file holds
    not what the flag wants (before anything loads)."""
    for name in ('auth_token_file', 'tls_cert', 'tls_key', 'tls_client_ca', 'init_params',
                 'job_secret_file'):
      path = getattr(self, name)
      if path is not None and not os.path.isfile(path):
        raise ConfigError(f'{_flag(name)}: no such file: {path}')
    for name, kind in (('tls_cert', 'certificate'), ('tls_key', 'key'),
                       ('tls_client_ca', 'certificate')):
      check_pem(getattr(self, name), kind, _flag(name))
    if self.checkpoint_dir and os.path.exists(self.checkpoint_dir) and not os.path.isdir(
        self.checkpoint_dir):
      raise ConfigError(f'--checkpoint-dir: {self.checkpoint_dir} is not a directory')
    return self

  @property
  def worker_allowlist(self) -> Optional[frozenset[str]]:
    if self.allowed_workers is None:
      return None
    return frozenset(w.strip() for w in str(self.allowed_workers).split(',') if w.strip())

  @property
  def effective_quorum(self) -> int:
    return 1 if self.step_mode == 'async' else (self.quorum or self.num_workers)





_PEM_MARKERS = {'certificate': (b'-----BEGIN CERTIFICATE-----',),
                'key': (b'PRIVATE KEY-----',)}


def check_pem(path: Optional[str], kind: str, flag: str) -> None:
  """ConfigError naming `flag` unless the file at `path` (if any) holds a PEM `kind`
  ('certificate' or 'key'): gRPC's own complaint is C++ log lines, then a failure that
  says nothing of the file."""
  if path is None:
    return
  try:
    with open(path, 'rb') as fh:
      data = fh.read(1 << 20)
  except OSError as e:
    raise ConfigError(f'{flag}: {path}: {e.strerror}') from None
  if not any(m in data for m in _PEM_MARKERS[kind]):
    other = 'key' if kind == 'certificate' else 'certificate'
    holds = (f'a PEM {other}' if any(m in data for m in _PEM_MARKERS[other])
             else 'no PEM data')
    raise ConfigError(f'{flag}: {path} holds {holds}, not a PEM {kind}')


def _check_type(f: dataclasses.Field, value: Any) -> None:
  """ConfigError unless `value` (from a flag or YAML) is of field `f`'s type."""
  kind = f.type if isinstance(f.type, str) else f.type.__name__
  if value is None and 'Optional' in kind:
    return
  if 'list' in kind:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
  elif 'bool' in kind:
    ok = isinstance(value, bool)
  elif 'int' in kind:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif 'float' in kind:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, str)
  if not ok:
    raise ConfigError(f'{_flag(f.name)}: expected {kind.replace("Optional[", "").rstrip("]")}, '
                      f'got {value!r}', f.name)


def _boolean(text: str) -> bool:
  value = text.strip().lower()
  if value in ('1', 'true', 'yes', 'on'):
    return True
  if value in ('0', 'false', 'no', 'off'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def _flag(name: str) -> str:
  return '--' + name.replace('_', '-')


# `serve --help` by topic; every field in exactly one (a test checks).
GROUPS = {
    'network': ('host', 'port', 'grpc_threads', 'metrics_port', 'health_port', 'keepalive_s',
                'health_stuck_s'),
    'logs': ('log_level', 'log_format', 'progress_every_seconds'),
    'security': ('allowed_workers', 'auth_token_file', 'auth_token_env', 'tls_cert', 'tls_key',
                 'tls_client_ca'),
    'limits': ('max_concurrent_rpcs', 'max_streams_per_connection', 'stream_idle_timeout_s',
               'min_push_bytes_per_second',
               'max_stream_seconds', 'max_inflight_pushes', 'max_inflight_bytes',
               'admission_timeout_s'),
    'checkpoints': ('checkpoint_dir', 'checkpoint_every_steps', 'checkpoint_every_seconds',
                    'keep_checkpoints', 'async_checkpoints', 'discard_unreadable_checkpoints',
                    'shutdown_grace_s', 'init_params'),
    'steps': ('num_workers', 'step_mode', 'quorum', 'straggler_timeout_s', 'staleness_bound',
              'ordered_sum', 'nonfinite'),
    'mesh and processes': ('devices', 'num_processes', 'process_id', 'coordinator_address',
                           'advertise_address', 'job_secret_file', 'job_secret_env'),
    'optimizer (LAMB)': ('optimizer', 'momentum', 'moments', 'learning_rate', 'schedule',
                         'warmup_steps',
                         'decay_steps',
                         'end_learning_rate', 'b1', 'b2', 'eps', 'eps_root', 'weight_decay',
                         'max_grad_norm', 'exclude_from_weight_decay',
                         'exclude_from_layer_adaptation'),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds --config and one flag per ServerConfig field (defaults suppressed), by topic."""
  parser.add_argument('--config', help='YAML file of settings (keys: the flag names, '
                      'with - or _); flags given on the command line win')
  group_of = {name: title for title, names in GROUPS.items() for name in names}
  groups = {title: parser.add_argument_group(title) for title in GROUPS}
  for f in dataclasses.fields(ServerConfig):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=f'{f.metadata["help"]} (default: {f.default})')
    if 'list' in kind:
      kwargs['action'] = 'append'
      kwargs['metavar'] = 'REGEX'
    elif 'bool' in kind:
      kwargs['type'] = _boolean
    elif 'int' in kind:
      kwargs['type'] = int
    elif 'float' in kind:
      kwargs['type'] = float
    choices = {'step_mode': STEP_MODES, 'schedule': SCHEDULES, 'nonfinite': NONFINITE_POLICIES,
               'log_format': LOG_FORMATS, 'optimizer': OPTIMIZERS, 'moments': MOMENTS}
    if f.name in choices:
      kwargs['choices'] = choices[f.name]
    groups[group_of[f.name]].add_argument(_flag(f.name), **kwargs)


def load_yaml(path: str) -> dict[str, Any]:
  """The settings of a YAML file; ConfigError naming the file (and key) if it cannot be used."""
  try:
    with open(path, encoding='utf-8') as fh:
      data = yaml.safe_load(fh) or {}
  except OSError as e:
    raise ConfigError(f'--config {path}: {e.strerror}') from None
  except yaml.YAMLError as e:
    where = getattr(e, 'problem_mark', None)
    at = f', line {where.line + 1}' if where is not None else ''
    raise ConfigError(f'--config {path}{at}: not valid YAML '
                      f'({getattr(e, "problem", None) or e})') from None
  if not isinstance(data, dict):
    raise ConfigError(f'--config {path}: expected a mapping of settings, got '
                      f'{type(data).__name__}')
  names = {f.name for f in dataclasses.fields(ServerConfig)}
  out = _Settings(path, _key_lines(path))
  floats = {f.name for f in dataclasses.fields(ServerConfig)
             if 'float' in (f.type if isinstance(f.type, str) else f.type.__name__)}
  for key, value in data.items():
    name = str(key).replace('-', '_')
    if name not in names:
      raise ConfigError(f'--config {path}: unknown setting {key!r}')
    if name in floats and isinstance(value, str):
      value = _yaml_number(value)
    if name in PATTERNS and isinstance(value, str):  # one pattern, not in a list
      value = [value]
    out[name] = value
  return out


class _Settings(dict):
  """The settings of a YAML file, and where each is: `where(name)`, 'FILE, line N: KEY'."""

  def __init__(self, path: str, lines: dict[str, tuple[str, int]]):
    super().__init__()
    self.path, self.lines = path, lines

  def where(self, name: str) -> str:
    key, line = self.lines.get(name, (name, None))
    return f'--config {self.path}' + (f', line {line}' if line else '') + f': {key}'


def _key_lines(path: str) -> dict[str, tuple[str, int]]:
  """Setting name -> (its key as written, its 1-based line) in the YAML file `path`."""
  try:
    with open(path, encoding='utf-8') as fh:
      node = yaml.compose(fh)
  except (OSError, yaml.YAMLError):
    return {}
  if not isinstance(node, yaml.MappingNode):
    return {}
  return {str(k.value).replace('-', '_'): (str(k.value), k.start_mark.line + 1)
          for k, _ in node.value}


def _yaml_number(text: str) -> Any:
  """A number as users write it (YAML 1.1 reads `1e10`, without a dot, as a string)."""
  try:
    return float(text) if _NUMBER.fullmatch(text.strip()) else text
  except ValueError:
    return text


_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def from_args(args: argparse.Namespace) -> ServerConfig:
  """The config from --config (if any) overridden by the explicit flags."""
  values: dict[str, Any] = {}
  from_yaml = load_yaml(args.config) if getattr(args, 'config', None) else None
  values.update(from_yaml or {})
  names = {f.name for f in dataclasses.fields(ServerConfig)}
  flags = {k: v for k, v in vars(args).items() if k in names}
  values.update(flags)
  config = ServerConfig(**values)
  try:
    return config.validate()
  except ConfigError as e:
    if from_yaml is None or e.setting is None or e.setting in flags or e.setting not in from_yaml:
      raise
    # The value is the file's: say its key as written, the file and the line.
    flag = _flag(e.setting)
    text = str(e)[len(flag) + 2:] if str(e).startswith(flag + ': ') else str(e)
    raise ConfigError(f'{from_yaml.where(e.setting)}: {text}', e.setting) from None


def parse(argv: Sequence[str]) -> ServerConfig:
  parser = argparse.ArgumentParser()
  add_flags(parser)
  return from_args(parser.parse_args(argv))
