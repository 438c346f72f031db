"""What a study leaves behind: results.json (every run), table.md, and the plots.

`summarize` turns the runs into rows, one per (view, batch, optimizer): the best
learning rate of the seed-0 sweep by the task's metric (`studies.tasks.Metric`:
held-out loss, or test accuracy), the metric over the seeds run at it (mean and
sample standard deviation) -- and the held-out loss too where the metric is another
figure --, the learning rates tried and whether the best lies on an edge of them
(then the grid did not bracket the optimum).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any

from studies import tasks
from studies.train import LABELS

VIEWS = {'epochs': 'same data (epochs)', 'steps': 'same steps'}
COLORS = {'lamb': 'tab:blue', 'adamw': 'tab:red', 'optax_lamb': 'tab:cyan'}


def _value(run: dict, metric: tasks.Metric) -> float:
  """The run's figure of `metric`; if it diverged, the worst there is (inf for a loss, -inf for
  an accuracy)."""
  score = metric.score(run.get(metric.key), run['diverged'])
  return -score if metric.higher_is_better else score


def _mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict], metric: tasks.Metric) -> list[dict]:
  """One row per (view, batch, optimizer), in that order.

  Example:
    >>> r = lambda lr, seed, loss: dict(view='epochs', optimizer='adamw', batch=8, lr=lr,
    ...     seed=seed, heldout_loss=loss, diverged=False, steps=10, wall_s=1.0)
    >>> runs = [r(0.1, 0, 2.0), r(0.2, 0, 1.5), r(0.2, 1, 1.7), r(0.4, 0, 1.9)]
    >>> [row] = summarize(runs, tasks.HELDOUT_LOSS)
    >>> row['best_lr'], round(row['mean'], 3), round(row['std'], 3), row['seeds'], row['edge']
    (0.2, 1.6, 0.141, 2, False)
    >>> runs[1]['heldout_accuracy'], runs[3]['heldout_accuracy'] = 0.7, 0.9  # seed 0's
    >>> runs[0]['heldout_accuracy'] = runs[2]['heldout_accuracy'] = 0.8
    >>> [row] = summarize(runs, tasks.HELDOUT_ACCURACY)   # ranked by accuracy now
    >>> row['best_lr'], row['mean'], row['loss_mean'], row['edge']
    (0.4, 0.9, 1.9, True)
  """
  cells: dict[tuple, list[dict]] = {}
  for run in runs:
    cells.setdefault((run['view'], run['batch'], run['optimizer']), []).append(run)
  order = {o: i for i, o in enumerate(LABELS)}
  rows = []
  for (view, batch, opt) in sorted(cells, key=lambda k: (k[0] != 'epochs', k[1], order[k[2]])):
    cell = cells[view, batch, opt]
    sweep = {r['lr']: r for r in cell if r['seed'] == 0}
    best_lr = min(sweep, key=lambda lr: metric.score(sweep[lr].get(metric.key),
                                                     sweep[lr]['diverged']))
    finals = [r for r in cell if r['lr'] == best_lr]
    mean, std = _mean_std([_value(r, metric) for r in finals])
    loss_mean, loss_std = _mean_std([_value(r, tasks.HELDOUT_LOSS) for r in finals])
    lrs = sorted(sweep)
    rows.append({
        'view': view, 'batch': batch, 'optimizer': opt, 'best_lr': best_lr,
        'mean': mean, 'std': std, 'loss_mean': loss_mean, 'loss_std': loss_std,
        'seeds': len(finals), 'steps': finals[0]['steps'],
        'wall_s': statistics.fmean(r['wall_s'] for r in finals),
        'lrs': {f'{lr:.4g}': _value(sweep[lr], metric) for lr in lrs},
        'edge': len(lrs) > 1 and best_lr in (lrs[0], lrs[-1]),
        'path': finals[0].get('path', 'in-process'),
    })
  return rows


def _fmt(mean: float, std: float, seeds: int) -> str:
  if not math.isfinite(mean):
    return 'diverged'
  return f'{mean:.3f} ± {std:.3f}' if seeds > 1 else f'{mean:.3f}'


def metric_of(summary: dict) -> tasks.Metric:
  return tasks.Metric(**summary['task']['metric'])


def table_text(summary: dict) -> str:
  """The markdown table of the rows (the held-out loss in a column of its own where the
  metric is another figure), and LAMB minus AdamW per batch."""
  metric = metric_of(summary)
  loss_too = metric.key != 'heldout_loss'
  loss_label = f'held-out loss ({summary["task"]["loss_unit"]})'
  lines = [f'| view | batch | optimizer | best lr | {metric.label} | '
           + (f'{loss_label} | ' if loss_too else '')
           + f'seeds | steps | s/run | lrs tried ({metric.label.split(" (")[0]} of seed 0) |',
           '|---|---:|---|---:|---|' + ('---|' if loss_too else '') + '---:|---:|---:|---|']
  for row in summary['rows']:
    tried = ', '.join(f'{lr}: {"div" if not math.isfinite(v) else f"{v:.3f}"}'
                      for lr, v in row['lrs'].items())
    via = ' (service)' if row['path'] == 'service' else ''
    loss = f'{_fmt(row["loss_mean"], row["loss_std"], row["seeds"])} | ' if loss_too else ''
    lines.append(f'| {VIEWS[row["view"]]} | {row["batch"]} | {LABELS[row["optimizer"]]}{via} | '
                 f'{row["best_lr"]:.4g}{" (edge)" if row["edge"] else ""} | '
                 f'{_fmt(row["mean"], row["std"], row["seeds"])} | {loss}'
                 f'{row["seeds"]} | {row["steps"]} | {row["wall_s"]:.1f} | {tried} |')
  better = '> 0' if metric.higher_is_better else '< 0'
  lines += ['', f'| view | batch | LAMB − AdamW ({metric.short}; {better}: LAMB better) |',
            '|---|---:|---|']
  for view, batch, delta, spread in summary['differences']:
    lines.append(f'| {VIEWS[view]} | {batch} | {delta:+.3f}'
                 + (f' ± {spread:.3f} |' if spread is not None else ' (one seed) |'))
  return '\n'.join(lines)


def differences(rows: list[dict]) -> list[tuple]:
  """(view, batch, LAMB mean - AdamW mean, sqrt(std_L^2 + std_A^2)) where both exist; the
  spread is None unless both rows have several seeds."""
  by = {(r['view'], r['batch'], r['optimizer']): r for r in rows}
  out = []
  for (view, batch, opt), row in by.items():
    other = by.get((view, batch, 'adamw'))
    if opt == 'lamb' and other is not None:
      several = row['seeds'] > 1 and other['seeds'] > 1
      out.append((view, batch, row['mean'] - other['mean'],
                  math.hypot(row['std'], other['std']) if several else None))
  return out


def write(config, task, mesh, plan, runs, out: str, wall_s: float) -> dict:
  """results.json, table.md, heldout_vs_batch.png, loss_curves.png in `out`; the summary."""
  run_dicts = [dataclasses.asdict(r) for r in runs]
  rows = summarize(run_dicts, task.metric)
  files = [os.path.join(out, name) for name in
           ('results.json', 'table.md', 'heldout_vs_batch.png', 'loss_curves.png')]
  summary: dict[str, Any] = {
      'config': dataclasses.asdict(config),
      'task': task.describe(),
      'mesh': {'devices': int(mesh.size), 'platform': mesh.devices.flat[0].platform},
      'plan': dataclasses.asdict(plan),
      'rows': rows,
      'differences': differences(rows),
      'runs': run_dicts,
      'wall_s': wall_s,
      'files': files,
  }
  with open(files[0], 'w', encoding='utf-8') as fh:
    json.dump(summary, fh, indent=1, default=jsonable)
    fh.write('\n')
  with open(files[1], 'w', encoding='utf-8') as fh:
    fh.write(table_text(summary) + '\n')
  plot_heldout(summary, files[2])
  plot_curves(summary, files[3])
  return summary


def jsonable(x):
  """A value JSON cannot write (a NumPy number, ...), as one it can."""
  return float(x) if hasattr(x, '__float__') else str(x)


def pyplot():
  """matplotlib's pyplot, drawing to files (no display)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_heldout(summary: dict, path: str) -> None:
  """The metric against the batch, one line per optimizer; one panel per view."""
  plt = pyplot()
  metric = metric_of(summary)
  views = [v for v in VIEWS if any(r['view'] == v for r in summary['rows'])]
  fig, axes = plt.subplots(1, len(views), figsize=(5.2 * len(views), 3.8), dpi=100,
                           squeeze=False)
  for ax, view in zip(axes[0], views):
    for opt, label in LABELS.items():
      rows = [r for r in summary['rows'] if r['view'] == view and r['optimizer'] == opt
              and math.isfinite(r['mean'])]
      if not rows:
        continue
      xs = [r['batch'] for r in rows]
      sanity = opt == 'optax_lamb'
      ax.errorbar(xs, [r['mean'] for r in rows], yerr=[r['std'] for r in rows],
                  color=COLORS[opt], marker='x' if sanity else 'o', ms=6 if sanity else 4,
                  ls='none' if sanity else '-', capsize=3, label=label)
    steps = sorted({(r['batch'], r['steps']) for r in summary['rows'] if r['view'] == view})
    ax.set_xscale('log', base=2)
    ax.set_xticks([b for b, _ in steps], [f'{b}\n{s} steps' for b, s in steps], fontsize=8)
    ax.set_xlabel(f'global batch ({summary["task"]["batch_unit"]})')
    ax.set_ylabel(metric.label)
    ax.set_title(VIEWS[view], fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f'{summary["task"]["title"]}: best lr per cell, mean ± std over seeds',
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_curves(summary: dict, path: str) -> None:
  """Training loss against examples seen (characters, signals), best lr and seed 0 of each
  (optimizer, batch)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  rows = [r for r in summary['rows'] if r['view'] == 'epochs' and r['optimizer'] != 'optax_lamb']
  batches = sorted({r['batch'] for r in rows})
  t = summary['task']
  for row in rows:
    run = next(r for r in summary['runs'] if r['view'] == 'epochs' and r['seed'] == 0
               and r['optimizer'] == row['optimizer'] and r['batch'] == row['batch']
               and r['lr'] == row['best_lr'])
    shade = 0.35 + 0.65 * (batches.index(row['batch']) + 1) / len(batches)
    ax.plot([s * row['batch'] * t['example_size'] for s, _ in run['curve']],
            [v for _, v in run['curve']], color=COLORS[row['optimizer']], alpha=shade,
            lw=1.2, label=f'{LABELS[row["optimizer"]]}, batch {row["batch"]}')
  ax.set_xlabel(f'training {t["example_unit"]} seen')
  ax.set_ylabel(f'training loss ({t["loss_unit"]})')
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title('training loss, best lr of each cell (seed 0)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
