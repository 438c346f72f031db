"""One process of a 2-process optimizer engine: its slices in, the same steps, its slices out.

    python tests/multihost/mp_engine.py COORDINATOR_PORT PROCESS_ID OUT_PREFIX

Run with 4 simulated CPU devices per process. The engine's mesh spans both
processes (8 devices); each process initialises the model from its own slices,
takes two workers' pushes of its own slices each step (in-process sessions, as
the servicer opens them), and pulls its own slices back. It writes
OUT_PREFIX.<process>.npz: each leaf's slice, where it starts, and the bytes
its pushes carried.
"""

import sys

import numpy as np

from service import runtime

STEPS, WORKERS = 3, 3
SHAPES = {"['rows']": (64, 4), "['cols']": (3, 16), "['odd']": (7,)}  # dim 0, dim 1, replicated
CONFIG = dict(num_workers=WORKERS, learning_rate=0.05, weight_decay=0.01)


def params():
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def grads(step, worker):
  rng = np.random.default_rng([step, worker])
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def main(port: str, process_id: str, out: str) -> int:
  runtime.initialize_distributed(f'127.0.0.1:{port}', 2, int(process_id),
                                 secret=b'a test job secret, not a secret',
                                 bind_address=f'127.0.0.1:{port}', heartbeat_timeout_s=10,
                                 initialization_timeout_s=60)
  # pylint: disable=import-outside-toplevel
  import jax
  from service.config import ServerConfig
  from service.core.engine import Engine
  from service.core.model import ModelPlan
  from service.protocol import pb
  from service.protocol.chunks import ChunkReceiver, chunk_parser
  from service.protocol.specs import LeafSpec
  from service.protocol.types import PushHeader
  engine = Engine(ServerConfig(**CONFIG), coordination=runtime.coordination())
  assert engine.mesh.devices.size == 8 and jax.process_count() == 2
  specs = [LeafSpec(k, s, np.dtype(np.float32)) for k, s in SHAPES.items()]
  p0 = params()
  # Which part of each leaf this process holds (what a client will read in the description).
  slices = ModelPlan(engine.config, engine.mesh, specs).slices
  engine.initialize(specs, [p0[s.path][sl] for s, sl in zip(specs, slices)])
  pushed = 0
  for step in range(STEPS):
    for w in range(WORKERS):
      g = grads(step, w)
      local = [g[s.path][sl] for s, sl in zip(specs, slices)]
      header = PushHeader(f'worker-{w}', f'{step}-{w}', step, 1, '', tuple(
          LeafSpec(s.path, x.shape, x.dtype) for s, x in zip(specs, local)))
      pushed += header.nbytes
      with engine.open_push(header, timeout=30) as push:
        push.fill(local)
        result = push.commit()
      assert result.applied == (w == WORKERS - 1), result
  assert engine.step == STEPS
  assert engine.trust_ratios().shape == (len(specs),)
  stream = engine.pull()
  header = next(stream)
  receiver, parse, commit = ChunkReceiver(header.leaves, 'pull'), chunk_parser(
      pb.PullParametersResponse), None
  for raw in stream:
    msg = parse(raw)
    if msg.WhichOneof('kind') == 'chunk':
      receiver.add(msg.chunk)
    else:
      commit = msg.commit
  receiver.finish(commit)
  starts = [[sl_d.start or 0 for sl_d in sl] for sl in slices]
  np.savez(f'{out}.{process_id}.npz', pushed=np.int64(pushed), step=np.int64(header.step),
           **{f'value:{s.path}': a for s, a in zip(header.leaves, receiver.sink.arrays)},
           **{f'start:{s.path}': np.asarray(st) for s, st in zip(specs, starts)})
  engine.close()
  return 0


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:]))
