"""Waiting for a signal in the main thread, whichever thread the kernel delivers it to."""

from __future__ import annotations

import contextlib
import signal
import socket
from typing import Callable, Iterator


@contextlib.contextmanager
def awaiting_signals(*signums: int) -> Iterator[Callable[[], int]]:
  """Catches `signums` while the block runs; yields `wait()`, which blocks until one arrives.

  A process signal is delivered to any one of its threads that does not block it --
  here, as often as not, one of gRPC's or XLA's threads. CPython's C-level handler
  then only sets a flag for the main thread, and a main thread blocked on a lock
  (`threading.Event().wait()`, as this server's was) never looks at it: SIGTERM was
  lost and the server hung until SIGKILL. So the main thread blocks reading a socket
  instead, to which the C-level handler writes the signal's number whichever thread
  it interrupted (`signal.set_wakeup_fd`); the number read is the signal that came.
  """
  reader, writer = socket.socketpair()
  writer.setblocking(False)
  old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
  # A Python handler, so that the default action (termination) does not happen; the
  # socket tells wait() which signal came.
  old = {s: signal.signal(s, lambda signum, frame: None) for s in signums}

  def wait() -> int:
    while True:
      for signum in reader.recv(64):
        if signum in signums:
          return signum
  try:
    yield wait
  finally:
    signal.set_wakeup_fd(old_fd)
    for s, handler in old.items():
      signal.signal(s, handler)
    reader.close()
    writer.close()
