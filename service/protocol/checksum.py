"""The stream checksum: the wrapping 64-bit sum of the data's little-endian words.

See `StreamCommit.checksum` in proto/lamb_sharded/v1/tensor.proto for what it
catches (lost, truncated, altered chunk data) and what it does not (swapped or
cancelling words; the transport guards the bytes in flight).
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1


def chunk_checksum(data) -> int:
  """The wrapping 64-bit sum of `data`'s little-endian uint64 words, zero-padded.

  `data` is any contiguous buffer (bytes, a memoryview, an array), read in
  place, not copied. A stream's checksum adds up its chunks' checksums:
  `(acc + chunk_checksum(data)) & MASK64`.
  """
  view = memoryview(data).cast('B')
  n = len(view)
  whole = n - n % 8
  # An explicit uint64 reduction: it wraps modulo 2^64, never widens or turns to floats.
  total = int(np.add.reduce(np.frombuffer(view, '<u8', whole // 8), dtype=np.uint64))
  if whole != n:  # the last, partial word, zero-padded at its end
    total += int.from_bytes(view[whole:], 'little')
  return total & MASK64
