"""Setting up a process before JAX loads: simulated CPU devices (XLA's flags).

The one place that edits `XLA_FLAGS`; it imports nothing heavy, so that a CLI
command, the demo's children, the tests and the benchmarks can call it first.
"""

from __future__ import annotations

import logging
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


def quiet_libraries(level: str, libraries: str = 'WARNING') -> None:
  """Keeps the libraries' own chatter below `libraries` (Orbax's per-save INFO lines, its
  notes on read-only managers, JAX's backend notes) out of a process's logs, unless
  `level` is DEBUG: absl's verbosity (Orbax logs through absl), JAX's logger, and XLA's
  C++ logging (TF_CPP_MIN_LOG_LEVEL, before JAX loads, unless already set)."""
  debug = level.upper() == 'DEBUG'
  if 'jax' not in sys.modules:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if debug else '1')
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity('debug' if debug else libraries.lower())
  # JAX's own notes ("Unable to initialize backend 'tpu'") go to its Python logger.
  logging.getLogger('jax').setLevel(logging.NOTSET if debug else libraries.upper())
