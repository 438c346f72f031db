"""Benchmark: one LAMB "update + apply" step, lamb_sharded.lamb vs optax.lamb.

What is measured
----------------
For a transformer-shaped pytree of float32 params (about 100M parameters with
`--size 100m`, about 25M with `--size 25m`) this times the jitted step

    (params, state) = step(params, state, grads)

(`tx.update` then `optax.apply_updates`, params and state donated, grads a
fixed random pytree) with weight_decay=0.01 and a warmup+cosine learning-rate
schedule, for two cases:

  * "1 device": no mesh, every array on the default device, uncommitted (as a
    jitted `model.init(key)` returns the params, or `jnp.array` makes them);
  * "8-device mesh": 8 simulated CPU devices as an (8,) or (4, 2) mesh
    (`--mesh`); every large matrix is split over all 8 devices, vectors are
    replicated. lamb_sharded gets `mesh=` and `param_specs=` (its update runs
    under `shard_map` with one psum); optax.lamb gets the same inputs, placed
    with the same `NamedSharding`s, and is partitioned by XLA. Both steps are
    compiled with the same output shardings.

The state is what `tx.init(params)` returns, as a user would get it, and the
step is a plain `jax.jit` (not ahead-of-time compiled): every compilation JAX
logs for it -- the first call's and any later one, e.g. when the state `init`
returns differs in placement or commitment from the state `update` returns -- is
counted, with its seconds, and printed beside the step times (1 is right).

Each measurement compiles the step, runs 2 warm-up steps, then `--reps`
repetitions of `--steps` steps each (timed with `jax.block_until_ready`); the
median seconds per step is reported. lamb_sharded and optax runs are
interleaved (A B A B ...) so machine noise hits both alike.

The machine's memory bandwidth is measured in the same run with a numpy
STREAM-style copy (`np.copyto` of ~400 MB float32 arrays, 2 * nbytes / t) and a
triad (a = b + s * c, 3 * nbytes / t, for information). Each step is credited
with 28 bytes per parameter (read g, m, v, p; write m, v, p) and that rate is
shown as a fraction of the copy bandwidth. Note that numpy's copy is
single-threaded while XLA may use every core, so the fraction can exceed 100%.

The script also prints the number of all-reduce ops (and of fusions) in the
compiled HLO of each step, and a Markdown table for docs/benchmarks.md.

int8 and int4 moments: two more runners, lamb_sharded with `mu_dtype=nu_dtype=
'int8'` and `'int4'` (8- and 4-bit blockwise moments, docs/low-bit-state.md),
are timed in the same interleaved run; their rows give their step time over the
float32-moment lamb_sharded step's (target for int8 <= 1.15x) and the state's
bytes per parameter (`lamb_sharded.state_nbytes` of `jax.eval_shape(tx.init,
params)`: m + v with their scales and the float32 small leaves, int4 codes at
half a byte; targets int8 <= 2.1, params + state <= 6.1; int4 about 1.06).
`--no-int8` and `--no-int4` leave them out.

Page faults: each repetition also counts the process's minor page faults
(`getrusage`) per step. A step that needs temporary buffers gets them from a
fresh allocation every step, and the first touch of each page faults; a step
that writes only into its donated inputs faults about never.

`--profile STEPS` then traces STEPS more steps of every runner with
`jax.profiler` and prints, per case, the milliseconds a step spends in each kind
of XLA op -- the op's name in the compiled HLO without its `.N` suffix
(`multiply_reduce_fusion`, `copy`, ...), summed over threads and devices, so
the ops of a step that runs on several cores add up to more than its wall time.

`--quantized-donation params`: the int8 and int4 runners donate their params
alone, so their step writes the new codes into fresh buffers and XLA copies no
old codes (the float32 and optax runners still donate both); it shows what the
copies cost (docs/low-bit-state.md).

`--compiler-option KEY=VALUE` (repeatable) compiles every runner's step with
these XLA options (`jax.jit(..., compiler_options=...)`), e.g.
`xla_cpu_use_fusion_emitters=false` (XLA:CPU's older emitters; docs/low-bit-state.md).

Thread pool: with several simulated CPU devices, XLA:CPU runs every device's
part of a step on one shared thread pool. Back-to-back steps can deadlock unless
the pool has at least 2x as many threads as there are devices (reported on
2-core machines; not seen in the runs recorded in docs/low-bit-state.md).

How to run
----------
    python tests/benchmarks/bench_lamb.py                  # 100M params
    python tests/benchmarks/bench_lamb.py --size 25m --reps 3
    python tests/benchmarks/bench_lamb.py --mesh 8 --json /tmp/bench.json
    python tests/benchmarks/bench_lamb.py --size 25m --reps 5 --steps 3 --profile 3
    python tests/benchmarks/bench_lamb.py --size 25m --compiler-option xla_cpu_use_fusion_emitters=false

On an accelerator (JAX's default backend not CPU) the same command times the
steps on its devices: the "1 device" case on the first, the mesh case only
where there are exactly 8 (else it says so and leaves it out), and the
bandwidth is a jitted copy and triad on the device instead of numpy's. On a
machine whose own JAX has the accelerator's plugin, from the checkout:

    PYTHONUNBUFFERED=1 python3 tests/benchmarks/bench_lamb.py --size 100m --reps 5 \
        --steps 5 --profile 3 --json /tmp/bench.json

XLA_FLAGS is extended with --xla_force_host_platform_device_count=8
(`service.runtime`) before jax is imported, so the mesh exists on a CPU-only
machine.
"""

from __future__ import annotations

import os
import sys

# The checkout first (run without PYTHONPATH or an install).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from service import runtime  # pylint: disable=wrong-import-position  # imports nothing heavy

N_DEVICES = 8
runtime.simulate_cpu_devices(N_DEVICES)  # must run before jax is imported

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import contextlib
import gc
import gzip
import json
import logging
import platform
import re
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lamb_sharded
# pylint: enable=g-import-not-at-top,wrong-import-position

# Model shapes: BERT-base-like for 100m, a smaller sibling for 25m.
SIZES = {
    '100m': dict(vocab=30522, max_len=512, d_model=768, layers=12),
    '25m': dict(vocab=10000, max_len=512, d_model=512, layers=6),
}
MESHES = {'8': ((8,), ('model',)), '4x2': ((4, 2), ('data', 'model'))}
DEFAULT_MESH = '4x2'
BYTES_PER_PARAM = 28  # read g, m, v, p; write m, v, p (float32)
WEIGHT_DECAY = 0.01
WARMUP_STEPS, DECAY_STEPS = 1_000, 100_000
STREAM_BYTES = 400 * 2**20
TARGETS = {'ratio_1_device': 1.0, 'ratio_mesh': 0.6, 'copy_bw_fraction': 0.5,
           'int8_ratio': 1.15, 'int8_state_bytes_per_param': 2.1,
           'int8_total_bytes_per_param': 6.1, 'int4_state_bytes_per_param': 1.1}
INT8 = dict(mu_dtype='int8', nu_dtype='int8')
QUANTIZED = {'int8': INT8, 'int4': dict(mu_dtype='int4', nu_dtype='int4')}


RUNNERS = ('lamb_sharded', 'optax', *(f'lamb_sharded_{k}' for k in QUANTIZED))


# ----------------------------------------------------------------------------- model


def param_shapes(vocab: int, max_len: int, d_model: int, layers: int) -> dict:
  """Nested dict of leaf shapes of a transformer encoder (no attention biases)."""
  d, h = d_model, 4 * d_model
  layer = {
      'attn': {'q': (d, d), 'k': (d, d), 'v': (d, d), 'out': (d, d)},
      'ln1': {'scale': (d,), 'bias': (d,)},
      'mlp': {'w_in': (d, h), 'b_in': (h,), 'w_out': (h, d), 'b_out': (d,)},
      'ln2': {'scale': (d,), 'bias': (d,)},
  }
  return {
      'embed': {'token': (vocab, d), 'position': (max_len, d)},
      'layers': [layer for _ in range(layers)],
      'final_ln': {'scale': (d,), 'bias': (d,)},
  }


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def count_params(shapes: dict) -> tuple[int, int]:
  """(number of parameters, number of leaves)."""
  leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
  return sum(int(np.prod(s)) for s in leaves), len(leaves)


def spec_for(shape: tuple[int, ...], axis_names: tuple[str, ...], axis_sizes: tuple[int, ...]) -> P:
  """A PartitionSpec splitting a matrix over every mesh axis; vectors replicated.

  On a 2-axis mesh a matrix is split (axis0, axis1) over its two dimensions when
  both divide, else all axes go on one dimension that the device count divides.
  """
  if len(shape) < 2:
    return P()
  n = int(np.prod(axis_sizes))
  if len(axis_names) == 2 and shape[0] % axis_sizes[0] == 0 and shape[1] % axis_sizes[1] == 0:
    return P(axis_names[0], axis_names[1])
  all_axes = axis_names[0] if len(axis_names) == 1 else tuple(axis_names)
  if shape[1] % n == 0:
    return P(None, all_axes)
  if shape[0] % n == 0:
    return P(all_axes, None)
  return P()


def random_tree(shapes: dict, seed: int, shardings: Any, scale: float = 0.02) -> Any:
  """Random float32 arrays of `shapes`, created directly with `shardings`."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)

  def make(key):
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)])

  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


# ----------------------------------------------------------------------------- bandwidth


def _median_seconds(fn: Callable[[], None], reps: int) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def memory_bandwidth(nbytes: int = STREAM_BYTES, reps: int = 7) -> dict:
  """STREAM-style copy and triad bandwidths (bytes/s) with numpy."""
  n = nbytes // 4
  src = np.ones(n, np.float32)
  dst = np.zeros(n, np.float32)
  np.copyto(dst, src)  # fault in the pages
  t_copy = _median_seconds(lambda: np.copyto(dst, src), reps)
  c = np.full(n, 2.0, np.float32)

  def triad():  # a = b + s * c, without a temporary
    np.multiply(c, np.float32(3.0), out=dst)
    np.add(dst, src, out=dst)

  triad()
  t_triad = _median_seconds(triad, reps)
  del src, dst, c
  return {'copy': 2 * nbytes / t_copy, 'triad': 3 * nbytes / t_triad,
          'array_bytes': nbytes, 'copy_s': t_copy, 'triad_s': t_triad, 'by': 'numpy'}


def device_bandwidth(nbytes: int = STREAM_BYTES, reps: int = 21) -> dict:
  """The same figures on an accelerator: a jitted copy (b = s * a: one read, one write)
  and triad of float32 arrays on the default device (bytes/s)."""
  n = nbytes // 4
  a, c = jnp.ones(n, jnp.float32), jnp.full(n, 2.0, jnp.float32)
  copy, triad = jax.jit(lambda x: x * 1.0001), jax.jit(lambda x, y: x + 3.0 * y)
  jax.block_until_ready((copy(a), triad(a, c)))  # compiled, and the outputs' memory had once
  t_copy = _median_seconds(lambda: copy(a).block_until_ready(), reps)
  t_triad = _median_seconds(lambda: triad(a, c).block_until_ready(), reps)
  del a, c
  return {'copy': 2 * nbytes / t_copy, 'triad': 3 * nbytes / t_triad,
          'array_bytes': nbytes, 'copy_s': t_copy, 'triad_s': t_triad,
          'by': f'jax on {jax.devices()[0].device_kind}'}


def has_mesh_case(backend: str, n_devices: int) -> bool:
  """Whether the 8-device mesh case runs: always on CPU (8 simulated devices), on an
  accelerator only where it has exactly 8 (the meshes are shaped for 8).

  >>> has_mesh_case('cpu', 8), has_mesh_case('gpu', 1), has_mesh_case('gpu', 8)
  (True, False, True)
  """
  return backend == 'cpu' or n_devices == N_DEVICES


# ----------------------------------------------------------------------------- steps


def learning_rate() -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1e-3, warmup_steps=WARMUP_STEPS,
      decay_steps=DECAY_STEPS, end_value=1e-5)


def make_step(tx: optax.GradientTransformation, name: str) -> Callable:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step.__name__ = step.__qualname__ = f'step_{name}'  # its compilations are logged by name
  return step


def state_shardings(state: Any, param_shardings: Any, other: Any) -> Any:
  """Every params-shaped subtree (the moments) like the params, the rest on `other`."""
  pdef = jax.tree.structure(param_shardings)

  def is_params_like(x):
    return jax.tree.structure(x) == pdef

  return jax.tree.map(lambda x: param_shardings if is_params_like(x) else other, state,
                      is_leaf=is_params_like)


class _Compilations(logging.Handler):
  """Collects the XLA compilations JAX logs (`jax.log_compiles`), by function name."""

  PATTERN = re.compile(r'Finished XLA compilation of jit\((\w+)\) in ([0-9.eE+-]+) sec')

  def __init__(self):
    super().__init__()
    self.seconds: dict[str, list[float]] = {}

  def emit(self, record):
    match = self.PATTERN.search(record.getMessage())
    if match:
      self.seconds.setdefault(match.group(1), []).append(float(match.group(2)))


@contextlib.contextmanager
def logged_compilations():
  handler, logger = _Compilations(), logging.getLogger('jax')
  logger.addHandler(handler)
  propagate, logger.propagate = logger.propagate, False  # keep the log off the console
  try:
    with jax.log_compiles():
      yield handler.seconds
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


def delete_tree(tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


class Runner:
  """One optimizer's compiled step and its live (donated) params and state."""

  def __init__(self, name, tx, shapes, grads, param_shardings, other_sharding, mesh_out,
               compiler_options=None, donate_state=True):
    self.name = name
    self.grads = grads
    self.params = random_tree(shapes, 0, param_shardings)
    self.state = tx.init(self.params)  # as a user gets it: no placing by hand
    if name.endswith(tuple(QUANTIZED)):  # quantized moments: not params-shaped, where init put them
      state_out = jax.tree.map(lambda x: x.sharding, self.state)
    else:
      state_out = state_shardings(self.state, param_shardings, other_sharding)
    self.step = jax.jit(
        make_step(tx, name), donate_argnums=(0, 1) if donate_state else 0,
        out_shardings=(param_shardings, state_out) if mesh_out else None,
        compiler_options=compiler_options or None)
    self.times: list[float] = []
    self.faults: list[float] = []
    self.all_reduces = self.fusions = None
    self.ops: set[str] = set()

  def read_hlo(self) -> None:
    """Counts ops in the compiled HLO (an ahead-of-time compilation: call it after the
    logged window, or the jitted step would reuse it and its compilation go uncounted)."""
    hlo = self.step.lower(self.params, self.state, self.grads).compile().as_text()
    self.all_reduces = hlo.count('all-reduce(') + hlo.count('all-reduce-start(')
    self.fusions = count_entry_fusions(hlo)
    self.ops = set(re.findall(r'^\s*(?:ROOT )?%?([\w.-]+) = ', hlo, re.M))

  def run(self, steps: int) -> float:
    """Runs `steps` steps; returns seconds per step (and records the process's minor
    page faults per step in `faults`)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(steps):
      self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    seconds = (time.perf_counter() - t0) / steps
    self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)
    return seconds

  def profile(self, steps: int) -> dict[str, float]:
    """Milliseconds a step spends in each kind of XLA op (its HLO name without the
    `.N` suffix: `multiply_reduce_fusion`, `copy`, ...), from a `jax.profiler` trace
    of `steps` steps, summed over threads (and devices). Call `read_hlo` first."""
    folder = tempfile.mkdtemp(prefix='bench_lamb_trace_')
    try:
      with jax.profiler.trace(folder):
        self.run(steps)
      path = next(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                  if f.endswith('.trace.json.gz'))
      with gzip.open(path) as f:
        events = json.load(f)['traceEvents']
    finally:
      shutil.rmtree(folder, ignore_errors=True)
    kinds: dict[str, float] = {}
    for e in events:
      if e.get('ph') == 'X' and e.get('name') in self.ops:
        kind = re.sub(r'\.\d+$', '', e['name'])
        kinds[kind] = kinds.get(kind, 0.0) + e['dur'] / 1e3 / steps
    return kinds

  def free(self) -> None:
    delete_tree((self.params, self.state))
    self.params = self.state = self.step = None


def count_entry_fusions(hlo: str) -> int:
  """Fusion instructions in the compiled HLO: roughly the kernels one step runs."""
  return hlo.count(' fusion(')


class Case(NamedTuple):
  name: str
  mesh: Any  # None for one device
  specs: Any  # pytree of PartitionSpec, or None


def measure_case(case: Case, shapes: dict, steps: int, reps: int,
                 quantized: tuple[str, ...] = tuple(QUANTIZED),
                 compiler_options: Optional[dict] = None, profile_steps: int = 0,
                 donate_quantized_state: bool = True) -> dict:
  """Times lamb_sharded.lamb (float32 and `quantized` moments) and optax.lamb on one
  case, interleaved; with `profile_steps`, then traces that many steps of each
  (`Runner.profile`). `donate_quantized_state=False`: the quantized runners donate
  their params alone."""
  if case.mesh is None:  # uncommitted, as a jitted model init returns them from a key
    param_sh = other_sh = None
  else:
    param_sh = lamb_sharded.named_shardings(case.mesh, case.specs, shapes_as_structs(shapes))
    other_sh = NamedSharding(case.mesh, P())
  grads = random_tree(shapes, 1, param_sh, scale=1e-3)
  sharded_tx = lamb_sharded.lamb(learning_rate(), weight_decay=WEIGHT_DECAY,
                                 mesh=case.mesh, param_specs=case.specs)
  optax_tx = optax.lamb(learning_rate(), weight_decay=WEIGHT_DECAY)
  txs = [('lamb_sharded', sharded_tx), ('optax', optax_tx)]
  for kind in quantized:
    txs.append((f'lamb_sharded_{kind}', lamb_sharded.lamb(
        learning_rate(), weight_decay=WEIGHT_DECAY, mesh=case.mesh, param_specs=case.specs,
        **QUANTIZED[kind])))
  runners = []
  try:
    for name, tx in txs:
      donate_state = donate_quantized_state or not name.endswith(tuple(QUANTIZED))
      runners.append(Runner(name, tx, shapes, grads, param_sh, other_sh, case.mesh is not None,
                            compiler_options, donate_state))
    with logged_compilations() as compiles:  # from the first call to the last
      for r in runners:  # warm-up (the first call compiles)
        r.run(2)
        seconds = compiles.get(f'step_{r.name}', [])
        print(f'  {r.name:>12}: {len(seconds)} compilation(s) in the first 2 steps, '
              f'{sum(seconds):.1f}s')
      for r in runners:
        r.faults.clear()  # the warm-up's (compilation, first allocations) aside
      for _ in range(reps):
        for r in runners:  # A B A B ...
          r.times.append(r.run(steps))
    out = {}
    for r in runners:
      r.read_hlo()
      seconds = compiles.get(f'step_{r.name}', [])
      out[r.name] = {'median_s': statistics.median(r.times), 'times_s': r.times,
                     'faults_per_step': statistics.median(r.faults),
                     'compiles': len(seconds), 'compile_s': sum(seconds),
                     'all_reduces': r.all_reduces, 'fusions': r.fusions}
      if profile_steps:
        out[r.name]['profile_ms'] = r.profile(profile_steps)
    return out
  finally:
    for r in runners:
      r.free()
    delete_tree(grads)
    gc.collect()


def shapes_as_structs(shapes: dict) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=_is_shape)


def make_mesh(kind: str, axis_type: AxisType) -> jax.sharding.Mesh:
  sizes, names = MESHES[kind]
  return jax.make_mesh(sizes, names, axis_types=(axis_type,) * len(names))


# ----------------------------------------------------------------------------- report


def state_bytes_per_param(shapes: dict, n_params: int, case: Case, **kw) -> float:
  """Bytes of lamb_sharded's m and v per parameter (8-bit codes' scales included)."""
  tx = lamb_sharded.lamb(1e-3, mesh=case.mesh, param_specs=case.specs, **kw)
  state = jax.eval_shape(tx.init, shapes_as_structs(shapes))
  return lamb_sharded.state_nbytes((state[0].mu, state[0].nu)) / n_params


def summarize(results: dict, n_params: int, copy_bw: float) -> dict:
  """Adds ratio and bandwidth figures to each case's results."""
  out = {}
  for case, r in results.items():
    row = {'ratio': r['lamb_sharded']['median_s'] / r['optax']['median_s']}
    for kind in QUANTIZED:
      if f'lamb_sharded_{kind}' in r:
        q, f = r[f'lamb_sharded_{kind}'], r['lamb_sharded']
        row[f'{kind}_ratio'] = q['median_s'] / f['median_s']
        row[f'{kind}_ratio_min'] = min(q['times_s']) / min(f['times_s'])
    for name in [n for n in RUNNERS if n in r]:
      bw = BYTES_PER_PARAM * n_params / r[name]['median_s']
      r[name]['bytes_per_s'] = bw
      r[name]['copy_bw_fraction'] = bw / copy_bw
    out[case] = {**r, **row}
  return out


def markdown_table(summary: dict) -> str:
  lines = ['| case | optax.lamb ms/step | lamb_sharded ms/step | ratio (lamb_sharded/optax) '
           '| lamb_sharded % of copy BW | optax % of copy BW '
           '| compilations lamb_sharded / optax | compile s lamb_sharded / optax |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for case, r in summary.items():
    s, o = r['lamb_sharded'], r['optax']
    lines.append(f"| {case} | {1e3 * o['median_s']:.1f} | {1e3 * s['median_s']:.1f} | "
                 f"{r['ratio']:.2f} | {100 * s['copy_bw_fraction']:.0f}% | "
                 f"{100 * o['copy_bw_fraction']:.0f}% | {s['compiles']} / {o['compiles']} | "
                 f"{s['compile_s']:.1f} / {o['compile_s']:.1f} |")
  return '\n'.join(lines)


def quantized_table(summary: dict, state_bytes: dict) -> str:
  """The int8/int4-moments rows: step time vs float32 moments (ratio of the medians and of
  the fastest repetitions), state bytes per parameter."""
  lines = ['| case | moments | lamb_sharded f32 moments ms/step | quantized moments ms/step '
           '| ratio / f32 (median) | ratio / f32 (min) | m+v bytes/param f32 / quantized '
           '| params+m+v bytes/param f32 / quantized | page faults/step f32 / quantized '
           '| compilations |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for case, r in summary.items():
    for kind in QUANTIZED:
      if f'lamb_sharded_{kind}' not in r:
        continue
      f, q, b = r['lamb_sharded'], r[f'lamb_sharded_{kind}'], state_bytes[case]
      lines.append(f"| {case} | {kind} | {1e3 * f['median_s']:.1f} | {1e3 * q['median_s']:.1f} | "
                   f"{r[f'{kind}_ratio']:.2f} | {r[f'{kind}_ratio_min']:.2f} | "
                   f"{b['float32']:.2f} / {b[kind]:.3f} | "
                   f"{4 + b['float32']:.2f} / {4 + b[kind]:.3f} | "
                   f"{f['faults_per_step']:.0f} / {q['faults_per_step']:.0f} | {q['compiles']} |")
  return '\n'.join(lines)


def profile_table(summary: dict, top: int = 8) -> str:
  """Per case, the milliseconds a step spends in each kind of XLA op, for every runner
  (the `top` kinds by their largest time, the rest summed), and the page faults."""
  lines = []
  for case, r in summary.items():
    names = [n for n in RUNNERS if n in r and 'profile_ms' in r[n]]
    if not names:
      continue
    kinds = sorted({k for n in names for k in r[n]['profile_ms']},
                   key=lambda k: -max(r[n]['profile_ms'].get(k, 0.0) for n in names))
    lines += [f'\n{case}: ms per step in each kind of XLA op (summed over threads'
              f'{" and devices" if "mesh" in case else ""}):\n',
              '| op | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    for kind in kinds[:top]:
      lines.append(f'| {kind} | ' + ' | '.join(
          f"{r[n]['profile_ms'].get(kind, 0.0):.1f}" for n in names) + ' |')
    lines.append('| (other ops) | ' + ' | '.join(
        f"{sum(v for k, v in r[n]['profile_ms'].items() if k not in kinds[:top]):.1f}"
        for n in names) + ' |')
    lines.append('| **all ops** | ' + ' | '.join(
        f"**{sum(r[n]['profile_ms'].values()):.1f}**" for n in names) + ' |')
    lines.append('| step (timed, wall) | ' + ' | '.join(
        f"{1e3 * r[n]['median_s']:.1f}" for n in names) + ' |')
    lines.append('| minor page faults / step | ' + ' | '.join(
        f"{r[n]['faults_per_step']:.0f}" for n in names) + ' |')
  return '\n'.join(lines)


def print_details(summary: dict) -> None:
  for case, r in summary.items():
    print(f'{case}:')
    for name in [n for n in RUNNERS if n in r]:
      x = r[name]
      reps = ' '.join(f'{1e3 * t:.1f}' for t in x['times_s'])
      print(f"  {name:>17}: median {1e3 * x['median_s']:.1f} ms/step (reps: {reps}), "
            f"{x['bytes_per_s'] / 1e9:.2f} GB/s = {100 * x['copy_bw_fraction']:.0f}% of copy BW, "
            f"all-reduces {x['all_reduces']}, fusions {x['fusions']}, "
            f"page faults {x['faults_per_step']:.0f}/step, "
            f"compilations {x['compiles']} ({x['compile_s']:.1f}s)")


def print_targets(summary: dict, one: str, mesh: str) -> None:
  """The targets of the cases that ran (`mesh` may be missing from `summary`)."""
  print('\nTargets (for orientation):')
  checks = [
      (f'ratio on 1 device <= {TARGETS["ratio_1_device"]}', summary[one]['ratio'],
       summary[one]['ratio'] <= TARGETS['ratio_1_device']),
  ]
  if mesh in summary:
    checks.append((f'ratio on the mesh <= {TARGETS["ratio_mesh"]}', summary[mesh]['ratio'],
                   summary[mesh]['ratio'] <= TARGETS['ratio_mesh']))
  cases = [c for c in (one, mesh) if c in summary]
  for case in cases:
    frac = summary[case]['lamb_sharded']['copy_bw_fraction']
    checks.append((f'lamb_sharded ({case}) >= {100 * TARGETS["copy_bw_fraction"]:.0f}% of copy BW',
                   frac, frac >= TARGETS['copy_bw_fraction']))
  for case in cases:
    n = summary[case]['lamb_sharded']['compiles']
    checks.append((f'lamb_sharded ({case}) compiles once', n, n == 1))
  for case in cases:
    if 'int8_ratio' in summary[case]:
      ratio = summary[case]['int8_ratio']
      checks.append((f'int8 moments / float32 moments ({case}) <= {TARGETS["int8_ratio"]}',
                     ratio, ratio <= TARGETS['int8_ratio']))
  for text, value, ok in checks:
    print(f"  {'met ' if ok else 'MISS'}  {text}: {value:.2f}")


# ----------------------------------------------------------------------------- main


def _steps(text: str) -> int:
  """A number of steps >= 1 (argparse names the flag in its error)."""
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number of steps >= 1')
  return n


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', choices=sorted(SIZES), default='100m')
  p.add_argument('--reps', type=int, default=7, help='timed repetitions (median reported)')
  p.add_argument('--steps', type=int, default=5, help='steps per repetition')
  p.add_argument('--mesh', choices=sorted(MESHES), default=DEFAULT_MESH)
  p.add_argument('--axis-type', choices=('explicit', 'auto'), default='explicit',
                 help='mesh axis type (jax.make_mesh defaults to explicit)')
  p.add_argument('--json', metavar='PATH', help='also write all figures here')
  p.add_argument('--no-int8', dest='int8', action='store_false',
                 help='leave out the int8-moments runner')
  p.add_argument('--no-int4', dest='int4', action='store_false',
                 help='leave out the int4-moments runner')
  p.add_argument('--profile', type=_steps, default=0, metavar='STEPS',
                 help='after timing, trace STEPS steps of every runner with jax.profiler '
                      'and print the time a step spends in each kind of XLA op')
  p.add_argument('--compiler-option', action='append', default=[], metavar='KEY=VALUE',
                 help='an XLA option for every runner\'s step (repeatable), e.g. '
                      'xla_cpu_use_fusion_emitters=false')
  p.add_argument('--quantized-donation', choices=('all', 'params'), default='all',
                 help='what the int8/int4 runners donate to their step: params and state '
                      '(all, as the others), or their params alone (no copies of old codes)')
  return p.parse_args(argv)


def compiler_options(pairs: list[str]) -> dict:
  """KEY=VALUE strings as jax.jit's compiler_options (true/false as bools, ints as ints)."""
  out = {}
  for pair in pairs:
    key, _, value = pair.partition('=')
    if value.lower() in ('true', 'false'):
      out[key] = value.lower() == 'true'
    else:
      try:
        out[key] = int(value)
      except ValueError:
        out[key] = value
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  backend = jax.default_backend()
  if backend == 'cpu':  # on an accelerator, its own devices
    assert jax.device_count() == N_DEVICES, jax.devices()
  shapes = param_shapes(**SIZES[args.size])
  n_params, n_leaves = count_params(shapes)
  print(f'jax {jax.__version__}, optax {optax.__version__}, {jax.device_count()} '
        f'{jax.devices()[0].platform} devices, {os.cpu_count()} CPU cores ({platform.machine()})')
  print(f'model {args.size} {SIZES[args.size]}: {n_params:,} params in {n_leaves} leaves')

  bw = memory_bandwidth() if backend == 'cpu' else device_bandwidth()
  print(f"memory bandwidth ({bw['by']}, {bw['array_bytes'] / 2**20:.0f} MiB arrays): "
        f"copy {bw['copy'] / 1e9:.2f} GB/s, triad {bw['triad'] / 1e9:.2f} GB/s")

  axis_type = AxisType.Explicit if args.axis_type == 'explicit' else AxisType.Auto
  one, on_mesh = '1 device', f'{N_DEVICES}-device mesh ({args.mesh})'
  cases = [Case(one, None, None)]
  if has_mesh_case(backend, jax.device_count()):
    mesh = make_mesh(args.mesh, axis_type)
    specs = jax.tree.map(lambda s: spec_for(s, mesh.axis_names, tuple(mesh.axis_sizes)),
                         shapes, is_leaf=_is_shape)
    cases.append(Case(on_mesh, mesh, specs))
    print(f'mesh {dict(mesh.shape)} ({args.axis_type} axes); specs: token embedding '
          f"{specs['embed']['token']}, mlp w_in {specs['layers'][0]['mlp']['w_in']}, "
          f"vectors {specs['final_ln']['scale']}")
  else:
    print(f'no mesh case: {jax.device_count()} {backend} device(s), not {N_DEVICES}')
  print(f'timing {args.reps} reps x {args.steps} steps after 2 warm-up steps')
  options = compiler_options(args.compiler_option)
  if options:
    print(f'compiler options of every step: {options}')
  if args.quantized_donation == 'params':
    print('the int8/int4 runners donate their params alone, not their state')
  quantized = tuple(k for k in QUANTIZED if getattr(args, k))

  results = {}
  for case in cases:
    print(f'{case.name}:')
    results[case.name] = measure_case(case, shapes, args.steps, args.reps, quantized, options,
                                      args.profile, args.quantized_donation == 'all')
  state_bytes = {case.name: {kind: state_bytes_per_param(shapes, n_params, case, **kw)
                             for kind, kw in (('float32', {}), *QUANTIZED.items())}
                 for case in cases}

  summary = summarize(results, n_params, bw['copy'])
  print()
  print_details(summary)
  print(f'\nlamb step, {args.size} ({n_params / 1e6:.1f}M float32 params, '
        f'{BYTES_PER_PARAM} B/param/step), copy BW {bw["copy"] / 1e9:.2f} GB/s:\n')
  print(markdown_table(summary))
  print('\nall-reduce ops in the compiled step: ' + ', '.join(
      f"{case} {name} {summary[case][name]['all_reduces']}"
      for case in summary for name in RUNNERS if name in summary[case]))
  if quantized:
    print('\nint8/int4 moments (mu_dtype=nu_dtype=\'int8\'/\'int4\') vs float32 moments, '
          'same run:\n')
    print(quantized_table(summary, state_bytes))
  if args.profile:
    print(profile_table(summary))
  print_targets(summary, one, on_mesh)
  for case, b in state_bytes.items():
    ok = b['int8'] <= TARGETS['int8_state_bytes_per_param'] and \
        4 + b['int8'] <= TARGETS['int8_total_bytes_per_param']
    print(f"  {'met ' if ok else 'MISS'}  int8 m+v bytes/param ({case}) <= "
          f"{TARGETS['int8_state_bytes_per_param']} and params+m+v <= "
          f"{TARGETS['int8_total_bytes_per_param']}: {b['int8']:.3f} / {4 + b['int8']:.3f}")
    ok = b['int4'] <= TARGETS['int4_state_bytes_per_param']
    print(f"  {'met ' if ok else 'MISS'}  int4 m+v bytes/param ({case}) <= "
          f"{TARGETS['int4_state_bytes_per_param']}: {b['int4']:.3f} / {4 + b['int4']:.3f}")
  wall = time.perf_counter() - t_start
  print(f'\nwall time {wall:.0f}s')

  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'size': args.size, 'model': SIZES[args.size], 'params': n_params,
                 'leaves': n_leaves, 'mesh': args.mesh, 'axis_type': args.axis_type,
                 'reps': args.reps, 'steps': args.steps, 'bandwidth': bw,
                 'compiler_options': options, 'quantized_donation': args.quantized_donation,
                 'backend': backend, 'device_kind': jax.devices()[0].device_kind,
                 'bytes_per_param': BYTES_PER_PARAM, 'cases': summary,
                 'state_bytes_per_param': state_bytes,
                 'targets': TARGETS, 'wall_s': wall}, f, indent=2)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
