"""The server's optimizer, built from its configuration: the schedule and `lamb_sharded.lamb`."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import optax

import lamb_sharded
from service.config import PATTERNS, ServerConfig
from service.errors import FailedPrecondition

# The hyperparameters that define the optimizer: a checkpoint records them.
HYPERPARAMETERS = ('optimizer', 'momentum', 'moments', 'learning_rate', 'schedule',
                   'warmup_steps', 'decay_steps', 'end_learning_rate', 'b1', 'b2', 'eps',
                   'eps_root', 'weight_decay', 'max_grad_norm', *PATTERNS)


def make_schedule(config: ServerConfig) -> tuple[optax.Schedule, str]:
  """The learning-rate schedule and a human-readable description of it.

  Example:
    >>> schedule, text = make_schedule(ServerConfig(learning_rate=0.1))
    >>> float(schedule(7)), text
    (0.1, 'constant(0.1)')
  """
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate), f'constant({config.learning_rate})'
  sched = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, max(config.decay_steps, 1),
      config.end_learning_rate)
  return sched, (f'warmup_cosine_decay(peak={config.learning_rate}, warmup={config.warmup_steps}, '
                 f'decay={config.decay_steps}, end={config.end_learning_rate})')


def excluded(config: ServerConfig, name: str, paths: Sequence[str]) -> list[bool]:
  """Per leaf path, whether a pattern of setting `name` (one of PATTERNS) matches it
  (`re.search`, as TF Addons' LAMB).

  >>> excluded(ServerConfig(exclude_from_weight_decay=["'b'"]), 'exclude_from_weight_decay',
  ...          ["['layer0']['w']", "['layer0']['b']"])
  [False, True]
  """
  patterns = [re.compile(p) for p in getattr(config, name) or ()]
  return [any(p.search(path) for p in patterns) for path in paths]


def check_patterns(config: ServerConfig, paths: Sequence[str]) -> None:
  """FailedPrecondition naming the setting and the pattern if one matches no leaf path: a
  pattern written for another model (or mistyped) would silently exclude nothing."""
  for name in PATTERNS:
    for pattern in getattr(config, name) or ():
      if not any(re.search(pattern, path) for path in paths):
        shown = ', '.join(paths[:4]) + (f' ... ({len(paths)} leaves)' if len(paths) > 4 else '')
        raise FailedPrecondition(f'--{name.replace("_", "-")} {pattern!r} matches no leaf of '
                                 f'the model (its leaves: {shown})', reason='pattern_unmatched')


def make_optimizer(config: ServerConfig, mesh, specs,
                   paths: Optional[Sequence[str]] = None) -> optax.GradientTransformation:
  """The server's optimizer (`--optimizer`): `lamb_sharded.lamb` with the config's
  hyperparameters, sharded as `specs` on `mesh`; or optax's SGD, with Nesterov momentum
  (`nesterov`) or none (`sgd`), after the same clipping and decoupled weight decay.

  `mesh` and `specs` None: plain JAX on one device (what the tests replay
  locally). `paths`: the leaves' paths, in the order of the params list, which
  exclude_from_weight_decay and exclude_from_layer_adaptation select leaves by
  (needed when either is set). The trust ratios are recorded for the server's
  metrics.
  """
  schedule, _ = make_schedule(config)
  mask = adaptation = None
  if config.exclude_from_weight_decay or config.exclude_from_layer_adaptation:
    if paths is None:
      raise ValueError('make_optimizer: the leaves\' paths are needed to select leaves')
    mask = [not e for e in excluded(config, 'exclude_from_weight_decay', paths)]
    adaptation = excluded(config, 'exclude_from_layer_adaptation', paths)
  if config.optimizer != 'lamb':  # optax's own: its state sharded like the params
    nesterov = config.optimizer == 'nesterov'
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm
        else optax.identity(),
        optax.add_decayed_weights(config.weight_decay, mask) if config.weight_decay
        else optax.identity(),
        optax.sgd(schedule, momentum=config.momentum if nesterov else None,
                  nesterov=nesterov))
  return lamb_sharded.lamb(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, eps_root=config.eps_root,
      weight_decay=config.weight_decay, mask=mask,
      exclude_from_layer_adaptation=adaptation, mesh=mesh, param_specs=specs,
      max_grad_norm=config.max_grad_norm or None, record_trust_ratio=True,
      **({'mu_dtype': config.moments, 'nu_dtype': config.moments}
         if config.moments != 'float32' else {}))
