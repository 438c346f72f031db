"""Test setup shared by every test and doctest: 8 simulated CPU devices, set before JAX loads."""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
_flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
os.environ['XLA_FLAGS'] = ' '.join(_flags + [_FLAG])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
