"""Runs of the DiLoCo study through the optimizer service: one server, K worker processes.

A `Method` says how the K workers train and what the server applies: H = 1 is
synchronous training (a gradient push every step, the server's LAMB with the
study's warm-up + cosine schedule); H > 1 is DiLoCo (a pseudo-gradient push every
H inner AdamW steps, the server's optimizer being the outer one, at a constant
learning rate). Each run starts, as `lamb-sharded demo` does (its `_Run`), one
`lamb-sharded serve --init-params WARM.npz` (the synchronously pre-trained
parameters) and K `lamb-sharded worker --model studies.charlm:... --local-steps H
...` processes; the server waits for every worker's push (quorum K, no straggler
timeout). At the end this process pulls the parameters, reads the server's
Prometheus counters (`received_bytes_total{rpc="PushGradients"}`,
`sent_bytes_total{rpc="PullParameters"}`, `local_steps_total`) and measures the
held-out loss.

Bytes are the tensors' (the metrics' unit, no gRPC framing): a push of a model
of n float32 values is 4n bytes (none), 2n (bf16), or per leaf of m values
4 * ceil(m / 256) scales + m (int8) or + ceil(m / 2) (int4) codes
(`service.protocol.codecs.nbytes`), a leaf of fewer than 256 values 4m (the client
sends it as float32); a pull is 4n (float32) or 2n (bfloat16). A
worker pushes once a round and pulls once a round plus once more (the pull that
finds the server at the last step and ends it); this process pulls once, in
float32, at the end. `expected_bytes` computes that; the study checks it against
the counters.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import urllib.request
from typing import Callable

import numpy as np

from service.examples import demo
from service.examples.demo import _Run as _Processes  # pylint: disable=protected-access
from studies import service_runs
from studies.train import Recipe, record_losses

OUTER = ('lamb', 'nesterov', 'sgd')
CODECS = ('none', 'bf16', 'int8', 'int4')


@dataclasses.dataclass(frozen=True)
class Method:
  """How a run trains: local steps, the server's (outer) optimizer, the codecs.

  `exclude_biases`: the server's `exclude_from_layer_adaptation` for the leaves that start
  at zero or one (biases, LayerNorm) -- LAMB's trust ratio fixed at 1 there.
  """
  local_steps: int = 1
  outer: str = 'lamb'
  lr: float = 0.01
  momentum: float = 0.0
  codec: str = 'none'
  pull_dtype: str = 'float32'
  exclude_biases: bool = False

  @property
  def synchronous(self) -> bool:
    return self.local_steps == 1

  def label(self) -> str:
    """E.g. 'DiLoCo H=50, nesterov lr 0.7 m 0.9, int8, bf16 pulls'."""
    if self.synchronous:
      head = f'synchronous, lamb lr {self.lr:g}'
    else:
      head = f'DiLoCo H={self.local_steps}, {self.outer_label()}'
    return head + self.codec_label(prefix=', ')

  def outer_label(self) -> str:
    text = f'{self.outer} lr {self.lr:g}'
    if self.outer == 'nesterov':
      text += f' m {self.momentum:g}'
    if self.exclude_biases:
      text += ' (biases, LN: no trust ratio)'
    return text

  def codec_label(self, prefix: str = '') -> str:
    parts = [] if self.codec == 'none' else [f'{self.codec} pushes']
    if self.pull_dtype != 'float32':
      parts.append('bf16 pulls')
    return prefix + ', '.join(parts) if parts else ('' if prefix else 'f32')


# The leaves a zero or one starts (the char-LM's biases and LayerNorm vectors), by path.
BIAS_PATTERNS = (r"\['(b|bias|scale)'\]$",)


@dataclasses.dataclass
class DilocoRun:
  """One run of the study and what it measured."""
  method: Method
  seed: int
  steps: int  # inner steps of each worker (server steps when synchronous)
  local_batch: int  # sequences per worker per inner step
  horizon: str = 'default'  # or 'longer'
  role: str = ''  # what the run is for in the study: 'baseline', 'outer', 'codec'
  heldout_loss: float = math.nan
  final_train_loss: float = math.nan
  diverged: bool = False
  wall_s: float = 0.0
  rounds: int = 0
  pushed_bytes: int = 0  # per worker, computed (expected_bytes)
  pulled_bytes: int = 0
  measured: dict = dataclasses.field(default_factory=dict)  # the server's counters
  curve: list = dataclasses.field(default_factory=list)  # [[inner step, training loss], ...]
  tokens: int = 0
  batch: int = 0  # the global batch of an inner step (record_losses' unit)

  @property
  def bytes_per_worker(self) -> int:
    return self.pushed_bytes + self.pulled_bytes


def leaf_sizes(params) -> list[int]:
  import jax  # pylint: disable=import-outside-toplevel
  return [int(np.size(x)) for x in jax.tree.leaves(params)]


def push_bytes(sizes: list[int], codec: str) -> int:
  """The tensor bytes of one push of leaves of `sizes` elements in `codec`."""
  from service.protocol import codecs  # pylint: disable=import-outside-toplevel
  if codec in ('none', 'bf16'):
    return sum(sizes) * (4 if codec == 'none' else 2)
  encoding = codecs.INT8 if codec == 'int8' else codecs.INT4
  # A leaf of fewer than one block's elements travels as float32 (OptimizerClient.push).
  return sum(codecs.nbytes(n, encoding) if n >= codecs.BLOCK else 4 * n for n in sizes)


def expected_bytes(sizes: list[int], method: Method, rounds: int) -> tuple[int, int]:
  """(pushed, pulled) tensor bytes of one worker over `rounds` rounds.

  Example:
    >>> expected_bytes([1000, 10], Method(local_steps=10, codec='int8', pull_dtype='bfloat16'), 5)
    (5280, 12120)
  """
  pull = sum(sizes) * (4 if method.pull_dtype == 'float32' else 2)
  return rounds * push_bytes(sizes, method.codec), (rounds + 1) * pull


def read_metrics(port: int, timeout: float = 10.0) -> dict:
  """The server's counters the study uses: pushed and pulled tensor bytes, local steps."""
  from prometheus_client.parser import (  # pylint: disable=import-outside-toplevel
      text_string_to_metric_families)
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=timeout) as r:
    text = r.read().decode()
  out = {'received_push_bytes': 0, 'sent_pull_bytes': 0, 'local_steps': 0}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      if sample.name == 'lamb_sharded_received_bytes_total' and \
          sample.labels.get('rpc') == 'PushGradients':
        out['received_push_bytes'] = int(sample.value)
      elif sample.name == 'lamb_sharded_sent_bytes_total' and \
          sample.labels.get('rpc') == 'PullParameters':
        out['sent_pull_bytes'] = int(sample.value)
      elif sample.name == 'lamb_sharded_local_steps_total':
        out['local_steps'] = int(sample.value)
  return out


class LocalStepsTrainer:
  """Trains `DilocoRun`s of `task` through a server and `workers` worker processes."""

  def __init__(self, task, model_spec: str, workers: int, out: str,
               inner_lr: float, recipe: Recipe = Recipe()):
    self.task, self.model_spec, self.workers = task, model_spec, workers
    self.out, self.inner_lr, self.recipe = out, inner_lr, recipe
    self.sizes = leaf_sizes(task.init(0))
    self.count = 0

  def server_config(self, run: DilocoRun, init_params: str) -> dict:
    """The server's settings: synchronous, every push awaited, metrics on a free port."""
    m = run.method
    rounds = run.steps // m.local_steps
    config = demo.server_config(rounds)
    config.update(optimizer=m.outer, learning_rate=m.lr, init_params=init_params,
                  straggler_timeout_s=0.0, checkpoint_every_steps=0,
                  checkpoint_every_seconds=0.0, b1=self.recipe.b1, b2=self.recipe.b2,
                  eps=1e-6, metrics_port=0)
    if m.synchronous:  # the study's recipe (studies.train): warm-up, cosine decay to 0
      config.update(schedule='warmup_cosine', warmup_steps=self.recipe.warmup_steps(rounds),
                    decay_steps=rounds, end_learning_rate=0.0,
                    weight_decay=self.recipe.weight_decay)
    else:  # DiLoCo's outer step: a constant learning rate, no weight decay
      config.update(schedule='constant', weight_decay=0.0, momentum=m.momentum or 0.0)
    if m.exclude_biases:
      config['exclude_from_layer_adaptation'] = list(BIAS_PATTERNS)
    return config

  def worker_args(self, method: Method) -> tuple[str, ...]:
    args = ('--pull-dtype', method.pull_dtype)
    if not method.synchronous:
      args += ('--local-steps', str(method.local_steps), '--inner-optimizer', 'adamw',
               '--inner-learning-rate', repr(self.inner_lr),
               '--inner-weight-decay', repr(self.recipe.weight_decay))
    return args

  def train(self, run: DilocoRun, init_params: str,
            on_step: Callable[[int], None] = lambda n: None):
    """Trains `run` from the parameters in `init_params` (fills in its results); returns the
    final parameters. `on_step(n)`: n more inner steps done (a progress bar)."""
    m = run.method
    if run.steps % m.local_steps:
      raise ValueError(f'{run.steps} steps are not whole rounds of H={m.local_steps}')
    t0 = time.perf_counter()
    self.count += 1
    out = os.path.join(self.out, f'run-{self.count}')
    rounds = run.steps // m.local_steps
    state = _Processes(out, self.workers, 1, rounds, run.local_batch * self.workers, run.seed,
                       compression=m.codec, model=self.model_spec, quorum=self.workers,
                       worker_args=self.worker_args(m))
    try:
      params, measured = self._train(state, run, init_params, on_step)
    finally:
      state.stop_all()
    run.rounds = rounds
    run.pushed_bytes, run.pulled_bytes = expected_bytes(self.sizes, m, rounds)
    run.measured = measured
    losses = np.array([state.step_loss(s) for s in sorted(state.losses)], np.float64)
    run.batch = run.local_batch * self.workers
    run.diverged = not np.all(np.isfinite(losses))
    record_losses(run, np.repeat(losses, m.local_steps), self.task.context)
    run.heldout_loss = math.inf if run.diverged else self.task.evaluate(params)
    if not math.isfinite(run.heldout_loss):
      run.diverged = True
    run.wall_s = time.perf_counter() - t0
    return params

  def _train(self, state, run: DilocoRun, init_params: str, on_step):
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    service_runs.start_processes(state, self.server_config(run, init_params), self.workers)
    like = self.task.init(0)
    h = run.method.local_steps
    with OptimizerClient(state.address, timeout=60) as client:
      client.describe(wait_for_ready=True, timeout=60)
      state.wait_until_ready()
      service_runs.follow_steps(state, client, state.steps, lambda n: on_step(n * h))
      pulled = client.pull(like=like)
      service_runs.await_workers(state)  # their last pulls counted before the metrics are read
      measured = read_metrics(state.metrics_port) if state.metrics_port else {}
    if measured:  # per worker, less this process's own final pull (float32)
      measured['pulled_per_worker'] = (measured['sent_pull_bytes']
                                       - 4 * sum(self.sizes)) / self.workers
      measured['pushed_per_worker'] = measured['received_push_bytes'] / self.workers
    return pulled.params, measured


def warm_start_file(params, path: str) -> str:
  """Writes `params` as `lamb-sharded export` does (.npz, keys: leaf paths); returns `path`."""
  import jax  # pylint: disable=import-outside-toplevel
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x, np.float32) for p, x in flat})
  return path
