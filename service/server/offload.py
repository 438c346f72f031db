"""The engine as the asyncio server sees it: waits that hold no thread, work that does.

`EngineWatch` mirrors the engine's position (model, step, closed) on the
event loop, told by the engine's listener: a long poll is an `await` on it,
however many there are. A `Lane` runs one RPC's work that may block -- an
engine call (its lock), copying a chunk, encoding a pull, the coordinator --
in order on a bounded pool of threads, so that the loop only moves messages
and never waits; a call whose RPC is cancelled meanwhile runs to its end, and
what it opened is closed after it (`Lane.then`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from typing import Any, Callable, Optional

from service.core.engine import Engine, Position


class EngineWatch:
  """The engine's latest `Position`, and events set when it changes (on the loop)."""

  def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
    self._loop = loop
    self.position: Optional[Position] = None
    self._any = asyncio.Event()  # replaced (after being set) at every change
    self._moved = asyncio.Event()  # ... at every change of model, step or closed
    engine.add_listener(self._listener)

  def _listener(self, position: Position) -> None:  # on the engine's thread, under its lock
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
      self._loop.call_soon_threadsafe(self._update, position)

  def _update(self, position: Position) -> None:
    old, self.position = self.position, position
    self._any, changed = asyncio.Event(), self._any
    changed.set()
    if old != position:
      self._moved, moved = asyncio.Event(), self._moved
      moved.set()

  def changed(self) -> asyncio.Event:
    """Set at the engine's next change (take it before checking, then wait on it)."""
    return self._any

  async def wait_for_step(self, step: int, timeout: float) -> Position:
    """The position once the model exists at step >= `step`, the engine closes, or
    `timeout` seconds pass (whichever is first)."""
    deadline = time.monotonic() + timeout
    while True:
      position, moved = self.position, self._moved
      if position.closed or (position.initialized and position.step >= step):
        return position
      left = deadline - time.monotonic()
      if left <= 0:
        return position
      with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(left):
          await moved.wait()


async def wait_changed(event: asyncio.Event, timeout: float) -> None:
  """Waits for `event` up to `timeout` seconds (no error when it does not come)."""
  with contextlib.suppress(TimeoutError):
    async with asyncio.timeout(max(timeout, 0.0)):
      await event.wait()


class Lane:
  """The blocking work of one RPC, run in order on a bounded pool of threads.

  A call whose RPC is cancelled while it runs goes on to its end (a thread
  cannot be stopped); `then` runs after it, e.g. to close what it opened.
  """

  def __init__(self, pool: concurrent.futures.Executor):
    self._pool = pool
    self._last: Optional[asyncio.Future] = None

  async def run(self, fn: Callable[..., Any], *args) -> Any:
    """`fn(*args)` on the pool, after the lane's earlier calls; its result."""
    return await asyncio.shield(self.then(fn, *args))

  def then(self, fn: Callable[..., Any], *args) -> asyncio.Future:
    """Schedules `fn(*args)` on the pool once the lane's last call has ended (whether
    or not anyone still awaits it); the future of its result."""
    loop = asyncio.get_running_loop()
    last = self._last
    if last is None or last.done():
      future = loop.run_in_executor(self._pool, fn, *args)
    else:
      future = loop.create_future()

      def start(_):
        inner = loop.run_in_executor(self._pool, fn, *args)
        inner.add_done_callback(lambda f: _copy(f, future))
      last.add_done_callback(start)
    self._last = future
    return future


def _copy(source: asyncio.Future, target: asyncio.Future) -> None:
  if target.done():
    return
  if source.cancelled():
    target.cancel()
  elif source.exception() is not None:
    target.set_exception(source.exception())
  else:
    target.set_result(source.result())
