"""NaN/Inf checks of host buffers, in one cache-friendly pass."""

from __future__ import annotations

import numpy as np

_FINITE_BLOCK = 1 << 16  # elements per isfinite block: its bool temporary stays in cache


def all_finite(buffer: np.ndarray) -> bool:
  """No NaN or Inf in `buffer`: one pass of `isfinite`, block by block (a small temporary)."""
  flat = buffer.reshape(-1)
  return all(np.isfinite(flat[i:i + _FINITE_BLOCK]).all()
             for i in range(0, flat.size, _FINITE_BLOCK))
