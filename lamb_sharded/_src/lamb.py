"""LAMB with its state sharded across a mesh and its per-layer norms all-reduced once.

`scale_by_lamb` is the whole LAMB direction (Adam moments, decoupled weight
decay, per-layer trust ratio) as one `optax.GradientTransformation`; `lamb`
chains it with `optax.scale_by_learning_rate`, exactly as `optax.lamb` chains
its four pieces.

Why one transformation instead of optax's four: on a mesh, every per-layer norm
optax computes is its own cross-device reduction (two per leaf), while here the
moments, the direction and the local partial sums of ||w||^2 and ||u||^2 of
every leaf are computed in one `shard_map`ped pass and the partial sums of the
whole pytree travel in a single `psum`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lamb_sharded._src import lowbit
from lamb_sharded._src import sharding as sharding_lib

PyTree = Any
MaskOrFn = Optional[Union[Any, Callable[[PyTree], Any]]]
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

_NO_PARAMS_MSG = (
    'lamb_sharded: you are using a transformation that requires the current value of '
    'parameters, but you are not passing `params` when calling `update`.')


class ScaleByLambState(NamedTuple):
  """State of `scale_by_lamb`.

  Attributes:
    count: number of updates applied so far (int32 scalar, replicated).
    mu: first moments, a pytree like the params, sharded like them. With
      `mu_dtype='int8'` or `'int4'` a quantized leaf is a `QuantizedMoment(codes,
      scales)` node (both arrays sharded like the leaf, the codes int8 or int4);
      `dequantize_moments` gives floats.
    nu: second moments, likewise (`nu_dtype`).
    trust_ratio: with `record_trust_ratio=True`, the trust ratio each leaf got
      in the last update (float32, one entry per leaf in the params' flattening
      order, 1 where layer adaptation is off; replicated); else None (no leaf).
  """
  count: jax.Array
  mu: PyTree
  nu: PyTree
  trust_ratio: Optional[jax.Array] = None


def _full_zeros(shape, dtype, *, where, traced):
  return sharding_lib.full(shape, 0, dtype, where, traced)


def _moment_leaves(params: PyTree, moments: PyTree, name: str, layout) -> list[Any]:
  """One entry per params leaf: a float array or a `QuantizedMoment`, checked.

  Raises:
    ValueError: naming the leaf where `moments` does not match `params`, or where
      a quantized moment's blocks would cross the boundary of the leaf's shards.
  """
  treedef = jax.tree_util.tree_structure(params)
  try:
    out = treedef.flatten_up_to(moments)
  except (ValueError, TypeError):
    sharding_lib.check_same_structure(params, moments, 'params', name)
    raise
  paths = sharding_lib.leaf_paths(params)
  for path, p, m, sp in zip(paths, jax.tree_util.tree_leaves(params), out, layout.specs):
    if not lowbit.is_quantized(m):
      if not hasattr(m, 'shape'):
        sharding_lib.check_same_structure(params, moments, 'params', name)
      if m.shape != p.shape:
        raise ValueError(f'leaf {path}: {name} has shape {m.shape} but params has shape '
                         f'{p.shape}')
      continue
    bits = lowbit.code_width(m.codes.dtype)
    if bits is None:
      raise ValueError(f'leaf {path}: {name} holds codes of dtype {m.codes.dtype}; expected '
                       f'int8, or 4-bit codes (uint8 two a byte, or int4)')
    if (not p.shape or m.scales.shape[:-1] != p.shape[:-1]
        or (m.codes.shape, jnp.dtype(m.codes.dtype)) != lowbit.codes_layout(
            p.shape, 'int8' if bits == 8 else 'int4')):
      raise ValueError(f'leaf {path}: {name} holds {bits}-bit codes of shape {m.codes.shape} '
                       f'({m.codes.dtype}) and scales of shape {m.scales.shape}, which do '
                       f'not fit params of shape {p.shape}')
    k = sharding_lib.dim_shards(sp, layout.mesh, p.ndim - 1)
    b = lowbit.block_size_of(m)
    if k > 1 and (m.scales.shape[-1] % k or (p.shape[-1] // k) % b):
      raise ValueError(
          f'leaf {path}: {name} has {bits}-bit blocks of {b} along the last axis, which the '
          f'spec {sp} splits into {k} shards of {p.shape[-1] // k}: blocks would cross '
          f'shard boundaries; re-quantize the state for this layout '
          f'(lamb_sharded.requantize_moments)')
  return out


def _is_python_zero(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _flags(tree_or_fn: MaskOrFn, params: PyTree, what: str, default: bool) -> list[bool]:
  """One Python bool per params leaf from a mask pytree (or prefix) or callable."""
  n = len(jax.tree_util.tree_leaves(params))
  if tree_or_fn is None:
    return [default] * n
  tree = tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn
  values = sharding_lib.broadcast_prefix(tree, params, what)
  out = []
  for path, v in zip(sharding_lib.leaf_paths(params), values):
    try:
      out.append(bool(v))
    except jax.errors.ConcretizationTypeError:
      raise ValueError(f'{what}{path}: mask leaves must be Python bools, not traced '
                       f'values') from None
  return out


def _acc_dtype(leaves) -> jnp.dtype:
  """Dtype of the partial sums: float64 if any leaf is 64-bit, else float32."""
  wide = any(jnp.dtype(x.dtype) in (jnp.float64, jnp.complex128) for x in leaves)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def _compute_dtype(dtype) -> jnp.dtype:
  """Low-precision floats are computed in float32; others in their own dtype."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return dtype
  return jnp.promote_types(dtype, jnp.float32)


def _sumsq(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  if jnp.iscomplexobj(x):
    return jnp.sum(jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc)))
  return jnp.sum(jnp.square(x.astype(acc)))


_ROWS = 8


def _sumsq_rows(x: jax.Array, y: jax.Array, acc: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """Partial sums of |x|^2 and |y|^2 as two vectors of `_ROWS` entries each.

  One variadic reduction, one loop reading x and y: two separate `jnp.sum`s
  would make XLA materialise `y` (the LAMB direction) to feed both the
  reduction and the update, while here it is recomputed inside the loop. The
  leaf is viewed as `_ROWS` rows (a free reshape) reduced row by row, which
  lets XLA:CPU split the loop over its threads (a reduction to one scalar runs
  on one); the caller sums the rows of every leaf together in one fusion.
  Small or indivisible leaves are reduced whole into the first entry.
  """
  def sq(a):
    if jnp.iscomplexobj(a):
      return jnp.square(a.real.astype(acc)) + jnp.square(a.imag.astype(acc))
    return jnp.square(a.astype(acc))
  rows = _ROWS if x.size % _ROWS == 0 and x.size >= 1024 * _ROWS else 1
  zero = jnp.zeros((), acc)
  per_row = jax.lax.reduce((sq(x).reshape(rows, -1), sq(y).reshape(rows, -1)), (zero, zero),
                           lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))
  return tuple(jnp.pad(r, (0, _ROWS - rows)) for r in per_row)


def _sumsq_pair(x: jax.Array, y: jax.Array, acc: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """|x|^2 and |y|^2 as two plain sums, padded like `_sumsq_rows`' vectors.

  For leaves that XLA partitions itself (params on a mesh with automatic axes,
  no `mesh=`): XLA turns a plain sum of a sharded array into a local sum plus
  an all-reduce, and combines the all-reduces of all leaves, while the single
  variadic reduction of `_sumsq_rows` would be partitioned by gathering its
  partial sums -- or, after its reshape, the whole leaf -- onto every device.
  """
  return tuple(jnp.pad(_sumsq(a, acc)[None], (0, _ROWS - 1)) for a in (x, y))


def _moment_sharding(leaf: Any, mesh, spec: P) -> Optional[jax.sharding.Sharding]:
  """Where the moments of `leaf` must live for `update` to return them unchanged.

  On a mesh: as `spec` says. Without one: like a committed leaf (a jitted step
  returns its outputs committed where its inputs were); an uncommitted leaf
  gets uncommitted moments, as `jnp.zeros_like` gives (and `optax.lamb` has).
  Under `jit` (a tracer, no visible placement) or for a `ShapeDtypeStruct`
  without a sharding: None.
  """
  if mesh is not None:
    entries = list(spec)
    while entries and entries[-1] is None:  # as a jitted step returns it: P(), not P(None,)
      entries.pop()
    return NamedSharding(mesh, P(*entries))
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, jax.Array):
    return leaf.sharding if leaf.committed else None
  return getattr(leaf, 'sharding', None)


def _as_spec(x: jax.Array, mesh, spec: P) -> jax.Array:
  """Reshards an input to `spec` where `shard_map` will not do it by itself.

  `shard_map` reshards inputs over auto-sharded mesh axes itself, but over
  explicit axes it insists that the inputs' types already match `in_specs`.
  """
  if not any(t == AxisType.Explicit for t in mesh.axis_types):
    return x
  current = jax.typeof(x).sharding
  if not current.mesh.empty and sharding_lib.same_spec(current.spec, spec, x.ndim):
    return x
  return sharding_lib.place(x, NamedSharding(mesh, spec))


class _Static(NamedTuple):
  """Trace-time configuration of one update: per-leaf flags and global switches."""
  decay: tuple[bool, ...]
  adapt: tuple[bool, ...]
  replicated_axes: tuple[tuple[str, ...], ...]
  axis_names: tuple[str, ...]
  xla_partitioned: tuple[bool, ...]  # leaves XLA partitions (auto axes, no shard_map)
  bias_correction: bool
  clip_grad_norm: bool
  clip_trust_ratio: bool
  record_trust_ratio: bool


def _local_update(static: _Static, s: dict, gs, ms, vs, ps):
  """The per-device LAMB step on local blocks; the only collective is `psum`.

  Two passes over memory per leaf, the minimum: the trust ratio needs the norm
  of the whole direction before any element of the update can be written.

    pass 1: read g, m, v (writing m, v) and p; reduce ||p||^2 and ||u||^2
            (u recomputed in the reduction loop, never written to memory);
    (one psum of the stacked partial sums of every leaf)
    pass 2: read m, v, p and write the update -- which XLA fuses with the
            caller's `apply_updates`, so it writes p directly.

  XLA:CPU has no multi-output loop fusion, so there m and v are written by
  separate loops that each read g (docs/library.md counts the traffic).
  """
  acc = _acc_dtype(ps)

  def hp(name, dtype, scalars=s):
    """A hyperparameter: Python numbers stay weakly typed, arrays are cast."""
    value = scalars[name]
    return value if isinstance(value, (int, float)) else value.astype(dtype)

  def psum(x):
    return jax.lax.psum(x, static.axis_names) if static.axis_names else x

  def owned(x, axes):
    """Counts `x` only on the first replica along the axes a leaf is not split over."""
    if not axes or not static.axis_names:
      return x
    first = functools.reduce(jnp.logical_and, [jax.lax.axis_index(a) == 0 for a in axes])
    return jnp.where(first, x, jnp.zeros_like(x))

  def owned_mask(axes_per_leaf):
    """1.0 where this device holds the counted replica of a leaf's block, else 0.0."""
    if not static.axis_names:
      return jnp.ones((len(axes_per_leaf),), acc)
    groups = sorted(set(axes_per_leaf))
    flags = [owned(jnp.ones((), acc), axes) for axes in groups]
    return jnp.stack([flags[groups.index(axes)] for axes in axes_per_leaf])

  def direction(i, m_new, v_new, p, scalars):
    """u = m^ / (sqrt(v^ + eps_root) + eps) [+ weight_decay * p], in m_new's dtype."""
    real = jnp.finfo(m_new.dtype).dtype
    if static.bias_correction:
      m_new = m_new * hp('inv_bc1', real, scalars)
      v_new = v_new * hp('inv_bc2', real, scalars)
    u = m_new / (jnp.sqrt(v_new + hp('eps_root', real, scalars)) + hp('eps', real, scalars))
    if static.decay[i]:
      u = u + hp('weight_decay', real, scalars) * p.astype(m_new.dtype)
    return u

  if static.clip_grad_norm:
    g_sq = sum(owned(_sumsq(g, acc), r) for g, r in zip(gs, static.replicated_axes))
    g_norm = jnp.sqrt(psum(g_sq))
    max_norm = hp('max_grad_norm', acc)
    grad_scale = jnp.where(g_norm > max_norm, max_norm / g_norm, jnp.ones_like(g_norm))

  # Pass 1: moments, and the partial sums of ||p||^2 and ||u||^2.
  new_ms, new_vs, fresh, rows_p, rows_u = [], [], [], [], []
  for i, (g, m, v, p) in enumerate(zip(gs, ms, vs, ps)):
    cdt = _compute_dtype(p.dtype)
    real = jnp.finfo(cdt).dtype  # real counterpart of a complex dtype
    b1, b2 = hp('b1', real), hp('b2', real)

    def grad(g, cdt=cdt, real=real):
      g = g.astype(cdt)
      return g * grad_scale.astype(real) if static.clip_grad_norm else g

    if lowbit.is_quantized(m) or lowbit.is_quantized(v):
      recompute, new_m, new_v, sums = _quantized_pass1(
          static, i, g, m, v, p, grad, b1, b2, lambda *a: direction(*a, s), acc)
      new_ms.append(new_m)
      new_vs.append(new_v)
      fresh.append(recompute)
      if sums is not None:
        rows_p.append(sums[0])
        rows_u.append(sums[1])
      continue
    g = grad(g)
    m_new = b1 * m.astype(cdt) + (1 - b1) * g
    g_abs_sq = (g.conj() * g).real if jnp.iscomplexobj(g) else g * g
    v_new = b2 * v.real.astype(real) + (1 - b2) * g_abs_sq
    new_ms.append(m_new.astype(m.dtype))
    new_vs.append(v_new.astype(v.dtype))
    fresh.append((m_new, v_new))
    if static.adapt[i]:
      sumsq = _sumsq_pair if static.xla_partitioned[i] else _sumsq_rows
      row_p, row_u = sumsq(p, direction(i, m_new, v_new, p, s), acc)
      rows_p.append(row_p)
      rows_u.append(row_u)

  # The trust ratios of all leaves at once: one (2, L) psum, vector arithmetic.
  ratios = None
  if rows_p:
    adapted = [a for a, keep in zip(static.replicated_axes, static.adapt) if keep]
    sums = jnp.stack([jnp.stack(rows_p), jnp.stack(rows_u)]).sum(-1) * owned_mask(adapted)
    totals = psum(sums)
    p_norm, u_norm = jnp.sqrt(totals[0]), jnp.sqrt(totals[1])
    ratios = p_norm / u_norm
    if static.clip_trust_ratio:
      ratios = jnp.clip(ratios, hp('min_trust_ratio', acc), hp('max_trust_ratio', acc))
    ratios = jnp.where((p_norm == 0) | (u_norm == 0), jnp.ones_like(ratios), ratios)

  recorded = None
  if static.record_trust_ratio:  # every leaf's ratio, 1 where adaptation is off
    one, k = jnp.ones((), jnp.float32), 0
    entries = []
    for adapt in static.adapt:
      entries.append(ratios[k].astype(jnp.float32) if adapt else one)
      k += adapt
    recorded = jnp.stack(entries) if entries else jnp.zeros((0,), jnp.float32)

  # Pass 2: the update. The barrier gives pass 2 its own copy of the scalars, so
  # XLA cannot merge its direction with pass 1's and materialise u in between.
  s2 = dict(s)
  arrays = {k: v for k, v in s.items() if not isinstance(v, (int, float))}
  s2.update(jax.lax.optimization_barrier(arrays))
  outs, k = [], 0
  for i, (g, p, moments) in enumerate(zip(gs, ps, fresh)):
    m_new, v_new = moments() if callable(moments) else moments
    u = direction(i, m_new, v_new, p, s2)
    if static.adapt[i]:
      u = u * ratios[k].astype(jnp.finfo(u.dtype).dtype)
      k += 1
    outs.append(u.astype(g.dtype))
  return outs, new_ms, new_vs, recorded


def _quantized_pass1(static: _Static, i: int, g, m, v, p, grad, b1, b2, direction, acc):
  """Pass 1 of a leaf with an 8- or 4-bit moment, in the block view (..., k, b).

  The same loops whatever the codes: each moment's `lowbit.CodeMap` (from its
  codes' dtype) encodes and decodes it.

  Loops over the leaf (XLA:CPU has no multi-output loop fusion, so one per array
  written):
    * one reduction reads g, the codes and scales, and p, and gives per block
      max |m_new|, max v_new (the new scales) and the partial sum of |u|^2;
    * ||p||^2 on its own (a reduction of an input alone, which XLA:CPU runs
      vectorised);
    * one loop per moment writes its new codes;
    * pass 2 (the caller) reads g, the old codes and p once more.
  m_new, v_new and u are never written to memory: each loop recomputes them
  from g and the old codes, which costs less than a float32 round trip and
  keeps the step's temporaries at the codes' size. XLA would rather compute
  them once and materialise them for their several consumers, so each consumer
  gets its own copy of the inputs through an `optimization_barrier` (free: the
  inputs are buffers already).

  Returns:
    (recompute, new_m, new_v, sums): `recompute()` gives (m_new, v_new) as
    float arrays of the leaf's shape for pass 2; the new stored moments; the
    two `_ROWS`-vectors of partial sums (None where layer adaptation is off).
  """
  qm, qv = lowbit.is_quantized(m), lowbit.is_quantized(v)
  m_map = lowbit.signed_map(m.codes.dtype) if qm else None
  v_map = lowbit.sqrt_map(v.codes.dtype) if qv else None
  b = lowbit.block_size_of(m if qm else v)
  if qm and qv and lowbit.block_size_of(v) != b:  # not from `init`: v decoded apart
    v = lowbit.dequantize_sqrt(v)
    qv = False
  n = p.shape[-1]
  blocks = functools.partial(lowbit.to_blocks, b=b)

  def moments(g, m, v, table=False):
    """m_new and v_new in the block view, from the stored state."""
    gb = blocks(grad(g))
    m_old = (lowbit.decode_blocks(m, b, m_map, table or m_map.step_gathers) if qm
             else blocks(m.astype(gb.dtype)))
    if qv:
      s_old = lowbit.decode_blocks(v, b, v_map, table or v_map.step_gathers)
      v_old = s_old * s_old
    else:
      v_old = blocks(v.astype(gb.dtype))
    return b1 * m_old + (1 - b1) * gb, b2 * v_old + (1 - b2) * gb * gb

  def apart(*xs):
    return jax.lax.optimization_barrier(xs)

  def recompute():
    return tuple(lowbit.from_blocks(x, n) for x in moments(*apart(g, m, v)))

  # The reduction's loop is scalar code on XLA:CPU, where a table lookup decodes
  # faster than the maps' integer operations; the other loops vectorise.
  m_new, v_new = moments(g, m, v, table=True)
  ops, kinds = [], []
  if qm:
    ops.append(jnp.abs(m_new))
    kinds.append('max')
  if qv:  # max sqrt(v) is sqrt(max v) exactly (sqrt is monotonic): one sqrt a block
    ops.append(v_new)
    kinds.append('max')
  blockwise_sum = static.adapt[i] and not static.xla_partitioned[i]
  if blockwise_sum:
    u = direction(i, m_new, v_new, blocks(p))
    if n % b:  # padded entries (0 / (0 + eps) may be NaN with eps = 0) count nothing
      u = jnp.where(jnp.arange(u.shape[-2] * b).reshape(u.shape[-2:]) < n, u, 0)
    ops.append(jnp.square(u.astype(acc)))
    kinds.append('add')

  def combine(x, y):
    return tuple(jnp.maximum(a, c) if k == 'max' else a + c for a, c, k in zip(x, y, kinds))

  inits = tuple(jnp.zeros((), x.dtype) for x in ops)
  reduced = list(jax.lax.reduce(tuple(ops), inits, combine, (m_new.ndim - 1,)))

  new_m = new_v = None
  if qm:
    amax = reduced.pop(0)
    g1, m1, v1, amax1 = apart(g, m, v, amax)
    codes = lowbit.encode_blocks(moments(g1, m1, v1)[0], amax1, m_map, floor_tiny=False)
    new_m = lowbit.QuantizedMoment(lowbit.store(lowbit.from_blocks(codes, n), m_map.dtype, b),
                                   lowbit.scales_of(amax, m_map))
  if qv:
    amax = jnp.sqrt(reduced.pop(0))
    g1, m1, v1, amax1 = apart(g, m, v, amax)
    codes = lowbit.encode_blocks(jnp.sqrt(moments(g1, m1, v1)[1]), amax1, v_map,
                                 floor_tiny=True)
    new_v = lowbit.QuantizedMoment(lowbit.store(lowbit.from_blocks(codes, n), v_map.dtype, b),
                                   lowbit.scales_of(amax, v_map))
  if new_m is None or new_v is None:
    m_full, v_full = recompute()
    new_m = m_full.astype(m.dtype) if new_m is None else new_m
    new_v = v_full.astype(v.dtype) if new_v is None else new_v

  sums = None
  if blockwise_sum:
    p_sq = jnp.sum(jnp.square(p.astype(acc)))
    sums = tuple(jnp.pad(x[None], (0, _ROWS - 1)) for x in (p_sq, jnp.sum(reduced.pop(0))))
  elif static.adapt[i]:  # XLA partitions this leaf: plain sums (see `_sumsq_pair`)
    sums = _sumsq_pair(p, direction(i, *recompute(), p), acc)
  return recompute, new_m, new_v, sums


def scale_by_lamb(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    mesh: Optional[Mesh] = None,
    param_specs: Optional[PyTree] = None,
    exclude_from_layer_adaptation: MaskOrFn = None,
    min_trust_ratio: Optional[float] = None,
    max_trust_ratio: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    bias_correction: bool = True,
    mu_dtype: Optional[Union[jnp.dtype, str]] = None,
    nu_dtype: Optional[Union[jnp.dtype, str]] = None,
    record_trust_ratio: bool = False,
    quantized_block_size: int = lowbit.DEFAULT_BLOCK_SIZE,
    min_quantized_size: int = lowbit.DEFAULT_MIN_QUANTIZED_SIZE,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by the LAMB direction, with state sharded on a mesh.

  For every leaf (layer) x with gradient g, at step t (You et al., Algorithm 2)::

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) |g|^2
    u = m^ / (sqrt(v^ + eps_root) + eps) + weight_decay * x     (x only where `mask`)
    output = ||x|| / ||u|| * u        (ratio 1 where either norm is 0)

  with m^ = m / (1 - b1^t), v^ = v / (1 - b2^t). This equals
  `chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio)` of optax.

  On a mesh the function runs under `shard_map`: each device updates its own
  blocks of m, v and computes partial sums of ||x||^2 and ||u||^2; the partial
  sums of all leaves are all-reduced together in one `psum`. A leaf replicated
  over some mesh axes contributes only from index 0 of those axes, so it is
  never counted twice.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    weight_decay: decoupled weight decay rate, a scalar or a schedule of the step.
    mask: pytree (or prefix, or callable of the params returning one) of bools:
      True where weight decay applies. The trust ratio applies to every leaf.
    mesh: the `jax.sharding.Mesh` to run on. Optional: see `param_specs`.
    param_specs: pytree (or prefix) of `PartitionSpec` for the params. When
      omitted, the shardings JAX exposes on explicitly sharded params
      (`jax.set_mesh` with `AxisType.Explicit`) are used; with neither, the
      update runs as plain JAX on whatever devices the arrays live on. Params
      put on a mesh with automatic axes are then partitioned by XLA, whose
      all-reduces of the per-leaf norms it combines (no leaf is gathered); pass
      `mesh` and `param_specs` for the single all-reduce and the fused norms.
    exclude_from_layer_adaptation: pytree/prefix/callable of bools: True where
      the trust ratio is fixed at 1 (TF Addons' `exclude_from_layer_adaptation`).
    min_trust_ratio: with `max_trust_ratio`, clamp the trust ratio to
      [min, max] (DeepSpeed's `min_coeff`/`max_coeff`). Either may be None.
    max_grad_norm: if set, scale all gradients by min(1, max_grad_norm /
      ||g||_global) before the moments (apex FusedLAMB's `max_grad_norm`).
    bias_correction: if False, m^ = m and v^ = v (apex `bias_correction=False`).
    mu_dtype: dtype to store the first moment in (default: the params' dtype),
      or 'int8' (or `jnp.int8`): 8-bit blockwise codes (FP8 E4M3 with one
      float32 scale per block along the last axis, `QuantizedMoment` leaves),
      or 'int4' (or `jnp.int4`): 4-bit codes (Li et al.'s dynamic map), likewise; see
      `lamb_sharded/_src/lowbit.py` and docs/low-bit-state.md. Leaves smaller
      than `min_quantized_size`, complex leaves, and leaves whose sharded last
      axis has a local extent that is not a multiple of 32 stay float32.
    nu_dtype: the same for the second moment ('int8' stores E4M3 codes of
      sqrt(v), 'int4' sqrt(v) to the nearest k/16 of its block's max, k = 1..16:
      the zero code excluded, so that no small entry of v decodes to 0). Any mix
      with `mu_dtype` is allowed.
    record_trust_ratio: keep each leaf's trust ratio of the last update in
      `ScaleByLambState.trust_ratio` (for monitoring; it costs a vector of one
      float per leaf and no extra pass over memory).
    quantized_block_size: largest block of quantized moments (a power of two >=
      32; default 128: 2.06 bytes per parameter for both moments with int8, 1.06
      with int4). A leaf whose last
      axis is split over devices gets the largest power of two <= this that
      divides its local extent, so that no block crosses a shard boundary.
    min_quantized_size: leaves with fewer elements keep float32 moments
      (default 4096, bitsandbytes' `min_8bit_size`).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `ScaleByLambState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(scale_by_lamb(), optax.scale(-0.1))
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    >>> print(updates['w'].round(6))
    [-0.1 -0.1 -0.1]

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  clip_trust_ratio = min_trust_ratio is not None or max_trust_ratio is not None
  lowbit.check_moment_dtype(mu_dtype, 'mu_dtype')
  lowbit.check_moment_dtype(nu_dtype, 'nu_dtype')
  if lowbit.code_dtype(mu_dtype) is not None or lowbit.code_dtype(nu_dtype) is not None:
    # optax.inject_hyperparams hands numbers in as arrays: concrete ones are fine;
    # traced ones must be made static (static_args=('quantized_block_size', ...)).
    quantized_block_size = lowbit.static_int(quantized_block_size, 'quantized_block_size')
    min_quantized_size = lowbit.static_int(min_quantized_size, 'min_quantized_size')
    lowbit.check_block_size(quantized_block_size)
    if min_quantized_size < 1:
      raise ValueError(f'min_quantized_size={min_quantized_size!r}: expected an int >= 1')

  def init_fn(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if leaves:
      layout = sharding_lib.resolve_layout(params, mesh, param_specs)
      lmesh, specs = layout.mesh, layout.specs
    else:  # e.g. optax.tree.map_params' placeholders
      lmesh, specs = None, ()
    # Every leaf of the state is placed where `update` will return it, so that a
    # jitted step sees the same input types on its first and second call.
    places = [_moment_sharding(x, lmesh, sp) for x, sp in zip(leaves, specs)]
    traced = [isinstance(x, jax.core.Tracer) for x in leaves]
    if lmesh is not None:
      scalar_place = NamedSharding(lmesh, P())
    else:
      scalar_place = sharding_lib.replicated(next((w for w in places if w is not None), None))
    any_traced = any(traced)

    def zeros(dtype):
      out = []
      for x, sp, where, t in zip(leaves, specs, places, traced):
        make = functools.partial(_full_zeros, where=where, traced=t)
        codes = lowbit.code_dtype(dtype)
        if codes is None:
          out.append(make(x.shape, x.dtype if dtype is None else dtype))
          continue
        block = lowbit.leaf_block_size(
            tuple(x.shape), sharding_lib.dim_shards(sp, lmesh, len(x.shape) - 1),
            quantized_block_size, min_quantized_size, x.dtype)
        if block is None:  # small, complex or not blockable: float
          real = jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)
          out.append(make(x.shape, jnp.float32 if real else x.dtype))
        else:
          out.append(lowbit.zeros(tuple(x.shape), block, make, codes))
      return jax.tree_util.tree_unflatten(treedef, out)

    ratio = (sharding_lib.full((len(leaves),), 1, jnp.float32, scalar_place, any_traced)
             if record_trust_ratio else None)
    count = sharding_lib.full((), 0, jnp.int32, scalar_place, any_traced)
    return ScaleByLambState(count=count, mu=zeros(mu_dtype), nu=zeros(nu_dtype),
                            trust_ratio=ratio)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    sharding_lib.check_same_structure(params, updates, 'params', 'updates')
    layout = sharding_lib.resolve_layout(params, mesh, param_specs)
    treedef = jax.tree_util.tree_structure(params)
    mus = _moment_leaves(params, state.mu, 'state.mu', layout)
    nus = _moment_leaves(params, state.nu, 'state.nu', layout)

    count_inc = optax.safe_increment(state.count)
    s = {'b1': b1, 'b2': b2, 'eps': eps, 'eps_root': eps_root}
    if bias_correction:
      s['inv_bc1'] = 1 / (1 - jnp.asarray(b1) ** count_inc)
      s['inv_bc2'] = 1 / (1 - jnp.asarray(b2) ** count_inc)
    has_decay = not _is_python_zero(weight_decay)
    if has_decay:
      s['weight_decay'] = weight_decay(state.count) if callable(weight_decay) else weight_decay
    if clip_trust_ratio:
      s['min_trust_ratio'] = 0.0 if min_trust_ratio is None else min_trust_ratio
      s['max_trust_ratio'] = float('inf') if max_trust_ratio is None else max_trust_ratio
    if max_grad_norm is not None:
      s['max_grad_norm'] = max_grad_norm
    # Python numbers are baked into the trace; arrays (schedules, inject_hyperparams)
    # enter the shard_map as replicated inputs.
    consts = {k: v for k, v in s.items() if isinstance(v, (int, float))}
    arrays = {k: jnp.asarray(v) for k, v in s.items() if k not in consts}

    decay = _flags(mask, params, 'mask', True) if has_decay else None
    n = len(layout.specs)
    static = _Static(
        decay=tuple(decay) if decay else (False,) * n,
        adapt=tuple(not e for e in _flags(exclude_from_layer_adaptation, params,
                                          'exclude_from_layer_adaptation', False)),
        replicated_axes=layout.replicated_axes,
        axis_names=layout.axis_names,
        xla_partitioned=tuple(layout.mesh is None and sharding_lib.auto_mesh_size(p) > 1
                              for p in jax.tree_util.tree_leaves(params)),
        bias_correction=bias_correction,
        clip_grad_norm=max_grad_norm is not None,
        clip_trust_ratio=clip_trust_ratio,
        record_trust_ratio=record_trust_ratio,
    )
    flat = [jax.tree_util.tree_leaves(updates), mus, nus, jax.tree_util.tree_leaves(params)]
    def local(arrays, *leaves):
      return _local_update(static, {**consts, **arrays}, *leaves)
    if layout.mesh is not None:
      specs = list(layout.specs)
      # A QuantizedMoment's codes and scales are both split like its leaf.
      m_specs, v_specs = ([lowbit.QuantizedMoment(sp, sp) if lowbit.is_quantized(x) else sp
                           for x, sp in zip(moments, specs)] for moments in (mus, nus))
      flat = [[jax.tree.map(lambda a, sp=sp: _as_spec(a, layout.mesh, sp), x)
               for x, sp in zip(leaves, specs)] for leaves in flat]
      local = jax.shard_map(
          local, mesh=layout.mesh,
          in_specs=(P(), specs, m_specs, v_specs, specs),
          out_specs=(specs, m_specs, v_specs, P() if record_trust_ratio else None),
          check_vma=False)
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    outs, new_mus, new_nus, ratio = local(arrays, *flat)
    return unflat(outs), ScaleByLambState(count=count_inc, mu=unflat(new_mus),
                                          nu=unflat(new_nus), trust_ratio=ratio)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    mesh: Optional[Mesh] = None,
    param_specs: Optional[PyTree] = None,
    exclude_from_layer_adaptation: MaskOrFn = None,
    min_trust_ratio: Optional[float] = None,
    max_trust_ratio: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    bias_correction: bool = True,
    mu_dtype: Optional[Union[jnp.dtype, str]] = None,
    nu_dtype: Optional[Union[jnp.dtype, str]] = None,
    record_trust_ratio: bool = False,
    quantized_block_size: int = lowbit.DEFAULT_BLOCK_SIZE,
    min_quantized_size: int = lowbit.DEFAULT_MIN_QUANTIZED_SIZE,
) -> optax.GradientTransformationExtraArgs:
  """The LAMB optimizer, sharded: a drop-in for `optax.lamb`.

  The first seven arguments mean exactly what they mean for `optax.lamb`, with
  the same defaults; everything after `*` is opt-in and its default keeps
  optax's behaviour. See `scale_by_lamb` for the maths and the options.

  Args:
    learning_rate: a scalar or an optax schedule of the step.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    weight_decay: decoupled weight decay, a scalar or a schedule.
    mask: where weight decay applies (pytree/prefix/callable of bools).
    mesh: optional `jax.sharding.Mesh` (see `scale_by_lamb`).
    param_specs: optional pytree of `PartitionSpec` for the params.
    exclude_from_layer_adaptation: where the trust ratio is fixed at 1.
    min_trust_ratio: lower clamp of the trust ratio.
    max_trust_ratio: upper clamp of the trust ratio.
    max_grad_norm: global gradient-norm clipping before the moments.
    bias_correction: Adam's bias correction on (default) or off.
    mu_dtype: storage dtype of the first moment, or 'int8' / 'int4' (8- or 4-bit
      blockwise).
    nu_dtype: storage dtype of the second moment, or 'int8' / 'int4'.
    record_trust_ratio: keep the last update's per-leaf trust ratios in the
      state (`ScaleByLambState.trust_ratio`).
    quantized_block_size: largest block of quantized moments (see `scale_by_lamb`).
    min_quantized_size: leaves smaller than this keep float32 moments.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its state is
    `(ScaleByLambState, <learning-rate state>)`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lamb_sharded
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = lamb_sharded.lamb(learning_rate=0.003)
    >>> params = jnp.array([1., 2., 3.])
    >>> opt_state = solver.init(params)
    >>> for _ in range(5):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print('Objective function: {:.2E}'.format(f(params)))
    Objective function: 1.39E+01
    Objective function: 1.38E+01
    Objective function: 1.38E+01
    Objective function: 1.37E+01
    Objective function: 1.36E+01

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  chained = optax.chain(
      scale_by_lamb(
          b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask,
          mesh=mesh, param_specs=param_specs,
          exclude_from_layer_adaptation=exclude_from_layer_adaptation,
          min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
          max_grad_norm=max_grad_norm, bias_correction=bias_correction,
          mu_dtype=mu_dtype, nu_dtype=nu_dtype, record_trust_ratio=record_trust_ratio,
          quantized_block_size=quantized_block_size, min_quantized_size=min_quantized_size),
      optax.scale_by_learning_rate(learning_rate),
  )

  def init_fn(params):
    lamb_state, lr_state = chained.init(params)
    # A schedule's step count is created uncommitted by optax; commit it where ours
    # lives (where a jitted step returns both), or the second call would compile again.
    count = lamb_state.count
    if not isinstance(count, jax.core.Tracer) and count.committed:
      lr_state = jax.tree.map(
          lambda x: x if x.committed else sharding_lib.place(x, count.sharding), lr_state)
    return lamb_state, lr_state

  return optax.GradientTransformationExtraArgs(init_fn, chained.update)


def _moment_pairs(state: ScaleByLambState):
  return (('mu', state.mu, lowbit.dequantize_signed, lowbit.quantize_signed),
          ('nu', state.nu, lowbit.dequantize_sqrt, lowbit.quantize_sqrt))


def dequantize_moments(state: ScaleByLambState) -> ScaleByLambState:
  """`state` with every 8- or 4-bit moment leaf decoded to float32 (float leaves unchanged).

  Args:
    state: a `ScaleByLambState` (e.g. `opt_state[0]` of `lamb`).

  Returns:
    A `ScaleByLambState` whose `mu` and `nu` have the params' tree structure.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_lamb(mu_dtype='int8', nu_dtype='int8', min_quantized_size=1)
    >>> params = {'w': jnp.ones((2, 4))}
    >>> _, state = tx.update({'w': jnp.full((2, 4), 0.5)}, tx.init(params), params)
    >>> print(dequantize_moments(state).mu['w'][0])
    [0.05 0.05 0.05 0.05]
  """
  out = {}
  for name, tree, decode, _ in _moment_pairs(state):
    out[name] = jax.tree.map(lambda x, d=decode: d(x) if lowbit.is_quantized(x) else x, tree,
                             is_leaf=lowbit.is_quantized)
  return state._replace(**out)


def requantize_moments(state: ScaleByLambState, like: ScaleByLambState) -> ScaleByLambState:
  """`state`'s moments re-encoded in the layout of `like` (block sizes, float, 8- or 4-bit).

  For restoring a checkpoint onto a mesh where a leaf's block size differs (its
  sharded last axis has another local extent), or into an optimizer of another
  `mu_dtype`/`nu_dtype`: restore the arrays as saved (into the abstract state of
  the optimizer that saved them: Orbax casts to the target's dtypes without a
  word, so int4 codes restored into an int8 target are garbage), then call this
  with `like = jax.eval_shape(tx.init, params)` (or `tx.init`'s state) of the
  new layout. Leaves whose layout and codes' dtype are the same are returned as
  they are (bit for bit); the others are decoded and encoded again, which
  changes each entry by at most one more rounding to `like`'s codes: for int8,
  2^-4 of the entry, relative, for m and sqrt(v) (about 2^-3 for v), for entries
  above 2^-6 of their block's maximum (E4M3's normal range); for int4, 0.1125 of
  the block's max |m| for m (half the dynamic map's widest gap), and 1/32 of the
  block's max sqrt(v) for sqrt(v) (1/16 below the first level). Outputs are
  placed where `like`'s are.

  Args:
    state: a `ScaleByLambState` whose moments may be in another layout.
    like: a `ScaleByLambState` (arrays or `jax.ShapeDtypeStruct`s) in the wanted layout.

  Returns:
    `state` with `mu` and `nu` in `like`'s layout.
  """
  out = {}
  for (name, tree, decode, encode), (_, target, _, _) in zip(_moment_pairs(state),
                                                             _moment_pairs(like)):
    def convert(x, t, decode=decode, encode=encode):
      if lowbit.is_quantized(t):
        if (lowbit.is_quantized(x) and x.scales.shape == t.scales.shape
            and x.codes.dtype == t.codes.dtype):
          y = x
        else:
          y = encode(decode(x) if lowbit.is_quantized(x) else x, lowbit.block_size_of(t),
                     t.codes.dtype)
        return lowbit.QuantizedMoment(*(sharding_lib.place(a, getattr(b, 'sharding', None))
                                        for a, b in zip(y, t)))
      y = decode(x) if lowbit.is_quantized(x) else x
      return sharding_lib.place(y.astype(t.dtype), getattr(t, 'sharding', None))
    flat_t, treedef = jax.tree_util.tree_flatten(target, is_leaf=lowbit.is_quantized)
    flat_x = treedef.flatten_up_to(tree)
    out[name] = treedef.unflatten([convert(x, t) for x, t in zip(flat_x, flat_t)])
  return state._replace(**out)


def state_nbytes(state: PyTree) -> int:
  """Bytes of every array in an optimizer state (quantized codes and their scales included).

  Works on arrays and `jax.ShapeDtypeStruct`s: `state_nbytes(jax.eval_shape(tx.init,
  params))` is the state's size before any of it is allocated. int4 codes count half a
  byte each, as XLA stores them (`jax.Array.nbytes` counts a byte).
  """
  return lowbit.moment_nbytes(state)
