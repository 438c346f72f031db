"""`lamb-sharded`: the command-line entry point.

Subcommands import JAX lazily, so that each can set up the XLA environment (for
example the number of simulated CPU devices) before JAX initialises.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _set_cpu_devices(n: int) -> None:
  """Simulates `n` CPU devices (must run before JAX is imported)."""
  if 'jax' in sys.modules:
    return
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={n}')
  os.environ['XLA_FLAGS'] = ' '.join(flags)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='lamb-sharded', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)

  demo = sub.add_parser('demo', help='train a small model with sharded LAMB on simulated devices')
  demo.add_argument('--devices', type=int, default=8, help='simulated CPU devices (default 8)')
  demo.add_argument('--steps', type=int, default=200, help='training steps (default 200)')
  demo.add_argument('--seed', type=int, default=0, help='random seed')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == 'demo':
    _set_cpu_devices(args.devices)
    from service import demo  # pylint: disable=import-outside-toplevel
    return demo.run(steps=args.steps, seed=args.seed)
  raise AssertionError(args.command)


if __name__ == '__main__':
  sys.exit(main())
