"""int8 pushes with error feedback to a 2-process server: what one process makes of the same bytes.

Two real `serve` processes (4 simulated CPU devices each, one 8-device mesh).
Two workers' OptimizerClients, given one process's address, push int8 with
error feedback: each process gets its part of every leaf, encoded on its own
(blocks count from the part's first element) with that part's own residual.
The test replays the same encoding (codecs.encode with the same residuals),
joins what each process decodes into whole gradients, and feeds those float32
values to a 1-process server: after the same steps the params must agree to
float32 rounding (the two meshes reduce LAMB's norms in different orders).
Every process is bounded by timeouts and ended by PID.
"""

import concurrent.futures
import os
import sys

import numpy as np

from service.client import ErrorFeedback, OptimizerClient
from service.client.sharded import Placements
from service.protocol import codecs, pb
from service.server.metrics import sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'service'))
from svc import running_server  # noqa: E402  pylint: disable=wrong-import-position
import mp_server  # noqa: E402  pylint: disable=wrong-import-position
from test_multiprocess_server import _scrape  # noqa: E402  pylint: disable=wrong-import-position

STEPS, WORKERS = 3, 2
# Split along dim 0, along dim 1 (a part's last block partial), and under one block (raw).
SHAPES = {"['rows']": (64, 24), "['cols']": (3, 200), "['odd']": (7,)}


def _params():
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(step, worker):
  rng = np.random.default_rng([step, worker, 14])
  return {k: (rng.normal(size=s) * 10.0 ** rng.integers(-3, 1, size=s)).astype(np.float32)
          for k, s in SHAPES.items()}


def _int8_values(data, n):
  """The values of int8 blocks, decoded here by hand (not by the codec under test)."""
  nb = -(-n // codecs.BLOCK)
  scales = data[:4 * nb].view('<f4')
  return data[4 * nb:].view(np.int8).astype(np.float32) * np.repeat(scales, codecs.BLOCK)[:n]


def _decoded(placements, grads, feedback):
  """The whole gradient the 2-process server decodes from one worker's int8 push, and the
  wire bytes each process gets (the client's encoding replayed, residuals committed)."""
  parts = placements.split(list(grads.items()))
  out = {k: np.empty(s, np.float32) for k, s in SHAPES.items()}
  wire = []
  for i, part in enumerate(parts):
    residuals, nbytes = {}, 0
    for k, x in part.items():
      if x.size < codecs.BLOCK:  # travels as float32
        out[k][placements.parts[k][i]] = x
        nbytes += x.nbytes
        continue
      residuals[k] = feedback[i].compensated(k, x)
      data = codecs.encode(residuals[k], codecs.INT8, residual_out=residuals[k])
      nbytes += data.size
      out[k][placements.parts[k][i]] = _int8_values(data, x.size).reshape(x.shape)
    feedback[i].commit(residuals)
    wire.append(nbytes)
  return out, wire


def test_int8_pushes_with_error_feedback_to_two_processes_train_like_one(tmp_path):
  params = _params()
  with mp_server.job(tmp_path, params=params, extra=['--num-workers', str(WORKERS)]) as job, \
      concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    workers = [OptimizerClient(f'127.0.0.1:{job[0][1]}', timeout=60) for _ in range(WORKERS)]
    d = workers[0]._stub.DescribeModel(pb.DescribeModelRequest(), timeout=30)  # pylint: disable=protected-access
    placements = Placements.of(d)
    assert placements is not None and len(placements.endpoints) == 2
    split = {k: placements.parts[k][0] != placements.parts[k][1] for k in SHAPES}
    assert split == {"['rows']": True, "['cols']": True, "['odd']": False}, d.placements
    mirrors = [[ErrorFeedback() for _ in range(2)] for _ in range(WORKERS)]
    decoded, wire = [], [0, 0]
    for step in range(STEPS):
      results = list(pool.map(lambda w, step=step: workers[w].push(
          step, _grads(step, w), 1, f'worker-{w}', compression='int8'), range(WORKERS)))
      assert [r.accepted_step for r in results] == [step] * WORKERS
      workers[0].wait_for_step(step + 1, timeout=60)
      for w in range(WORKERS):
        g, nbytes = _decoded(placements, _grads(step, w), mirrors[w])
        decoded.append(g)
        wire = [a + b for a, b in zip(wire, nbytes)]
    got = workers[1].pull()
    assert got.step == STEPS
    received = [sample(_scrape(m), 'lamb_sharded_received_bytes_total', {'rpc': 'PushGradients'})
                for _, _, m in job]
    for w in workers:
      w.close()
  # Each process received its parts int8-encoded (about a quarter of their float32 bytes).
  assert received == wire, (received, wire)
  f32 = [STEPS * WORKERS * sum(4 * np.prod(np.empty(s)[placements.parts[k][i]].shape)
                               for k, s in SHAPES.items()) for i in range(2)]
  assert all(b < 0.3 * f for b, f in zip(wire, f32)), (wire, f32)

  with running_server(devices=8, num_workers=WORKERS, learning_rate=0.05,
                      weight_decay=0.01) as (_, one):
    one.initialize(params)
    for step in range(STEPS):
      for w in range(WORKERS):
        one.push(step, decoded[step * WORKERS + w], 1, f'worker-{w}')
    want = one.pull()
  assert want.step == STEPS
  for k in SHAPES:
    np.testing.assert_allclose(got.params[k], want.params[k], rtol=2e-6, atol=2e-7, err_msg=k)
    assert not np.allclose(got.params[k], params[k])  # the steps changed every leaf
