"""Local steps (DiLoCo): a worker takes H optimizer steps of its own between pushes.

Each round, the worker pulls the server's parameters θ (step t), takes H steps of its
inner optimizer from them on its own batches, and pushes the pseudo-gradient
Δ = θ − θ_worker (`local_steps=H`, the examples of all H steps); the server averages
the workers' Δs, weighted by their examples, and applies its optimizer -- the outer
one (`serve --optimizer nesterov|sgd|lamb`) -- as to gradients. The inner optimizer's
state persists across rounds, as in DiLoCo (Douillard et al. 2023). One push per H
steps: H times less communication than a push per step.

    trainer = LocalSteps(client, grad_fn, optax.adamw(1e-3), local_steps=50,
                         worker_id='worker-0', like=params)
    while True:
      r = trainer.round(lambda t, k: batch(t * 50 + k))   # batch of inner step k of round t
      if r.step >= steps: break
      if not r.result.applied:
        client.wait_for_step(r.result.accepted_step + 1, model_id=r.result.model_id)

A restarted worker starts its inner optimizer afresh (and, with int8/int4 pushes, its
error feedback from zero): the round it recomputes is the one the server waits for,
from the server's parameters, so training goes on; only the inner moments' history is
lost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from service.client.client import OptimizerClient, Pulled
from service.protocol.types import PushResult


@dataclasses.dataclass(frozen=True)
class Round:
  """One round: the server's step it started from, the push's result, the mean inner loss."""
  step: int
  result: Optional[PushResult]  # None: the server had reached `until`, nothing pushed
  loss: float
  examples: int


def inner_optimizer(name: str, learning_rate: float,
                    weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The worker's inner optimizer by name: adamw (DiLoCo's), adam or sgd."""
  if name == 'adamw':
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  if name == 'adam':
    return optax.adam(learning_rate)
  if name == 'sgd':
    return optax.sgd(learning_rate)
  raise ValueError(f'inner optimizer must be adamw, adam or sgd, got {name!r}')


class LocalSteps:
  """A worker's rounds of H local steps and one push of their pseudo-gradient.

  Args:
    client: the worker's OptimizerClient.
    grad_fn: `(params, x, y) -> (loss, grads)` (e.g. `jax.value_and_grad(loss)`).
    inner: the inner optimizer (an optax transformation); its state is kept here,
      across rounds.
    local_steps: H, the inner steps of a round (>= 1).
    worker_id: this worker's id (its pushes, its error feedback).
    like: a pytree of the model's structure (what pulls unflatten into).
    compression: how the pseudo-gradients travel (OptimizerClient.push).
    pull_dtype: how the parameters travel (OptimizerClient.pull's `dtype`, e.g.
      `ml_dtypes.bfloat16`: half the bytes); the worker trains in float32 from them.
  """

  def __init__(self, client: OptimizerClient, grad_fn: Callable, inner: optax.GradientTransformation,
               local_steps: int, worker_id: str, *, like: Any,
               compression: Optional[str] = None, pull_dtype: Any = None):
    if local_steps < 1:
      raise ValueError(f'local_steps must be >= 1, got {local_steps}')
    self.client, self.inner, self.local_steps = client, inner, local_steps
    self.worker_id, self.like, self.compression = worker_id, like, compression
    self.pull_dtype = pull_dtype
    self.inner_state = None  # made at the first round, from the pulled parameters
    self.last_pulled_step: Optional[int] = None  # the round being trained or pushed
    self.last_model_id = ''  # ... and the model it is of

    def step(params, state, x, y):
      loss, grads = grad_fn(params, x, y)
      updates, state = inner.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
    self._step = jax.jit(step)

  def train(self, pulled: Pulled, batch: Callable[[int, int], tuple]) -> tuple[Any, float, int]:
    """H inner steps from `pulled`'s parameters: (Δ = pulled − trained, mean loss, examples).

    `batch(t, k)`: the (x, y) of inner step k of the round from server step t.
    """
    params = pulled.params
    if self.inner_state is None:
      self.inner_state = self.inner.init(params)
    losses, examples = [], 0
    for k in range(self.local_steps):
      x, y = batch(pulled.step, k)
      params, self.inner_state, loss = self._step(params, self.inner_state, x, y)
      losses.append(loss)
      examples += len(x)
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32),
                         pulled.params, params)
    return delta, float(np.mean(jax.device_get(losses))), examples

  def round(self, batch: Callable[[int, int], tuple], until: Optional[int] = None) -> Round:
    """Pulls, trains H steps, pushes Δ; the round. With `until`, a server already at that
    step is not trained from (the Round's result is None)."""
    pulled = self.client.pull(like=self.like, dtype=self.pull_dtype)
    if self.pull_dtype is not None:
      pulled = dataclasses.replace(pulled, params=jax.tree.map(
          lambda x: np.asarray(x, np.float32), pulled.params))
    self.last_pulled_step, self.last_model_id = pulled.step, pulled.model_id
    if until is not None and pulled.step >= until:
      return Round(pulled.step, None, float('nan'), 0)
    delta, loss, examples = self.train(pulled, batch)
    result = self.client.push(pulled.step, delta, examples, self.worker_id,
                              model_id=pulled.model_id, compression=self.compression,
                              local_steps=self.local_steps)
    return Round(pulled.step, result, loss, examples)
