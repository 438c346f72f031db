"""Host buffers in the mesh's block layout (service/core/layout.py) and what they buy.

The layout must put every byte of a row-major stream where the device that
holds it expects it, whatever the chunk boundaries (odd byte counts
included); a push received into it must train exactly like the reference;
and on CPU the step's sum must go onto the mesh without a copy (the reason
for the layout), while the params the mesh owns stay its own.
"""

import grpc
import jax
import ml_dtypes
import numpy as np
import optax
import pytest

import lamb_sharded
from service.config import ServerConfig
from service.core import layout
from service.core.accumulator import Accumulator
from service.core.engine import Engine
from service.core.model import ModelPlan
from service.core.placement import host_pieces, layout_of, local_slice, partition_spec
from service.protocol.chunks import ALIGN, HostArrays
from service.protocol.specs import LeafSpec
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from svc import push_messages, running_server, spec, stub

CASES = [  # shape, dim, parts
    ((16, 4), 0, 8), ((3, 16), 1, 8), ((5, 8, 12), 1, 4), ((2, 3, 40), 2, 8), ((7,), None, 1),
    ((), None, 1), ((0, 8), 1, 8), ((4, 6), 1, 2), ((1, 24), 1, 8)]


@pytest.mark.parametrize('shape,dim,parts', CASES)
def test_round_trip_and_blocks(shape, dim, parts):
  lay = layout.LeafLayout(shape, dim, parts)
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  buf = lay.from_array(x)
  assert buf.shape == (parts, *lay.block_shape)
  np.testing.assert_array_equal(lay.to_array(buf), x)
  for b in range(parts):  # block b is the b-th slice of the split dimension
    if dim is None:
      np.testing.assert_array_equal(lay.block(buf, 0), x)
    else:
      n = shape[dim] // parts
      want = np.take(x, np.arange(b * n, (b + 1) * n), axis=dim)
      got = lay.block(buf, b * n)
      assert got.flags.c_contiguous
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('shape,dim,parts', CASES)
@pytest.mark.parametrize('seed', [0, 1])
def test_writes_at_any_byte_boundaries(shape, dim, parts, seed):
  # A stream cut at random byte counts (1 byte, odd sizes, many rows at once) lands
  # exactly where `from_array` puts it.
  lay = layout.LeafLayout(shape, dim, parts)
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  buf = np.full((parts, *lay.block_shape), np.nan, np.float32)
  view, rng, off = lay.wire_view(buf), np.random.default_rng(seed + 10), 0
  while off < raw.size:
    n = int(rng.choice([1, 3, 5, 17, 61, 384, 1000]))
    layout.write(view, off, raw[off:off + n])
    off += n
  np.testing.assert_array_equal(buf, lay.from_array(x))


def test_bad_splits_are_refused():
  with pytest.raises(ValueError, match='cannot split dimension 1'):
    layout.LeafLayout((4, 6), 1, 4)
  with pytest.raises(ValueError, match='1 part'):
    layout.LeafLayout((4, 6), None, 2)


def test_host_buffers_are_one_aligned_allocation():
  lays = [layout.LeafLayout((3, 16), 1, 8), layout.LeafLayout((5,)), layout.LeafLayout((16, 4), 0, 8)]
  bufs = layout.host_buffers(lays, [np.float32, ml_dtypes.bfloat16, np.float32])
  assert [b.shape for b in bufs] == [(8, 3, 2), (1, 5), (8, 2, 4)]
  assert all(b.ctypes.data % ALIGN == 0 for b in bufs)
  starts = [b.ctypes.data for b in bufs]
  assert starts == sorted(starts) and starts[-1] - starts[0] < 1024  # consecutive, one block


def test_partition_and_layout_agree():
  for shape in [(16, 4), (3, 16), (30522, 768), (7,), (768, 3072)]:
    pspec = partition_spec(shape, 8)
    lay = layout_of(shape, pspec, 8)
    if lay.dim is None:
      assert 'x' not in pspec
    else:
      assert list(pspec).index('x') == lay.dim and lay.parts == 8


# Leaves split along every kind of dimension; each device block a multiple of 64 bytes, so
# that XLA's CPU runtime may wrap it (an unaligned block is copied instead, which is fine).
P0 = {"['col']": np.linspace(-1, 1, 3 * 128, dtype=np.float32).reshape(3, 128),       # dim 1
      "['deep']": np.linspace(1, 2, 2 * 3 * 64, dtype=np.float32).reshape(2, 3, 64),  # dim 2
      "['row']": np.linspace(-2, 0, 128, dtype=np.float32).reshape(16, 8),            # dim 0
      "['odd']": np.linspace(0.5, 1, 7, dtype=np.float32)}                            # whole


def _g(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in P0.items()}


def test_pushes_cut_anywhere_train_like_the_reference():
  # Two workers on a real server: one pushes float32 in 1001-byte chunks (cutting
  # elements and rows anywhere), one bfloat16 in 333-byte chunks; two steps must equal
  # LAMB fed the example-weighted means.
  g = [[_g(10 * s + w) for w in range(2)] for s in range(2)]
  bf16 = lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}  # noqa: E731
  tx = lamb_sharded.lamb(0.1)
  want, state = P0, tx.init(P0)
  for s in range(2):
    a, b = g[s][0], {k: v.astype(np.float32) for k, v in bf16(g[s][1]).items()}
    mean = {k: (3 * a[k] + b[k]) / 4 for k in P0}
    u, state = tx.update(mean, state, want)
    want = optax.apply_updates(want, u)
  with running_server(devices=8, num_workers=2, learning_rate=0.1) as (running, client):
    model_id = client.initialize(P0)
    st = stub(running.port)
    for s in range(2):
      r0 = st.PushGradients(iter(push_messages(
          list(g[s][0].items()), worker_id='f32', step=s, num_examples=3, model_id=model_id,
          chunk_bytes=1001)))
      assert not r0.applied
      leaves = list(bf16(g[s][1]).items())
      r1 = st.PushGradients(iter(push_messages(
          leaves, worker_id='bf16', step=s, model_id=model_id, chunk_bytes=333,
          specs=[spec(p, x.shape, tensor_pb2.DTYPE_BFLOAT16) for p, x in leaves])))
      assert r1.applied
    got = client.pull().params
  for k in P0:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-7, err_msg=k)


def test_the_sum_goes_onto_a_cpu_mesh_without_a_copy():
  # Each device's block of the host sum is what the device holds: same memory.
  config = ServerConfig(devices=8)
  engine = Engine(config)
  try:
    specs = [LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()]
    plan = ModelPlan(config, engine.mesh, specs)
    acc = Accumulator(plan, max_buffers=2)
    host = acc.take_buffers([s.dtype for s in specs])
    for lay, buf, v in zip(plan.layouts, host, _g(0).values()):
      lay.from_array(v, out=buf)
    blocks = host[:]
    acc.add(host, 1)  # a float32 push of weight 1 becomes the sum as it is
    arrays = acc.to_mesh()
    for lay, buf, arr, v in zip(plan.layouts, blocks, arrays, _g(0).values()):
      np.testing.assert_array_equal(np.asarray(arr), v)
      for shard in arr.addressable_shards:
        start = 0 if lay.dim is None else (shard.index[lay.dim].start or 0)
        assert shard.data.unsafe_buffer_pointer() == lay.block(buf, start).ctypes.data
    del arrays
  finally:
    engine.close()
  assert jax.default_backend() == 'cpu'


def test_initial_params_are_the_meshs_own():
  # Wrapped host memory could not be donated: the first step would allocate new params.
  engine = Engine(ServerConfig(devices=8))
  try:
    specs = [LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()]
    host = HostArrays(specs).arrays
    for buf, v in zip(host, P0.values()):
      buf[...] = v
    engine.initialize(specs, host)
    with engine.reading() as snap:
      for buf, arr in zip(host, snap.arrays):
        pointers = {s.data.unsafe_buffer_pointer() for s in arr.addressable_shards}
        lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
        assert not any(lo <= p < hi for p in pointers)
  finally:
    engine.close()


@pytest.mark.parametrize('shape,pspec', [
    ((30, 64), (None, 'x')), ((16, 8), ('x',)), ((2, 3, 64), (None, None, 'x')), ((7,), ()),
    ((), ()), ((8, 5), ('x', None))])
@pytest.mark.parametrize('max_bytes', [4, 100, 1 << 20])
def test_pulls_read_leaves_in_pieces(shape, pspec, max_bytes):
  # A pull streams a leaf from its devices' blocks a piece at a time: the pieces, in
  # order, are the leaf in row-major order, none (but a single row) over max_bytes.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  arr = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*pspec)))
  pieces = list(host_pieces(arr, max_bytes))
  np.testing.assert_array_equal(np.concatenate(pieces).reshape(shape), x)
  row = x.nbytes // max(1, shape[0]) if len(shape) > 1 else 4
  assert all(p.nbytes <= max(max_bytes, row) for p in pieces)
  if max_bytes == 1 << 20:
    assert len(pieces) <= 8  # at most a piece per block when a block is small


@pytest.mark.parametrize('chunk_bytes', [1001, 4096, 6])
def test_nan_is_found_whatever_the_chunk_boundaries(chunk_bytes):
  # A NaN's bytes may straddle two chunks (6-byte chunks), and the leaf it is in may be
  # scattered over the devices' blocks: the push is refused, naming the leaf, and
  # nothing changes.
  with running_server(devices=8, learning_rate=0.1) as (running, client):
    model_id = client.initialize(P0)
    before = client.pull().params
    bad = _g(0)
    bad["['deep']"].reshape(-1)[77] = np.nan  # bytes 308..311: across a 6-byte cut
    with pytest.raises(grpc.RpcError) as e:
      stub(running.port).PushGradients(iter(push_messages(
          list(bad.items()), step=0, model_id=model_id, chunk_bytes=chunk_bytes)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaf ['deep']" in e.value.details() and 'NaN or Inf' in e.value.details()
    after = client.pull()
    assert after.step == 0
    for k in P0:
      np.testing.assert_array_equal(after.params[k], before[k])


def test_a_process_lays_out_only_its_devices_slice():
  # In a 2-process job of 4 devices each, process 1 holds blocks 4..7 of a split leaf.
  jsh = jax.sharding
  lay = layout_of((64, 4), jsh.PartitionSpec('x'), 8, range(4, 8))
  assert (lay.shape, lay.dim, lay.parts, lay.first) == ((32, 4), 0, 4, 4)
  cols = layout_of((3, 16), jsh.PartitionSpec(None, 'x'), 8, range(4, 8))
  assert (cols.shape, cols.block_shape, cols.first) == ((3, 8), (3, 2), 4)
  x = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
  here = x[local_slice((3, 16), jsh.PartitionSpec(None, 'x'), range(4, 8), 8)]
  np.testing.assert_array_equal(here, x[:, 8:])
  buf = cols.from_array(here)
  np.testing.assert_array_equal(cols.block(buf, 10), x[:, 10:12])  # device 5's block
  whole = layout_of((7,), jsh.PartitionSpec(), 8, range(4, 8))
  assert whole.shape == (7,) and whole.dim is None
