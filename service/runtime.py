"""Setting up a process before JAX loads: simulated CPU devices (XLA's flags).

The one place that edits `XLA_FLAGS`; it imports nothing heavy, so that a CLI
command, the demo's children, the tests and the benchmarks can call it first.
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
