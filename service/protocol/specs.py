"""`LeafSpec`: one leaf of a model as the wire describes it (`TensorSpec`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from service.errors import InvalidArgument
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.protocol.dtypes import numpy_dtype, wire_dtype

MAX_LEAF_BYTES = 1 << 40  # a declared shape bigger than this is refused (1 TiB)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One leaf: its path, shape and dtype (NumPy)."""
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @functools.cached_property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def to_proto(self) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(path=self.path, shape=list(self.shape),
                                 dtype=wire_dtype(self.dtype))

  @staticmethod
  def from_proto(spec: tensor_pb2.TensorSpec, what: str) -> 'LeafSpec':
    """The spec of a `TensorSpec`; InvalidArgument naming `what` and the leaf if malformed."""
    if not spec.path:
      raise InvalidArgument(f'{what}: a leaf has an empty path')
    if any(d < 0 for d in spec.shape):
      raise InvalidArgument(f'{what}: leaf {spec.path} has a negative dimension '
                            f'{list(spec.shape)}')
    dtype = numpy_dtype(spec.dtype, f'{what}: leaf {spec.path}')
    n = 1
    for d in spec.shape:
      n *= d
      if n * dtype.itemsize > MAX_LEAF_BYTES:
        raise InvalidArgument(f'{what}: leaf {spec.path} declares shape {list(spec.shape)}, '
                              f'over 1 TiB')
    return LeafSpec(spec.path, tuple(int(d) for d in spec.shape), dtype)


def specs_from_proto(specs: Sequence[tensor_pb2.TensorSpec], what: str) -> list[LeafSpec]:
  """The specs of a header's leaves, each path at most once."""
  out, seen = [], set()
  for s in specs:
    leaf = LeafSpec.from_proto(s, what)
    if leaf.path in seen:
      raise InvalidArgument(f'{what}: leaf {leaf.path} appears twice')
    seen.add(leaf.path)
    out.append(leaf)
  return out
