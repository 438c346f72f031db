"""`LeafSpec`: one leaf of a model as the wire describes it (`TensorSpec`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from service.errors import InvalidArgument
from service.protocol import codecs
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.protocol.dtypes import numpy_dtype, wire_dtype
from service.protocol.ids import check_path

MAX_LEAF_BYTES = 1 << 40  # a declared shape bigger than this is refused (1 TiB)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """One leaf: its path, shape, dtype (NumPy) and encoding on the wire.

  `encoding` is a `lamb_sharded.v1.Encoding` (service.protocol.codecs): RAW,
  the values in `dtype`; or a block encoding (pushed gradients), whose `dtype`
  is the decoded one, float32. `nbytes` is the leaf's size on the wire.
  """
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  encoding: int = codecs.RAW

  @functools.cached_property
  def size(self) -> int:
    return math.prod(self.shape)

  @functools.cached_property
  def nbytes(self) -> int:
    return codecs.nbytes(self.size, self.encoding, self.dtype.itemsize)

  @property
  def described(self) -> str:
    """E.g. 'float32[3, 4]', or 'float32[3, 4] in int8 blocks' (for messages)."""
    enc = '' if self.encoding == codecs.RAW else f' in {codecs.NAMES[self.encoding]} blocks'
    return f'{self.dtype.name}{list(self.shape)}{enc}'

  def to_proto(self) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(path=self.path, shape=list(self.shape),
                                 dtype=wire_dtype(self.dtype), encoding=self.encoding)

  @staticmethod
  def from_proto(spec: tensor_pb2.TensorSpec, what: str, *,
                 encoded_ok: bool = False) -> 'LeafSpec':
    """The spec of a `TensorSpec`; InvalidArgument naming `what` and the leaf if malformed.

    `encoded_ok`: block encodings are allowed (pushed gradients); else only raw.
    """
    check_path(spec.path, what)
    if any(d < 0 for d in spec.shape):
      raise InvalidArgument(f'{what}: leaf {spec.path} has a negative dimension '
                            f'{list(spec.shape)}')
    dtype = numpy_dtype(spec.dtype, f'{what}: leaf {spec.path}')
    encoding = codecs.check_encoding(spec.encoding, f'{what}: leaf {spec.path}')
    if encoding != codecs.RAW:
      if not encoded_ok:
        raise InvalidArgument(f'{what}: leaf {spec.path} is in {codecs.NAMES[encoding]} '
                              f'blocks, but only gradient pushes may be encoded')
      if dtype != np.float32:
        raise InvalidArgument(f'{what}: leaf {spec.path} is in {codecs.NAMES[encoding]} '
                              f'blocks with dtype {dtype.name}; encoded leaves decode to '
                              f'DTYPE_FLOAT32')
    n = 1
    for d in spec.shape:
      n *= d
      if n * dtype.itemsize > MAX_LEAF_BYTES:
        raise InvalidArgument(f'{what}: leaf {spec.path} declares shape {list(spec.shape)}, '
                              f'over 1 TiB')
    return LeafSpec(spec.path, tuple(int(d) for d in spec.shape), dtype, encoding)


def specs_from_proto(specs: Sequence[tensor_pb2.TensorSpec], what: str, *,
                     encoded_ok: bool = False) -> list[LeafSpec]:
  """The specs of a header's leaves, each path at most once (`encoded_ok`: see from_proto)."""
  out, seen = [], set()
  for s in specs:
    leaf = LeafSpec.from_proto(s, what, encoded_ok=encoded_ok)
    if leaf.path in seen:
      raise InvalidArgument(f'{what}: leaf {leaf.path} appears twice')
    seen.add(leaf.path)
    out.append(leaf)
  return out
