"""Prometheus metrics of the optimizer server, served over HTTP on their own port.

Every metric is named `lamb_sharded_*`. Counters that the engine already keeps
(steps, accepted pushes) and its gauges (current step, pushes in flight, trust
ratios) are read from it at scrape time, so the step loop pays nothing for
them; the servicer counts rejections, bytes and latencies as they happen.
Each server has its own registry (several servers may share a process, as in
the tests).

The metrics (`lamb_sharded_` omitted; counters end in `_total` on the wire):

  steps_applied, steps_skipped          LAMB steps applied / skipped (NaN/Inf, skip_step)
  step                                  the current step (gauge)
  pushes_accepted                       pushes counted into a step
  pushes_duplicate                      retries of an accepted push, answered again
  local_steps                           workers' local steps the accepted pushes cover
                                        (a gradient 1; a DiLoCo pseudo-gradient H)
  pushes_rejected{reason}               pushes refused, by cause (docs/operations.md)
  pushes_in_flight, inflight_bytes      pushes being received now, and their bytes
  waiting_for_step                      WaitForStep long polls waiting now
  received_bytes{rpc}, sent_bytes{rpc}  tensor bytes in pushes/initialisation and pulls
  push_seconds, pull_seconds            RPC latency histograms, first message to answer
  apply_seconds                         a step's update, dispatch to computed
  checkpoint_blocking_seconds           how long starting a save took its writer thread (the step loop is not held)
  checkpoint_seconds                    a save from its start until it is on disk
  checkpoint_failures                   saves that failed (disk full, directory gone...)
  checkpoint_failing                    failed saves since the last one written (0: healthy)
  checkpoint_last_success_timestamp_seconds  when the last save was on disk (unix time;
                                        0: none since this server started)
  streams_cut_off{rpc,reason}           streams the server ended: idle, too long
  rpcs_unauthenticated                  calls refused for a missing or wrong token
  trust_ratio{stat=min|median|max}      the per-layer trust ratios of the last step
  model_parameters                      parameters of the model (0 before it exists)
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

PREFIX = 'lamb_sharded_'
# Latencies from a millisecond (small models, unary calls) to minutes (large pushes).
_SECONDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
  """The engine's own counters and gauges, read when Prometheus scrapes."""

  def __init__(self, engine):
    self._engine = engine

  def collect(self):
    e = self._engine
    stats = dict(e.stats)
    for name, doc in (('steps_applied', 'LAMB steps applied'),
                      ('steps_skipped', 'steps skipped (NaN/Inf with nonfinite=skip_step)'),
                      ('pushes_accepted', 'pushes counted into a step')):
      yield CounterMetricFamily(PREFIX + name, doc, value=stats.get(name, 0))
    d = e.describe()
    yield GaugeMetricFamily(PREFIX + 'step', 'the current step', value=d.step)
    yield GaugeMetricFamily(PREFIX + 'model_parameters', 'parameters of the model',
                            value=sum(int(np.prod(s.shape)) for s in d.leaves))
    yield GaugeMetricFamily(PREFIX + 'pushes_in_flight', 'pushes being received',
                            value=e.pushes_in_flight)
    yield GaugeMetricFamily(PREFIX + 'waiting_for_step', 'long polls waiting for a step',
                            value=e.waiting)
    yield GaugeMetricFamily(PREFIX + 'inflight_bytes',
                            'bytes of the pushes being received (wire dtype)',
                            value=e.inflight_bytes)
    ratios = e.trust_ratios()
    if ratios is not None and ratios.size:
      g = GaugeMetricFamily(PREFIX + 'trust_ratio',
                            'per-layer trust ratios of the last step: min, median, max',
                            labels=['stat'])
      for stat, fn in (('min', np.min), ('median', np.median), ('max', np.max)):
        g.add_metric([stat], float(fn(ratios)))
      yield g


class Metrics:
  """The server's metrics: a registry, the servicer's instruments, the engine's hooks.

  Args:
    engine: the `service.core.engine.Engine` to read counters and gauges from (or later,
      with `watch`; None: only the servicer's own metrics).
  """

  def __init__(self, engine=None):
    self.registry = CollectorRegistry(auto_describe=True)
    r = self.registry
    self.pushes_rejected = Counter(PREFIX + 'pushes_rejected', 'pushes refused, by reason',
                                   ['reason'], registry=r)
    self.pushes_duplicate = Counter(PREFIX + 'pushes_duplicate',
                                    'retries of an accepted push, answered again', registry=r)
    self.local_steps = Counter(PREFIX + 'local_steps', 'workers\' local steps that the '
                               'accepted pushes cover (a gradient: 1)', registry=r)
    self.received_bytes = Counter(PREFIX + 'received_bytes', 'tensor bytes received',
                                  ['rpc'], registry=r)
    self.sent_bytes = Counter(PREFIX + 'sent_bytes', 'tensor bytes sent', ['rpc'], registry=r)
    self.push_seconds = Histogram(PREFIX + 'push_seconds', 'PushGradients latency',
                                  buckets=_SECONDS, registry=r)
    self.pull_seconds = Histogram(PREFIX + 'pull_seconds', 'PullParameters latency',
                                  buckets=_SECONDS, registry=r)
    self.apply_seconds = Histogram(PREFIX + 'apply_seconds',
                                   'a step\'s LAMB update, dispatch to computed',
                                   buckets=_SECONDS, registry=r)
    self.checkpoint_blocking_seconds = Histogram(
        PREFIX + 'checkpoint_blocking_seconds',
        'how long starting a checkpoint save took its writer thread (the step loop is not held)',
        buckets=_SECONDS, registry=r)
    self.checkpoint_seconds = Histogram(
        PREFIX + 'checkpoint_seconds', 'a checkpoint from its start until it is on disk',
        buckets=_SECONDS, registry=r)
    self.checkpoint_failures = Counter(
        PREFIX + 'checkpoint_failures', 'checkpoint saves that failed (retried at the next '
        'save point)', registry=r)
    self.checkpoint_failing = Gauge(
        PREFIX + 'checkpoint_failing', 'checkpoint saves failed since the last one written '
        '(0: saves are being written)', registry=r)
    self.checkpoint_last_success = Gauge(
        PREFIX + 'checkpoint_last_success_timestamp_seconds',
        'when the last checkpoint save was on disk (unix time; 0: none since start)',
        registry=r)
    self.streams_cut_off = Counter(PREFIX + 'streams_cut_off',
                                   'streams the server ended (idle or too long)',
                                   ['rpc', 'reason'], registry=r)
    self.rpcs_unauthenticated = Counter(PREFIX + 'rpcs_unauthenticated',
                                        'calls refused for a missing or wrong token', registry=r)
    for reason in ('invalid_argument', 'nonfinite', 'stale_step'):
      self.pushes_rejected.labels(reason)  # the common ones show as 0 from the start
    self._httpd = None
    self.last_checkpoint: Optional[tuple[int, float]] = None  # (step, time.time()) on disk
    if engine is not None:
      self.watch(engine)

  def watch(self, engine) -> None:
    """Adds the engine's counters and gauges to the registry."""
    self.registry.register(_EngineCollector(engine))

  # Engine hooks (service.core.engine.EngineObserver).
  def step_applied(self, step: int, seconds: float) -> None:
    del step
    self.apply_seconds.observe(seconds)

  def checkpoint_started(self, step: int, blocking_seconds: float) -> None:
    del step
    self.checkpoint_blocking_seconds.observe(blocking_seconds)

  def checkpoint_saved(self, step: int, seconds: float) -> None:
    self.checkpoint_seconds.observe(seconds)
    self.last_checkpoint = (step, time.time())
    self.checkpoint_last_success.set(self.last_checkpoint[1])
    self.checkpoint_failing.set(0)

  def checkpoint_failed(self, step: int, error: BaseException, in_a_row: int) -> None:
    del step, error
    self.checkpoint_failures.inc()
    self.checkpoint_failing.set(in_a_row)

  # HTTP.
  def serve(self, host: str, port: int) -> int:
    """Serves /metrics on host:port (0: ephemeral) in a daemon thread; returns the port."""
    self._httpd, _ = prometheus_client.start_http_server(port, addr=host,
                                                         registry=self.registry)
    return self._httpd.server_port

  def close(self) -> None:
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
      self._httpd = None

  def text(self) -> str:
    """The exposition text (what /metrics serves)."""
    return prometheus_client.generate_latest(self.registry).decode()


def sample(text: str, name: str, labels: Optional[dict] = None) -> Optional[float]:
  """The value of sample `name` {labels} in exposition `text` (None if absent)."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=import-outside-toplevel
  for family in text_string_to_metric_families(text):
    for s in family.samples:
      if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
        return s.value
  return None
