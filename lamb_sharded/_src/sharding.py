"""Where each leaf lives: mesh and `PartitionSpec` resolution, with validation.

The update needs, for every leaf, the mesh axes it is split over (so its local
block can be reduced and the partial sums all-reduced) and the axes it is
replicated over (so the replicas do not count the same elements twice). This
module turns the user's `mesh` / `param_specs` -- or the shardings JAX exposes
on the params in explicit-sharding mode -- into one `Layout` per step.

Everything here is trace-time Python: it raises before any state changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
AnyMesh = Any  # jax.sharding.Mesh or jax.sharding.AbstractMesh


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, P)


def leaf_paths(tree: PyTree) -> list[str]:
  """Returns `jax.tree_util.keystr` of every leaf of `tree`, in flatten order."""
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def broadcast_prefix(prefix: PyTree, tree: PyTree, what: str, is_leaf=None) -> list[Any]:
  """Flattens `prefix` (a tree-prefix of `tree`) to one value per leaf of `tree`.

  Args:
    prefix: a pytree whose structure is a prefix of `tree` (for example a mask
      or a tree of `PartitionSpec`s).
    tree: the full pytree (the params).
    what: name of the argument, for error messages.
    is_leaf: optional predicate marking leaves of `prefix`.

  Returns:
    A list with one entry of `prefix` per leaf of `tree`.

  Raises:
    ValueError: naming the first leaf of `tree` that `prefix` does not cover.
  """
  prefix_def = jax.tree_util.tree_structure(prefix, is_leaf=is_leaf)
  try:
    subtrees = prefix_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'{what} does not match the params tree: {_first_mismatch(prefix, tree, is_leaf)} '
        f'({e})') from None
  values = jax.tree_util.tree_leaves(prefix, is_leaf=is_leaf)
  out = []
  for value, sub in zip(values, subtrees):
    out.extend([value] * len(jax.tree_util.tree_leaves(sub)))
  return out


def _first_mismatch(prefix: PyTree, tree: PyTree, is_leaf=None) -> str:
  """Names the first path where `prefix` and `tree` disagree."""
  pre = [jax.tree_util.keystr(p) for p, _ in
         jax.tree_util.tree_flatten_with_path(prefix, is_leaf=is_leaf)[0]]
  full = leaf_paths(tree)
  for path in full:
    if not any(path == q or path.startswith(q) for q in pre):
      return f'params leaf {path} has no entry'
  for q in pre:
    if not any(path == q or path.startswith(q) for path in full):
      return f'entry {q} is not a params leaf'
  return 'tree structures differ'


def check_same_structure(ref: PyTree, other: PyTree, ref_name: str, other_name: str) -> None:
  """Raises a ValueError naming the first leaf path where two trees differ.

  Both structure and leaf shapes are compared.
  """
  ref_paths = jax.tree_util.tree_flatten_with_path(ref)[0]
  oth_paths = jax.tree_util.tree_flatten_with_path(other)[0]
  ref_def = jax.tree_util.tree_structure(ref)
  oth_def = jax.tree_util.tree_structure(other)
  if ref_def != oth_def:
    ref_keys = [jax.tree_util.keystr(p) for p, _ in ref_paths]
    oth_keys = [jax.tree_util.keystr(p) for p, _ in oth_paths]
    missing = [k for k in ref_keys if k not in set(oth_keys)]
    extra = [k for k in oth_keys if k not in set(ref_keys)]
    detail = []
    if missing:
      detail.append(f'leaf {missing[0]} of {ref_name} is missing from {other_name}')
    if extra:
      detail.append(f'{other_name} has leaf {extra[0]} that {ref_name} lacks')
    if not detail:
      detail.append(f'node types differ: {ref_def} vs {oth_def}')
    raise ValueError(f'{other_name} and {ref_name} have different tree structures: '
                     + '; '.join(detail))
  for (path, a), (_, b) in zip(ref_paths, oth_paths):
    if getattr(a, 'shape', None) != getattr(b, 'shape', None):
      raise ValueError(
          f'leaf {jax.tree_util.keystr(path)}: {other_name} has shape '
          f'{getattr(b, "shape", None)} but {ref_name} has shape {getattr(a, "shape", None)}')


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the leaves of a params tree are laid out on a mesh.

  Attributes:
    mesh: the `Mesh` (or `AbstractMesh` in explicit-sharding mode) the update
      runs on under `shard_map`; `None` means no mesh is known and the update
      runs as plain (jit-partitioned) JAX, exactly like `optax.lamb`.
    specs: one normalised `PartitionSpec` per leaf (flatten order).
    replicated_axes: per leaf, the mesh axes the leaf is *not* split over; its
      partial sums are only counted on index 0 of those axes.
  """
  mesh: Optional[AnyMesh]
  specs: tuple[P, ...]
  replicated_axes: tuple[tuple[str, ...], ...]

  @property
  def axis_names(self) -> tuple[str, ...]:
    return tuple(self.mesh.axis_names) if self.mesh is not None else ()


def _spec_axes(spec: P) -> list[str]:
  axes = []
  for entry in spec:
    if entry is None:
      continue
    axes.extend(entry if isinstance(entry, tuple) else (entry,))
  return axes


def dim_shards(spec: P, mesh: Optional[AnyMesh], dim: int) -> int:
  """Into how many blocks `spec` splits dimension `dim` on `mesh` (1 without a mesh)."""
  if mesh is None or dim < 0 or dim >= len(spec) or spec[dim] is None:
    return 1
  entry = spec[dim]
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n = 1
  for name in (entry if isinstance(entry, tuple) else (entry,)):
    n *= sizes[name]
  return n


def validate_spec(path: str, shape: Sequence[int], spec: P, mesh: AnyMesh) -> P:
  """Checks that `spec` fits a leaf of `shape` on `mesh`; returns it normalised.

  Raises:
    ValueError: naming the leaf `path` when the spec has more entries than the
      leaf has dimensions, names an axis the mesh lacks, uses an axis twice, or
      splits a dimension into blocks that do not divide it evenly (`shard_map`
      needs even blocks).
  """
  if not isinstance(spec, P):
    raise ValueError(f'param_specs{path}: expected a PartitionSpec or None, got {spec!r}')
  if len(spec) > len(shape):
    raise ValueError(
        f'param_specs{path}: {spec} has {len(spec)} entries but the leaf has shape '
        f'{tuple(shape)} ({len(shape)} dimensions)')
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  seen: set[str] = set()
  for dim, entry in enumerate(spec):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    block = 1
    for name in names:
      if name not in sizes:
        raise ValueError(
            f'param_specs{path}: {spec} names mesh axis {name!r}, but the mesh has axes '
            f'{tuple(mesh.axis_names)}')
      if name in seen:
        raise ValueError(f'param_specs{path}: {spec} uses mesh axis {name!r} twice')
      seen.add(name)
      block *= sizes[name]
    if shape[dim] % block:
      raise ValueError(
          f'param_specs{path}: {spec} splits dimension {dim} of size {shape[dim]} '
          f'into {block} blocks, which does not divide it; shard another dimension '
          f'or replicate this leaf')
  return P(*spec, *([None] * (len(shape) - len(spec))))


def explicit_sharding(leaf: Any) -> Optional[NamedSharding]:
  """The sharding JAX exposes on a leaf in explicit-sharding mode, else None."""
  try:
    sharding = jax.typeof(leaf).sharding
  except (TypeError, AttributeError):
    return None
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None or mesh.empty:
    return None
  if not any(t == AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def auto_mesh_size(leaf: Any) -> int:
  """Devices of the automatically partitioned mesh a leaf lives on (1: none).

  Under `jit`, a tracer of an input placed with a `NamedSharding` over
  automatic axes still carries the (abstract) mesh in its type, though not the
  spec: XLA chooses that later. This tells a leaf that XLA will partition from
  one that lives on a single device.
  """
  try:
    mesh = jax.typeof(leaf).sharding.mesh
  except (TypeError, AttributeError):
    return 1
  if mesh is None or mesh.empty:
    return 1
  return mesh.size


def _is_explicit(mesh: AnyMesh) -> bool:
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def place(x: jax.Array, sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
  """Puts `x` on `sharding`, whatever the mode; the one place that knows the modes.

  Outside `jit` this is `jax.device_put` (the result is committed to
  `sharding`); under `jit` it is `jax.sharding.reshard` where the mesh has
  explicit axes (the type changes) and `jax.lax.with_sharding_constraint` where
  its axes are automatic. `None` leaves `x` as it is (uncommitted stays
  uncommitted). MaxText's `maybe_shard_with_name` is the model.

  Args:
    x: an array or a tracer.
    sharding: where it should live, or None.

  Returns:
    `x`, placed.
  """
  if sharding is None:
    return x
  if not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, sharding)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is not None and _is_explicit(mesh):
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def full(shape: Sequence[int], fill: Any, dtype: Any,
         sharding: Optional[jax.sharding.Sharding], traced: bool) -> jax.Array:
  """`jnp.full(shape, fill, dtype)` created where `place` would put it.

  Outside `jit` the array is created directly on `sharding` (never assembled on
  one device first); under `jit` (`traced`) it is created and then `place`d.
  """
  if sharding is None:
    return jnp.full(shape, fill, dtype)
  if traced:
    return place(jnp.full(shape, fill, dtype), sharding)
  if isinstance(getattr(sharding, 'mesh', None), jax.sharding.AbstractMesh):
    return jnp.full(shape, fill, dtype, out_sharding=sharding)  # under jax.set_mesh
  return jnp.full(shape, fill, dtype, device=sharding)


def replicated(sharding: Optional[jax.sharding.Sharding]) -> Optional[jax.sharding.Sharding]:
  """The sharding that replicates a value over the devices of `sharding`.

  This is where a jitted step returns its scalars (the step count) when its
  inputs live on `sharding`; None where that cannot be said (then the scalar
  stays uncommitted).
  """
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return None


def same_spec(a: P, b: P, ndim: int) -> bool:
  """Whether two specs place a leaf of `ndim` dimensions the same way."""
  def norm(s):
    entries = [tuple(e) if isinstance(e, tuple) else ((e,) if e is not None else ()) for e in s]
    return tuple(entries + [()] * (ndim - len(entries)))
  return norm(a) == norm(b)


def resolve_layout(params: PyTree, mesh: Optional[Mesh], param_specs: Optional[PyTree]) -> Layout:
  """Resolves where every leaf of `params` lives.

  Rules, in order:
    1. `param_specs` given: those specs, on `mesh` (or on the mesh set with
       `jax.set_mesh` when `mesh` is omitted).
    2. `mesh` given without specs: the specs JAX exposes on explicitly sharded
       params, and `P()` (replicated) for the others.
    3. Neither: if the params carry explicit shardings (`jax.set_mesh` with
       `AxisType.Explicit`), those; otherwise no mesh (plain JAX, like optax).

  Args:
    params: the params pytree (arrays, tracers or `jax.ShapeDtypeStruct`s).
    mesh: optional mesh.
    param_specs: optional pytree of `PartitionSpec` (or None for replicated),
      with the structure of `params` or a prefix of it.

  Returns:
    A `Layout`.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  leaves = [x for _, x in flat]

  if param_specs is not None:
    if mesh is None:
      ctx = jax.sharding.get_abstract_mesh()
      if ctx is None or ctx.empty:
        raise ValueError('param_specs was given without a mesh: pass mesh=... or use '
                         'jax.set_mesh(mesh)')
      mesh = ctx
    raw = broadcast_prefix(param_specs, params, 'param_specs', is_leaf=_is_spec_leaf)
    specs = [P() if s is None else s for s in raw]
  else:
    explicit = [explicit_sharding(x) for x in leaves]
    if mesh is None:
      meshes = {s.mesh for s in explicit if s is not None}
      if not meshes:
        return Layout(None, tuple(P() for _ in leaves), tuple(() for _ in leaves))
      if len(meshes) > 1:
        raise ValueError(f'params are sharded over different meshes: {sorted(map(str, meshes))}')
      mesh = meshes.pop()
    specs = [s.spec if s is not None else P() for s in explicit]

  norm, repl = [], []
  for path, leaf, spec in zip(paths, leaves, specs):
    s = validate_spec(path, leaf.shape, spec, mesh)
    used = set(_spec_axes(s))
    norm.append(s)
    repl.append(tuple(a for a in mesh.axis_names if a not in used))
  return Layout(mesh, tuple(norm), tuple(repl))


def named_shardings(mesh: Mesh, param_specs: PyTree, params: PyTree) -> PyTree:
  """`NamedSharding`s for `params` from a (prefix) tree of `PartitionSpec`s.

  Useful to `jax.device_put` params (and, by the same specs, the LAMB state)
  before training.

  Args:
    mesh: the mesh.
    param_specs: pytree of `PartitionSpec`/None, structure of `params` or a prefix.
    params: the params pytree.

  Returns:
    A pytree of `NamedSharding` with the structure of `params`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = {'w': jnp.zeros((4, 2))}
    >>> named_shardings(mesh, {'w': P('data')}, params)['w'].spec
    P('data',)
  """
  specs = broadcast_prefix(param_specs, params, 'param_specs', is_leaf=_is_spec_leaf)
  treedef = jax.tree_util.tree_structure(params)
  return jax.tree_util.tree_unflatten(
      treedef, [NamedSharding(mesh, P() if s is None else s) for s in specs])
