"""One process of a 2-process JAX job: three sharded LAMB steps on the global 8-device mesh.

    python tests/multihost/mp_lamb.py COORDINATOR_PORT PROCESS_ID OUT.npz

Run with 4 simulated CPU devices per process (the test sets XLA_FLAGS). Each
process makes only its own blocks of each global array; process 0 writes the
gathered params and the number of all-reduces in the compiled step to OUT.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import lamb_sharded
from service import runtime

SHAPES = {'w': (16, 8), 'b': (8,), 'v': (32,)}


def host_params():
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def host_grads(step):
  rng = np.random.default_rng(100 + step)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def main(port: str, process_id: str, out: str) -> int:
  runtime.initialize_distributed(f'127.0.0.1:{port}', 2, int(process_id),
                                 bind_address=f'127.0.0.1:{port}', heartbeat_timeout_s=10,
                                 initialization_timeout_s=60)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  assert jax.local_device_count() == 4
  mesh = jax.make_mesh((8,), ('data',))
  specs = {'w': P('data'), 'b': P('data'), 'v': P('data')}
  shardings = {k: NamedSharding(mesh, specs[k]) for k in SHAPES}

  def global_tree(tree):  # each process supplies only the blocks of its own devices
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in tree.items()}

  tx = lamb_sharded.lamb(1e-2, weight_decay=0.01, mesh=mesh, param_specs=specs)
  params = global_tree(host_params())
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads0 = global_tree(host_grads(0))
  hlo = step.lower(params, state, grads0).compile().as_text()
  for t in range(3):
    params, state = step(params, state, global_tree(host_grads(t)))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    np.savez(out, all_reduces=np.int64(hlo.count('all-reduce(')), count=np.asarray(state[0].count),
             **{k: np.asarray(v) for k, v in gathered.items()})
  jax.block_until_ready(jnp.zeros(()))
  return 0


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:]))
