"""Limits on the server's streams: cut off clients that go silent or stay too long.

Pure threading; no knowledge of the service's messages. `StreamReader` wraps a
client stream's request iterator, `PullWatch` guards server streams.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Callable, Iterator

from service.errors import DeadlineExceeded

_END = object()


class StreamReader:
  """Reads a client stream on a thread of its own, so that a silent client can be cut off.

  gRPC's synchronous server gives a handler a blocking iterator with no timeout:
  a client that stalls half-way through a push would hold its buffer slot until
  its own deadline, if it set one. Read through this, the handler gives up after
  `idle_s` without a message, or once `deadline` (time.monotonic) passes, with
  DEADLINE_EXCEEDED and a message saying why. At most two messages wait in
  between (backpressure). When the handler is done, gRPC ends the call, which
  ends the reading thread's iterator as well.
  """

  def __init__(self, requests: Iterator, what: str, idle_s: float, deadline: float):
    self.what = what  # named in the messages; the caller refines it once it knows more
    self._idle_s, self._deadline = idle_s, deadline
    self._queue: queue.Queue = queue.Queue(maxsize=2)
    self._stopped = threading.Event()
    threading.Thread(target=self._pump, args=(requests,), name='stream-reader',
                     daemon=True).start()

  def _pump(self, requests: Iterator) -> None:
    try:
      for message in requests:
        if not self._put(message):
          return
      self._put(_END)
    except Exception as e:  # pylint: disable=broad-except  # the client cancelled
      self._put(e)

  def _put(self, item) -> bool:
    while not self._stopped.is_set():
      try:
        self._queue.put(item, timeout=0.25)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    wait = min(self._idle_s, self._deadline - time.monotonic())
    try:
      item = self._queue.get(timeout=max(wait, 0.0))
    except queue.Empty:
      self.close()
      if time.monotonic() >= self._deadline:
        raise DeadlineExceeded(f'{self.what}: the stream was open too long '
                               f'(max_stream_seconds); cut off, its data discarded',
                               reason='stream_too_long') from None
      raise DeadlineExceeded(f'{self.what}: no message for {self._idle_s:g}s '
                             f'(stream_idle_timeout_s); cut off, its data discarded',
                             reason='idle') from None
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stopped.set()


class PullWatch:
  """Cancels server-streaming pulls whose client stopped reading, or that run too long.

  A pull's handler blocks inside gRPC while the client does not read (flow
  control); only another thread can end it. Each pull registers here and
  reports progress per message; a watchdog cancels those without progress for
  `idle_s` or open longer than `max_s` (the client sees CANCELLED).
  """

  def __init__(self, idle_s: float, max_s: float, on_cut: Callable[[str, float], None]):
    self._idle_s, self._max_s, self._on_cut = idle_s, max_s, on_cut
    self._lock = threading.Lock()
    self._pulls: dict[int, list] = {}
    self._ids = itertools.count()
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._loop, name='pull-watch', daemon=True)
    self._thread.start()

  def register(self, context) -> int:
    now = time.monotonic()
    with self._lock:
      key = next(self._ids)
      self._pulls[key] = [context, now, now]
    return key

  def progress(self, key: int) -> None:
    with self._lock:
      if key in self._pulls:
        self._pulls[key][2] = time.monotonic()

  def unregister(self, key: int) -> None:
    with self._lock:
      self._pulls.pop(key, None)

  def _loop(self) -> None:
    period = min(1.0, self._idle_s / 4)
    while not self._stopped.wait(period):
      now = time.monotonic()
      with self._lock:
        late = [(k, v) for k, v in self._pulls.items()
                if now - v[2] > self._idle_s or now - v[1] > self._max_s]
        for k, _ in late:
          del self._pulls[k]
      for _, (context, started, last) in late:
        reason = 'idle' if now - last > self._idle_s else 'stream_too_long'
        self._on_cut(reason, now - started)
        context.cancel()

  def close(self) -> None:
    """Stops the watchdog and waits for its thread (it wakes at least once a second)."""
    self._stopped.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=5)
