"""A multi-process server as one: its processes' endpoints, and each leaf's part on each.

`DescribeModel` of a multi-process server lists its processes and, per leaf,
where it is split (`LeafPlacement`). `Placements` splits a pytree's leaves
into each process's parts (a push sends process i its parts) and joins the
parts pulled from every process into whole leaves. `OptimizerClient` uses it
by itself, so that worker code does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from service.protocol import pb


@dataclasses.dataclass(frozen=True)
class Placements:
  """Where each leaf of a model lives on a multi-process server.

  Attributes:
    model_id: the model they describe.
    endpoints: every process's HOST:PORT, by index.
    shapes: each leaf's whole shape, by path.
    parts: each leaf's index (a tuple of slices) into it, per process, by path.
  """
  model_id: str
  endpoints: tuple[str, ...]
  shapes: dict[str, tuple[int, ...]]
  parts: dict[str, tuple[tuple[slice, ...], ...]]

  @classmethod
  def of(cls, r: pb.DescribeModelResponse) -> Optional['Placements']:
    """The placements of a description; None for a single-process server (or no model)."""
    if len(r.processes) <= 1 or not r.initialized:
      return None
    n = len(r.processes)
    shapes = {s.path: tuple(s.shape) for s in r.leaves}
    parts = {}
    for p in r.placements:
      shape = shapes[p.path]
      if not p.HasField('split_dim'):
        parts[p.path] = (tuple(slice(None) for _ in shape),) * n
        continue
      bounds = list(p.starts) + [shape[p.split_dim]]
      parts[p.path] = tuple(
          tuple(slice(bounds[i], bounds[i + 1]) if d == p.split_dim else slice(None)
                for d in range(len(shape))) for i in range(n))
    return cls(r.model_id, tuple(e.endpoint for e in sorted(r.processes, key=lambda e: e.index)),
               shapes, parts)

  def split(self, leaves: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each process's parts of `leaves` ((path, whole leaf) pairs), as path -> array."""
    return [self.part(leaves, i) for i in range(len(self.endpoints))]

  def part(self, leaves: Sequence[tuple[str, np.ndarray]], i: int) -> dict[str, np.ndarray]:
    """Process i's parts of `leaves`, as path -> array (contiguous: a copy where a leaf is split
    along a dimension other than the first). Processes' parts can be made in parallel threads
    (NumPy's copies let go of the GIL)."""
    for path, _ in leaves:
      if path not in self.parts:
        raise ValueError(f'leaf {path} is not a leaf of the server\'s model')
    return {path: np.ascontiguousarray(x[self.parts[path][i]]) for path, x in leaves}

  def join(self, parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Whole leaves from every process's parts (path -> array, by process)."""
    whole = {}
    for path, shape in self.shapes.items():
      first = parts[0][path]
      if all(index == tuple(slice(None) for _ in shape) for index in self.parts[path]):
        whole[path] = first  # every process holds it whole
        continue
      out = np.empty(shape, first.dtype)
      for index, part in zip(self.parts[path], parts):
        out[index] = part[path]
      whole[path] = out
    return whole
