"""The server's optimizer, built from its configuration: the schedule and `lamb_sharded.lamb`."""

from __future__ import annotations

import optax

import lamb_sharded
from service.config import ServerConfig

# The hyperparameters that define the optimizer: a checkpoint records them.
HYPERPARAMETERS = ('learning_rate', 'schedule', 'warmup_steps', 'decay_steps',
                   'end_learning_rate', 'b1', 'b2', 'eps', 'eps_root', 'weight_decay',
                   'max_grad_norm')


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


def make_optimizer(config: ServerConfig, mesh, specs) -> optax.GradientTransformation:
  """`lamb_sharded.lamb` with the config's hyperparameters, sharded as `specs` on `mesh`.

  `mesh` and `specs` None: plain JAX on one device (what the tests replay
  locally). The trust ratios are recorded for the server's metrics.
  """
  schedule, _ = make_schedule(config)
  return lamb_sharded.lamb(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, eps_root=config.eps_root,
      weight_decay=config.weight_decay, mesh=mesh, param_specs=specs,
      max_grad_norm=config.max_grad_norm or None, record_trust_ratio=True)
