"""The server's memory with float32, int8 and int4 LAMB moments (`serve --moments`).

A real `lamb-sharded serve` (8 simulated devices) per row, one worker: the model
initialised, 3 warm-up steps and `--reps` timed steps pushed and pulled through
gRPC (`bench_service.run_server`); the server's peak RSS (VmHWM) and RSS at the end
(VmRSS) read from /proc. The rows alternate float32, int8, int4, float32, ...
(`--rounds`; `--moments` picks which); the table shows each row's medians and their
ratios to float32:

  .venv/bin/python tests/benchmarks/bench_moments.py --size 100m

What the state should take: params 4 B a parameter, the step's gradient sum 4 B, and
LAMB's moments 8 B (float32), about 2.07 B (int8 codes and a float32 scale per block of
128; leaves under 4,096 entries stay float32) or about 1.07 B (int4 codes, two to a
byte) -- 16, about 10.1 and about 9.1 B a parameter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_service as bs  # noqa: E402  pylint: disable=wrong-import-position

MOMENTS = ('float32', 'int8', 'int4')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--size', choices=sorted(bs.SIZES), default='100m')
  p.add_argument('--reps', type=int, default=2, help='timed steps per server (default 2)')
  p.add_argument('--rounds', type=int, default=1,
                 help='servers of each kind, alternating (default 1)')
  p.add_argument('--moments', nargs='+', choices=MOMENTS, default=list(MOMENTS),
                 help='which servers to run (default all; float32 always, the baseline)')
  args = p.parse_args(argv)
  moments_run = ['float32'] + [m for m in args.moments if m != 'float32']
  params = bs.random_tree(bs.leaf_shapes(**bs.SIZES[args.size]), 1, 0.02)
  grads = bs.random_tree(bs.leaf_shapes(**bs.SIZES[args.size]), 2, 1e-3)
  n = bs.tree_params(params)
  runs: dict[str, list[dict]] = {m: [] for m in moments_run}
  for r in range(args.rounds):
    for moments in moments_run:
      print(f'round {r}: --moments {moments}', flush=True)
      runs[moments].append(bs.run_server(1, params, grads, args.reps,
                                         ['--moments', moments], log=lambda _: None))
  rows = {}
  for moments, rs in runs.items():
    rows[moments] = {
        'peak': statistics.median(x['vmhwm'] for x in rs),
        'end': statistics.median(x['vmrss_end'] for x in rs),
        'apply': statistics.median(s['apply_s'] for x in rs for s in x['steps']),
        'step': statistics.median(s['push_s'] + s['apply_s'] + s['pull_s']
                                  for x in rs for s in x['steps'])}
  base = rows['float32']
  print(f'\n{n / 1e6:.1f}M parameters, 8 simulated devices, 1 worker, {args.reps} steps x '
        f'{args.rounds} server(s) each\n')
  print('| moments | peak RSS GB | RSS at end GB | bytes a parameter (end) | apply s | '
        'peak / float32 | end / float32 | apply / float32 |')
  print('|---|---|---|---|---|---|---|---|')
  for moments, r in rows.items():
    print(f"| {moments} | {r['peak'] / 1e9:.2f} | {r['end'] / 1e9:.2f} | {r['end'] / n:.1f} | "
          f"{r['apply']:.3f} | {r['peak'] / base['peak']:.2f} | {r['end'] / base['end']:.2f} | "
          f"{r['apply'] / base['apply']:.2f} |")
  return 0


if __name__ == '__main__':
  sys.exit(main())
