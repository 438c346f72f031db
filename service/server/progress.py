"""The server's progress line: every `--progress-every-seconds`, one INFO line of what
happened since the last one, read from the server's metrics (no hook in the step loop).

    progress: step 120 (+40 applied), 26.7 pushes/s, 3.1 MB/s received, apply 4.2 ms
    (mean of 40), last checkpoint step 100 (12s ago)
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Optional

from service.logs import fields
from service.server.metrics import PREFIX, Metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Totals:
  """The counters the line is made of, at one moment (`time.monotonic()` seconds)."""
  at: float
  step: float
  steps_applied: float
  pushes_accepted: float
  push_bytes: float
  apply_count: float
  apply_seconds: float

  @classmethod
  def of(cls, metrics: Metrics) -> 'Totals':
    def value(name: str, labels: Optional[dict] = None) -> float:
      return metrics.registry.get_sample_value(PREFIX + name, labels) or 0.0
    return cls(time.monotonic(), value('step'), value('steps_applied_total'),
               value('pushes_accepted_total'),
               value('received_bytes_total', {'rpc': 'PushGradients'}),
               value('apply_seconds_count'), value('apply_seconds_sum'))


def line(before: Totals, now: Totals, last_checkpoint: Optional[tuple[int, float]],
         wall_now: Optional[float] = None) -> str:
  """The progress line for what changed from `before` to `now`.

  `last_checkpoint`: (step, time.time() it was on disk), or None.
  """
  dt = max(now.at - before.at, 1e-9)
  applies = now.apply_count - before.apply_count
  apply = (f'apply {1e3 * (now.apply_seconds - before.apply_seconds) / applies:.1f} ms '
           f'(mean of {applies:.0f})' if applies else 'no step applied')
  if last_checkpoint is None:
    ckpt = 'no checkpoint yet'
  else:
    ago = (time.time() if wall_now is None else wall_now) - last_checkpoint[1]
    ckpt = f'last checkpoint step {last_checkpoint[0]} ({ago:.0f}s ago)'
  return (f'progress: step {now.step:.0f} (+{now.steps_applied - before.steps_applied:.0f} '
          f'applied), {(now.pushes_accepted - before.pushes_accepted) / dt:.1f} pushes/s, '
          f'{(now.push_bytes - before.push_bytes) / dt / 1e6:.1f} MB/s received, {apply}, '
          f'{ckpt}')


class ProgressLog:
  """Logs `line(...)` every `every_s` seconds in a thread of its own, until `close()`.

  Args:
    metrics: the server's metrics (watching its engine).
    every_s: seconds between lines (0: none, no thread).
  """

  def __init__(self, metrics: Metrics, every_s: float):
    self._metrics, self._every = metrics, every_s
    self._stop = threading.Event()
    self._thread = None
    if every_s > 0:
      self._thread = threading.Thread(target=self._run, name='progress-log', daemon=True)
      self._thread.start()

  def _run(self) -> None:
    before = Totals.of(self._metrics)
    while not self._stop.wait(self._every):
      now = Totals.of(self._metrics)
      log.info('%s', line(before, now, self._metrics.last_checkpoint),
               extra=fields(step=int(now.step)))
      before = now

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
