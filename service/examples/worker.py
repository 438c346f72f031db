"""`lamb-sharded worker`: pull, compute gradients on this worker's data, push, repeat.

Synchronous: each step, the worker pulls the parameters of the server's current
step, pushes the gradients of its own batch for that step, and (unless its push
completed the step) waits for the step to be applied. A push refused because
its step was applied meanwhile (a straggler) is dropped; the worker pulls again.

Models whose `batch` shards a global batch (`shards_global_batch`, e.g. digits)
get this worker's slice of each step's global batch of `batch_size *
num_workers` examples; the others (regression) get `batch_size` examples of
their own. With `progress=True` (`--progress`), the worker prints one JSON
object per line on stdout, flushed: `{"event": "ready", ...}` once its data is
loaded and its gradient compiled, `{"event": "push", "step", "loss",
"examples", "applied", ...}` after each accepted push, `{"event": "done", ...}`
at the end -- what `lamb-sharded demo` reads for its progress bar and loss curve.
`server='-'` (`--server -`) reads host:port from the first line of stdin, after
the data is loaded and the gradient compiled: a supervisor can start its
workers while the server it starts on an ephemeral port is still coming up.
`lifeline=True` (`--lifeline`): stdin is a pipe from the supervisor, and the
worker exits as soon as it closes -- when the supervisor dies, even by SIGKILL.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Optional, Union

import grpc
import jax
import ml_dtypes
import numpy as np

from service.client import (ModelMismatch, OptimizerClient, ServerRestarting, hints, local,
                            model_difference)
from service.errors import ConfigError, NoServer
from service.examples.models import load_model
from service.examples.progress import Progress
from service.logs import fields

log = logging.getLogger(__name__)

WAITING_EVERY_S = 5.0  # how often a worker waiting for its server says so


def run(server: str, worker_index: int, num_workers: int, steps: int, batch_size: int,
        model: Union[str, Any] = 'regression', seed: int = 0, init: bool = False,
        timeout: float = 60.0, connect_timeout: float = 60.0, progress: bool = False,
        lifeline: bool = False, client_options: Optional[dict] = None,
        compression: str = 'none', local_steps: int = 1, inner_optimizer: str = 'adamw',
        inner_learning_rate: float = 1e-3, inner_weight_decay: float = 0.0,
        pull_dtype: str = 'float32') -> int:
  """Trains until the server's step reaches `steps`; returns an exit code.

  `model`: a model (see `service.examples.models.Model`), or what `load_model` takes
  (a built-in model's name, or MODULE:FN). `client_options`: more OptimizerClient
  arguments (token, root_certificates, ...). `compression`: how gradients travel
  (OptimizerClient.push; int8/int4 with error feedback). `local_steps` > 1: each push is
  the pseudo-gradient of that many steps of the inner optimizer (`service.client.local`,
  DiLoCo): inner step k of the round from server step t trains on the batch of index
  t * local_steps + k. `pull_dtype` 'bfloat16': parameters pulled in bfloat16 (half the
  bytes), trained from in float32.
  """
  m = load_model(model, seed) if isinstance(model, str) else model
  worker_id = f'worker-{worker_index}'
  grad_fn = m.grad_fn()
  template = m.init(seed)
  shards_global_batch = getattr(m, 'shards_global_batch', False)

  def batch(step: int):
    if shards_global_batch:  # this worker's slice of the step's global batch
      return m.batch(step, worker_index, batch_size, num_workers)
    return m.batch(step, worker_index, batch_size)  # its own examples

  def report(event: str, **values):
    if progress:
      print(Progress(event, worker_index, os.getpid(), time.time(), **values).line(), flush=True)

  if progress:  # load the data and compile before saying ready
    jax.block_until_ready(grad_fn(template, *batch(0)))
  if server == '-':  # for a supervisor that learns the server's address after starting us
    server = sys.stdin.readline().strip()
    if not server:
      raise SystemExit('--server -: expected host:port on the first line of stdin')
  if lifeline:
    threading.Thread(target=_exit_at_stdin_eof, args=(worker_id,), name='lifeline',
                     daemon=True).start()
  report('ready', server=server)
  options = client_options or {}
  tls = any(options.get(k) is not None for k in ('root_certificates', 'client_cert'))

  def wait_for_server():
    return wait_for(client, server, connect_timeout, worker_id, tls=tls,
                    ca_file=options.get('root_certificates'))

  def ensure_model():
    """Waits for the server to have a model; with --init, gives it one if it has none."""
    if wait_for_server().initialized:
      return
    if init:
      try:
        client.initialize(template)
        log.info('%s initialised the model', worker_id, extra=fields(worker=worker_id))
      except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
          raise
      client.wait_for_step(0, timeout=connect_timeout)
    else:
      wait_for_model(client, server, worker_id)

  checked = False
  with OptimizerClient(server, timeout=timeout, **options) as client:
    trainer = None
    if local_steps > 1:
      trainer = local.LocalSteps(
          client, grad_fn, local.inner_optimizer(inner_optimizer, inner_learning_rate,
                                                 inner_weight_decay),
          local_steps, worker_id, like=template,
          compression=None if compression == 'none' else compression,
          pull_dtype=None if pull_dtype == 'float32' else ml_dtypes.bfloat16)
    while True:
      step, model_id = None, ''  # the step (and model) this pass pulled
      try:
        ensure_model()
        if not checked:  # once: the worker's flags and model against the server's
          info = client.describe()
          check_fits(info, template, worker_index, num_workers)
          checked = True
          if info.step >= steps:
            log.warning('%s: the server is at step %d, at or past --steps %d: nothing to '
                        'train', worker_id, info.step, steps, extra=fields(worker=worker_id))
            step = info.step
            break
        if trainer is not None:  # a round of local steps, then its pseudo-gradient
          round_ = trainer.round(lambda t, k: batch(t * local_steps + k), until=steps)
          step, r, loss, examples = round_.step, round_.result, round_.loss, round_.examples
          model_id = trainer.last_model_id
          if r is None:
            break
        else:
          pulled = client.pull(like=template,
                               dtype=None if pull_dtype == 'float32' else ml_dtypes.bfloat16)
          if pull_dtype != 'float32':  # trained from in float32
            pulled = dataclasses.replace(pulled, params=jax.tree.map(
                lambda x: np.asarray(x, np.float32), pulled.params))
          step, model_id = pulled.step, pulled.model_id
          if pulled.step >= steps:
            break
          x, y = batch(pulled.step)
          loss, grads = grad_fn(pulled.params, x, y)
          examples = batch_size
          r = client.push(pulled.step, jax_to_numpy(grads), batch_size, worker_id,
                          model_id=pulled.model_id, compression=compression)
        log.info('%s step %d loss %.5f', worker_id, step, float(loss),
                 extra=fields(step=step, worker=worker_id))
        report('push', step=step, loss=float(loss), examples=examples, applied=r.applied)
        if not r.applied:
          client.wait_for_step(r.accepted_step + 1, timeout=timeout, model_id=r.model_id)
      except grpc.RpcError as e:
        if step is None and trainer is not None:  # the round it was pushing
          step, model_id = trainer.last_pulled_step, trainer.last_model_id
        _recover(client, e, worker_id, step, model_id, connect_timeout, wait_for_server)
      except ServerRestarting as e:  # again and again during one pull: wait as for UNAVAILABLE
        log.info('%s: %s; pulling again', worker_id, e, extra=fields(worker=worker_id))
        wait_for_server()
  report('done', step=step)
  return 0


def wait_for(client: OptimizerClient, address: str, connect_timeout: float, worker_id: str, *,
             tls: bool = False, ca_file: Optional[str] = None,
             every: float = WAITING_EVERY_S):
  """The server's description, once it answers (gRPC's wait_for_ready: no polling).

  Logs `waiting for the server at ADDRESS` every `every` seconds while it does not;
  after `connect_timeout` seconds, NoServer saying why (`hints.unreachable`: no server
  there, a TLS mismatch...) and naming the address.
  """
  deadline = time.monotonic() + connect_timeout
  while True:
    left = deadline - time.monotonic()
    try:
      return client.describe(wait_for_ready=True, timeout=max(min(every, left), 0.01))
    except grpc.RpcError as e:
      if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise
      if time.monotonic() >= deadline:
        why = (hints.unreachable(address, tls=tls, ca_file=ca_file)
               or f'the server at {address} did not answer ({e.code().name})')
        raise NoServer(f'{why}; gave up after --connect-timeout {connect_timeout:g}s') from None
    log.warning('%s: waiting for the server at %s (%.0fs, up to --connect-timeout %gs)',
                worker_id, address, connect_timeout - max(deadline - time.monotonic(), 0),
                connect_timeout, extra=fields(worker=worker_id))


WAITING_FOR_MODEL_EVERY_S = 60.0  # how often a worker without --init says it still waits


def wait_for_model(client: OptimizerClient, address: str, worker_id: str, *,
                   every: float = WAITING_FOR_MODEL_EVERY_S) -> None:
  """Waits (server side, no polling) for the server at `address` to have a model: says once,
  at once, how it gets one, then a line every `every` seconds while it has none."""
  log.warning('%s: the server at %s has no model yet: start one worker with --init (or the '
              'server with --init-params); waiting for one', worker_id, address,
              extra=fields(worker=worker_id, reason='no_model'))
  t0 = time.monotonic()
  while not client.wait_for_step(0, timeout=every)[1]:
    log.info('%s: still no model on the server at %s (%.0fs)', worker_id, address,
             time.monotonic() - t0, extra=fields(worker=worker_id, reason='no_model'))


def check_fits(info, template, worker_index: int, num_workers: int) -> None:
  """ConfigError (one line naming the flag) if this worker does not fit the server described
  by `info`: its --num-workers, its --worker-index, or its model's leaves."""
  n = info.num_workers
  if num_workers != n:
    raise ConfigError(f'--num-workers {num_workers}: the server trains with {n} worker(s) '
                      f'(its num_workers): start every worker with --num-workers {n}')
  if worker_index >= n:
    raise ConfigError(f'--worker-index {worker_index}: the server trains with {n} worker(s), '
                      f'indices 0 .. {n - 1}')
  difference = model_difference(info.leaves, template)
  if difference is not None:
    raise ModelMismatch(f'--model: this worker\'s model is not the server\'s: {difference}')


_RECOVERABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS)


def _recover(client: OptimizerClient, error: grpc.RpcError, worker_id: str,
             step: Optional[int], model_id: str, connect_timeout: float,
             wait_for_server) -> None:
  """What a worker does about a refused or failed call before it pulls again.

  ABORTED: the step moved on without this push (a straggler). ALREADY_EXISTS:
  this worker's push for the step (of model `model_id`) is already in: wait for the
  step to complete -- in that model: if the server restarts meanwhile, the wait ends.
  FAILED_PRECONDITION: the server restarted from a checkpoint (another model_id,
  another step) or has no model (the loop then waits for one, or with --init,
  gives it the initial params again: with no checkpoint to restore, the run
  starts over from the same deterministic start). UNAVAILABLE: the server is
  down or restarting: wait (gRPC's wait_for_ready, no polling) until it is back. In
  every case the worker then pulls the server's current step and computes that
  step's gradients again -- data is deterministic by step, so nothing is lost.
  """
  code = error.code()
  if code not in _RECOVERABLE:  # the CLI says what it means (service.client.hints)
    raise error
  log.info('%s: %s (%s); pulling again', worker_id, code.name, error.details(),
           extra=fields(step=step, worker=worker_id, code=code.name))
  try:
    if code == grpc.StatusCode.UNAVAILABLE:
      wait_for_server()
    elif code == grpc.StatusCode.ALREADY_EXISTS and step is not None:
      client.wait_for_step(step + 1, timeout=connect_timeout, model_id=model_id)
  except grpc.RpcError as again:  # the server went away (or restarted) meanwhile: start over
    if again.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.FAILED_PRECONDITION):
      raise


def _exit_at_stdin_eof(worker_id: str) -> None:
  """The lifeline: stdin is a pipe from the supervisor; its end means the supervisor is gone."""
  while sys.stdin.read(4096):
    pass
  log.warning('%s: stdin closed (the supervisor is gone): exiting', worker_id,
              extra=fields(worker=worker_id))
  os._exit(3)  # pylint: disable=protected-access


def jax_to_numpy(tree):
  return jax.tree.map(np.asarray, tree)
