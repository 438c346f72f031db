"""`lamb-sharded worker`: pull, compute gradients on this worker's data, push, repeat.

Synchronous: each step, the worker pulls the parameters of the server's current
step, pushes the gradients of its own batch for that step, and (unless its push
completed the step) waits for the step to be applied. A push refused because
its step was applied meanwhile (a straggler) is dropped; the worker pulls again.
"""

from __future__ import annotations

import logging

import grpc
import jax
import numpy as np

from service.client import OptimizerClient
from service.models import MODELS

log = logging.getLogger(__name__)


def run(server: str, worker_index: int, num_workers: int, steps: int, batch_size: int,
        model: str = 'regression', seed: int = 0, init: bool = False,
        timeout: float = 60.0, connect_timeout: float = 60.0) -> int:
  """Trains until the server's step reaches `steps`; returns an exit code."""
  del num_workers  # data is per worker index; the server knows how many push
  m = MODELS[model](seed=seed)
  worker_id = f'worker-{worker_index}'
  grad_fn = m.grad_fn()
  with OptimizerClient(server, timeout=timeout) as client:
    info = client.describe(wait_for_ready=True, timeout=connect_timeout)
    if not info.initialized:
      if init:
        try:
          client.initialize(m.init(seed))
          log.info('%s initialised the model', worker_id)
        except grpc.RpcError as e:
          if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
      client.wait_for_step(0, timeout=connect_timeout)
    template = m.init(seed)
    while True:
      pulled = client.pull(like=template)
      if pulled.step >= steps:
        break
      x, y = m.batch(pulled.step, worker_index, batch_size)
      loss, grads = grad_fn(pulled.params, x, y)
      try:
        r = client.push(pulled.step, jax_to_numpy(grads), batch_size, worker_id,
                        model_id=pulled.model_id)
      except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS):
          log.info('%s: push for step %d refused (%s); pulling again', worker_id, pulled.step,
                   e.details())
          client.wait_for_step(pulled.step + 1, timeout=timeout)
          continue
        raise
      log.info('%s step %d loss %.5f', worker_id, pulled.step, float(loss))
      if not r.applied:
        client.wait_for_step(r.accepted_step + 1, timeout=timeout)
  return 0


def jax_to_numpy(tree):
  return jax.tree.map(np.asarray, tree)
