"""The model on the mesh: its plan (what it is and how it is stepped) apart from its state.

`ModelPlan` is everything that follows from the leaves' specs and the mesh --
the shardings, the host layouts, the optimizer, the jitted step -- and holds no
array; a restore builds one to get the abstract target Orbax restores into,
and keeps it. `ModelState` is the live state: params, LAMB state, and the last
step's trust ratios.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lamb_sharded

from service.config import ServerConfig
from service.core import placement
from service.core.optimizer import check_patterns, make_optimizer
from service.protocol.specs import LeafSpec


def _is_moment(x: Any) -> bool:
  return isinstance(x, lamb_sharded.QuantizedMoment)


def _layout(lamb_state: Any) -> Optional[list]:
  """The scales' shapes of a LAMB state's quantized moments (None for the others)."""
  mu = getattr(lamb_state, 'mu', None)
  if mu is None:
    return None
  return [tuple(m.scales.shape) if _is_moment(m) else None for m in mu]


@dataclasses.dataclass
class ModelState:
  """The model's live state on the mesh.

  Attributes:
    params: one global array per leaf, in the specs' order.
    opt_state: the LAMB state (moments sharded like the params).
    trust_ratios: the per-leaf trust ratios of the last step applied since start
      (None: none yet); never donated, so it stays readable.
  """
  params: list[jax.Array]
  opt_state: Any
  trust_ratios: Optional[jax.Array] = None

  def checkpointed(self) -> dict:
    """What a checkpoint holds."""
    return {'params': self.params, 'opt_state': self.opt_state}


class ModelPlan:
  """A model's leaves on a mesh: shardings, host layouts, the optimizer and the jitted step."""

  def __init__(self, config: ServerConfig, mesh: jax.sharding.Mesh, specs: Sequence[LeafSpec]):
    """Args:
      config: the server's settings (the optimizer's hyperparameters).
      mesh: the server's mesh (in a multi-process job, over every process's devices).
      specs: the model's leaves, whole.

    Attributes beside those: `local_specs`, the leaves as this process holds
    them (`slices` of the whole ones; all of them in a single process): what
    its pushes carry and its pulls send.
    """
    self.specs = tuple(specs)
    self.paths = {s.path: i for i, s in enumerate(self.specs)}
    n = mesh.devices.size
    blocks = placement.local_blocks(mesh)
    self.pspecs = [placement.partition_spec(s.shape, n) for s in self.specs]
    self.shardings = [NamedSharding(mesh, p) for p in self.pspecs]
    self.replicated = NamedSharding(mesh, P())
    self.slices = [placement.local_slice(s.shape, p, blocks, n)
                   for s, p in zip(self.specs, self.pspecs)]
    # Host buffers: each device's block of a leaf contiguous (see service/core/layout.py).
    self.layouts = [placement.layout_of(s.shape, p, n, blocks)
                    for s, p in zip(self.specs, self.pspecs)]
    self.local_specs = tuple(LeafSpec(s.path, lay.shape, s.dtype)
                             for s, lay in zip(self.specs, self.layouts))
    # Per leaf, which part each process holds (None: whole); only in a multi-process job.
    self.placements = (tuple(placement.process_starts(s.shape, p, mesh)
                             for s, p in zip(self.specs, self.pspecs))
                       if jax.process_count() > 1 else ())
    check_patterns(config, [s.path for s in self.specs])  # FailedPrecondition
    self.tx = make_optimizer(config, mesh, self.pspecs, [s.path for s in self.specs])
    # The width of quantized moments (--moments int8 / int4; None: float32).
    self.moments_width = None if config.moments == 'float32' else config.moments
    self._abstract = None  # abstract_state(), once made

    def apply(params, opt_state, acc, inv_weight):
      grads = [(a * inv_weight).astype(p.dtype) for a, p in zip(acc, params)]
      updates, opt_state = self.tx.update(grads, opt_state, params)
      # The trust ratios once more, as an output of their own: opt_state is donated to
      # the next step, this copy stays readable (metrics) and marks the step computed.
      ratios = (opt_state[0].trust_ratio if config.optimizer == 'lamb'
                else jnp.zeros((0,), jnp.float32))  # no trust ratio: nothing to show
      return optax.apply_updates(params, updates), opt_state, ratios
    # The new params and moments take the old ones' memory (donated), so a step needs
    # no second copy of them. Params can be donated only while no pull reads them;
    # otherwise `_apply_keeping_params` leaves them to the readers. The outputs are
    # pinned to the inputs' shardings, so that every step runs the executable
    # compiled for the first (see `compile`).
    state = self.abstract_state()
    out_shardings = jax.tree.map(lambda x: x.sharding,
                                 (state['params'], state['opt_state'])) + (self.replicated,)
    self._apply = jax.jit(apply, donate_argnums=(0, 1), out_shardings=out_shardings)
    self._apply_keeping_params = jax.jit(apply, donate_argnums=1, out_shardings=out_shardings)
    # While a checkpoint is being written from the state, none of it is donated.
    self._apply_keeping_state = jax.jit(apply, out_shardings=out_shardings)

  def abstract_state(self) -> dict:
    """The checkpointed state as ShapeDtypeStructs with this mesh's shardings (a quantized
    moment's codes and per-block scales both with its leaf's partition spec)."""
    if self._abstract is None:
      self._abstract = self._make_abstract_state()
    return self._abstract

  def _make_abstract_state(self) -> dict:
    params = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
              for s, sh in zip(self.specs, self.shardings)]
    shapes = jax.eval_shape(self.tx.init, params)

    def like_param(x, sh):
      if isinstance(x, lamb_sharded.QuantizedMoment):
        return lamb_sharded.QuantizedMoment(
            *(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in x))
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    opt_state = optax.tree.map_params(
        self.tx, like_param, shapes, self.shardings, is_leaf=_is_moment,
        transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=self.replicated))
    return {'params': params, 'opt_state': opt_state}

  def moment_layout(self) -> Optional[list]:
    """Per leaf, the shape of its quantized first moment's scales (None: a float moment); None
    with float moments. A checkpoint records it: its block sizes follow from the mesh."""
    layout = _layout(self.abstract_state()['opt_state'][0])  # None: not LAMB's state
    if layout is None or not any(shape is not None for shape in layout):
      return None
    return [list(shape) if shape is not None else None for shape in layout]

  def place(self, host_params: Sequence[np.ndarray]) -> ModelState:
    """The initial state on the mesh from host params: row-major, one per leaf, each the
    part of the leaf this process holds (`local_specs`; the whole leaf in one process)."""
    params = []
    for x, s, sh, lay in zip(host_params, self.specs, self.shardings, self.layouts):
      if x.shape == s.shape:  # the whole leaf
        array = placement.to_mesh(x, sh)
      else:  # this process's slice: its devices' blocks
        array = placement.to_mesh(lay.from_array(x), sh, lay, s.shape)
      # Copies the mesh owns: on CPU an aligned host block would be wrapped in place, and
      # the first step could then not donate the params' memory to the new ones (it would
      # allocate them afresh, a second copy of the params at the step's peak).
      params.append(jax.device_put(array, sh, may_alias=False))
    # Step counters on the mesh too (replicated), so every step sees the same shardings.
    opt_state = optax.tree.map_params(
        self.tx, lambda x: x, jax.jit(self.tx.init)(params), is_leaf=_is_moment,
        transform_non_params=lambda x: jax.device_put(x, self.replicated))
    return ModelState(params, opt_state)

  def saved_target(self, layout: Optional[list]) -> dict:
    """`abstract_state()`, but with the quantized moments' scales as a checkpoint of moment
    layout `layout` holds them (another mesh may cut a leaf's blocks otherwise): those
    restore replicated, and `restored` re-encodes them."""
    state = self.abstract_state()
    if layout is None or layout == self.moment_layout():
      return state
    lamb_state = state['opt_state'][0]

    def as_saved(moments):
      out = []
      for m, shape, spec, sh in zip(moments, layout, self.specs, self.shardings):
        if shape is None:  # saved as float32 (its blocks did not fit that mesh's shards)
          out.append(jax.ShapeDtypeStruct(spec.shape, np.float32, sharding=sh))
        else:  # saved in 8- or 4-bit blocks (this server's --moments), maybe not this mesh's
          out.append(lamb_sharded.QuantizedMoment(
              jax.ShapeDtypeStruct(*lamb_sharded.codes_layout(spec.shape, self.moments_width),
                                   sharding=sh),
              jax.ShapeDtypeStruct(tuple(shape), np.float32, sharding=self.replicated)))
      return out
    lamb_state = lamb_state._replace(mu=as_saved(lamb_state.mu), nu=as_saved(lamb_state.nu))
    return {**state, 'opt_state': (lamb_state, *state['opt_state'][1:])}

  def restored(self, tree: dict) -> ModelState:
    """The state of a checkpoint restored into `abstract_state()` (or `saved_target`: its
    quantized moments re-encoded in this mesh's blocks, one more rounding)."""
    opt_state = tree['opt_state']
    like = self.abstract_state()['opt_state']
    if _layout(opt_state[0]) != _layout(like[0]):
      opt_state = (lamb_sharded.requantize_moments(opt_state[0], like[0]), *opt_state[1:])
    return ModelState(list(tree['params']), opt_state)

  def compile(self) -> None:
    """Compiles the step now, before any push: the first step does not wait for it.

    The compiler's working memory is freed when it is done, but the C allocator
    keeps it (a few hundred MB for a BERT-sized model) until something trims
    its heaps: it is handed back to the OS here, before the first step's peak.
    """
    state = self.abstract_state()
    acc = [jax.ShapeDtypeStruct(s.shape, np.float32, sharding=sh)
           for s, sh in zip(self.specs, self.shardings)]
    self._apply.lower(state['params'], state['opt_state'], acc, jnp.float32(1)).compile()
    placement.trim_heap()

  def step(self, state: ModelState, grads: list[jax.Array], weight: int,
           keep_params: bool, keep_state: bool = False) -> ModelState:
    """Dispatches one LAMB step with the gradient sum `grads` of `weight` examples.

    `state`'s arrays are donated to the new state (its params too, unless
    `keep_params`: a pull is reading them; none of them with `keep_state`: a
    checkpoint is being written from them).
    """
    if keep_state:
      apply = self._apply_keeping_state
    else:
      apply = self._apply_keeping_params if keep_params else self._apply
    params, opt_state, ratios = apply(state.params, state.opt_state, grads,
                                      jnp.float32(1.0 / weight))
    return ModelState(params, opt_state, ratios)
