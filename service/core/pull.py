"""Pulls: the params of one step as encoded messages, made once for every puller of that step.

After a step is applied every worker pulls it at once. `SharedStream` makes the
step's encoded messages once (one copy of the data, from the devices' blocks
into each message's bytes) and hands them to every reader that joins it; a
message is dropped as soon as every reader has passed it, so it holds what
lies between the slowest and the fastest reader (one message with a single
reader; at most one encoded copy of the model if a reader stalls, until the
server cuts that pull off as idle). A reader that comes after the first
message was dropped starts a stream of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from service.core import placement
from service.errors import Unavailable
from service.protocol import pb
from service.protocol.chunks import encoded_chunk_messages
from service.protocol.specs import LeafSpec

_END = object()
NOT_READY = object()  # `_Reader.poll`: the next item would have to be waited for


def encode(specs: Sequence[LeafSpec], arrays: Sequence[jax.Array],
           chunk_bytes: int) -> Iterator[bytes]:
  """The chunk messages and the commit of a pull of `arrays` in the dtypes of `specs`.

  Each leaf is read from its devices' blocks a chunk's worth at a time
  (`placement.host_pieces`: no host copy of a leaf) and cast to its spec's
  dtype piece by piece.
  """
  def leaves():
    for s, a in zip(specs, arrays):
      pieces = placement.host_pieces(a, chunk_bytes * a.dtype.itemsize // s.dtype.itemsize)
      yield s.path, (p.astype(s.dtype, copy=False) for p in pieces)
  return encoded_chunk_messages(pb.PullParametersResponse, leaves(), chunk_bytes)


class SharedStream:
  """A stream of items made once, ahead of its readers, and read by several at their own pace.

  While it has one reader, the reader makes each item itself when it needs
  it. Once a second reader reads, a thread of the stream's own makes the
  items, at most `ahead` past the fastest reader, so that making the next
  item overlaps the readers' sending of the last ones (a reader that made
  each item itself would leave the others waiting meanwhile: with 4 pullers,
  every message's encoding stalled all of them). With one reader the thread
  would cost more than it saves: a thread switch per item, and the two
  threads' turns at the GIL (a pull of 108.9M parameters to one worker took
  0.53 s with it, 0.43 s without).

  Args:
    source: the items.
    release: called once when the stream is done with its source: every item
      made, or every reader gone (the source is then closed).
    ahead: how many items the stream makes past the fastest reader.

  Example:
    >>> stream = SharedStream(iter('abc'), release=lambda: None)
    >>> a, b = stream.join(), stream.join()
    >>> next(a), next(b), next(a), list(a), list(b)
    ('a', 'a', 'b', ['c'], ['b', 'c'])
    >>> stream.join() is None  # too late: its first item was dropped
    True
  """

  def __init__(self, source: Iterator, release: Callable[[], None], ahead: int = 16):
    self._source, self._release, self._ahead = source, release, ahead
    self._cond = threading.Condition(threading.Lock())
    self._source_lock = threading.Lock()  # held while an item is made, and to close the source
    self._items: dict[int, object] = {}
    self._made = 0  # items taken from the source
    self._dropped = 0  # items [0, dropped) are gone
    self._maker: Optional[threading.Thread] = None
    self._stop = False  # every reader is gone: make nothing more
    self._done = False  # the source is exhausted (or failed: `_error`)
    self._error: Optional[BaseException] = None
    self._readers: dict[int, int] = {}  # reader -> the index it reads next
    self._ids = itertools.count()
    self._released = False

  def join(self) -> Optional['_Reader']:
    """A reader from the first item; None if that item is gone (start another stream).

    Close the reader when done with it (or read it to its end).
    """
    with self._cond:
      if self._dropped or self._released or self._stop:
        return None
      rid = next(self._ids)
      self._readers[rid] = 0
    return _Reader(self, rid)

  def _get(self, i: int, block: bool = True):
    """Item `i` (`_END` past the last); with `block` False, `NOT_READY` where it would wait
    for the stream's thread (a lone reader makes its items itself: it never waits)."""
    while True:
      with self._cond:
        while True:
          if i in self._items:
            return self._items[i]
          if self._error is not None:
            raise self._error
          if (self._done or self._stop) and i >= self._made:
            return _END
          if self._maker is None:
            if len(self._readers) <= 1:
              break  # a single reader makes its items itself: no thread, no switch per item
            self._maker = threading.Thread(target=self._make, name='pull-encode', daemon=True)
            self._maker.start()
          if not block:
            return NOT_READY
          self._cond.wait()
      if not block and self._source_lock.locked():
        return NOT_READY  # being made (or closed) by another: that would wait
      self._make_one()

  def _make(self) -> None:
    """The stream's thread: makes items until the source ends or every reader is gone."""
    while True:
      with self._cond:
        if self._lead_locked() >= self._ahead:
          # Full: sleep until the fastest reader is within half of `ahead`, then make the
          # other half in one go (a wake per item would cost a thread switch per message).
          while not self._stop and self._lead_locked() > self._ahead // 2:
            self._cond.wait()
        if self._stop:
          return
      if not self._make_one():
        return

  def _make_one(self) -> bool:
    """Makes the next item (on the stream's thread, or a lone reader's); False once the
    source is exhausted or failed, or every reader is gone."""
    with self._source_lock:  # held until the item is stored: items keep the source's order
      if self._released:
        return False
      try:
        item, error = next(self._source, _END), None
      except BaseException as e:  # pylint: disable=broad-except
        item, error = _END, e
      if item is not _END:
        with self._cond:
          if self._stop:
            return False
          self._items[self._made] = item
          self._made += 1
          self._cond.notify_all()
        return True
    self._finish()  # released before any reader sees the end
    with self._cond:
      self._done, self._error = True, error
      self._cond.notify_all()
    return False

  def _lead_locked(self) -> int:
    """How many items the stream has made past its fastest reader."""
    return self._made - max(self._readers.values(), default=0)

  def _passed(self, rid: int, i: int) -> None:
    with self._cond:
      if rid in self._readers:
        self._readers[rid] = i
        self._drop_locked()
        if self._lead_locked() == self._ahead // 2:
          self._cond.notify_all()  # the maker may go on

  def _leave(self, rid: int) -> None:
    with self._cond:
      self._readers.pop(rid, None)
      self._drop_locked()
      last = not self._readers
      if last:
        self._items.clear()
        self._dropped = max(self._dropped, 1)  # nobody may join a stream cut short
        self._stop = True
      self._cond.notify_all()
    if last:
      self._finish()

  def _drop_locked(self) -> None:
    low = min(self._readers.values(), default=self._made)
    for j in range(self._dropped, low):
      self._items.pop(j, None)
    self._dropped = max(self._dropped, low)

  def _finish(self) -> None:
    """Closes the source (after the item being made, if any) and releases, once."""
    with self._source_lock:
      with self._cond:
        if self._released:
          return
        self._released = True
      try:
        close = getattr(self._source, 'close', None)
        if close is not None:
          close()
      finally:
        self._release()


class _Reader:
  """One reader of a SharedStream: an iterator, and `close()` (also at its end)."""

  def __init__(self, stream: SharedStream, rid: int):
    self._stream, self._rid, self._next = stream, rid, 0
    self._closed = False

  def __iter__(self):
    return self

  def __next__(self):
    return self._take(block=True)

  def poll(self):
    """The next item if it can be had without waiting for another thread (a lone
    reader makes it here), else `NOT_READY`; StopIteration at the end."""
    return self._take(block=False)

  def _take(self, block: bool):
    if self._closed:
      raise StopIteration
    if self._next:  # the previous item was passed on
      self._stream._passed(self._rid, self._next)  # pylint: disable=protected-access
    try:
      item = self._stream._get(self._next, block)  # pylint: disable=protected-access
    except BaseException:
      self.close()
      raise
    if item is NOT_READY:
      return item
    if item is _END:
      self.close()
      raise StopIteration
    self._next += 1
    return item

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._stream._leave(self._rid)  # pylint: disable=protected-access


def pulled_dtypes(specs: Sequence[LeafSpec], dtype: Optional[np.dtype]) -> tuple[LeafSpec, ...]:
  """The leaves as a pull in `dtype` sends them (None: each in its own)."""
  return tuple(LeafSpec(s.path, s.shape, dtype or s.dtype) for s in specs)


@dataclasses.dataclass(frozen=True)
class PullHeader:
  """What a pull yields first: the step it serves, and its leaves in the pull's dtypes.

  `not_modified`: the caller already has this step (nothing else follows).
  """
  model_id: str
  step: int
  leaves: tuple[LeafSpec, ...]
  not_modified: bool = False


class PullStream:
  """One pull: an iterator of its `PullHeader`, then its encoded messages; close it when done.

  `poll()` takes the next message only if it needs no wait for another thread
  (a lone puller encodes it itself), so that an event loop can take it.
  """

  def __init__(self, header: PullHeader, reader):
    self._header, self._reader, self._step = header, reader, header.step

  def __iter__(self) -> 'PullStream':
    return self

  def __next__(self):
    if self._header is not None:
      header, self._header = self._header, None
      return header
    return self._read(next, self._reader)

  def poll(self):
    """The next message, or `NOT_READY` if it would have to be waited for."""
    if self._header is not None:
      return next(self)
    poll = getattr(self._reader, 'poll', None)
    return self._read(poll) if poll is not None else next(self)

  def _read(self, take, *args):
    try:
      return take(*args)
    except jax.errors.JaxRuntimeError as e:  # the step's computation failed (a lost peer)
      self.close()
      raise Unavailable(f'the parameters of step {self._step} could not be read ({e}); retry '
                        f'(the server restarts from its last checkpoint)',
                        reason='step_failed') from e
    except BaseException:
      self.close()
      raise

  def close(self) -> None:
    """Ends the pull: the step's params are no longer held for it."""
    self._header = None
    close = getattr(self._reader, 'close', None)
    if close is not None:
      close()

  def __del__(self):  # a pull dropped unfinished (as a generator's end closes it)
    self.close()
