"""Setting up a process for JAX: simulated CPU devices (XLA's flags), the multi-process runtime.

The one place that edits `XLA_FLAGS` and that starts `jax.distributed`; it
imports nothing heavy at module level, so that a CLI command, the demo's
children, the tests and the benchmarks can call it before JAX loads.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def with_cpu_devices(xla_flags: str, count: Optional[int]) -> str:
  """`xla_flags` asking XLA:CPU for `count` simulated devices (None: dropping the ask).

  Example:
    >>> with_cpu_devices('--xla_foo=1 --xla_force_host_platform_device_count=2', 8)
    '--xla_foo=1 --xla_force_host_platform_device_count=8'
  """
  flags = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  if count is not None:
    flags.append(f'{DEVICE_COUNT_FLAG}={count}')
  return ' '.join(flags)


def simulate_cpu_devices(count: Optional[int],
                         environ: Optional[MutableMapping[str, str]] = None) -> None:
  """Asks for `count` simulated CPU devices (None: none asked) in `environ` (default: this
  process's, which must not have imported JAX yet: then nothing changes)."""
  if environ is None:
    if 'jax' in sys.modules:
      return
    environ = os.environ
  flags = with_cpu_devices(environ.get('XLA_FLAGS', ''), count)
  if flags:
    environ['XLA_FLAGS'] = flags
  else:
    environ.pop('XLA_FLAGS', None)


_store = None  # the job's SignedStore, once initialize_distributed has joined one


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           secret: Optional[bytes] = None,
                           bind_address: Optional[str] = None,
                           heartbeat_timeout_s: int = 100,
                           initialization_timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX job (`jax.distributed.initialize`).

  Afterwards `jax.devices()` lists every process's devices (their ids are not
  indices: a second process's CPU devices count from 2048) and a mesh over
  them spans the processes; collectives cross them (on CPU through gloo).
  The job is what the processes agree on: JAX's coordinator (process 0 serves
  it at `coordinator_address`) and its key-value store.

  Args:
    coordinator_address: HOST:PORT of process 0's coordinator service.
    num_processes: how many processes the job has.
    process_id: this one's index, in [0, num_processes).
    secret: the job's secret, the same in every process: every value the processes
      exchange through the coordinator's store is signed with it (`job_store`).
      Without one, no `Job` can be made (a job whose store anyone could write).
    bind_address: where process 0 binds the coordinator (default: JAX's, every
      interface); e.g. '127.0.0.1:PORT' for a job on one machine.
    heartbeat_timeout_s: after how long without a heartbeat a process is lost.
    initialization_timeout_s: how long to wait for every process to join.
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f'process_id {process_id} is not in [0, num_processes={num_processes})')
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, cluster_detection_method='deactivate',
      coordinator_bind_address=bind_address, heartbeat_timeout_seconds=heartbeat_timeout_s,
      initialization_timeout=initialization_timeout_s)
  if secret:
    _start_session(secret, num_processes, process_id, float(initialization_timeout_s))


def _start_session(secret: bytes, count: int, index: int, timeout_s: float) -> None:
  """This run's signed store: each process publishes a random nonce (signed) and the session
  is their digest, so that a value signed in an earlier run of the job never verifies in this
  one. A nonce key someone wrote first (a replay) makes this process fail: it never signs
  under a session an outsider chose."""
  global _store  # pylint: disable=global-statement
  import secrets  # pylint: disable=import-outside-toplevel
  from service.core import coordination  # pylint: disable=import-outside-toplevel
  base = coordination.CoordinatorStore(coordinator_client())
  opening = coordination.SignedStore(base, secret)
  if not opening.set(f'lamb_sharded/session/{index}', secrets.token_hex(16), overwrite=False):
    raise RuntimeError(f'the job\'s store already holds process {index}\'s nonce: someone else '
                       f'wrote it (the coordinator\'s port is reachable from outside the job?)')
  nonces = [opening.blocking_get(f'lamb_sharded/session/{i}', timeout_s) for i in range(count)]
  missing = [i for i, n in enumerate(nonces) if n is None]
  if missing:
    raise RuntimeError(f'no signed nonce from server processes {missing} within {timeout_s:.0f}s '
                       f'(a different job secret?)')
  _store = coordination.SignedStore(base, secret, coordination.session_of(nonces))


def coordination():
  """This process's `coordination.Coordination`: its job's (a `Job` over the job's signed
  store), or a lone process's."""
  import jax  # pylint: disable=import-outside-toplevel
  from service.core import coordination as coordination_lib  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return coordination_lib.Coordination()
  return coordination_lib.Job(job_store(), jax.process_index(), jax.process_count())


def job_store():
  """The job's signed store (a `coordination.SignedStore`); RuntimeError if the job was joined
  without a secret."""
  if _store is None:
    raise RuntimeError('this process joined its job without a secret '
                       '(initialize_distributed(secret=...), --job-secret-file/--job-secret-env): '
                       'the processes cannot authenticate what they exchange')
  return _store


def exchange(key: str, value: str, timeout_s: float = 60.0) -> list[str]:
  """Every process's `value` for `key`, by process index, through JAX's coordinator.

  Each process of a `jax.distributed` job publishes its value in the
  coordinator's key-value store and waits for the others' (e.g. the server
  processes' endpoints). In a single process: `[value]`.
  """
  if coordinator_client() is None:
    return [value]
  import jax  # pylint: disable=import-outside-toplevel
  store = job_store()
  if not store.set(f'lamb_sharded/{key}/{jax.process_index()}', value, overwrite=False):
    raise RuntimeError(f'the job\'s store already holds {key!r} of process '
                       f'{jax.process_index()}: someone else wrote it')
  values = [store.blocking_get(f'lamb_sharded/{key}/{i}', timeout_s)
            for i in range(jax.process_count())]
  missing = [i for i, v in enumerate(values) if v is None]
  if missing:
    raise RuntimeError(f'no signed {key!r} from server processes {missing} within '
                       f'{timeout_s:.0f}s')
  return values


def coordinator_client():
  """The job's coordinator client (JAX's own; None in a single process): its key-value store.

  JAX 0.10 has no public handle on it; `jax._src.distributed` is where
  `jax.distributed.initialize` keeps it.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client

