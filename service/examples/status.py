"""`lamb-sharded status`: what a running server is doing, from what it tells today.

DescribeModel (the model, its step, the step rules, the learning rate now, the
workers expected and, per worker seen, the step of its last counted push and how
long ago), ListCheckpoints (which steps are on disk, one being written) and,
given its metrics port, the Prometheus metrics (pushes in flight, long polls
waiting -- between steps, that is the workers waiting for the next one --,
counters of steps, pushes accepted and refused, checkpoint saves failing and
the last one written).

Up to FEW_WORKERS workers seen, the text has a line per worker; a fleet is
summarised: how many workers are in each state (`worker_state`: pushed into the
current step, into the one before, behind by more, silent) and the SLOWEST
furthest behind by name. The JSON keeps every worker seen, and the counts.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from typing import Any, Optional

import grpc

from service.client import OptimizerClient
from service.protocol import pb

# The metrics shown, by the name they have in the report.
_METRICS = {
    'pushes_in_flight': 'lamb_sharded_pushes_in_flight',
    'inflight_bytes': 'lamb_sharded_inflight_bytes',
    'waiting_for_step': 'lamb_sharded_waiting_for_step',
    'steps_applied': 'lamb_sharded_steps_applied_total',
    'steps_skipped': 'lamb_sharded_steps_skipped_total',
    'pushes_accepted': 'lamb_sharded_pushes_accepted_total',
    'pushes_duplicate': 'lamb_sharded_pushes_duplicate_total',
    'checkpoint_failures': 'lamb_sharded_checkpoint_failures_total',
    'checkpoint_failing': 'lamb_sharded_checkpoint_failing',
    'checkpoint_last_success': 'lamb_sharded_checkpoint_last_success_timestamp_seconds',
}

FEW_WORKERS = 10  # up to this many workers seen: a line each; more: counts by state
SLOWEST = 5  # the workers furthest behind named in a fleet's summary
SILENT_S = 60.0  # a worker not in the current step with no push counted this long: silent
FAR_BEHIND = 10  # steps behind the server from which a worker is far behind
# The states of a worker seen, in the order the text shows them.
STATES = ('current', 'previous', 'behind', 'far_behind', 'silent')


def worker_state(last_step: int, seconds_ago: float, step: int) -> str:
  """The state of a worker whose last counted push went into `last_step`, `seconds_ago`.

  'current': pushed into the server's current `step` (in sync mode: waiting for
  the others); else 'silent' if that was more than SILENT_S ago; else by how far
  behind: 'previous' (its last push went into the step before: its push for this
  one is due), 'behind' (2 to FAR_BEHIND - 1 steps), 'far_behind'.
  """
  lag = step - last_step
  if lag <= 0:
    return 'current'
  if seconds_ago > SILENT_S:
    return 'silent'
  return 'previous' if lag == 1 else 'behind' if lag < FAR_BEHIND else 'far_behind'


def worker_states(workers: list[dict[str, Any]], step: int) -> dict[str, int]:
  """How many of `workers` (workers_seen entries) are in each of STATES."""
  counts = dict.fromkeys(STATES, 0)
  for w in workers:
    counts[worker_state(w['last_step'], w['seconds_ago'], step)] += 1
  return counts


def slowest(workers: list[dict[str, Any]], step: int, n: int = SLOWEST) -> list[dict[str, Any]]:
  """The `n` workers furthest behind `step` (the longest silent first among equals)."""
  behind = [w for w in workers if w['last_step'] < step]
  return sorted(behind, key=lambda w: (w['last_step'], -w['seconds_ago'], w['worker_id']))[:n]


def gather(server: str, metrics: Optional[str] = None, *, timeout: float = 10.0,
           **client_options) -> dict[str, Any]:
  """The report of the server at `server` (and of its metrics at host:port `metrics`)."""
  with OptimizerClient(server, timeout=timeout, retries=1, **client_options) as client:
    # The description as sent (OptimizerClient.describe leaves out the workers seen).
    info = client._stub.DescribeModel(pb.DescribeModelRequest(), timeout=timeout)  # pylint: disable=protected-access
    report: dict[str, Any] = {
        'server': server, 'initialized': info.initialized, 'model_id': info.model_id,
        'step': info.step, 'leaves': len(info.leaves),
        'parameters': sum(math.prod(s.shape) for s in info.leaves),
        'step_mode': 'sync' if info.step_mode == pb.STEP_MODE_SYNCHRONOUS else 'async',
        'num_workers': info.num_workers, 'quorum': info.quorum,
        'staleness_bound': info.staleness_bound, 'ordered_sum': info.ordered_sum,
        'learning_rate': info.hyperparameters.learning_rate,
        'weight_decay': info.hyperparameters.weight_decay,
        'optimizer': info.hyperparameters.optimizer or 'lamb',
        'momentum': info.hyperparameters.momentum,
        'moments': info.hyperparameters.moments or 'float32',
        'exclusions': {
            'weight_decay': {
                'patterns': list(info.hyperparameters.exclude_from_weight_decay),
                'leaves': list(info.hyperparameters.leaves_without_weight_decay)},
            'layer_adaptation': {
                'patterns': list(info.hyperparameters.exclude_from_layer_adaptation),
                'leaves': list(info.hyperparameters.leaves_without_layer_adaptation)}},
        'processes': [{'index': p.index, 'endpoint': p.endpoint} for p in info.processes],
        'workers_seen': [{'worker_id': w.worker_id, 'last_step': w.last_step,
                          'seconds_ago': round(w.seconds_ago, 3)}
                         for w in sorted(info.workers, key=lambda w: w.seconds_ago)]}
    report['worker_states'] = worker_states(report['workers_seen'], info.step)
    report['silent_after_s'] = SILENT_S
    try:
      report['checkpoints'] = [
          {'step': c.step, 'complete': c.complete, 'size_bytes': c.size_bytes, 'path': c.path}
          for c in client.list_checkpoints()]
    except grpc.RpcError as e:
      if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # no --checkpoint-dir
        raise
      report['checkpoints'] = None
  if metrics is not None:
    report['metrics'] = scrape(metrics, timeout)
  return report


def scrape(address: str, timeout: float = 10.0) -> dict[str, Any]:
  """The shown metrics of the server's metrics port at `address` (host:port)."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=import-outside-toplevel
  url = f'http://{address}/metrics'
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      text = response.read().decode()
  except OSError as e:
    raise OSError(f'--metrics {address}: cannot read {url}: '
                  f'{getattr(e, "reason", None) or e}') from None
  values: dict[str, float] = {}
  rejected: dict[str, float] = {}
  for family in text_string_to_metric_families(text):
    for s in family.samples:
      if s.name == 'lamb_sharded_pushes_rejected_total':
        rejected[s.labels['reason']] = s.value
      values[s.name] = s.value
  out: dict[str, Any] = {k: values.get(name) for k, name in _METRICS.items()}
  out['pushes_rejected'] = {k: int(v) for k, v in sorted(rejected.items()) if v}
  return out


def as_json(report: dict[str, Any]) -> str:
  return json.dumps(report, sort_keys=True)


def as_text(report: dict[str, Any]) -> str:
  """The report as aligned `name  value` lines."""
  r = report
  lines = [('server', r['server'])]
  if r['initialized']:
    lines += [('model', f'{r["model_id"]}: {r["leaves"]} leaves, {r["parameters"]:,} '
                        'parameters'),
              ('step', f'{r["step"]} (learning rate now {r["learning_rate"]:.6g})')]
  else:
    lines += [('model', 'none yet (InitializeModel, or serve --init-params)')]
  rules = (f'synchronous, {r["num_workers"]} workers, quorum {r["quorum"]}'
           + (', ordered sum (pushes added by worker)' if r.get('ordered_sum') else '')
           if r['step_mode'] == 'sync' else
           f'asynchronous, staleness bound {r["staleness_bound"]}')
  lines.append(('steps', rules))
  optimizer = r.get('optimizer', 'lamb')
  if optimizer != 'lamb':
    lines.append(('optimizer', f'{optimizer}' + (f', momentum {r["momentum"]:g}'
                                                 if optimizer == 'nesterov' else '')))
  elif r.get('moments', 'float32') != 'float32':
    lines.append(('optimizer', f'lamb, {r["moments"]} moments'))
  if len(r.get('processes', ())) > 1:
    lines.append(('processes', f'{len(r["processes"])}: ' + ', '.join(
        f'{p["index"]} {p["endpoint"]}' for p in r['processes'])))
  for what, e in r.get('exclusions', {}).items():
    if e['patterns']:
      leaves = ', '.join(e['leaves'][:6]) + (f' ... ({len(e["leaves"])})'
                                              if len(e['leaves']) > 6 else '')
      lines.append((f'no {what.replace("_", " ")}',
                    (f'{len(e["leaves"])} leaves: {leaves}' if r['initialized'] else
                     'no model yet') + f' (matching {", ".join(e["patterns"])})'))
  lines += _workers(r)
  ckpts = r['checkpoints']
  if ckpts is None:
    lines.append(('checkpoints', 'off (no --checkpoint-dir)'))
  else:
    done = [c for c in ckpts if c['complete']]
    writing = [c['step'] for c in ckpts if not c['complete']]
    text = (f'{len(done)} on disk, newest step {done[-1]["step"]} ({done[-1]["path"]})'
            if done else 'none on disk')
    if writing:
      text += f'; writing step {writing[0]}'
    lines.append(('checkpoints', text))
  m = r.get('metrics')
  if m is not None:
    def n(key):
      return 'n/a' if m.get(key) is None else f'{int(m[key]):,}'
    lines += [('in flight', f'{n("pushes_in_flight")} pushes ({n("inflight_bytes")} bytes)'),
              ('waiting', f'{n("waiting_for_step")} WaitForStep calls (workers between steps)'),
              ('since start', f'{n("steps_applied")} steps applied, {n("steps_skipped")} '
                              f'skipped; {n("pushes_accepted")} pushes accepted, '
                              f'{n("pushes_duplicate")} duplicates'),
              ('refused', ', '.join(f'{k} {v}' for k, v in m['pushes_rejected'].items())
               or 'none')]
    if ckpts is not None and m.get('checkpoint_failures') is not None:
      lines.append(('saving', _saves(m)))
  width = max(len(k) for k, _ in lines)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in lines)


def _saves(m: dict[str, Any]) -> str:
  """How the checkpoint saves go, from the metrics: failing or not, the last one written."""
  last = m.get('checkpoint_last_success') or 0
  written = (f'last written {max(0.0, time.time() - last):.0f}s ago' if last > 0
             else 'none written since start')
  failures, failing = int(m['checkpoint_failures'] or 0), int(m.get('checkpoint_failing') or 0)
  if failing:
    return (f'failing: {failing} in a row ({failures} since start), {written}; retried at '
            'each save point (see the server\'s log)')
  return f'{written}; {failures} failed since start'


def _workers(r: dict[str, Any]) -> list[tuple[str, str]]:
  """The workers' lines: one per worker seen, or for a fleet the counts by state and the
  slowest few."""
  seen, step = r['workers_seen'], r['step']
  width = max((len(w['worker_id']) for w in seen), default=0)

  def line(w):
    return ('', f'{w["worker_id"]:<{width}}  last push into step {w["last_step"]}, '
                f'{w["seconds_ago"]:.1f}s ago')
  head = f'{r["num_workers"]} expected, {len(seen)} seen since start'
  if len(seen) <= FEW_WORKERS:
    return [('workers', head + (' (newest first):' if seen else ''))] + [line(w) for w in seen]
  states = r.get('worker_states') or worker_states(seen, step)
  silent_s = r.get('silent_after_s', SILENT_S)
  text = {
      'current': f'pushed into the current step {step}',
      'previous': f'last pushed into step {step - 1}, their push for step {step} is due',
      'behind': f'behind by 2 to {FAR_BEHIND - 1} steps',
      'far_behind': f'behind by {FAR_BEHIND} steps or more',
      'silent': f'silent: not in the current step, nothing counted for over {silent_s:.0f}s',
  }
  count_width = len(str(max(states.values())))
  lines = [('workers', head + ':')]
  lines += [('', f'{states[s]:>{count_width}} {text[s]}') for s in STATES if states[s]]
  late = slowest(seen, step)
  if late:
    behind = sum(states.values()) - states['current']
    lines.append(('', f'furthest behind ({len(late)} of {behind}):'))
    lines += [line(w) for w in late]
  return lines
