"""Helpers for the service tests: real servers on 127.0.0.1, raw streams, snapshots."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import zlib

import grpc
import numpy as np

from service import server as server_lib
from service.client import OptimizerClient
from service.config import ServerConfig
from service._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service._gen.lamb_sharded.v1 import tensor_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def running_server(**overrides):
  """An in-process server on an ephemeral port of 127.0.0.1, with a client."""
  config = ServerConfig(host='127.0.0.1', port=0, **overrides).validate()
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

  `mutate(chunks)` may edit the list of TensorChunk messages before the commit
  is computed from it... or after, if it returns (chunks, keep_commit_of_original).
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
  crc, total = 0, 0
  for c in chunks:
    crc = zlib.crc32(c.data, crc)
    total += len(c.data)
  return tensor_pb2.StreamCommit(chunk_count=len(chunks), total_bytes=total, crc32=crc)


def params_of(client) -> dict:
  pulled = client.pull()
  return pulled.step, {k: v.copy() for k, v in pulled.params.items()}


def start_server_process(*flags, env=None):
  """`lamb-sharded serve --port 0` as a real process; returns (process, port)."""
  proc = subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'serve', '--host', '127.0.0.1', '--port', '0',
       '--log-level', 'WARNING', *flags],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, **(env or {}), 'PYTHONPATH': ROOT})
  line = proc.stdout.readline()
  m = re.search(r'serving on [^:]+:(\d+)', line)
  if not m:
    proc.kill()
    raise RuntimeError(f'server did not start: {line!r} {proc.stderr.read()}')
  return proc, int(m.group(1))
