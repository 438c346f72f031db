"""Test setup shared by every test and doctest: 8 simulated CPU devices, set before JAX loads."""

import os

from service import runtime

runtime.simulate_cpu_devices(8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
