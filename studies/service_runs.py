"""LAMB runs through the optimizer service: a real local server and worker processes.

Each run starts, as `lamb-sharded demo` does (its `_Run`: the same processes,
logs and clean-up), one `lamb-sharded serve` on `devices` simulated CPU devices
with the run's learning rate and schedule, and `workers` `lamb-sharded worker
--model MODULE:FN` processes (the task's: `studies.tasks.spec`), each computing the
gradient of 1/W of every step's global batch. The server waits for every worker's push (quorum W,
no straggler timeout), averages them and applies one `lamb_sharded.lamb` step:
the same update as `studies.train.Trainer` makes in one process, up to the
order of floating-point sums.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import numpy as np
import yaml

from service.examples import demo
from service.examples.demo import _Run as _Processes  # pylint: disable=protected-access
from studies.train import Recipe, Run, record_heldout, record_losses


class ServiceTrainer:
  """Trains LAMB runs of `task` through a server and `workers` worker processes."""

  def __init__(self, task, model_spec: str, workers: int, out: str, devices: int = 1,
               recipe: Recipe = Recipe()):
    self.task, self.model_spec, self.workers = task, model_spec, workers
    self.out, self.devices, self.recipe = out, devices, recipe
    self.count = 0

  def server_config(self, run: Run) -> dict:
    """The server's settings for `run`: the study's recipe, synchronous, every push awaited."""
    config = demo.server_config(run.steps)
    config.update(learning_rate=run.lr, schedule='warmup_cosine',
                  warmup_steps=self.recipe.warmup_steps(run.steps), decay_steps=run.steps,
                  end_learning_rate=0.0, weight_decay=self.recipe.weight_decay,
                  b1=self.recipe.b1, b2=self.recipe.b2, eps=1e-6, straggler_timeout_s=0.0,
                  checkpoint_every_steps=0)
    return config

  def train(self, run: Run, on_step: Callable[[int], None] = lambda n: None):
    """Trains `run` through the service (fills in its results); returns the final params."""
    if run.optimizer != 'lamb':
      raise ValueError(f'the optimizer server applies LAMB, not {run.optimizer}')
    if run.batch % self.workers:
      raise ValueError(f'batch {run.batch} is not a multiple of {self.workers} workers')
    t0 = time.perf_counter()
    self.count += 1
    out = os.path.join(self.out, f'run-{self.count}')
    state = _Processes(out, self.workers, self.devices, run.steps, run.batch, run.seed,
                       model=self.model_spec, quorum=self.workers)
    try:
      params = self._train(state, run, on_step)
    finally:
      state.stop_all()
    losses = np.array([state.step_loss(s) for s in sorted(state.losses)], np.float64)
    run.path = 'service'
    run.diverged = not np.all(np.isfinite(losses))
    record_losses(run, losses, self.task.example_size)
    record_heldout(run, self.task, params)
    run.wall_s = time.perf_counter() - t0
    return params

  def _train(self, state, run: Run, on_step):
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    start_processes(state, self.server_config(run), self.workers)
    init = self.task.init(run.seed)
    with OptimizerClient(state.address, timeout=60) as client:
      client.describe(wait_for_ready=True, timeout=60)
      state.wait_until_ready()
      client.initialize(init)
      follow_steps(state, client, run.steps, on_step)
      pulled = client.pull(like=init)
    await_workers(state)
    return pulled.params


def start_processes(state, config: dict, workers: int) -> None:
  """Writes the server's settings `config` and starts the server and `workers` workers of
  `state` (a `demo._Run`), and tells the workers the server's address."""
  os.makedirs(state.logs, exist_ok=True)
  config_path = os.path.join(state.out, 'server.yaml')
  with open(config_path, 'w', encoding='utf-8') as fh:
    yaml.safe_dump(config, fh, sort_keys=False)
  with warnings.catch_warnings():
    # JAX warns at every fork of a process where it runs; the children here exec at once
    # (the server's preexec_fn only calls prctl, looked up before the fork).
    warnings.filterwarnings('ignore', r'os\.fork\(\) was called', RuntimeWarning)
    state.start_server(config_path, 0, os.path.join(state.out, 'checkpoints'))
    for w in range(workers):
      state.start_worker(w)
  state.wait_for_server()
  state.tell_workers_the_address()


def follow_steps(state, client, steps: int, on_step: Callable[[int], None]) -> None:
  """Waits until the server of `state` reaches step `steps`, calling `on_step(n)` as n more
  steps are applied; DemoError if none is for demo.STALL_TIMEOUT_S."""
  step, last = 0, time.monotonic()
  while step < steps:
    reached, _ = client.wait_for_step(step + 1, timeout=1.0)
    state.handle_events()
    if reached > step:
      on_step(reached - step)
      step, last = reached, time.monotonic()
      state.server_step = step
    elif time.monotonic() - last > demo.STALL_TIMEOUT_S:
      raise demo.DemoError(f'no step applied for {demo.STALL_TIMEOUT_S:g} s (at step '
                           f'{step}); see {state.logs}')


def await_workers(state, timeout_s: float = 60.0) -> None:
  """Waits for every worker of `state` to pull the last step and exit, and for their
  reports; DemoError after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while any(w.proc.poll() is None for w in state.workers.values()):
    if time.monotonic() > deadline:
      raise demo.DemoError(f'workers still running {timeout_s:g} s after the last step; see '
                           f'{state.logs}')
    state.handle_events(timeout=0.5)
  for w in state.workers.values():
    w.reader.join(timeout=10)
  state.handle_events()
