"""What the DiLoCo study leaves behind: results.json (every run), table.md, the plots.

`summarize` turns the runs into rows, one per (horizon, method): the held-out loss
over the seeds run (mean and sample standard deviation), its difference from the
synchronous baseline's (relative), the communication rounds, the tensor bytes each
worker pushed and pulled, and how many times fewer than the baseline's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any

from studies import report

COLORS = {'sync': 'black', 'nesterov': 'tab:blue', 'lamb': 'tab:red', 'sgd': 'tab:green'}
MARKERS = {1: 's', 10: 'o', 50: '^'}
TOLERANCES = (0.02, 0.05)  # the goal, and its fallback


def _score(run: dict) -> float:
  loss = run['heldout_loss']
  return math.inf if run['diverged'] or loss is None or not math.isfinite(loss) else loss


def _key(method: dict) -> tuple:
  return tuple(sorted(method.items()))


def summarize(runs: list[dict]) -> list[dict]:
  """One row per (horizon, method), in the order first run; `vs_baseline` and `ratio` against
  the synchronous row of the same horizon.

  Example:
    >>> m = lambda h, codec='none': dict(local_steps=h, outer='lamb' if h == 1 else 'sgd',
    ...     lr=1.0, momentum=0.0, codec=codec, pull_dtype='float32', exclude_biases=False)
    >>> r = lambda h, seed, loss, b: dict(method=m(h), seed=seed, horizon='default', role='',
    ...     heldout_loss=loss, diverged=False, rounds=100 // h, pushed_bytes=b, pulled_bytes=b,
    ...     wall_s=1.0, measured={})
    >>> rows = summarize([r(1, 0, 2.0, 800), r(1, 1, 2.2, 800), r(10, 0, 2.2, 80)])
    >>> [(x['local_steps'], round(x['mean'], 2), round(x['vs_baseline'], 3), x['ratio'])
    ...  for x in rows]
    [(1, 2.1, 0.0, 1.0), (10, 2.2, 0.048, 10.0)]
  """
  cells: dict[tuple, list[dict]] = {}
  for run in runs:
    cells.setdefault((run['horizon'], _key(run['method'])), []).append(run)
  rows = []
  for (horizon, _), cell in cells.items():
    scores = [_score(r) for r in cell]
    first = cell[0]
    rows.append({
        'horizon': horizon, 'method': first['method'],
        'local_steps': first['method']['local_steps'], 'outer': first['method']['outer'],
        'role': first['role'],
        'mean': statistics.fmean(scores),
        'std': statistics.stdev(scores) if len(scores) > 1 and all(map(math.isfinite, scores))
        else 0.0,
        'seeds': len(cell), 'rounds': first['rounds'],
        'pushed_bytes': first['pushed_bytes'], 'pulled_bytes': first['pulled_bytes'],
        'bytes': first['pushed_bytes'] + first['pulled_bytes'],
        'wall_s': statistics.fmean(r['wall_s'] for r in cell),
        'bytes_match': all(_bytes_match(r) for r in cell),
    })
  for row in rows:
    base = next((b for b in rows if b['horizon'] == row['horizon'] and b['local_steps'] == 1),
                None)
    row['vs_baseline'] = (row['mean'] - base['mean']) / base['mean'] if base else math.nan
    row['ratio'] = base['bytes'] / row['bytes'] if base else math.nan
  return rows


def _bytes_match(run: dict) -> bool:
  """Whether the server's counters say what the study computed (True if it read none)."""
  m = run.get('measured') or {}
  if not m:
    return True
  return (m['pushed_per_worker'] == run['pushed_bytes']
          and m['pulled_per_worker'] == run['pulled_bytes'])


def findings(rows: list[dict]) -> dict:
  """The goal (the largest reduction within 2% and within 5% of the baseline's loss), outer
  LAMB against outer Nesterov at each H, and the gap at each horizon."""
  out: dict[str, Any] = {'within': [], 'lamb_vs_nesterov': [], 'gap': []}
  for horizon in ('default', 'longer'):
    for tol in TOLERANCES:
      ok = [r for r in rows if r['horizon'] == horizon and r['vs_baseline'] <= tol]
      if not ok:  # no such horizon, or its baseline diverged
        continue
      best = max(ok, key=lambda r: (r['ratio'], -r['mean']))
      out['within'].append({'horizon': horizon, 'tolerance': tol, 'ratio': best['ratio'],
                            'label': label(best), 'vs_baseline': best['vs_baseline']})
  for horizon in ('default', 'longer'):
    for h in sorted({r['local_steps'] for r in rows if r['local_steps'] > 1}):
      cell = [r for r in rows if r['horizon'] == horizon and r['local_steps'] == h
              and r['method']['codec'] == 'none' and r['method']['pull_dtype'] == 'float32']
      lamb = [r for r in cell if r['outer'] == 'lamb']
      nesterov = [r for r in cell if r['outer'] == 'nesterov']
      if lamb and nesterov:
        a, b = min(lamb, key=lambda r: r['mean']), nesterov[0]
        out['lamb_vs_nesterov'].append({'horizon': horizon, 'local_steps': h,
                                        'lamb': label(a), 'delta': a['mean'] - b['mean'],
                                        'seeds': min(a['seeds'], b['seeds'])})
      if cell:
        best = min(cell, key=lambda r: r['mean'])
        out['gap'].append({'horizon': horizon, 'local_steps': h, 'label': label(best),
                           'vs_baseline': best['vs_baseline']})
  return out


def label(row: dict) -> str:
  from studies.diloco_runs import Method  # pylint: disable=import-outside-toplevel
  return Method(**row['method']).label()


def _fmt_loss(row: dict) -> str:
  if not math.isfinite(row['mean']):
    return 'diverged'
  return f'{row["mean"]:.3f} ± {row["std"]:.3f}' if row['seeds'] > 1 else f'{row["mean"]:.3f}'


def _fmt_bytes(n: float) -> str:
  return f'{n / 1e6:.2f} MB' if n >= 1e5 else f'{n / 1e3:.1f} kB'


def table_text(summary: dict) -> str:
  """The markdown table of the rows, then the findings."""
  from studies.diloco_runs import Method  # pylint: disable=import-outside-toplevel
  lines = ['| horizon | method | H | outer optimizer | codec | held-out loss (nats/char) '
           '| vs (1) | seeds | rounds | pushed + pulled per worker | less than (1) | s/run |',
           '|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|']
  names = {'baseline': '(1) synchronous', 'outer': '(2) DiLoCo', 'codec': '(3) DiLoCo, codecs'}
  for row in summary['rows']:
    m = Method(**row['method'])
    outer = f'lamb lr {m.lr:g} (warm-up + cosine)' if m.synchronous else m.outer_label()
    lines.append(
        f'| {row["horizon"]} | {names.get(row["role"], row["role"])} | {m.local_steps} | '
        f'{outer} | {m.codec_label()} | {_fmt_loss(row)} | {row["vs_baseline"]:+.1%} | '
        f'{row["seeds"]} | {row["rounds"]} | {_fmt_bytes(row["pushed_bytes"])} + '
        f'{_fmt_bytes(row["pulled_bytes"])} | {row["ratio"]:.1f}x | {row["wall_s"]:.0f} |')
  f = summary['findings']
  agree = 'agree for every run' if summary['bytes_match'] else 'DISAGREE (see results.json)'
  lines += ['', f'Bytes: tensor bytes per worker, computed; the server\'s counters {agree}.',
            f'Warm-up: {summary["warmup"]["steps"]} synchronous LAMB steps in-process, held-out '
            f'loss {summary["warmup"]["heldout_loss"]:.3f} (mean over seeds).', '']
  for best in f['within']:
    lines.append(f'- {best["horizon"]} horizon: the largest reduction within '
                 f'{best["tolerance"]:.0%} of (1)\'s held-out loss is {best["ratio"]:.1f}x '
                 f'({best["label"]}, {best["vs_baseline"]:+.1%}).')
  for c in f['lamb_vs_nesterov']:
    word = 'beats' if c['delta'] < -0.005 else 'loses to' if c['delta'] > 0.005 else 'equals'
    seeds = 'one seed' if c['seeds'] == 1 else f'{c["seeds"]} seeds'
    lines.append(f'- {c["horizon"]} horizon, H = {c["local_steps"]}: outer LAMB (best: '
                 f'{c["lamb"]}) {word} outer Nesterov by {abs(c["delta"]):.3f} nats/char'
                 f' ({seeds}).')
  for g in f['gap']:
    lines.append(f'- {g["horizon"]} horizon, H = {g["local_steps"]}: the best float32 DiLoCo '
                 f'({g["label"]}) is {g["vs_baseline"]:+.1%} from (1).')
  return '\n'.join(lines)


def write(config, task, warm_runs, runs, out: str, wall_s: float) -> dict:
  """results.json, table.md, loss_vs_bytes.png, loss_curves.png in `out`; the summary."""
  run_dicts = [dataclasses.asdict(r) for r in runs]
  rows = summarize(run_dicts)
  files = [os.path.join(out, name) for name in
           ('results.json', 'table.md', 'loss_vs_bytes.png', 'loss_curves.png')]
  summary: dict[str, Any] = {
      'config': dataclasses.asdict(config),
      'task': {'name': 'charlm', 'parameters': task.num_params(), 'context': task.context,
               'width': task.width, 'depth': task.depth,
               'train_chars': len(task.corpus().train),
               'heldout_chars': len(task.corpus().heldout)},
      'warmup': {'steps': config.warmup_steps, 'path': 'in-process (studies.train, LAMB)',
                 'heldout_loss': statistics.fmean(r.heldout_loss for r in warm_runs),
                 'runs': [dataclasses.asdict(r) for r in warm_runs]},
      'rows': rows,
      'findings': findings(rows),
      'bytes_match': all(r['bytes_match'] for r in rows),
      'runs': run_dicts,
      'wall_s': wall_s,
      'files': files,
  }
  with open(files[0], 'w', encoding='utf-8') as fh:
    json.dump(summary, fh, indent=1, default=report.jsonable)
    fh.write('\n')
  with open(files[1], 'w', encoding='utf-8') as fh:
    fh.write(table_text(summary) + '\n')
  plot_loss_vs_bytes(summary, files[2])
  plot_curves(summary, files[3])
  return summary


def plot_loss_vs_bytes(summary: dict, path: str) -> None:
  """Held-out loss against the bytes each worker communicated; one panel per horizon."""
  plt = report.pyplot()
  horizons = [h for h in ('default', 'longer') if any(r['horizon'] == h for r in summary['rows'])]
  fig, axes = plt.subplots(1, len(horizons), figsize=(6.4 * len(horizons), 4.4), dpi=100,
                           squeeze=False)
  for ax, horizon in zip(axes[0], horizons):
    rows = [r for r in summary['rows'] if r['horizon'] == horizon and math.isfinite(r['mean'])]
    base = next((r for r in rows if r['local_steps'] == 1), None)
    if base is not None:
      for tol, alpha in zip(TOLERANCES, (0.18, 0.08)):
        ax.axhspan(base['mean'], base['mean'] * (1 + tol), color='gray', alpha=alpha, lw=0,
                   label=f'within {tol:.0%} of (1)')
    seen = set()
    for r in rows:
      outer = 'sync' if r['local_steps'] == 1 else r['outer']
      name = f'{"synchronous (1)" if outer == "sync" else "outer " + outer}'
      compressed = r['method']['codec'] != 'none'
      ax.errorbar(r['bytes'], r['mean'], yerr=r['std'], color=COLORS[outer],
                  marker=MARKERS.get(r['local_steps'], 'D'), ms=7, capsize=3,
                  mfc='none' if compressed else COLORS[outer], ls='none',
                  label=name if name not in seen else None)
      seen.add(name)
      if compressed or r['method']['exclude_biases']:
        tag = (r['method']['codec'] if compressed else 'no TR on biases')
        ax.annotate(tag, (r['bytes'], r['mean']), textcoords='offset points', xytext=(5, 4),
                    fontsize=7)
    ax.set_xscale('log')
    ax.set_xlabel('bytes pushed + pulled per worker (log)\n'
                  '■ H=1, ● H=10, ▲ H=50; hollow: int8/int4 pushes + bf16 pulls', fontsize=8)
    ax.set_ylabel('held-out loss (nats/char)')
    top = min(max(r['mean'] for r in rows), (base['mean'] * 1.25) if base else math.inf)
    ax.set_ylim(top=top + 0.02)
    ax.set_title(f'{horizon} horizon', fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
  t = summary['task']
  fig.suptitle(f'DiLoCo through the service: 4 workers, char-LM ({t["parameters"]:,} params), '
               'mean over seeds', fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_curves(summary: dict, path: str) -> None:
  """Training loss (the workers' mean) against inner steps: (1) and the best of each H."""
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  rows = [r for r in summary['rows'] if r['horizon'] == 'default']
  chosen = [r for r in rows if r['local_steps'] == 1]
  for h in sorted({r['local_steps'] for r in rows} - {1}):
    for outer in ('nesterov', 'lamb', 'sgd'):
      cell = [r for r in rows if r['local_steps'] == h and r['outer'] == outer
              and r['method']['codec'] == 'none']
      if cell:
        chosen.append(min(cell, key=lambda r: r['mean']))
  for row in chosen:
    run = next(r for r in summary['runs'] if r['horizon'] == 'default' and r['seed'] == 0
               and _key(r['method']) == _key(row['method']))
    outer = 'sync' if row['local_steps'] == 1 else row['outer']
    ax.plot([s for s, _ in run['curve']], [v for _, v in run['curve']], color=COLORS[outer],
            ls={1: '-', 10: '--'}.get(row['local_steps'], ':'), lw=1.2, label=label(row))
  ax.set_xlabel('inner steps of each worker (after the warm-up)')
  ax.set_ylabel('training loss (nats/char)')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title('training loss (mean of the workers\' inner steps), seed 0', fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
