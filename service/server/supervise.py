"""A process of a multi-process server, run as a child that `lamb-sharded serve` watches.

JAX ends a process of a `jax.distributed` job by itself the moment the job's
coordinator (process 0) is gone: SIGABRT from one of its threads, a C++
stack trace, no Python to say why, and no handler can step in. The watch of
the peers (service/server/peers.py) comes first in every other case, but not
in that one. So in a multi-process server the command's own process imports
no JAX: it runs the server as its child, passes its signals on, and turns
such an abort into one line and `peers.LOST_EXIT`, like every other loss.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

CHILD = 'LAMB_SHARDED_SERVER_PROCESS'  # set in the child's environment
PARENT = 'LAMB_SHARDED_SERVER_PARENT'  # the parent's pid, there
LOST_EXIT = 3  # = peers.LOST_EXIT (that module imports the core; this one must not)
# A multi-process server stopped by SIGTERM (preempted, drained, its pod deleted): every
# process drained and wrote the final checkpoint, and the job is to go on: a status that is
# not success, so that an indexed Job starts the group again (its podFailurePolicy ignores
# it). Only SIGINT, an operator's explicit stop, ends a multi-process server with 0.
STOPPED_EXIT = 4


def is_child() -> bool:
  return os.environ.get(CHILD) == '1'


def die_with_parent() -> None:
  """In the child, first thing: SIGKILL once the parent is gone (Linux), even if it already is.

  Set by the child itself rather than in a `preexec_fn`: that would make
  `subprocess` fork a parent that has gRPC loaded, whose poller then aborted it
  now and then ("epoll_wait error: Bad file descriptor").
  """
  if sys.platform != 'linux':
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != int(os.environ.get(PARENT, '0')):  # it went before the prctl
    os._exit(1)  # pylint: disable=protected-access


def run(argv: Sequence[str], index: int, count: int, coordinator: str,
        log_level: str = 'INFO') -> int:
  """Runs `lamb-sharded <argv>` as the child; its exit status (an abort: LOST_EXIT).

  The child's stderr passes through `_Relay`: below DEBUG, without the C++ chatter of
  JAX's collectives at start and without the stack trace of JAX's abort, which this
  process turns into one line.
  """
  child = subprocess.Popen([sys.executable, '-m', 'service.cli', *argv],
                           env={**os.environ, CHILD: '1', PARENT: str(os.getpid())},
                           stderr=subprocess.PIPE)
  relay = _Relay(child.stderr, verbose=log_level.upper() == 'DEBUG')
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, lambda n, _frame: child.send_signal(n))
  code = child.wait()
  relay.join()
  if code == -signal.SIGABRT:
    print(f'lamb-sharded serve: error: server process {index} of {count} was ended by JAX: the '
          f'job lost its coordinator (process 0, {coordinator}) or another process; exiting so '
          f'that the job restarts from its last checkpoint', file=sys.stderr, flush=True)
    return LOST_EXIT
  relay.release()  # not JAX's abort: what it held may say why
  if code < 0:  # killed: the OOM killer, an operator's kill -9
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f'signal {-code}'
    print(f'lamb-sharded serve: error: server process {index} of {count} was killed ({name}); '
          f'exiting so that the job restarts from its last checkpoint', file=sys.stderr,
          flush=True)
    return LOST_EXIT
  return code


# A line of C++ logging (absl, glog): severity letter, MMDD, time.
_CPP_LOG = re.compile(rb'[IWEF]\d{4} \d\d:\d\d:\d\d')
_CHATTER = (b'[Gloo] ',)  # JAX's CPU collectives, at start: one line per peer


class _Relay:
  """Copies the child's stderr to ours, line by line, but for (below DEBUG) the
  collectives' chatter, dropped, and what JAX's abort prints, held: the C++ error lines
  that lead to it (each held until a line of another kind follows) and, from its fatal
  line on, its message and stack trace. `release()` writes what is held, if the exit
  turns out not to be that abort."""

  HELD_MAX = 200  # lines

  def __init__(self, stream, verbose: bool):
    self._stream, self._verbose = stream, verbose
    self._held: list[bytes] = []
    self._fatal = False
    self._thread = threading.Thread(target=self._copy, name='stderr-relay', daemon=True)
    self._thread.start()

  def _copy(self) -> None:
    out = sys.stderr.buffer
    for line in iter(self._stream.readline, b''):
      if not self._verbose:
        if line.startswith(_CHATTER):
          continue
        cpp = _CPP_LOG.match(line) is not None
        self._fatal = self._fatal or (cpp and line[:1] == b'F')
        if self._fatal or (cpp and line[:1] in b'EW'):
          if len(self._held) < self.HELD_MAX:
            self._held.append(line)
          continue
        line = b''.join(self._held) + line  # errors that no abort followed
        self._held = []
      out.write(line)
      out.flush()

  def join(self) -> None:
    self._thread.join(timeout=10)

  def release(self) -> None:
    sys.stderr.buffer.write(b''.join(self._held))
    sys.stderr.buffer.flush()
    self._held = []
