"""`lamb-sharded demo`: train a real model through the optimizer service, end to end.

What runs, all on 127.0.0.1 and all real processes:

* one optimizer server, `python -m service.cli serve`, on a mesh of `--devices`
  simulated CPU devices, with the embedded config below (written to
  OUT/server.yaml and passed with `--config`) and `--checkpoint-dir OUT/checkpoints`;
* `--workers` worker processes, `python -m service.cli worker --model digits
  --progress` -- the entry point a Kubernetes worker runs.

Who pushes what to whom: the workers load scikit-learn's handwritten digits
(shipped inside the package), hold out a stratified 20% test split they never
train on, compile their gradient and say they are ready. This process then
uploads the initial parameters of the MLP (`InitializeModel`), which wakes every
worker at once. Each step, every worker pulls the parameters of the server's
current step (`PullParameters`), computes the gradient of its own slice of the
step's global batch (a permutation seeded by (seed, epoch); worker w takes the
w-th of W equal parts) and pushes it (`PushGradients`). When the server has the
pushes of the step it averages them weighted by their examples, applies one
sharded LAMB step (warmup + cosine decay) on its mesh, and answers the workers'
`WaitForStep` long polls. This process watches the same way: it long-polls
`WaitForStep` for the progress bar, reads the workers' JSON progress lines
(step, loss, examples) for the loss curve, pulls the parameters every few steps
(EVAL_POINTS times a run) to measure the held-out loss, and at the end pulls the
final parameters and measures the held-out accuracy. It writes OUT/summary.json,
OUT/loss.png, OUT/history.json (the train and held-out loss curves, kept across
resumes and written as the run goes), and keeps the processes' logs in OUT/logs/.

Straggler policy: the server runs with `--quorum workers-1
--straggler-timeout-s 2`, and this process supervises the workers. A worker
that dies after it was ready (killed, OOM, a crash) is restarted with the same
index -- its data is deterministic by step, so the replacement simply pulls the
current step and carries on; meanwhile each step is applied with the pushes of
the others 2 s after the first one arrived, so the run never stalls. The run
gives up, with the dead worker's exit status and the tail of its log, after
MAX_RESTARTS restarts in all, or if a worker dies before it was ever ready (a
bug or a broken environment, which a restart would not fix). The summary
records the restarts and every PID that ran.

Resume: the server restores the newest checkpoint in --checkpoint-dir by itself
when it starts, so `--resume` only means: do not wipe OUT/checkpoints and do not
initialise the model, and carry on OUT/history.json (its points before the
restored step; the plot and the summary then cover the whole run). Without
`--resume` the checkpoints and history of an earlier run are deleted first. With
no checkpoint there, `--resume` fails before starting anything. Interrupted
(Ctrl-C, SIGTERM, SIGHUP), the demo stops everything -- the server writes a final
checkpoint -- and prints the command that resumes the run, and exits 130.

Clean exit: the children run in their own sessions (process groups), so a
Ctrl-C reaches only this process, which then stops them in order (workers,
then the server, gracefully) -- on any exit, SIGINT, SIGTERM or SIGHUP. If
this process dies without cleaning up (SIGKILL), the server gets SIGTERM from
the kernel (PR_SET_PDEATHSIG, Linux) and the workers exit when their stdin, a
pipe from this process, closes (`--lifeline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Optional

import yaml

from service import runtime
from service.examples.progress import Progress

MAX_RESTARTS = 3  # worker restarts per run before the demo gives up
STRAGGLER_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 300.0  # server start, and workers loading data + compiling
STALL_TIMEOUT_S = 120.0  # no step applied for this long: give up
MODEL = 'digits'
EVAL_POINTS = 20  # held-out loss evaluations per run (every steps // EVAL_POINTS steps)
HISTORY = 'history.json'


def server_config(steps: int) -> dict[str, Any]:
  """The embedded server config: large-batch LAMB with warmup and cosine decay."""
  return {
      'learning_rate': 0.02,
      'schedule': 'warmup_cosine',
      'warmup_steps': max(1, steps // 10),
      'decay_steps': steps,
      'end_learning_rate': 0.0,
      'weight_decay': 1e-3,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-6,
      'step_mode': 'sync',
      'straggler_timeout_s': STRAGGLER_TIMEOUT_S,
      'checkpoint_every_steps': 100,
      'keep_checkpoints': 2,
      'shutdown_grace_s': 10.0,
      'metrics_port': 0,  # Prometheus metrics on a free port (named on the server's first line)
  }


def _latest_checkpoint(directory: str) -> Optional[int]:
  from service.core import checkpoint  # pylint: disable=import-outside-toplevel  # loads Orbax
  return checkpoint.latest_step(directory)


class DemoError(Exception):
  """A failure with a message for the user (no traceback)."""


class _Interrupted(BaseException):
  """SIGINT, SIGTERM or SIGHUP, turned into an exception so that `finally` stops the
  children."""


# The signals received, by name: the training loop checks it at every turn, since the
# exception a handler raises inside a blocking gRPC call can be lost there (a Ctrl-C that
# the demo ignored, seen under load).
_SIGNALLED: list[str] = []


def _child_env(simulated_devices: bool = True) -> dict[str, str]:
  """This environment, with the directory holding `service` first on PYTHONPATH.

  Without `simulated_devices`, an inherited ask for simulated CPU devices is
  dropped: a worker computes on one device (the server sets its own count).
  """
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.environ.get('PYTHONPATH', '')
  env = {**os.environ, 'PYTHONPATH': root + (os.pathsep + path if path else '')}
  if not simulated_devices:
    runtime.simulate_cpu_devices(None, env)
  return env


def _die_with_parent(sig: int):
  """A preexec_fn: the kernel sends `sig` to the child when this process dies (Linux)."""
  if not sys.platform.startswith('linux'):
    return None

  import ctypes  # pylint: disable=import-outside-toplevel
  # Looked up here, before the fork: the child only calls it (no import, no dlopen), which
  # stays safe where the parent runs other threads (a study's JAX, studies.service_runs).
  prctl = ctypes.CDLL(None, use_errno=True).prctl

  def preexec():
    prctl(1, sig)  # PR_SET_PDEATHSIG
  return preexec


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as fh:
      text = fh.readlines()[-lines:]
  except OSError:
    return '(no log)'
  return ''.join('    ' + line for line in text).rstrip() or '    (empty log)'


def _exit_status(rc: Optional[int]) -> str:
  if rc is None:
    return 'still running'
  if rc < 0:
    try:
      return f'signal {signal.Signals(-rc).name}'
    except ValueError:
      return f'signal {-rc}'
  return f'exit code {rc}'


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
  """Sends `sig` to the child's process group, waits `grace` s, then SIGKILLs the group.

  The group id is the child's pid, which stays reserved until the child is reaped
  (by `wait`), so the signals cannot reach an unrelated process.
  """
  if proc.poll() is not None:
    return
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, sig)
  try:
    proc.wait(grace)
    return
  except subprocess.TimeoutExpired:
    pass
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


@dataclasses.dataclass
class _Worker:
  index: int
  proc: subprocess.Popen
  log_path: str
  reader: threading.Thread
  ready: bool = False
  done: bool = False


class _Run:
  """The server and worker processes of one demo run, and what they report."""

  def __init__(self, out: str, workers: int, devices: int, steps: int, batch_size: int,
               seed: int, compression: str = 'none', model: str = MODEL,
               quorum: Optional[int] = None, worker_args: tuple[str, ...] = ()):
    self.out, self.num_workers, self.devices = out, workers, devices
    self.steps, self.batch_size, self.seed = steps, batch_size, seed
    self.compression = compression
    self.model = model  # the workers' --model
    self.worker_args = tuple(worker_args)  # more flags of every worker (e.g. --local-steps)
    self.quorum = max(1, workers - 1) if quorum is None else quorum  # the server's --quorum
    self.logs = os.path.join(out, 'logs')
    self.server: Optional[subprocess.Popen] = None
    self.server_log = os.path.join(self.logs, 'server.log')
    self.address = ''
    self.metrics_port: Optional[int] = None  # the server's Prometheus port, if it serves one
    self.workers: dict[int, _Worker] = {}
    self.pids: dict[str, Any] = {'server': None, 'workers': []}
    self.events: queue.Queue = queue.Queue()
    self.restarts: list[dict] = []
    # step -> worker index -> (loss, examples); the newest push of each worker for the step
    self.losses: dict[int, dict[int, tuple[float, int]]] = {}
    self.pushes = 0
    self.examples = 0
    self.server_step = 0
    self.start_step = 0
    # The curves of the runs before this one (a resume), and this run's held-out losses.
    self.history_before: dict[str, list] = {'train_loss': [], 'test_loss': [], 'resumed_at': []}
    self.test_losses: list[tuple[int, float]] = []
    self.history_ready = False  # history_before is read (resume) or history.json removed

  # ------------------------------------------------------------------ processes

  def start_server(self, config_path: str, port: int, checkpoint_dir: str) -> None:
    quorum = self.quorum
    with open(self.server_log, 'ab') as log:
      self.server = subprocess.Popen(
          [sys.executable, '-m', 'service.cli', 'serve', '--config', config_path,
           '--host', '127.0.0.1', '--port', str(port), '--devices', str(self.devices),
           '--num-workers', str(self.num_workers), '--quorum', str(quorum),
           '--checkpoint-dir', checkpoint_dir, '--log-level', 'WARNING'],
          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
          env=_child_env(), start_new_session=True,
          preexec_fn=_die_with_parent(signal.SIGTERM))  # no thread runs yet: safe
    self.pids['server'] = self.server.pid

  def wait_for_server(self) -> None:
    """Reads the server's first line, `lamb-sharded serving on HOST:PORT`, for the port."""
    lines: queue.Queue = queue.Queue()

    def read():  # the first line to `lines`, the rest (if any) to the log
      for i, line in enumerate(self.server.stdout):
        if i == 0:
          lines.put(line)
        else:
          with open(self.server_log, 'a', encoding='utf-8') as fh:
            fh.write(line)
      lines.put('')
    threading.Thread(target=read, name='server-stdout', daemon=True).start()
    try:
      first = lines.get(timeout=READY_TIMEOUT_S)
    except queue.Empty:
      first = ''
    m = re.search(r'serving on ([^\s:]+):(\d+)', first)
    if not m:
      self.server.poll()
      raise DemoError(f'the server did not start ({_exit_status(self.server.returncode)}); '
                      f'the end of {self.server_log}:\n{_tail(self.server_log)}')
    self.address = f'127.0.0.1:{m.group(2)}'
    metrics = re.search(r'metrics: port (\d+)', first)
    self.metrics_port = int(metrics.group(1)) if metrics else None

  def start_worker(self, index: int) -> _Worker:
    """Starts worker `index`; before the server's address is known, with `--server -`."""
    log_path = os.path.join(self.logs, f'worker-{index}.log')
    with open(log_path, 'ab') as log:
      proc = subprocess.Popen(
          [sys.executable, '-m', 'service.cli', 'worker', '--server', self.address or '-',
           '--worker-index', str(index), '--num-workers', str(self.num_workers),
           '--steps', str(self.steps), '--batch-size', str(self.batch_size // self.num_workers),
           '--model', self.model, '--seed', str(self.seed), '--progress', '--lifeline',
           '--log-level', 'WARNING', '--compression', self.compression, *self.worker_args],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
          env=_child_env(simulated_devices=False), start_new_session=True)
    reader = threading.Thread(target=self._read_worker, args=(index, proc, log_path),
                              name=f'worker-{index}-stdout', daemon=True)
    worker = _Worker(index, proc, log_path, reader)
    self.workers[index] = worker
    self.pids['workers'].append(proc.pid)
    reader.start()
    return worker

  def tell_workers_the_address(self) -> None:
    """The first line of their stdin; the pipe stays open: it is their lifeline."""
    for w in self.workers.values():
      with contextlib.suppress(BrokenPipeError):  # it died: its reader reports that
        w.proc.stdin.write(self.address + '\n')
        w.proc.stdin.flush()

  def _read_worker(self, index: int, proc: subprocess.Popen, log_path: str) -> None:
    """Worker stdout -> events: its JSON progress lines, then ('exit', ...) at EOF."""
    for line in proc.stdout:
      msg = Progress.parse(line)
      if msg is not None:
        self.events.put((msg.event, index, proc, msg))
      else:  # anything else a library printed: keep it in the log
        with open(log_path, 'a', encoding='utf-8') as fh:
          fh.write(line)
    self.events.put(('exit', index, proc, None))

  def stop_all(self) -> None:
    """Workers first (SIGTERM, then SIGKILL), then the server (SIGTERM: graceful).

    The losses the workers reported before they stopped are counted in between, so that
    the history an interrupted run saves has every step the workers saw applied.
    """
    for w in self.workers.values():
      _stop(w.proc, signal.SIGTERM, 5.0)
      with contextlib.suppress(OSError):
        w.proc.stdin.close()
    for w in self.workers.values():
      w.reader.join(timeout=5.0)  # their stdout is closed: the readers end
    self._count_reported_pushes()
    if self.server is not None:
      _stop(self.server, signal.SIGTERM, 30.0)

  # ------------------------------------------------------------------ events

  def handle_events(self, timeout: Optional[float] = None, say=print) -> None:
    """Processes what the workers reported; blocks up to `timeout` for the first event."""
    if timeout:
      try:
        first = self.events.get(timeout=timeout)
      except queue.Empty:
        return
      self._handle(*first, say=say)
    for event in self._queued():
      self._handle(*event, say=say)

  def _count_reported_pushes(self) -> None:
    """The queued 'push' reports only (no restarts: the workers are being stopped)."""
    for event in self._queued():
      if event[0] == 'push':
        self._handle(*event, say=print)

  def _queued(self) -> Iterator[tuple]:
    """The events queued now, without waiting."""
    while True:
      try:
        yield self.events.get_nowait()
      except queue.Empty:
        return

  def _handle(self, kind: str, index: int, proc: subprocess.Popen, msg: Optional[Progress],
              say) -> None:
    worker = self.workers.get(index)
    current = worker is not None and worker.proc is proc
    if kind == 'ready' and current:
      worker.ready = True
    elif kind == 'push':
      self.losses.setdefault(msg.step, {})[index] = (msg.loss, msg.examples)
      self.pushes += 1
      self.examples += msg.examples
    elif kind == 'done' and current:
      worker.done = True
    elif kind == 'exit' and current:
      try:
        rc = proc.wait(10)
      except subprocess.TimeoutExpired:  # closed its stdout but lives on: end it
        _stop(proc, signal.SIGKILL, 5.0)
        rc = proc.returncode
      if worker.done or self.server_step >= self.steps:  # nothing left for it to do
        return
      status = _exit_status(rc)
      if not worker.ready:
        raise DemoError(f'worker {index} (pid {proc.pid}) exited with {status} before it was '
                        f'ready; the end of {worker.log_path}:\n{_tail(worker.log_path)}')
      if len(self.restarts) >= MAX_RESTARTS:
        raise DemoError(f'worker {index} (pid {proc.pid}) exited with {status} at step '
                        f'{self.server_step}, after {len(self.restarts)} restarts already: '
                        f'giving up; the end of {worker.log_path}:\n{_tail(worker.log_path)}')
      replacement = self.start_worker(index)
      self.restarts.append({'worker': index, 'pid': proc.pid, 'status': status,
                            'step': self.server_step, 'replacement_pid': replacement.proc.pid})
      say(f'worker {index} (pid {proc.pid}) exited with {status} at step {self.server_step}: '
          f'restarted it (pid {replacement.proc.pid}); meanwhile the server applies each step '
          f'with the other workers\' pushes {STRAGGLER_TIMEOUT_S:g} s after the first')

  def wait_until_ready(self) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(w.ready for w in self.workers.values()):
      if time.monotonic() > deadline:
        late = [w.index for w in self.workers.values() if not w.ready]
        raise DemoError(f'workers {late} were not ready after {READY_TIMEOUT_S:g} s; see '
                        f'{self.logs}')
      self.handle_events(timeout=1.0)

  def step_loss(self, step: int) -> float:
    """The example-weighted mean of the workers' losses at `step` (the global batch's)."""
    pushes = self.losses[step].values()
    return sum(loss * e for loss, e in pushes) / sum(e for _, e in pushes)

  def loss_curve(self) -> list[tuple[int, float]]:
    """The training loss of every step, of this run and the ones it resumes."""
    before = [(int(s), float(v)) for s, v in self.history_before['train_loss']]
    return before + [(step, self.step_loss(step)) for step in sorted(self.losses)
                     if step >= self.start_step]

  def test_curve(self) -> list[tuple[int, float]]:
    before = [(int(s), float(v)) for s, v in self.history_before['test_loss']]
    return before + self.test_losses

  def history(self) -> dict[str, list]:
    resumed_at = self.history_before['resumed_at'] + (
        [self.start_step] if self.start_step else [])
    return {'train_loss': [[s, round(v, 6)] for s, v in self.loss_curve()],
            'test_loss': [[s, round(v, 6)] for s, v in self.test_curve()],
            'resumed_at': resumed_at}

  def save_history(self) -> None:
    """OUT/history.json, as far as the run got (the next `--resume` carries it on)."""
    if self.history_ready:
      _write_json(os.path.join(self.out, HISTORY), self.history())


def load_history(path: str, before_step: int) -> dict[str, list]:
  """The curves of OUT/history.json before `before_step` (the restored step of a resume).

  {'train_loss': [[step, loss]...], 'test_loss': [[step, loss]...], 'resumed_at': [step...]};
  empty lists if there is no (readable) history.
  """
  history: dict[str, list] = {'train_loss': [], 'test_loss': [], 'resumed_at': []}
  with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
    with open(path, encoding='utf-8') as fh:
      saved = json.load(fh)
    for key in history:
      history[key] = [p for p in saved[key]
                      if (p[0] if isinstance(p, list) else p) < before_step]
  return history


def _write_json(path: str, data: Any) -> None:
  """Writes `data` to `path` whole or not at all (a temporary file, renamed)."""
  with open(path + '.tmp', 'w', encoding='utf-8') as fh:
    json.dump(data, fh, indent=1)
    fh.write('\n')
  os.replace(path + '.tmp', path)


def resume_command(out: str, workers: int, devices: int, steps: int, batch_size: int,
                   port: int, seed: int, compression: str) -> str:
  """The command that resumes this run."""
  argv = ['lamb-sharded', 'demo', '--out', out, '--workers', str(workers), '--devices',
          str(devices), '--steps', str(steps), '--batch-size', str(batch_size), '--seed',
          str(seed)]
  if port:
    argv += ['--port', str(port)]
  if compression != 'none':
    argv += ['--compression', compression]
  return shlex.join(argv + ['--resume'])


def _plot(curve: list[tuple[int, float]], path: str, title: str,
          test_curve: list[tuple[int, float]], config: dict[str, Any], restarts: list[dict],
          resumed_at: list[int]) -> None:
  """The training loss per step, the held-out loss every few steps, the learning rate behind."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_schedule  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
  if curve:
    steps, losses = zip(*curve)
    ax.plot(steps, losses, lw=1.4, color='tab:blue', label='training loss (global batch)')
    if test_curve:
      ax.plot(*zip(*test_curve), lw=1.4, color='tab:red', marker='o', ms=3, zorder=3,
              label=f'held-out test loss (last {test_curve[-1][1]:.3f})')
    for i, r in enumerate(restarts):
      ax.axvline(r['step'], color='tab:orange', ls=':', lw=1.2,
                 label='a worker died, restarted' if i == 0 else None)
    for i, s in enumerate(resumed_at):
      ax.axvline(s, color='tab:green', ls='--', lw=1.0,
                 label='resumed from a checkpoint' if i == 0 else None)
    ax.set_yscale('log')
    lr = ax.twinx()
    schedule, _ = make_schedule(ServerConfig(**config))
    xs = list(range(steps[0], steps[-1] + 1))
    lr.plot(xs, [float(schedule(x)) for x in xs], color='tab:gray', lw=1, alpha=0.5)
    lr.set_ylabel('learning rate (gray)', color='tab:gray')
    lr.tick_params(axis='y', colors='tab:gray')
    lr.set_ylim(bottom=0)
    ax.set_zorder(lr.get_zorder() + 1)  # the loss in front of the learning rate
    ax.patch.set_visible(False)
  ax.set_xlabel('step')
  ax.set_ylabel('cross-entropy')
  ax.set_title(title, fontsize=10)
  ax.grid(True, which='both', alpha=0.3)
  # Below the axes, clear of every curve.
  ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
  fig.savefig(path, bbox_inches='tight')
  plt.close(fig)


def _table(rows: list[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'  {k:<{width}}  {v}' for k, v in rows)


def run(workers: int = 4, devices: int = 8, steps: int = 200, batch_size: int = 256,
        port: int = 0, out: str = 'runs/demo', resume: bool = False, seed: int = 0,
        compression: str = 'none') -> int:
  """Runs the demo; returns a process exit code (0 trained, 1 failed, 130 interrupted)."""
  t0 = time.monotonic()
  handlers = {}

  def interrupted(signum, frame):
    del frame
    _SIGNALLED.append(signal.Signals(signum).name)
    raise _Interrupted(signal.Signals(signum).name)
  _SIGNALLED.clear()
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    handlers[sig] = signal.signal(sig, interrupted)
  state = None
  stopped_by = None
  try:
    state = _Run(out, workers, devices, steps, batch_size, seed, compression)
    return _main(state, port, resume, t0)
  except DemoError as e:
    print(f'\nlamb-sharded demo failed: {e}', file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    import grpc  # pylint: disable=import-outside-toplevel
    if not isinstance(e, grpc.RpcError) or state is None or state.server is None:
      raise
    # A call to the server failed: say why, and what became of the server.
    print(f'\nlamb-sharded demo failed: {e.code().name} from the server ({e.details()}); the '
          f'server is {_exit_status(state.server.poll())}; the end of {state.server_log}:\n'
          f'{_tail(state.server_log)}', file=sys.stderr)
    return 1
  except (KeyboardInterrupt, _Interrupted) as e:
    stopped_by = str(e) or 'SIGINT'
    print(f'\nlamb-sharded demo interrupted ({stopped_by}): stopping the server and '
          f'the workers', file=sys.stderr, flush=True)
    return 130
  finally:
    # A second Ctrl-C must not cut the clean-up short (it is bounded: SIGKILL after a grace).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      signal.signal(sig, signal.SIG_IGN)
    try:
      if state is not None:
        state.stop_all()
        state.save_history()
        if stopped_by is not None:
          _say_how_to_resume(state, port)
    finally:
      for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _say_how_to_resume(state: '_Run', port: int) -> None:
  """After an interrupted run: the command that continues it, if a checkpoint is there."""
  step = _latest_checkpoint(os.path.join(state.out, 'checkpoints'))
  if step is None:
    print('lamb-sharded demo: no checkpoint was written yet: nothing to resume; run it again',
          file=sys.stderr)
    return
  command = resume_command(state.out, state.num_workers, state.devices, state.steps,
                           state.batch_size, port, state.seed, state.compression)
  print(f'lamb-sharded demo: stopped at step {step} (checkpointed); to resume:\n  {command}',
        file=sys.stderr)


def _main(state: _Run, port: int, resume: bool, t0: float) -> int:
  out, steps, workers, batch_size = state.out, state.steps, state.num_workers, state.batch_size
  if workers < 1 or state.devices < 1 or steps < 1:
    raise DemoError('--workers, --devices and --steps must be >= 1')
  if batch_size % workers:
    raise DemoError(f'--batch-size {batch_size} is not a multiple of --workers {workers}')
  checkpoint_dir = os.path.join(out, 'checkpoints')
  # Without Orbax (and JAX) in this process yet: the server's preexec_fn forks it. The
  # server's restore says whether a checkpoint is readable (below).
  if resume and not (os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir)):
    raise DemoError(f'--resume: no checkpoint to resume from in {checkpoint_dir}')
  os.makedirs(state.logs, exist_ok=True)
  if not resume:  # else the server would restore the previous run's newest checkpoint
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(out, HISTORY))
  for name in os.listdir(state.logs):
    if re.fullmatch(r'(server|worker-\d+)\.log', name):
      os.remove(os.path.join(state.logs, name))
  config = server_config(steps)
  config_path = os.path.join(out, 'server.yaml')
  with open(config_path, 'w', encoding='utf-8') as fh:
    fh.write('# The embedded config of `lamb-sharded demo` (the demo adds --host, --port,\n'
             '# --devices, --num-workers, --quorum and --checkpoint-dir on the command line).\n')
    yaml.safe_dump(config, fh, sort_keys=False)

  # Every process starts at once (the server first, while no thread runs in this one yet):
  # the workers load their data and compile while the server comes up, and then learn its
  # address on stdin.
  state.start_server(config_path, port, checkpoint_dir)
  for w in range(workers):
    state.start_worker(w)
  state.wait_for_server()
  if not resume:  # on resume, only once the restored step is known (below)
    state.tell_workers_the_address()
  phases = {'server_start': time.monotonic() - t0}
  print(f'lamb-sharded demo: server {state.address} (pid {state.pids["server"]}), '
        f'{len(state.workers)} workers (pids {" ".join(map(str, state.pids["workers"]))}), '
        f'logs in {state.logs}', flush=True)

  # Imported only now: JAX and scikit-learn take seconds, and the children are already busy.
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  from service.examples.models import MODELS  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  model = MODELS[MODEL](seed=state.seed)
  try:
    steps_per_epoch = model.steps_per_epoch(batch_size)  # loads the data set
  except ValueError as e:
    raise DemoError(f'--batch-size: {e}') from None
  with OptimizerClient(state.address, timeout=60) as client:
    info = client.describe(wait_for_ready=True, timeout=60)
    if resume and not info.initialized:
      raise DemoError(f'--resume: no checkpoint to resume from in {checkpoint_dir}')
    if not resume and info.initialized:
      raise DemoError(f'the new server already has a model (step {info.step}): is another '
                      f'run using {checkpoint_dir}?')
    start_step = info.step if resume else 0
    if resume:  # the workers could not start before: the restored step is the start
      state.tell_workers_the_address()
      state.history_before = load_history(os.path.join(out, HISTORY), start_step)
    state.server_step = state.start_step = start_step
    state.history_ready = True
    state.wait_until_ready()
    phases['workers_ready'] = time.monotonic() - t0 - phases['server_start']
    t_train = time.monotonic()
    every = max(1, steps // EVAL_POINTS)

    def evaluate(params=None) -> int:
      """The held-out loss of the server's current params; the step to evaluate next."""
      at = 0
      if params is None:
        pulled = client.pull(like=model.init(state.seed))
        at, params = pulled.step, pulled.params
      state.test_losses.append((at, float(model.evaluate(params)[1])))
      state.save_history()
      return (at // every + 1) * every
    if not resume:  # step 0's held-out loss is the initial params'
      next_eval = evaluate(model.init(state.seed))
      client.initialize(model.init(state.seed))  # wakes every worker at once
    else:
      next_eval = evaluate()
    step = start_step
    last_progress = time.monotonic()
    bar = tqdm(total=steps, initial=start_step, unit='step', desc='training', dynamic_ncols=True,
               file=sys.stderr, smoothing=0.1)
    try:
      while step < steps:
        if _SIGNALLED:  # its exception was lost inside a blocking call
          raise _Interrupted(_SIGNALLED[0])
        reached_step, _ = client.wait_for_step(step + 1, timeout=1.0)  # a long poll
        state.handle_events(say=bar.write)
        if reached_step > step:
          bar.update(reached_step - step)
          step = state.server_step = reached_step
          last_progress = time.monotonic()
          if next_eval <= step < steps:
            next_eval = evaluate()
        elif time.monotonic() - last_progress > STALL_TIMEOUT_S:
          raise DemoError(f'no step applied for {STALL_TIMEOUT_S:g} s (at step {step}); see '
                          f'{state.logs}')
        elapsed = max(time.monotonic() - t_train, 1e-9)
        done = [s for s in state.losses if s < step]
        postfix = {}
        if done:
          postfix['loss'] = f'{state.step_loss(max(done)):.4f}'
        postfix['examples/s'] = f'{state.examples / elapsed:,.0f}'
        postfix['pushes/s'] = f'{state.pushes / elapsed:.1f}'
        bar.set_postfix(postfix, refresh=False)
    finally:
      bar.close()
    train_seconds = max(time.monotonic() - t_train, 1e-9)
    phases['training'] = train_seconds
    t_end = time.monotonic()
    # Every worker now pulls a step >= steps and exits by itself.
    deadline = time.monotonic() + 60
    while any(w.proc.poll() is None for w in state.workers.values()):
      if time.monotonic() > deadline:
        raise DemoError(f'workers still running 60 s after the last step; see {state.logs}')
      state.handle_events(timeout=0.5)
    for w in state.workers.values():
      w.reader.join(timeout=10)
    state.handle_events()
    phases['workers_exit'] = time.monotonic() - t_end
    pulled = client.pull(like=model.init(state.seed))
    accuracy, test_loss = model.evaluate(pulled.params)
    if state.test_losses and state.test_losses[-1][0] == pulled.step:
      state.test_losses.pop()  # the loop's last evaluation pulled the final step already
    state.test_losses.append((pulled.step, float(test_loss)))
    phases['evaluation'] = time.monotonic() - t_end - phases['workers_exit']

  t_stop = time.monotonic()
  state.stop_all()
  phases['server_shutdown'] = time.monotonic() - t_stop
  server_rc = state.server.returncode
  state.save_history()
  curve, test_curve = state.loss_curve(), state.test_curve()
  summary_path = os.path.join(out, 'summary.json')
  png_path = os.path.join(out, 'loss.png')
  x_train, _, x_test, _ = model.data()
  n_params = sum(int(v.size) for layer in model.init(0).values() for v in layer.values())
  _plot(curve, png_path, f'digits MLP, {workers} workers -> optimizer server on {state.devices} '
        f'devices: test accuracy {accuracy:.1%}', test_curve, server_config(steps), state.restarts,
        state.history()['resumed_at'])
  wall = time.monotonic() - t0
  summary = {
      'accuracy': accuracy,
      'test_loss': test_loss,
      'final_loss': curve[-1][1] if curve else None,
      'first_loss': curve[0][1] if curve else None,
      'steps': pulled.step,
      'start_step': start_step,
      'resumed': resume,
      'wall_seconds': round(wall, 2),
      'train_seconds': round(train_seconds, 2),
      'phase_seconds': {k: round(v, 2) for k, v in phases.items()},
      'workers': workers,
      'devices': state.devices,
      'global_batch_size': batch_size,
      'compression': state.compression,
      'examples_per_second': round(state.examples / train_seconds, 1),
      'pushes_per_second': round(state.pushes / train_seconds, 2),
      'pushes': state.pushes,
      'worker_restarts': len(state.restarts),
      'restarts': state.restarts,
      'pids': state.pids,
      'server_exit_code': server_rc,
      'model': {'name': MODEL, 'sizes': list(model.sizes), 'parameters': n_params},
      'data': {'train_examples': len(x_train), 'test_examples': len(x_test),
               'steps_per_epoch': steps_per_epoch},
      'server_config': {**server_config(steps), 'num_workers': workers,
                        'quorum': max(1, workers - 1)},
      'server': state.address,
      'checkpoint_dir': os.path.join(out, 'checkpoints'),
      'loss_curve': [[s, round(v, 6)] for s, v in curve],
      'test_loss_curve': [[s, round(v, 6)] for s, v in test_curve],
      'resumed_at': state.history()['resumed_at'],
  }
  with open(summary_path, 'w', encoding='utf-8') as fh:
    json.dump(summary, fh, indent=2)
    fh.write('\n')

  cfg = server_config(steps)
  loss_text = (f'{curve[0][1]:.4f} -> {curve[-1][1]:.4f} (global batch, step {curve[0][0]} -> '
               f'{curve[-1][0]})' if curve else 'no steps trained')
  print()
  print(_table([
      ('model', f'MLP {"-".join(map(str, model.sizes))} ({n_params:,} parameters) on '
                f'scikit-learn digits'),
      ('data', f'{len(x_train):,} train / {len(x_test):,} held-out test examples'),
      ('server', f'{state.address}, mesh of {state.devices} CPU devices, synchronous steps '
                 f'(quorum {max(1, workers - 1)} of {workers} after {STRAGGLER_TIMEOUT_S:g} s)'),
      ('workers', f'{workers} processes x {batch_size // workers} examples = global batch '
                  f'{batch_size}'),
      ('optimizer', f'LAMB, peak lr {cfg["learning_rate"]:g}, warmup {cfg["warmup_steps"]}, '
                    f'cosine decay to step {cfg["decay_steps"]}, weight decay '
                    f'{cfg["weight_decay"]:g}'),
      ('steps', f'{start_step} -> {pulled.step}' if resume else f'{pulled.step}'),
      ('train loss', loss_text),
      ('held-out loss', (f'{test_curve[0][1]:.4f} -> {test_curve[-1][1]:.4f} (step '
                         f'{test_curve[0][0]} -> {test_curve[-1][0]}, {len(test_curve)} points)')
       if test_curve else 'not measured'),
      ('test accuracy', f'{accuracy:.2%} (test loss {test_loss:.4f})'),
      ('throughput', f'{state.examples / train_seconds:,.0f} examples/s, '
                     f'{state.pushes / train_seconds:.1f} pushes/s'),
      ('time', f'{wall:.1f} s wall ({train_seconds:.1f} s training)'),
      ('restarts', f'{len(state.restarts)} worker restart(s)'),
      ('wrote', f'{summary_path}, {png_path}'),
  ]))
  if server_rc != 0:
    raise DemoError(f'the server exited with {_exit_status(server_rc)}; see '
                    f'{os.path.join(state.logs, "server.log")}')
  return 0
