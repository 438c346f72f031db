"""The tensor dtypes of the wire (`lamb_sharded.v1.Dtype`) and their NumPy equivalents."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from service.errors import InvalidArgument
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2

_TO_NUMPY = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype(np.float32),
    tensor_pb2.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    tensor_pb2.DTYPE_FLOAT16: np.dtype(np.float16),
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}


def numpy_dtype(dtype: int, what: str) -> np.dtype:
  """The NumPy dtype of a wire `Dtype`; InvalidArgument naming `what` if none."""
  try:
    return _TO_NUMPY[dtype]
  except KeyError:
    raise InvalidArgument(f'{what}: unsupported dtype {dtype} '
                          f'(expected DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16)') from None


def wire_dtype(dtype) -> int:
  """The wire `Dtype` of a NumPy dtype (float32, bfloat16, float16)."""
  try:
    return _FROM_NUMPY[np.dtype(dtype)]
  except KeyError:
    raise ValueError(f'dtype {np.dtype(dtype)} cannot travel on the wire '
                     f'(float32, bfloat16 and float16 can)') from None


def as_wire_array(x) -> np.ndarray:
  """`x` as a NumPy array in a wire dtype (other dtypes become float32)."""
  x = np.asarray(x)
  return x if x.dtype in _FROM_NUMPY else x.astype(np.float32)
