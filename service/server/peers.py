"""The other processes of a multi-process server, as one of them watches them.

Two things end a process of the job besides its own signal:

- A lost peer. When a process of a `jax.distributed` job dies, JAX's
  coordinator notices after its heartbeat timeout and then aborts every other
  process (SIGABRT, a C++ stack trace, no word of which process was lost), and
  until then each collective of a step waits for it. So each process watches
  the others' endpoints itself, far more often than the heartbeat, and once
  one stops answering it exits at once with one line naming it (`LOST_EXIT`):
  the group is restarted from the last checkpoint, and the workers wait for it.
- A stop asked of another process (a signal to one pod): it is published in the
  coordinator's store (`coordination.Job.request_shutdown`), with whether it is
  final, and every process then drains and writes the final checkpoint together.
  A final stop (SIGINT: the operator's) ends every process with 0; any other
  (SIGTERM: preemption, a node drain, a pod deleted) with `STOPPED_EXIT`, so
  that the Job starts the group again and it resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable, Optional, Sequence

from service.core.coordination import Job
from service.server import supervise

log = logging.getLogger(__name__)

LOST_EXIT = supervise.LOST_EXIT  # the exit status of a process whose job lost another one
STOPPED_EXIT = supervise.STOPPED_EXIT  # stopped by SIGTERM, with a final checkpoint: restart
INTERVAL_S = 1.0  # how often the peers are checked
MISSES = 3  # checks in a row a peer fails before it is lost (well inside JAX's heartbeat)


def reachable(endpoint: str, timeout_s: float = 1.0) -> bool:
  """Whether something accepts connections at endpoint HOST:PORT."""
  host, port = endpoint.rsplit(':', 1)
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s):
      return True
  except OSError:
    return False


class PeerWatch:
  """Watches the job's other processes from a thread; `close()` stops watching.

  Args:
    job: this process's view of the job.
    endpoints: every process's endpoint, by index.
    on_lost: called once with a message naming the lost process (it should end
      this process).
    on_stop: called once when another process asked the job to stop, with its index and
      whether the stop is final.
  """

  def __init__(self, job: Job, endpoints: Sequence[str], on_lost: Callable[[str], None],
               on_stop: Callable[[int, bool], None], interval_s: float = INTERVAL_S,
               misses: int = MISSES):
    self._job, self._endpoints = job, list(endpoints)
    self._on_lost, self._on_stop = on_lost, on_stop
    self._interval_s, self._misses = interval_s, misses
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, name='peer-watch', daemon=True)
    self._thread.start()

  def _run(self) -> None:
    missed = [0] * len(self._endpoints)
    while not self._done.wait(self._interval_s):
      for i, endpoint in enumerate(self._endpoints):
        if i == self._job.index:
          continue
        missed[i] = 0 if reachable(endpoint) else missed[i] + 1
        if missed[i] >= self._misses and not self._done.is_set():
          self._done.set()
          self._on_lost(f'server process {i} of {len(self._endpoints)} ({endpoint}) is lost: '
                        f'no connection for {self._misses * self._interval_s:.0f}s; this '
                        f'process exits so that the job restarts from its last checkpoint')
          return
      try:
        asked = self._job.shutdown_requested()
      except Exception:  # pylint: disable=broad-except  # the coordinator is going away
        asked = None
      if asked is not None and asked[0] != self._job.index and not self._done.is_set():
        self._done.set()
        self._on_stop(*asked)
        return

  def request_stop(self, final: bool = False) -> None:
    """This process was asked to stop (for good if `final`): so is every other one."""
    self._done.set()
    try:
      self._job.request_shutdown(final)
    except Exception as e:  # pylint: disable=broad-except
      log.warning('could not tell the other server processes to stop: %s', e)

  def close(self) -> None:
    self._done.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=5)


def watch(job: Optional[Job], endpoints: Sequence[str], on_lost, on_stop
          ) -> Optional[PeerWatch]:
  """A PeerWatch of a multi-process server (None for a single process)."""
  return None if job is None else PeerWatch(job, endpoints, on_lost, on_stop)
