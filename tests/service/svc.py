"""Helpers for the service tests: real servers on 127.0.0.1, raw streams, snapshots."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import grpc
import numpy as np

from service.server import app as server_lib
from service.client import OptimizerClient
from service.config import ServerConfig
from service.protocol.checksum import MASK64, chunk_checksum
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def running_server(**overrides):
  """An in-process server on an ephemeral port of 127.0.0.1, with a client.

  Its metrics are on an ephemeral port too (`running.metrics_port`) unless overridden.
  """
  config = ServerConfig(host='127.0.0.1', port=0, **{'metrics_port': 0, **overrides}).validate()
  running = server_lib.start(config)
  client = OptimizerClient(f'127.0.0.1:{running.port}', timeout=30)
  try:
    yield running, client
  finally:
    client.close()
    running.stop(grace=0)


def stub(port: int) -> pb_grpc.OptimizerServiceStub:
  return pb_grpc.OptimizerServiceStub(grpc.insecure_channel(f'127.0.0.1:{port}'))


def spec(path, shape, dtype=tensor_pb2.DTYPE_FLOAT32):
  return tensor_pb2.TensorSpec(path=path, shape=list(shape), dtype=dtype)


def push_messages(leaves, *, worker_id='w0', step=0, num_examples=1, push_id='',
                  model_id='', specs=None, chunk_bytes=1 << 20, commit=True, mutate=None):
  """The messages of a PushGradients stream for [(path, array)], optionally mutated.

  The commit is always the one of the unmutated chunks; `mutate(chunks)` returns
  the chunks to send instead (reordered, duplicated, corrupted...).
  """
  header = pb.PushGradientsHeader(
      worker_id=worker_id, step=step, num_examples=num_examples, push_id=push_id,
      model_id=model_id,
      leaves=specs if specs is not None else [spec(p, a.shape) for p, a in leaves])
  chunks, seq = [], 0
  for path, array in leaves:
    raw = np.ascontiguousarray(array).tobytes()
    for off in range(0, len(raw), chunk_bytes):
      chunks.append(tensor_pb2.TensorChunk(path=path, offset=off, data=raw[off:off + chunk_bytes],
                                           sequence=seq))
      seq += 1
  good_commit = _commit(chunks)
  if mutate is not None:
    chunks = mutate(chunks)
  msgs = [pb.PushGradientsRequest(header=header)]
  msgs += [pb.PushGradientsRequest(chunk=c) for c in chunks]
  if commit:
    msgs.append(pb.PushGradientsRequest(commit=good_commit))
  return msgs


def _commit(chunks):
  checksum, total = 0, 0
  for c in chunks:
    checksum = (checksum + chunk_checksum(c.data)) & MASK64
    total += len(c.data)
  return tensor_pb2.StreamCommit(chunk_count=len(chunks), total_bytes=total, checksum=checksum)


def params_of(client) -> dict:
  pulled = client.pull()
  return pulled.step, {k: v.copy() for k, v in pulled.params.items()}


def start_server_process(*flags, env=None):
  """`lamb-sharded serve --port 0` as a real process; returns (process, port)."""
  proc = subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--metrics-port', '0', '--log-level', 'WARNING', *flags],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, **(env or {}), 'PYTHONPATH': ROOT})
  line = proc.stdout.readline()
  m = re.search(r'serving on [^:]+:(\d+)', line)
  if not m:
    proc.kill()
    raise RuntimeError(f'server did not start: {line!r} {proc.stderr.read()}')
  return proc, int(m.group(1))


def flags(d: dict) -> list[str]:
  """{'learning_rate': 0.1} -> ['--learning-rate', '0.1']."""
  return [x for k, v in d.items() for x in (f'--{k.replace("_", "-")}', str(v))]


def local_reference(steps: int, batch: dict, lamb_flags: dict, seed: int = 0):
  """What `lamb-sharded worker`s training Regression through a server must end with.

  lamb_sharded on one device, fed the example-weighted mean of the gradients
  each worker computes on its deterministic batch of every step.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.core.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  from service.examples.models import Regression  # pylint: disable=import-outside-toplevel
  model = Regression(seed=seed)
  tx = make_optimizer(ServerConfig(**lamb_flags), None, None)
  params = jax.tree.map(np.asarray, model.init(seed))
  state = tx.init(params)
  grad_fn = model.grad_fn()
  total = sum(batch.values())
  for step in range(steps):
    acc = None
    for w, n in batch.items():
      x, y = model.batch(step, w, n)
      _, g = grad_fn(params, x, y)
      g = jax.tree.map(lambda v, n=n: n * v, g)
      acc = g if acc is None else jax.tree.map(lambda a, b: a + b, acc, g)
    mean = jax.tree.map(lambda a: a * np.float32(1 / total), acc)
    updates, state = tx.update(mean, state, params)
    params = optax.apply_updates(params, updates)
  return params


def push_header(worker_id, step, leaves, num_examples=1, push_id='', model_id=''):
  """A PushHeader of [(path, array)] (or a dict path -> array) in the arrays' dtypes."""
  from service.protocol.specs import LeafSpec  # pylint: disable=import-outside-toplevel
  from service.protocol.types import PushHeader  # pylint: disable=import-outside-toplevel
  leaves = list(leaves.items()) if isinstance(leaves, dict) else list(leaves)
  return PushHeader(worker_id, push_id, step, num_examples, model_id,
                    tuple(LeafSpec(p, np.shape(a), np.asarray(a).dtype) for p, a in leaves))


def push_arrays(engine, worker_id, step, leaves, num_examples=1, push_id='', timeout=1.0):
  """Pushes whole arrays into an in-process engine (`open_push`, `fill`, `commit`)."""
  header = push_header(worker_id, step, leaves, num_examples, push_id)
  values = list(leaves.values()) if isinstance(leaves, dict) else [a for _, a in leaves]
  with engine.open_push(header, timeout) as push:
    push.fill(values)
    return push.commit()


def free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_workers(port: int, batch: dict, steps: int, extra=()):
  """One `lamb-sharded worker` process per entry of batch {index: batch size}."""
  return [subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'worker', '--server', f'127.0.0.1:{port}',
       '--worker-index', str(w), '--num-workers', str(len(batch)), '--steps', str(steps),
       '--batch-size', str(n), '--log-level', 'WARNING', *extra] + (['--init'] if w == 0 else []),
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w, n in batch.items()]


def until(cond, timeout: float = 20.0) -> None:
  """Waits for `cond()` to be true, polling; fails the test after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.01)


def own_connection(target: str) -> grpc.Channel:
  """A channel to `target` with a TCP connection of its own, for OptimizerClient(channel=...).

  gRPC Python shares one connection between the channels of a process that have
  the same target and options; a fleet of workers in one process would then be
  one connection (at most max_streams_per_connection streams at once), unlike
  workers on hosts of their own. A local subchannel pool gives each its own.
  """
  from service.protocol import MAX_RECEIVE_BYTES  # pylint: disable=import-outside-toplevel
  return grpc.insecure_channel(target, options=[
      ('grpc.use_local_subchannel_pool', 1),
      ('grpc.max_receive_message_length', MAX_RECEIVE_BYTES)])
