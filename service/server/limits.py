"""Limits on the server's streams: cut off clients that go silent or stay too long.

For the asyncio server (`grpc.aio`): a wait costs no thread, so each read or
write of a stream is simply bounded by a timeout. No knowledge of the
service's messages.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import grpc

from service.errors import DeadlineExceeded


class StreamLimits:
  """The limits of one stream: `idle_s` without progress, `max_s` open in all.

  `what` names the stream in the messages (the caller refines it once it
  knows more, e.g. which worker's push it is).
  """

  def __init__(self, what: str, idle_s: float, max_s: float):
    self.what = what
    self._idle_s = idle_s
    self.started = self._last = time.monotonic()  # the stream's start, its last progress
    self._deadline = self.started + max_s
    self._rate: Optional[tuple[int, float]] = None  # (bytes announced, the least rate)

  def expect(self, nbytes: int, min_rate: float) -> None:
    """The stream announced `nbytes`: it must send them at `min_rate` bytes/s at least,
    beyond the idle allowance (0: no bound) -- bounded by progress, not by silence, so
    that a client dripping a byte now and then cannot hold its push's slot for long."""
    if min_rate > 0:
      deadline = self.started + self._idle_s + nbytes / min_rate
      if deadline < self._deadline:
        self._deadline, self._rate = deadline, (nbytes, min_rate)

  def _wait(self) -> float:
    return max(min(self._idle_s, self._deadline - time.monotonic()), 0.0)

  def error(self) -> DeadlineExceeded:
    """Why the stream was cut off (the limit it broke), for its client."""
    now = time.monotonic()
    if now - self._last >= self._idle_s / 2:  # mostly silent: say so, whatever else it broke
      return self._idle()
    if now >= self._deadline and self._rate is not None:
      nbytes, rate = self._rate
      return DeadlineExceeded(
          f'{self.what}: too slow: {nbytes} bytes announced, not sent within '
          f'{self._deadline - self.started:.1f}s (stream_idle_timeout_s + the bytes at '
          f'min_push_bytes_per_second {rate:g}); cut off, its data discarded',
          reason='too_slow')
    if time.monotonic() >= self._deadline:
      return DeadlineExceeded(f'{self.what}: the stream was open too long (max_stream_seconds); '
                              f'cut off, its data discarded', reason='stream_too_long')
    return self._idle()

  def _idle(self) -> DeadlineExceeded:
    return DeadlineExceeded(f'{self.what}: no message for {self._idle_s:g}s '
                            f'(stream_idle_timeout_s); cut off, its data discarded',
                            reason='idle')

  async def read(self, context: grpc.aio.ServicerContext) -> Optional[object]:
    """The client's next message (None at the end of its stream); DeadlineExceeded if
    it sends none within the limits."""
    try:
      async with asyncio.timeout(self._wait()):
        message = await context.read()
    except TimeoutError:
      raise self.error() from None
    self._last = time.monotonic()
    return None if message is grpc.aio.EOF else message

  async def write(self, context: grpc.aio.ServicerContext, message) -> None:
    """Sends `message`; DeadlineExceeded if the client does not take it within the limits
    (it stopped reading: flow control holds the write)."""
    try:
      async with asyncio.timeout(self._wait()):
        await context.write(message)
    except TimeoutError:
      raise self.error() from None
    self._last = time.monotonic()
