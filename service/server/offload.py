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

  async def wait_for_step(self, step: int, timeout: float, model_id: str = '') -> Position:
    """The position once the model exists at step >= `step`, the engine closes,
    `timeout` seconds pass, or -- with a `model_id` -- the model is not that one
    (whichever is first)."""
    deadline = time.monotonic() + timeout
    while True:
      position, moved = self.position, self._moved
      if position.closed or (position.initialized and position.step >= step):
        return position
      if model_id and not (position.initialized and position.model_id == model_id):
        return position  # its history is gone: the caller is told (Position.require_model)
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

  async def open(self, fn: Callable[..., Any], *args,
                 close: Callable[[Any], Any] = lambda opened: opened.close()) -> Any:
    """`run(fn, *args)` for a call that opens something (a push's session, an
    initialisation's claim): if the RPC is cancelled while the call runs, what it opens
    is closed on the lane once it exists -- else nobody would, and its slot would stay
    taken for good."""
    future = self.then(fn, *args)
    try:
      return await asyncio.shield(future)
    except asyncio.CancelledError:
      def orphan(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
          self.then(close, done.result())
      future.add_done_callback(orphan)
      raise

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


async def watch_health(engine: Engine, health_servicer, pool: concurrent.futures.Executor,
                       stuck_s: float, names: tuple[str, ...], log) -> None:
  """Keeps the health service's status the engine's: NOT_SERVING while `engine.health`
  says why it cannot serve (a wedged step, a needed thread gone), SERVING again after.

  Runs until cancelled; each check runs on the pool (it may wait up to `stuck_s`).
  """
  from grpc_health.v1 import health_pb2  # pylint: disable=import-outside-toplevel
  loop = asyncio.get_running_loop()
  serving, every = True, min(2.0, stuck_s / 2)
  while True:
    await asyncio.sleep(every)
    why = await loop.run_in_executor(pool, engine.health, stuck_s)
    if (why is None) == serving:
      continue
    serving = why is None
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in names:
      await health_servicer.set(name, status)
    if serving:
      log.warning('health: SERVING again (the engine answers)')
    else:
      log.error('health: NOT_SERVING: the engine is not serving: %s', why)
