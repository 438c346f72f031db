"""`lamb-sharded status`: what a running server is doing, from what it tells today.

DescribeModel (the model, its step, the step rules, the learning rate now),
ListCheckpoints (which steps are on disk, one being written) and, given its
metrics port, the Prometheus metrics (pushes in flight, long polls waiting --
between steps, that is the workers waiting for the next one --, counters of
steps, pushes accepted and refused). Which workers pushed when is in no RPC or
metric yet, so it is not shown.
"""

from __future__ import annotations

import json
import math
import urllib.request
from typing import Any, Optional

import grpc

from service.client import OptimizerClient

# The metrics shown, by the name they have in the report.
_METRICS = {
    'pushes_in_flight': 'lamb_sharded_pushes_in_flight',
    'inflight_bytes': 'lamb_sharded_inflight_bytes',
    'waiting_for_step': 'lamb_sharded_waiting_for_step',
    'steps_applied': 'lamb_sharded_steps_applied_total',
    'steps_skipped': 'lamb_sharded_steps_skipped_total',
    'pushes_accepted': 'lamb_sharded_pushes_accepted_total',
    'pushes_duplicate': 'lamb_sharded_pushes_duplicate_total',
}


def gather(server: str, metrics: Optional[str] = None, *, timeout: float = 10.0,
           **client_options) -> dict[str, Any]:
  """The report of the server at `server` (and of its metrics at host:port `metrics`)."""
  with OptimizerClient(server, timeout=timeout, retries=1, **client_options) as client:
    info = client.describe()
    report: dict[str, Any] = {
        'server': server, 'initialized': info.initialized, 'model_id': info.model_id,
        'step': info.step, 'leaves': len(info.leaves),
        'parameters': sum(math.prod(s.shape) for s in info.leaves),
        'step_mode': 'sync' if info.synchronous else 'async',
        'num_workers': info.num_workers, 'quorum': info.quorum,
        'staleness_bound': info.staleness_bound, 'learning_rate': info.learning_rate}
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
           if r['step_mode'] == 'sync' else
           f'asynchronous, staleness bound {r["staleness_bound"]}')
  lines.append(('steps', rules))
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
  width = max(len(k) for k, _ in lines)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in lines)
