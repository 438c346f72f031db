"""The ingestion fast paths: host accumulation, donated params, chunks without protobuf.

Each test would fail if its mechanism broke: a push that fails after the
accumulator adopted or grew must leave no trace, a pull that started before an
apply must still stream the old step even though applies donate the params,
the client's hand-encoded chunk messages must parse as protobuf's own, and the
server's chunk parser must read what protobuf reads (and leave the rest to it).
"""

import threading

import grpc
import ml_dtypes
import numpy as np
import optax
import pytest
from google.protobuf.message import DecodeError

import lamb_sharded
from service.protocol import chunks
from service.protocol.specs import LeafSpec
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.config import ServerConfig
from service.core.engine import Engine
from service.errors import InvalidArgument, ResourceExhausted
from svc import params_of, push_arrays, push_header, push_messages, running_server, stub

P0 = {"['w']": np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4),
      "['b']": np.linspace(0.5, 1, 8, dtype=np.float32)}


def _g(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in P0.items()}


def _lamb_step(grads, lr):
  tx = lamb_sharded.lamb(lr)
  u, _ = tx.update(grads, tx.init(P0), P0)
  return optax.apply_updates(P0, u)


def _engine(**overrides) -> Engine:
  engine = Engine(ServerConfig(**{'devices': 8, 'learning_rate': 0.1, **overrides}))
  specs = [LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()]
  engine.initialize(specs, [v.copy() for v in P0.values()])
  return engine


def _push(engine, worker, grads, num_examples=1, step=0):
  return push_arrays(engine, worker, step, grads, num_examples)


def _assert_params(got, want):
  for k in P0:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('first_fails', [True, False])
def test_a_push_cut_off_leaves_no_trace_in_the_accumulator(first_fails):
  # With 2 workers, the first committed push becomes the accumulator and the second is
  # added to it in place: a push cut off before, between or after must not count.
  with running_server(devices=8, num_workers=2, learning_rate=0.1) as (running, client):
    client.initialize(P0)
    leaves = [(k, np.full(v.shape, 1e3, np.float32)) for k, v in P0.items()]
    cut = push_messages(leaves=leaves, worker_id='cut', chunk_bytes=16)[:3]  # no commit
    g1, g2 = _g(1), _g(2)
    if first_fails:
      with pytest.raises(grpc.RpcError):
        stub(running.port).PushGradients(iter(cut), timeout=10)
    assert not client.push(0, g1, 1, 'a').applied
    with pytest.raises(grpc.RpcError):
      stub(running.port).PushGradients(iter(cut), timeout=10)
    assert client.push(0, g2, 3, 'b').applied
    _, got = params_of(client)
  _assert_params(got, _lamb_step({k: (g1[k] + 3 * g2[k]) / 4 for k in P0}, 0.1))


def test_rejected_push_after_the_accumulator_exists_changes_nothing():
  engine = _engine(num_workers=2)
  try:
    g1, g2 = _g(1), _g(2)
    _push(engine, 'a', g1, num_examples=2)  # adopted as the accumulator, scaled in place
    bad = dict(g2, **{"['b']": np.full(8, np.inf, np.float32)})
    with pytest.raises(InvalidArgument, match=r"leaf \['b'\] .* contains NaN or Inf"):
      _push(engine, 'b', bad)
    assert engine.pushes_in_flight == 0
    assert _push(engine, 'b', g2, num_examples=1).applied
    with engine.reading() as snap:
      got = dict(zip(P0, snap.arrays))
    _assert_params(got, _lamb_step({k: (2 * g1[k] + g2[k]) / 3 for k in P0}, 0.1))
  finally:
    engine.close()


def test_low_precision_pushes_accumulate_in_float32():
  engine = _engine(num_workers=2)
  try:
    g1 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _g(1).items()}
    g2 = {k: v.astype(np.float16) for k, v in _g(2).items()}
    _push(engine, 'a', g1, num_examples=1)
    _push(engine, 'b', g2, num_examples=2)
    with engine.reading() as snap:
      got = dict(zip(P0, snap.arrays))
    mean = {k: (g1[k].astype(np.float32) + 2 * g2[k].astype(np.float32)) / 3 for k in P0}
    _assert_params(got, _lamb_step(mean, 0.1))
  finally:
    engine.close()


def test_applies_donate_the_params_unless_a_pull_reads_them():
  engine = _engine()
  try:
    with engine.reading() as snap:
      _push(engine, 'w', _g(1))  # applied while the snapshot is read
      assert snap.step == 0 and not any(a.is_deleted() for a in snap.arrays)
      for k, a in zip(P0, snap.arrays):
        np.testing.assert_array_equal(np.asarray(a), P0[k])
    with engine.reading() as snap:
      held = snap.arrays
    assert snap.step == 1
    _push(engine, 'w', _g(2), step=1)  # nobody reads step 1's params: their memory is reused
    assert all(a.is_deleted() for a in held)
  finally:
    engine.close()


def test_a_cancelled_pull_stops_holding_the_params():
  with running_server(devices=8, learning_rate=0.1) as (running, client):
    big = {"['w']": np.ones((256, 1024), np.float32)}
    client.initialize(big)
    calls = stub(running.port).PullParameters(pb.PullParametersRequest(max_chunk_bytes=4096),
                                              timeout=10)
    assert next(calls).header.step == 0
    assert running.engine._readers == 1  # pylint: disable=protected-access
    calls.cancel()
    done = threading.Event()
    for _ in range(200):
      if running.engine._readers == 0:  # pylint: disable=protected-access
        done.set()
        break
      done.wait(0.05)
    assert done.is_set(), 'the cancelled pull still holds the params'
    assert client.push(0, {"['w']": np.ones((256, 1024), np.float32)}, 1, 'w').applied
    step, got = params_of(client)
    assert step == 1 and np.all(np.isfinite(got["['w']"]))


@pytest.mark.parametrize('chunk_bytes', [4096, 5001, 1 << 20])
def test_encoded_chunk_messages_parse_as_protobufs_own(chunk_bytes):
  arrays = [("['a']", np.arange(5000, dtype=np.float32)),
            ("['é']", np.arange(300, dtype=np.float32).astype(ml_dtypes.bfloat16)),
            ("['empty']", np.zeros((0, 3), np.float32)),
            ("['s']", np.float32(7.0))]
  for message in (pb.PushGradientsRequest, pb.InitializeModelRequest):
    want = list(chunks.chunk_messages(message, arrays, chunk_bytes))
    got = [message.FromString(m) for m in chunks.encoded_chunk_messages(message, arrays,
                                                                      chunk_bytes)]
    assert got == want


def _as_chunk(parsed, message):
  """A parsed upload message's chunk as a TensorChunk (ChunkMessage or protobuf's own)."""
  if isinstance(parsed, chunks.ChunkMessage):
    c = parsed.chunk
    return tensor_pb2.TensorChunk(path=c.path, offset=c.offset, data=bytes(c.data),
                                  sequence=c.sequence)
  assert isinstance(parsed, message)
  return parsed.chunk


def test_chunk_parser_reads_chunks_as_protobuf_does_without_copying():
  parse = chunks.chunk_parser(pb.PushGradientsRequest)
  for chunk in (tensor_pb2.TensorChunk(path="['w']", offset=0, data=b'\x01' * 8, sequence=0),
                tensor_pb2.TensorChunk(path="['é']", offset=(1 << 40), data=b'xy', sequence=300),
                tensor_pb2.TensorChunk(path="['w']", offset=-1, data=b'z', sequence=-5),
                tensor_pb2.TensorChunk()):
    raw = pb.PushGradientsRequest(chunk=chunk).SerializeToString()
    parsed = parse(raw)
    assert isinstance(parsed, chunks.ChunkMessage) and parsed.WhichOneof('kind') == 'chunk'
    assert _as_chunk(parsed, pb.PushGradientsRequest) == chunk
    if chunk.data:  # a view into the received bytes, not a copy
      assert parsed.chunk.data.obj is raw
  for other in (pb.PushGradientsRequest(header=pb.PushGradientsHeader(worker_id='w')),
                pb.PushGradientsRequest(commit=tensor_pb2.StreamCommit(chunk_count=3))):
    assert parse(other.SerializeToString()) == other


@pytest.mark.parametrize('raw', [
    # An unknown field inside the chunk, and one next to it: protobuf's parser decides.
    pb.PushGradientsRequest(chunk=tensor_pb2.TensorChunk(path='a', data=b'd')).SerializeToString()
    + b'\x28\x01',
    b'\x12\x05' + b'\x0a\x01a' + b'\x30\x07',
    # A field with another wire type than TensorChunk's (path as a varint).
    b'\x12\x02\x08\x01',
])
def test_chunk_parser_leaves_anything_unusual_to_protobuf(raw):
  parsed = chunks.chunk_parser(pb.PushGradientsRequest)(raw)
  assert isinstance(parsed, pb.PushGradientsRequest)
  assert parsed == pb.PushGradientsRequest.FromString(raw)


@pytest.mark.parametrize('raw', [b'\x12\x05\x0a\x09abc', b'\x12\x03\x0a\x02\xff\xfe', b'\x12\x80'])
def test_chunk_parser_rejects_what_protobuf_rejects(raw):
  # Truncated, not UTF-8, a truncated length: the same error as protobuf's own parser.
  with pytest.raises(DecodeError):
    pb.PushGradientsRequest.FromString(raw)
  with pytest.raises(DecodeError):
    chunks.chunk_parser(pb.PushGradientsRequest)(raw)


def _recycling_run(workers, steps, dtype=np.float32):
  """`steps` sync steps of `workers` pushes into an engine with max_inflight_pushes=2: the
  push buffers used (the objects: a freed buffer's address may come back), after checking
  the params against LAMB fed each step's mean."""
  engine = _engine(num_workers=workers, max_inflight_pushes=2)
  tx = lamb_sharded.lamb(0.1)
  want, state = P0, tx.init(P0)
  try:
    used = []
    for step in range(steps):
      grads = [{k: v.astype(dtype) for k, v in _g(10 * step + w).items()} for w in range(workers)]
      for w, g in enumerate(grads):
        with engine.open_push(push_header(f'w{w}', step, g), timeout=5) as push:
          used.append(push.buffers[0])
          push.fill(list(g.values()))
          assert push.commit().applied == (w == workers - 1)
      mean = {k: sum(g[k].astype(np.float32) for g in grads) / workers for k in P0}
      u, state = tx.update(mean, state, want)
      want = optax.apply_updates(want, u)
    with engine.reading() as snap:
      _assert_params(dict(zip(P0, snap.arrays)), want)
    return used
  finally:
    engine.close()


def test_buffers_are_recycled_and_steps_stay_exact():
  # Each step's sum goes onto the mesh (on CPU the mesh wraps the host buffer) and its host
  # buffer goes back to the pool: reusing it must wait until the step is computed. Over
  # many steps no more than max_inflight_pushes buffers are ever allocated.
  assert len({id(b) for b in _recycling_run(workers=1, steps=8)}) <= 2


def test_several_workers_allocate_no_more_than_the_bound():
  # 3 workers x 4 steps: every push lands in one of at most max_inflight_pushes buffers
  # (recycled: fresh pages would cost the kernel a zeroing pass each time).
  assert len({id(b) for b in _recycling_run(workers=3, steps=4)}) <= 2


def test_low_precision_push_buffers_are_recycled_too():
  assert len({id(b) for b in _recycling_run(workers=1, steps=6, dtype=ml_dtypes.bfloat16)}) == 1


def test_the_sum_holds_one_of_the_buffers():
  # max_inflight_pushes bounds the model-sized gradient buffers: the step's sum holds
  # one from its first push until the step is applied, so with 2 a second push is
  # received beside it and a third waits.
  engine = _engine(num_workers=3, max_inflight_pushes=2)
  try:
    assert not _push(engine, 'a', _g(1)).applied
    with engine.open_push(push_header('b', 0, P0), timeout=1) as second:
      with pytest.raises(ResourceExhausted, match="1 pushes .* in flight beside the step's sum"):
        engine.open_push(push_header('c', 0, P0), timeout=0.2)
      second.fill(list(_g(2).values()))
      assert not second.commit().applied
    assert _push(engine, 'c', _g(3)).applied  # room again once 'b' was added to the sum
  finally:
    engine.close()


def test_one_buffer_cannot_serve_several_sync_workers():
  with pytest.raises(ValueError, match='max_inflight_pushes must be >= 2 with several workers'):
    ServerConfig(num_workers=2, max_inflight_pushes=1).validate()
  ServerConfig(num_workers=2, max_inflight_pushes=1, step_mode='async').validate()
  ServerConfig(num_workers=1, max_inflight_pushes=1).validate()


def test_recycled_buffers_wait_on_fences_that_stay_valid():
  # A retired sum is reused once the step that reads it is computed. The fence must be an
  # output that later steps never donate: the params are donated to the next step, and
  # waiting on a donated array fails ("called on deleted or donated buffer").
  engine = _engine(max_inflight_pushes=2)
  try:
    fences = []
    for step in range(4):
      _push(engine, 'w', _g(step), step=step)
      fences += [x for _, _, fence in engine._sum.pool._idle for x in fence]  # pylint: disable=protected-access
    assert fences and not any(x.is_deleted() for x in fences)
  finally:
    engine.close()
