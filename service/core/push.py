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

  A raw leaf's bytes are copied in as they are. A block-encoded leaf's are
  checked as they arrive and kept as they came (`codecs.EncodedLeaf`: its
  scales copied, its codes views of the received messages): they are decoded
  only when the push counts, straight into the step's sum (the accumulator's
  `add`), so an encoded push holds its wire bytes, not a float32 copy, and a
  malformed one is refused before anything was decoded.
  """

  def __init__(self, views: list[np.ndarray], specs: Sequence[LeafSpec], what: str,
               on_leaf: Callable[[int], None]):
    self._views, self._specs, self._what, self._on_leaf = views, specs, what, on_leaf
    self.encoded: dict[int, codecs.EncodedLeaf] = {}  # leaf -> its checked, kept bytes

  def write(self, leaf: int, offset: int, data: np.ndarray) -> None:
    spec = self._specs[leaf]
    if spec.encoding == codecs.RAW:
      layout.write(self._views[leaf], offset, data)
      return
    enc = self.encoded.get(leaf)
    if enc is None:
      enc = self.encoded[leaf] = codecs.EncodedLeaf(spec.size, spec.encoding,
                                                    f'{self._what}: leaf {spec.path}')
    enc.feed(offset, data)

  def leaf_complete(self, leaf: int) -> None:
    # An encoded leaf needs no NaN/Inf pass: its scales were checked to be finite and at
    # most float32's max / QMAX, its codes to be within +-QMAX, so every value is finite.
    if self._specs[leaf].encoding == codecs.RAW:
      self._on_leaf(leaf)


class PushSession:
  """A push admitted by the engine: write its data, then commit it (or let it go).

  Attributes:
    header: the push's header.
    answered: True when the push is a retry of one already answered: `result`
      is that answer, and nothing needs to be written or committed.
    result: the answer, once committed (or answered).
    nonfinite_leaf: the first leaf that carried NaN/Inf (with nonfinite=skip_step).
    encoded: leaf index -> `codecs.EncodedLeaf`, the checked bytes of each
      block-encoded leaf, decoded into the sum when the push counts (its
      buffer in `buffers` is then unused, unless the push becomes the sum).
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
    self.encoded = self._sink.encoded  # leaf -> its block-encoded bytes, checked
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
    release, self._release = self._release, None
    if release is not None:
      release(self, error)
    self._views.clear()
    self.encoded.clear()  # the received messages' bytes they kept

  def __enter__(self) -> 'PushSession':
    return self

  def __exit__(self, kind, error, traceback) -> None:
    self.close(error)
