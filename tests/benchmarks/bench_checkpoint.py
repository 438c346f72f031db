"""Benchmark: checkpointing the optimizer server's state with Orbax.

What is measured, for a transformer-shaped float32 model of about 100M
parameters (`--size 100m`, default; `--size 25m` for a quick run) whose state
-- params and both LAMB moments, sharded over an 8-device CPU mesh exactly as
the server shards them -- is saved with the server's own `Checkpointer`:

  * how long the step loop is blocked by an asynchronous save (the time
    `Checkpointer.save` takes to return: Orbax copies the arrays to host
    memory, then writes in the background) compared with a synchronous save
    of the same state (target: <= 10%);
  * save and restore throughput in MB/s (synchronous save; restore onto the
    same mesh with target shardings) against `np.save` / `np.load` of the same
    bytes, as one .npy file per array, measured in the same run
    (target: >= 50%).

Each figure is the median of `--reps` repetitions, each into a fresh
directory under `--dir` (default: a temporary directory on the disk the
project lives on). The OS page cache is not dropped: both Orbax and NumPy
write to and read from it alike.

    python tests/benchmarks/bench_checkpoint.py            # ~100M parameters
    python tests/benchmarks/bench_checkpoint.py --size 25m --reps 3
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from service import runtime  # pylint: disable=wrong-import-position

runtime.simulate_cpu_devices(8)

# pylint: disable=wrong-import-position
import argparse
import json
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from service.config import ServerConfig
from service.core.checkpoint import Checkpointer
from service.core.model import ModelPlan
from service.core.persistence import specs_to_meta
from service.core.placement import make_mesh
from service.protocol.specs import LeafSpec

SIZES = {
    '100m': dict(vocab=30522, d=768, layers=12),
    '25m': dict(vocab=10000, d=512, layers=6),
}


def leaf_specs(vocab: int, d: int, layers: int) -> list[LeafSpec]:
  f32 = np.dtype(np.float32)
  specs = [LeafSpec("['embed']", (vocab, d), f32), LeafSpec("['pos']", (512, d), f32)]
  for i in range(layers):
    for name, shape in (('qkv', (d, 3 * d)), ('out', (d, d)), ('mlp_in', (d, 4 * d)),
                        ('mlp_in_b', (4 * d,)), ('mlp_out', (4 * d, d)), ('ln1', (d,)),
                        ('ln2', (d,))):
      specs.append(LeafSpec(f"['layer{i}']['{name}']", shape, f32))
  return specs


def build_state(specs: list[LeafSpec]):
  """The server's own state for these leaves: params and LAMB state on its 8-device mesh."""
  plan = ModelPlan(ServerConfig(devices=8), make_mesh(8), specs)
  rng = np.random.default_rng(0)
  host = [rng.standard_normal(s.shape, dtype=np.float32) * 0.02 for s in specs]
  state = plan.place(host)
  # Moments that are not all zeros (a real run's).
  state.opt_state = jax.tree.map(lambda x: x + 0.001 if x.ndim else x, state.opt_state)
  del host
  return plan, state


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=SIZES, default='100m')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--dir', default=None, help='where to write (default: a temp dir)')
  parser.add_argument('--json', default=None, help='also write the figures here')
  args = parser.parse_args(argv)

  specs = leaf_specs(**SIZES[args.size])
  plan, model = build_state(specs)
  state = model.checkpointed()
  total = nbytes(state)
  meta = {'leaves': specs_to_meta(specs)}
  host = [np.asarray(x) for x in jax.tree.leaves(state)]
  root = tempfile.mkdtemp(prefix='bench-ckpt-', dir=args.dir or os.getcwd())
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, '
        f'{os.cpu_count()} CPU cores')
  print(f'model {args.size}: {sum(int(np.prod(s.shape)) for s in specs):,} params in '
        f'{len(specs)} leaves; state (params + 2 moments) {total / 1e6:,.0f} MB; writing under '
        f'{root}')

  figures: dict[str, list[float]] = {k: [] for k in (
      'async_block_s', 'async_total_s', 'sync_s', 'restore_s', 'np_save_s', 'np_load_s')}
  try:
    for rep in range(args.reps):
      d = os.path.join(root, f'rep{rep}')
      # Synchronous save, then restore of it onto the same mesh (target shardings).
      sync = Checkpointer(os.path.join(d, 'sync'), asynchronous=False)
      figures['sync_s'].append(timed(lambda: sync.save(1, state, meta, force=True)))
      target = plan.abstract_state()
      t0 = time.perf_counter()
      found = sync.restore_latest(lambda _m: target)
      jax.block_until_ready(found[1])
      figures['restore_s'].append(time.perf_counter() - t0)
      del found
      sync.close()
      # Asynchronous save: the time until `save` returns is what blocks the step loop.
      asy = Checkpointer(os.path.join(d, 'async'), asynchronous=True)
      t0 = time.perf_counter()
      asy.save(1, state, meta, force=True)
      figures['async_block_s'].append(time.perf_counter() - t0)
      asy.wait()
      figures['async_total_s'].append(time.perf_counter() - t0)
      asy.close()
      # NumPy baseline: the same bytes, one .npy per array.
      npdir = os.path.join(d, 'npy')
      os.makedirs(npdir)

      def np_save():
        for i, a in enumerate(host):
          np.save(os.path.join(npdir, f'{i}.npy'), a)

      def np_load():
        for i in range(len(host)):
          np.load(os.path.join(npdir, f'{i}.npy'))
      figures['np_save_s'].append(timed(np_save))
      figures['np_load_s'].append(timed(np_load))
      shutil.rmtree(d)
      print(f'  rep {rep}: ' + ', '.join(f'{k} {v[-1]:.3f}' for k, v in figures.items()))
  finally:
    shutil.rmtree(root, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in figures.items()}
  mbs = lambda s: total / s / 1e6
  rows = [
      ('save (synchronous)', med['sync_s'], mbs(med['sync_s']), mbs(med['np_save_s']),
       med['np_save_s'] / med['sync_s']),
      ('restore (onto the mesh)', med['restore_s'], mbs(med['restore_s']),
       mbs(med['np_load_s']), med['np_load_s'] / med['restore_s']),
  ]
  blocked = med['async_block_s'] / med['sync_s']
  print(f'\nOrbax checkpoint of the server state, {args.size} ({total / 1e6:,.0f} MB), median of '
        f'{args.reps}:\n')
  print('| operation | seconds | MB/s | np.save/np.load MB/s | vs NumPy |')
  print('|---|---:|---:|---:|---:|')
  for name, s, ours, base, ratio in rows:
    print(f'| {name} | {s:.2f} | {ours:,.0f} | {base:,.0f} | {ratio:.0%} |')
  print(f'\nasynchronous save: the step loop is blocked {med["async_block_s"]:.3f} s '
        f'(the whole save takes {med["async_total_s"]:.2f} s in the background) against '
        f'{med["sync_s"]:.2f} s for a synchronous save: {blocked:.1%}')
  print('\nTargets: blocked <= 10% of a synchronous save: '
        f'{"met" if blocked <= 0.10 else "MISS"}; save and restore >= 50% of NumPy: '
        f'{"met" if min(r[4] for r in rows) >= 0.5 else "MISS"}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as fh:
      json.dump({'size': args.size, 'bytes': total, 'median_s': med, 'blocked_fraction': blocked,
                 'reps': figures}, fh, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
