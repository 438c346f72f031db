"""One push being received: `PushSession`, what the engine's `open_push` hands out.

    with engine.open_push(header) as push:
      if not push.answered:            # a retry of an answered push is answered at once
        for chunk in chunks:
          push.write(chunk)            # checked against the header, into the push's buffers
        push.commit(stream_commit)     # checks the commit; counts the push into its step
      return push.result

The session holds the push's admission slot and its host buffers (in the
mesh's block layout) from `open_push` until it commits or its block exits;
leaving the block without a commit (an error, a cancelled stream) frees both,
and the push changes nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Optional, Sequence

import numpy as np

from service.core import layout
from service.core.finite import all_finite
from service.errors import InvalidArgument
from service.protocol import codecs, tensor_pb2
from service.protocol.chunks import Chunk, ChunkReceiver
from service.protocol.specs import LeafSpec
from service.protocol.types import PushHeader, PushResult


class _BlockSink:
  """A receiver's sink into a push's buffers (through their wire views); `on_leaf` checks
  each raw leaf as it completes.

  A raw leaf's bytes are copied in as they are; a block-encoded leaf's are
  decoded (`codecs.LeafDecoder`), a piece at a time, into the leaf's float32
  buffer: straight into it where its layout is the row-major one, else
  through the same wire view, at their float32 byte offsets. Decoding runs on
  a thread of the sink's own, in the stream's order, while the receiving
  thread takes the next chunks from gRPC (NumPy lets go of the GIL): at most
  `_QUEUE` chunks wait for it. A decoding error (a bad scale or code) is
  raised by the next `write`, `leaf_complete` or by `drain`, which the push's
  commit calls; `close` waits for the thread before the buffers go back.
  """

  _QUEUE = 8

  def __init__(self, views: list[np.ndarray], specs: Sequence[LeafSpec], what: str,
               on_leaf: Callable[[int], None]):
    self._views, self._specs, self._what, self._on_leaf = views, specs, what, on_leaf
    self._decoder: Optional[tuple[int, codecs.LeafDecoder]] = None  # (leaf, its decoder)
    self._scratch: Optional[codecs.Scratch] = None  # the decoders', made on first use
    self._thread: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._pending: collections.deque = collections.deque()

  def write(self, leaf: int, offset: int, data: np.ndarray) -> None:
    if self._specs[leaf].encoding == codecs.RAW:
      layout.write(self._views[leaf], offset, data)
      return
    if self._thread is None:
      self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='decode')
    self._pending.append(self._thread.submit(self._decode, leaf, offset, data))
    self._collect(self._QUEUE)

  def _decode(self, leaf: int, offset: int, data: np.ndarray) -> None:
    spec = self._specs[leaf]
    if self._decoder is None or self._decoder[0] != leaf:
      self._scratch = self._scratch or codecs.Scratch()
      self._decoder = (leaf, codecs.LeafDecoder(spec.size, spec.encoding,
                                                f'{self._what}: leaf {spec.path}',
                                                self._scratch))
    view = self._views[leaf]
    if view.ndim == 1:  # the row-major layout: decoded straight into the buffer
      for _ in self._decoder[1].feed(offset, data, out=view.view(np.float32)):
        pass
      return
    for at, values in self._decoder[1].feed(offset, data):  # scattered into the blocks
      layout.write(view, at, values.view(np.uint8))

  def _collect(self, keep: int) -> None:
    """Waits until at most `keep` chunks are queued; raises the first decoding error."""
    while self._pending and (len(self._pending) > keep or self._pending[0].done()):
      self._pending.popleft().result()

  def leaf_complete(self, leaf: int) -> None:
    # An encoded leaf needs no NaN/Inf pass: its scales were checked to be finite and at
    # most float32's max / QMAX, its codes to be within +-QMAX, so every value is finite.
    if self._specs[leaf].encoding == codecs.RAW:
      self._on_leaf(leaf)
    self._collect(self._QUEUE)

  def drain(self) -> None:
    """Waits for every queued chunk to be decoded; raises the first decoding error."""
    self._collect(0)

  def close(self) -> None:
    """Stops the decoding thread (queued chunks are dropped or finished, errors ignored)."""
    for f in self._pending:
      f.cancel()
    self._pending.clear()
    if self._thread is not None:
      self._thread.shutdown(wait=True)
      self._thread = None


class PushSession:
  """A push admitted by the engine: write its data, then commit it (or let it go).

  Attributes:
    header: the push's header.
    answered: True when the push is a retry of one already answered: `result`
      is that answer, and nothing needs to be written or committed.
    result: the answer, once committed (or answered).
    nonfinite_leaf: the first leaf that carried NaN/Inf (with nonfinite=skip_step).
  """

  def __init__(self, header: PushHeader, *, answered: Optional[PushResult] = None,
               buffers: Optional[list[np.ndarray]] = None,
               views: Sequence[np.ndarray] = (), slot=None, reject_nonfinite: bool = True,
               commit: Optional[Callable[['PushSession'], PushResult]] = None,
               release: Optional[Callable[['PushSession', Optional[BaseException]], None]] = None):
    """Made by `Engine.open_push`, not by hand.

    Args:
      header: the push's header, checked and admitted.
      answered: the answer of a retried push (then nothing else is needed).
      buffers: one host buffer per leaf, in the wire dtypes (float32 for an encoded leaf)
        and the block layout.
      views: per buffer, the uint8 view whose row-major order is the wire's.
      slot: the push's admission slot (the engine's; the session only carries it).
      reject_nonfinite: NaN/Inf rejects the push (else it marks it).
      commit: counts the complete push into its step (the engine's, under its lock).
      release: frees the push's slot and unused buffers (the engine's), exactly once.
    """
    self.header = header
    self.answered = answered is not None
    self.result: Optional[PushResult] = answered
    self.nonfinite_leaf: Optional[str] = None
    self.buffers = buffers if buffers is not None else []
    self._views = list(views)
    self.slot = slot
    self._reject_nonfinite = reject_nonfinite
    self._commit, self._release = commit, release
    self._sink = _BlockSink(self._views, header.leaves, header.what, self._check_finite)
    self._receiver = ChunkReceiver(header.leaves, header.what, self._sink)
    self._filled = False

  @property
  def received_bytes(self) -> int:
    """Data bytes written so far."""
    return self._receiver.total_bytes

  def write(self, chunk: tensor_pb2.TensorChunk | Chunk) -> None:
    """The next chunk of the stream; InvalidArgument naming the leaf if it breaks the rules."""
    self._receiver.add(chunk)

  def fill(self, arrays: Sequence[np.ndarray]) -> None:
    """Writes whole leaves (row-major, in the wire dtypes) at once, instead of chunks.

    A block-encoded leaf is given as its encoded bytes (uint8, `codecs.encode`).
    For callers in this process (tests, benchmarks); `commit()` then needs no
    stream commit.
    """
    for i, (spec, x) in enumerate(zip(self.header.leaves, arrays)):
      if spec.encoding != codecs.RAW:
        x = np.ascontiguousarray(x, np.uint8).reshape(-1)
        if x.size != spec.nbytes:
          raise ValueError(f'leaf {spec.path}: {x.size} bytes, expected {spec.nbytes}')
        self._sink.write(i, 0, x)
        self._sink.leaf_complete(i)
        continue
      x = np.ascontiguousarray(x, spec.dtype).reshape(-1)
      if x.size * spec.dtype.itemsize != spec.nbytes:
        raise ValueError(f'leaf {spec.path}: {x.size} elements, expected shape {spec.shape}')
      layout.write(self._views[i], 0, x.view(np.uint8))
      self._check_finite(i)
    self._filled = True

  def commit(self, stream_commit: Optional[tensor_pb2.StreamCommit] = None) -> PushResult:
    """Checks the stream's commit and counts the push into its step; returns the answer.

    The push's buffers become the step's sum's (or go back to the pool): the
    session keeps no reference to them.
    """
    if self.answered:
      return self.result
    if not self._filled:
      self._receiver.finish(stream_commit)
    self._sink.drain()
    self.result = self._commit(self)
    return self.result

  def _check_finite(self, leaf: int) -> None:
    if all_finite(self.buffers[leaf]):
      return
    spec, h = self.header.leaves[leaf], self.header
    if self._reject_nonfinite:
      raise InvalidArgument(f'leaf {spec.path} of worker {h.worker_id}\'s push for step '
                            f'{h.step} contains NaN or Inf', reason='nonfinite', leaf=spec.path)
    self.nonfinite_leaf = self.nonfinite_leaf or spec.path

  def close(self, error: Optional[BaseException] = None) -> None:
    """Frees the push's slot and buffers unless it committed (safe to call again).

    `error`: what ended the push before its commit, if anything did.
    """
    self._sink.close()  # before the buffers go back: its thread may still write into them
    release, self._release = self._release, None
    if release is not None:
      release(self, error)
    self._views.clear()

  def __enter__(self) -> 'PushSession':
    return self

  def __exit__(self, kind, error, traceback) -> None:
    self.close(error)
