"""Compressed pushes: the int8/int4 block codecs, the server decoding them, error feedback.

The codecs (service/protocol/codecs.py) must keep every element within half a
quantisation step of its value, decode at any byte cut straight into the
server's block layout without a leaf-sized temporary, and the server must
train on what it decoded exactly as LAMB does. Malformed encoded pushes are in
test_hostile.py's table. Error feedback (service/client/feedback.py) must keep
the sum of what the server decoded within one step's quantisation error of the
sum of the true gradients, however many steps; without it, the sum drifts.
"""

from __future__ import annotations

import os
import sys
import tracemalloc

import grpc
import jax
import numpy as np
import optax
import pytest

import lamb_sharded
from service.cli import COMPRESSIONS as CLI_COMPRESSIONS
from service.client import COMPRESSIONS, ErrorFeedback, OptimizerClient
from service.config import ServerConfig
from service.core import layout
from service.core.engine import Engine
from service.errors import InvalidArgument
from service.examples.models import Regression
from service.protocol import codecs, pb
from service.protocol.specs import LeafSpec
from service.protocol.types import PushHeader
from svc import ROOT, flags, local_reference, push_messages, running_server, start_server_process
from svc import start_workers, stub

ENCODINGS = {'int8': codecs.INT8, 'int4': codecs.INT4}
SIZES = [1, 2, 7, 255, 256, 257, 1000, 2 * codecs.PIECE + 77]


def _values(n, seed, kind='normal'):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n).astype(np.float32)
  if kind == 'outliers':  # heavy tails: a few elements 1000x the rest
    x[rng.integers(0, n, size=max(1, n // 100))] *= 1000
  elif kind == 'zeros':  # whole zero blocks, and a zero tail
    x[: n // 2] = 0
  return x


def _scales(data, n):
  return np.frombuffer(data[:4 * codecs.num_blocks(n)].tobytes(), '<f4')


def _per_element(scales, n):
  return np.repeat(scales, codecs.BLOCK)[:n]


# ----------------------------------------------------------------------------- the codecs


@pytest.mark.parametrize('name', list(ENCODINGS))
@pytest.mark.parametrize('n', SIZES)
@pytest.mark.parametrize('kind', ['normal', 'outliers', 'zeros'])
def test_round_trip_within_half_a_step(name, n, kind):
  enc = ENCODINGS[name]
  x = _values(n, n, kind)
  data = codecs.encode(x, enc)
  assert data.dtype == np.uint8 and data.size == codecs.nbytes(n, enc)
  assert data.size == 4 * -(-n // 256) + (n if enc == codecs.INT8 else -(-n // 2))
  scales = _scales(data, n)
  blocks = np.pad(np.abs(x), (0, scales.size * 256 - n)).reshape(-1, 256)
  np.testing.assert_array_equal(scales, blocks.max(axis=1) / np.float32(codecs.QMAX[enc]))
  y = codecs.decode(data, n, enc)
  err = np.abs(x - y)
  assert np.all(err <= _per_element(scales, n) * (0.5 + 1e-6)), float(err.max())
  assert np.all(y[x == 0] == 0)  # zero blocks have scale 0, and zeros stay zeros
  # What the encoding dropped, as encode reports it (in place, for error feedback), is
  # exactly x minus what a receiver decodes.
  r = x.copy()
  assert np.array_equal(codecs.encode(r, enc, residual_out=r), data)
  np.testing.assert_array_equal(r, x - y)
  if kind == 'zeros' and n >= 512:
    assert scales[0] == 0


@pytest.mark.parametrize('name', list(ENCODINGS))
def test_a_block_of_subnormal_values_keeps_them_in_the_residual(name):
  # qmax / absmax overflows float32 for absmax < ~4e-37: once it made the block's codes
  # NaN * inf and its residual NaN, and the next push's scale NaN (a demo worker died so).
  enc = ENCODINGS[name]
  x = np.zeros(768, np.float32)
  x[:256] = np.float32(1e-40) * np.arange(256, dtype=np.float32) / 255  # subnormal block
  x[256:512] = np.float32(1e-37) * np.linspace(-1, 1, 256, dtype=np.float32)  # int8: too
  x[512:] = np.linspace(-1, 1, 256, dtype=np.float32)  # a normal block beside them
  r = x.copy()
  data = codecs.encode(r, enc, residual_out=r)
  y = codecs.decode(data, x.size, enc)
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(r))
  np.testing.assert_array_equal(r, x - y)  # what was not sent is kept for the next push
  np.testing.assert_array_equal(y[:256], 0)
  assert np.abs(x[512:] - y[512:]).max() <= _scales(data, x.size)[2] / 2 * (1 + 1e-6)


def test_int4_packing_is_the_documented_one():
  # Block scale 1 (absmax 7): element 2i in the low nibble, 2i+1 in the high one.
  x = np.array([7, -1, 2, -7, 3], np.float32)
  data = codecs.encode(x, codecs.INT4)
  assert _scales(data, 5).tolist() == [1.0]
  assert data[4:].tolist() == [0xF7, 0x92, 0x03]  # (-1, 7), (-7, 2), (pad 0, 3)
  data8 = codecs.encode(x, codecs.INT8)
  assert _scales(data8, 5).tolist() == [pytest.approx(7 / 127)]
  assert data8[4:].view(np.int8).tolist() == [127, -18, 36, -127, 54]


@pytest.mark.parametrize('name', list(ENCODINGS))
@pytest.mark.parametrize('shape,dim,parts', [((3, 640), 1, 8), ((5, 8, 96), 1, 4),
                                             ((2, 3, 1280), 2, 8), ((700,), None, 1),
                                             ((64, 9), 0, 8)])
@pytest.mark.parametrize('seed', [0, 1])
def test_decodes_at_any_byte_cut_into_the_block_layout(name, shape, dim, parts, seed):
  # The stream cut at random byte counts (inside a scale, between scales and codes,
  # inside a block, a byte at a time), kept, then decoded run by run in any order: the
  # values land where `from_array` would put the decoded leaf, written or added.
  enc = ENCODINGS[name]
  lay = layout.LeafLayout(shape, dim, parts)
  x = _values(int(np.prod(shape)), seed)
  data = codecs.encode(x, enc)
  want = lay.from_array(codecs.decode(data, x.size, enc).reshape(shape))
  rng, off = np.random.default_rng(seed + 10), 0
  leaf = codecs.EncodedLeaf(x.size, enc, 'leaf')
  while off < data.size:
    n = int(rng.choice([1, 2, 3, 5, 17, 61, 384, 1000]))
    leaf.feed(off, data[off:off + n])
    off += n
  runs = leaf.runs()
  assert sum(r[1].size for r in runs) == data.size - 4 * codecs.num_blocks(x.size)
  start = rng.normal(size=(parts, *lay.block_shape)).astype(np.float32)
  for add in (False, True):
    buf = start.copy()
    view, scratch = lay.wire_view(buf, np.float32), codecs.Scratch()
    for i in rng.permutation(len(runs)):
      for e0, values in leaf.values(runs[i], scratch):
        layout.write(view, e0, values, add)
    np.testing.assert_array_equal(buf, start + want if add else want)


@pytest.mark.parametrize('name', list(ENCODINGS))
def test_decoding_makes_no_leaf_sized_temporary(name):
  # 8M elements (32 MB in float32) received in 1 MiB chunks, then added into an existing
  # buffer: what the leaf keeps is its scales (1/64 of the float32 leaf) and views of
  # the chunks (no copy); decoding takes one piece of scratch.
  enc, n = ENCODINGS[name], 1 << 23
  data = codecs.encode(_values(n, 0), enc)
  out = np.zeros(n, np.float32)
  tracemalloc.start()
  try:
    leaf = codecs.EncodedLeaf(n, enc, 'leaf')
    for off in range(0, data.size, 1 << 20):
      leaf.feed(off, data[off:off + (1 << 20)])
    scratch = codecs.Scratch()
    for run in leaf.runs():
      for e0, values in leaf.values(run, scratch):
        layout.write(out, e0, values, add=True)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 4 * n // 64 + (2 << 20), peak  # scales + ~1 MiB of scratch, not 32 MB
  np.testing.assert_array_equal(out, codecs.decode(data, n, enc))


@pytest.mark.parametrize('mutate,pattern', [
    (lambda d: d[:4].view('<f4').__setitem__(0, np.nan), r'block 0 of 3 has scale nan'),
    (lambda d: d[8:12].view('<f4').__setitem__(0, -1.0), r'block 2 of 3 has scale -1.0'),
    (lambda d: d[4:8].view('<f4').__setitem__(0, np.inf), r'block 1 of 3 has scale inf'),
    (lambda d: d.__setitem__(12 + 300, 0x80), r'element 300 has code -128, outside \[-127, 127\]'),
])
def test_bad_int8_data_is_refused_naming_the_leaf(mutate, pattern):
  data = codecs.encode(_values(700, 0), codecs.INT8)
  mutate(data)
  with pytest.raises(InvalidArgument, match=r"^leaf \['w'\]: " + pattern):
    codecs.decode(data, 700, codecs.INT8, "leaf ['w']")


def test_bad_int4_codes_are_refused():
  data = codecs.encode(_values(701, 0), codecs.INT4)
  bad = data.copy()
  bad[12 + 10] = 0x8F  # element 21 (high nibble) is -8
  with pytest.raises(InvalidArgument, match=r'element 21 has code -8, outside \[-7, 7\]'):
    codecs.decode(bad, 701, codecs.INT4)
  bad = data.copy()
  bad[-1] |= 0x10  # the padding nibble of an odd leaf
  with pytest.raises(InvalidArgument, match=r'padding nibble after the last of its 701'):
    codecs.decode(bad, 701, codecs.INT4)
  bad = data.copy()
  bad[-1] |= 0x80  # a padding nibble of 8 is the padding's fault, not element 701's code
  with pytest.raises(InvalidArgument, match=r'padding nibble after the last of its 701 '
                                            r'elements is -8, expected 0'):
    codecs.decode(bad, 701, codecs.INT4)
  with pytest.raises(InvalidArgument, match=r'364 bytes, expected 363'):
    codecs.decode(np.append(data, np.uint8(0)), 701, codecs.INT4)


@pytest.mark.parametrize('name', ['int8', 'int4'])
def test_the_largest_scale_the_proto_allows_is_accepted(name):
  """tensor.proto: a scale is valid while qmax times it is finite in float32. For int4,
  float32(max / 7) is such a scale (7 x it rounds to max) and the encoder makes it from a
  block whose largest value is float32's max; for int8 float32(max / 127) is not (127 x it
  rounds to inf), one ulp below it is."""
  enc = codecs.BY_NAME[name]
  qmax, top = np.float32(codecs.QMAX[enc]), np.float32(np.finfo(np.float32).max)
  x = np.zeros(256, np.float32)
  x[3] = top  # the encoder's own scale for this block: top / qmax
  data = codecs.encode(x, enc)
  scale = data[:4].view('<f4')[0]
  with np.errstate(over='ignore'):
    largest = scale if np.isfinite(qmax * scale) else np.nextafter(scale, np.float32(0))
  data[:4].view('<f4')[0] = largest
  y = codecs.decode(data, 256, enc, "leaf ['w']")
  assert np.isfinite(y).all() and y[3] == qmax * largest
  with np.errstate(over='ignore'):
    data[:4].view('<f4')[0] = np.nextafter(largest, np.float32(np.inf))  # qmax x it: inf
  with pytest.raises(InvalidArgument, match=r"^leaf \['w'\]: block 0 of 1 has scale"):
    codecs.decode(data, 256, enc, "leaf ['w']")


def test_int4_minus_8_is_found_in_every_byte_value_at_every_position():
  # The receive check finds an int4 code -8 (a nibble 0x8) eight bytes at a time without
  # unpacking; checked against unpacking for every byte value, at every position of a
  # 17-byte run (two whole words and a tail), among bytes with no such nibble.
  for b in range(256):
    want = (b & 0x0F) == 8 or (b >> 4) == 8
    for pos in range(17):
      raw = np.array([0x77, 0x00, 0xF1, 0x9E] * 5, np.uint8)[:17]
      raw[pos] = b
      assert codecs._has_nibble_8(raw) == want, (hex(b), pos)  # pylint: disable=protected-access


def test_specs_carry_the_encoding_and_refuse_what_they_cannot_decode():
  s = LeafSpec("['w']", (3, 700), np.dtype(np.float32), codecs.INT4)
  assert s.nbytes == 4 * 9 + 1050 and s.described == 'float32[3, 700] in int4 blocks'
  assert LeafSpec.from_proto(s.to_proto(), 'h', encoded_ok=True) == s
  with pytest.raises(InvalidArgument, match=r"h: leaf \['w'\] is in int4 blocks, but only "
                                            r'gradient pushes may be encoded'):
    LeafSpec.from_proto(s.to_proto(), 'h')
  bad = s.to_proto()
  bad.encoding = 9
  with pytest.raises(InvalidArgument, match=r"h: leaf \['w'\]: unsupported encoding 9"):
    LeafSpec.from_proto(bad, 'h', encoded_ok=True)
  assert CLI_COMPRESSIONS == COMPRESSIONS


# ----------------------------------------------------------------------------- the server

# Leaves split along every kind of dimension over the 8-device mesh (as test_layout.py).
P0 = {"['col']": np.linspace(-1, 1, 3 * 640, dtype=np.float32).reshape(3, 640),      # dim 1
      "['deep']": np.linspace(1, 2, 2 * 3 * 64, dtype=np.float32).reshape(2, 3, 64),  # dim 2
      "['row']": np.linspace(-2, 0, 1024, dtype=np.float32).reshape(128, 8),          # dim 0
      "['odd']": np.linspace(0.5, 1, 7, dtype=np.float32)}                            # whole


def _g(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in P0.items()}


def _encoded_push(grads, enc, **kw):
  """push_messages of every leaf of `grads` in encoding `enc` (the odd one too)."""
  leaves = [(k, codecs.encode(v, enc)) for k, v in grads.items()]
  specs = [LeafSpec(k, v.shape, np.dtype(np.float32), enc).to_proto() for k, v in grads.items()]
  return push_messages(leaves, specs=specs, **kw)


def _decoded(grads, enc):
  return {k: codecs.decode(codecs.encode(v, enc), v.size, enc).reshape(v.shape)
          for k, v in grads.items()}


def test_compressed_pushes_train_like_lamb_on_what_was_decoded():
  # Three workers on a real server, int8 (in 333-byte chunks: scales and codes cut
  # anywhere), int4 (1001-byte chunks) and float32, two steps: equal to LAMB fed the
  # example-weighted mean of the decoded gradients.
  g = [[_g(10 * s + w) for w in range(3)] for s in range(2)]
  tx = lamb_sharded.lamb(0.1)
  want, state = P0, tx.init(P0)
  for s in range(2):
    a, b, c = _decoded(g[s][0], codecs.INT8), _decoded(g[s][1], codecs.INT4), g[s][2]
    mean = {k: (3 * a[k] + b[k] + 2 * c[k]) / 6 for k in P0}
    u, state = tx.update(mean, state, want)
    want = optax.apply_updates(want, u)
  with running_server(devices=8, num_workers=3, learning_rate=0.1) as (running, client):
    model_id = client.initialize(P0)
    st = stub(running.port)
    for s in range(2):
      r = st.PushGradients(iter(_encoded_push(g[s][0], codecs.INT8, worker_id='i8', step=s,
                                              num_examples=3, model_id=model_id,
                                              chunk_bytes=333)))
      assert not r.applied
      r = st.PushGradients(iter(_encoded_push(g[s][1], codecs.INT4, worker_id='i4', step=s,
                                              model_id=model_id, chunk_bytes=1001)))
      assert not r.applied
      r = st.PushGradients(iter(push_messages(list(g[s][2].items()), worker_id='f32', step=s,
                                              num_examples=2, model_id=model_id)))
      assert r.applied
    got = client.pull().params
  for k in P0:  # the float32 sums' order differs: a few ulps of the update (lr 0.1)
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-6, err_msg=k)


def test_a_refused_encoded_push_adds_nothing_to_its_step():
  # Worker a's int8 push counts; worker b's first push carries a code out of range in
  # its LAST leaf (every other leaf well formed, already received) and is refused; its
  # second push counts. The step is LAMB on the mean of a's and b's second push only:
  # nothing of the refused push reached the sum (its leaves are decoded only once the
  # whole push was checked).
  ga, gb, gc = _g(1), _g(2), _g(3)
  tx = lamb_sharded.lamb(0.1)
  a, c = _decoded(ga, codecs.INT8), _decoded(gc, codecs.INT8)
  u, _ = tx.update({k: (a[k] + c[k]) / 2 for k in P0}, tx.init(P0), P0)
  want = optax.apply_updates(P0, u)
  bad = [(k, codecs.encode(v, codecs.INT8)) for k, v in gb.items()]
  assert bad[-1][0] == "['odd']"
  bad[-1][1][4 + 3] = 0x80  # element 3 of the last leaf: code -128
  specs = [LeafSpec(k, v.shape, np.dtype(np.float32), codecs.INT8).to_proto()
           for k, v in gb.items()]
  with running_server(devices=8, num_workers=2, learning_rate=0.1) as (running, client):
    model_id = client.initialize(P0)
    st = stub(running.port)
    assert not st.PushGradients(iter(_encoded_push(ga, codecs.INT8, worker_id='a', step=0,
                                                   model_id=model_id, chunk_bytes=500))).applied
    with pytest.raises(grpc.RpcError) as e:
      st.PushGradients(iter(push_messages(bad, specs=specs, worker_id='b', step=0,
                                          model_id=model_id, chunk_bytes=500)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaf ['odd']: element 3 has code -128" in e.value.details()
    assert st.PushGradients(iter(_encoded_push(gc, codecs.INT8, worker_id='b', step=0,
                                               model_id=model_id, chunk_bytes=500))).applied
    got = client.pull().params
  for k in P0:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-6, err_msg=k)


def test_a_large_push_is_added_on_several_threads_as_on_one():
  # Leaves big enough for the accumulator's threads (over 1M elements, each cut into
  # pieces and runs): an int8 push (weight 3) that becomes the step's sum, then int4 and
  # float32 pushes added into it, then the step: LAMB on the weighted mean of what was
  # decoded, as in the small test above.
  params = {"['emb']": np.linspace(-1, 1, 2048 * 768, dtype=np.float32).reshape(2048, 768),
            "['ff']": np.linspace(1, 2, 96 * 3 * 1024, dtype=np.float32).reshape(96, 3 * 1024)}
  rng = np.random.default_rng(0)
  g = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
       for _ in range(3)]
  a, b = _decoded(g[0], codecs.INT8), _decoded(g[1], codecs.INT4)
  mean = {k: (3 * a[k] + b[k] + 2 * g[2][k]) / 6 for k in params}
  tx = lamb_sharded.lamb(0.1)
  u, _ = tx.update(mean, tx.init(params), params)
  want = optax.apply_updates(params, u)
  engine = Engine(ServerConfig(devices=8, num_workers=3, learning_rate=0.1))
  try:
    engine.initialize([LeafSpec(k, v.shape, v.dtype) for k, v in params.items()],
                      [v.copy() for v in params.values()])
    for w, (enc, n) in enumerate([(codecs.INT8, 3), (codecs.INT4, 1), (codecs.RAW, 2)]):
      specs = tuple(LeafSpec(k, v.shape, np.dtype(np.float32), enc) for k, v in params.items())
      with engine.open_push(PushHeader(f'w{w}', '', 0, n, '', specs), 5.0) as push:
        push.fill([codecs.encode(v, enc) if enc else v for v in g[w].values()])
        assert push.commit().applied == (w == 2)
    with engine.reading() as snap:
      got = [np.asarray(a) for a in snap.arrays]
  finally:
    engine.close()
  for k, v in zip(params, got):
    np.testing.assert_allclose(np.asarray(v), want[k], rtol=2e-6, atol=1e-6, err_msg=k)


def test_admission_counts_wire_bytes_and_buffers_stay_float32():
  # max_inflight_bytes between the int8 size and the float32 size of the push: the
  # compressed push is admitted (counted at its encoded size), the float32 one is not;
  # the compressed push's buffers are float32, from the same pool.
  f32_bytes = sum(v.nbytes for v in P0.values())
  specs = [LeafSpec(k, v.shape, np.dtype(np.float32), codecs.INT8) for k, v in P0.items()]
  wire = sum(s.nbytes for s in specs)
  assert wire < f32_bytes // 3
  engine = Engine(ServerConfig(devices=8, max_inflight_bytes=wire + 10))
  try:
    engine.initialize([LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()],
                      [v.copy() for v in P0.values()])
    header = PushHeader('w0', '', 0, 1, '', tuple(specs))
    with engine.open_push(header, 1.0) as push:
      assert engine.inflight_bytes == wire
      assert all(b.dtype == np.float32 for b in push.buffers)
      push.fill([codecs.encode(v, codecs.INT8) for v in _g(0).values()])
      assert push.commit().applied
    raw = PushHeader('w0', '', 1, 1, '', tuple(LeafSpec(k, v.shape, v.dtype)
                                                for k, v in P0.items()))
    with pytest.raises(Exception, match=r'over max_inflight_bytes'):
      engine.open_push(raw, 1.0)
  finally:
    engine.close()


def test_parameters_cannot_be_initialised_encoded():
  with running_server(devices=2) as (running, client):
    header = pb.InitializeModelHeader(leaves=[LeafSpec(
        "['w']", (700,), np.dtype(np.float32), codecs.INT8).to_proto()])
    with pytest.raises(grpc.RpcError) as e:
      stub(running.port).InitializeModel(iter([pb.InitializeModelRequest(header=header)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaf ['w'] is in int8 blocks, but only gradient pushes" in e.value.details()
    assert not client.describe().initialized


# ----------------------------------------------------------------------------- the client


class _NoServer:
  """A stub with no server behind it: described as a single-process server."""

  def DescribeModel(self, request, timeout=None):  # pylint: disable=invalid-name
    del request, timeout
    return pb.DescribeModelResponse(initialized=True)


class _FlakyStub:
  """Records each PushGradients attempt's serialized messages; the first attempt fails
  with UNAVAILABLE after its stream was sent, the others go to the real stub."""

  def __init__(self, real):
    self.real, self.attempts = real, []

  def __getattr__(self, name):  # every other call goes to the real stub
    return getattr(self.real, name)

  def PushGradients(self, requests, timeout=None):  # pylint: disable=invalid-name
    msgs = [m if isinstance(m, bytes) else m.SerializeToString() for m in requests]
    self.attempts.append(msgs)
    if len(self.attempts) == 1:
      raise _Unavailable()
    return self.real.PushGradients(iter(msgs), timeout=timeout)


class _Unavailable(grpc.RpcError):
  def code(self):
    return grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize('compression', ['int8', 'int4'])
def test_a_retried_compressed_push_sends_the_same_bytes_and_counts_once(compression):
  with running_server(devices=8, num_workers=1, learning_rate=0.1) as (running, client):
    model_id = client.initialize(P0)
    raw_stub = client._stub  # pylint: disable=protected-access
    flaky = _FlakyStub(raw_stub)
    client._stub = flaky  # pylint: disable=protected-access
    fb = client.error_feedback_of('w0')
    fb.residuals["['col']"] = np.full(P0["['col']"].size, 0.01, np.float32)
    g = _g(0)
    r = client.push(0, g, 1, 'w0', model_id=model_id, compression=compression, push_id='p1')
    assert r.applied and r.current_step == 1 and not r.duplicate
    assert len(flaky.attempts) == 2 and flaky.attempts[0] == flaky.attempts[1]
    assert running.engine.stats['pushes_accepted'] == 1
    # The residual was updated once: what this push's bytes dropped from g + r.
    header = pb.PushGradientsRequest.FromString(flaky.attempts[0][0]).header
    encoded = {s.path: s.encoding for s in header.leaves}
    assert encoded == {"['col']": ENCODINGS[compression], "['deep']": ENCODINGS[compression],
                       "['row']": ENCODINGS[compression], "['odd']": codecs.RAW}
    sent = g["['col']"].reshape(-1) + np.float32(0.01)
    data = codecs.encode(sent, ENCODINGS[compression])
    np.testing.assert_array_equal(fb.residuals["['col']"],
                                  sent - codecs.decode(data, sent.size, ENCODINGS[compression]))
    assert "['odd']" not in fb.residuals  # raw leaves lose nothing
    # The same push again (same push id): answered as a duplicate, not counted again.
    client._stub = raw_stub  # pylint: disable=protected-access
    again = client.push(0, g, 1, 'w0', model_id=model_id, compression=compression,
                        push_id='p1')
    assert again.duplicate and again.accepted_step == 0
    assert running.engine.stats['pushes_accepted'] == 1


class _Recorder(_NoServer):
  """A stub that decodes every push it is sent (no server): what a server would add."""

  def __init__(self):
    self.decoded: list[dict[str, np.ndarray]] = []
    self.max_scale: list[float] = []  # per push, its largest block scale

  def PushGradients(self, requests, timeout=None):  # pylint: disable=invalid-name
    del timeout
    msgs = [pb.PushGradientsRequest.FromString(m if isinstance(m, bytes) else
                                               m.SerializeToString()) for m in requests]
    specs = {s.path: s for s in msgs[0].header.leaves}
    data: dict[str, bytearray] = {}
    for m in msgs[1:-1]:
      data.setdefault(m.chunk.path, bytearray()).extend(m.chunk.data)
    out = {}
    for p, s in specs.items():
      n = int(np.prod(s.shape))
      out[p] = (codecs.decode(bytes(data[p]), n, s.encoding) if s.encoding
                else np.frombuffer(bytes(data[p]), np.float32))
      if s.encoding:
        self.max_scale.append(float(_scales(np.frombuffer(bytes(data[p]), np.uint8), n).max()))
    self.decoded.append(out)
    return pb.PushGradientsResponse(accepted_step=0, applied=True, current_step=1)


def _drift(compression, error_feedback, steps=200):
  """(max |sum decoded - sum true| over the steps' pushes, one step's error bound)."""
  client = OptimizerClient('127.0.0.1:1')
  rec = _Recorder()
  client._stub = rec  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  # A small steady component under a large per-block outlier: rounded the same way every
  # step without feedback (to 0 in int4). Plus a little noise: the scales change.
  base = np.full(4096, 0.02, np.float32)
  base[::256] = 1.0
  total = np.zeros(4096, np.float64)
  for _ in range(steps):
    g = base + 0.001 * rng.standard_normal(4096).astype(np.float32)
    client.push(0, {"['w']": g}, 1, 'w0', compression=compression,
                error_feedback=error_feedback)
    total += g
  got = np.sum([d["['w']"] for d in rec.decoded], axis=0, dtype=np.float64)
  client.close()
  # One step's quantisation error: half a step of the last push's largest scale.
  return float(np.max(np.abs(got - total))), 0.5 * rec.max_scale[-1]


@pytest.mark.parametrize('compression', ['int8', 'int4'])
def test_error_feedback_keeps_the_sum_within_one_steps_error(compression):
  # With feedback the server's sum of 200 steps is the true sum but for the last
  # residual (<= half a step); without, every step's rounding adds up.
  with_ef, bound = _drift(compression, True)
  without, _ = _drift(compression, False)
  assert with_ef <= bound * 1.001, (with_ef, bound)
  assert without > 20 * bound, (without, bound)


class _ByteCounter(_NoServer):
  """A stub that counts the chunk bytes of each push it is sent (no server)."""

  def __init__(self):
    self.sent: list[int] = []

  def PushGradients(self, requests, timeout=None):  # pylint: disable=invalid-name
    del timeout
    total = 0
    for m in requests:
      msg = pb.PushGradientsRequest.FromString(m if isinstance(m, bytes) else
                                               m.SerializeToString())
      if msg.WhichOneof('kind') == 'chunk':
        total += len(msg.chunk.data)
    self.sent.append(total)
    return pb.PushGradientsResponse(accepted_step=0, applied=True, current_step=1)


def test_the_benchmarks_wire_bytes_are_what_the_client_sends():
  # bench_codecs.py's table of wire bytes per push (docs/benchmarks.md) is computed from the leaf
  # shapes; a transformer-shaped model pushed by the client sends exactly that, and the
  # ratios to float32 are the ones docs/benchmarks.md gives for the 100M model.
  sys.path.insert(0, os.path.join(ROOT, 'tests', 'benchmarks'))
  import bench_codecs  # pylint: disable=import-outside-toplevel
  shapes = bench_codecs.bs.leaf_shapes(vocab=100, max_len=16, d_model=32, layers=2)
  grads = bench_codecs.bs.random_tree(shapes, 0, 1e-3)
  want = bench_codecs.wire_bytes(shapes)
  client = OptimizerClient('127.0.0.1:1')
  counter = _ByteCounter()
  client._stub = counter  # pylint: disable=protected-access
  for name, compression in bench_codecs.COMPRESSION.items():
    client.push(0, grads, 1, 'w0', compression=compression)
    assert counter.sent[-1] == want[name], name
  client.close()
  big = bench_codecs.wire_bytes(bench_codecs.bs.leaf_shapes(**bench_codecs.bs.SIZES['100m']))
  assert round(big['f32'] / big['int8'], 2) == 3.94 and round(big['f32'] / big['int4'], 2) == 7.76


def test_error_feedback_restarts_from_zero():
  fb = ErrorFeedback()
  fb.commit({"['w']": np.ones(3, np.float32)})
  np.testing.assert_array_equal(fb.compensated("['w']", np.zeros(3)), np.ones(3))
  fb.reset()
  np.testing.assert_array_equal(fb.compensated("['w']", np.zeros(3)), np.zeros(3))
  with pytest.raises(ValueError, match='compression must be one of'):
    OptimizerClient('127.0.0.1:1').push(0, {"['w']": np.zeros(3)}, 1, 'w', compression='int2')


STEPS = 30
LAMB_FLAGS = dict(learning_rate=0.02, schedule='warmup_cosine', warmup_steps=4, decay_steps=STEPS)


def test_an_int8_worker_trains_like_a_float32_one():
  # `lamb-sharded worker --compression int8` on a real server: the Regression model
  # ends with a held-out loss within 5% of float32 LAMB's.
  server, port = start_server_process('--devices', '8', '--num-workers', '1',
                                      *flags(LAMB_FLAGS))
  try:
    (w,) = start_workers(port, {0: 64}, STEPS, extra=['--compression', 'int8'])
    out, _ = w.communicate(timeout=240)
    assert w.returncode == 0, out
    model = Regression(seed=0)
    with OptimizerClient(f'127.0.0.1:{port}') as client:
      pulled = client.pull(like=model.init(0))
    assert pulled.step == STEPS
  finally:
    server.terminate()
    server.wait(timeout=30)
  want = local_reference(STEPS, {0: 64}, LAMB_FLAGS)
  x, y = model.batch(10_000, 7, 512)  # examples no step trained on
  loss = lambda p: float(model.loss(p, x, y))  # noqa: E731
  f32, int8, init = loss(want), loss(pulled.params), loss(model.init(0))
  assert f32 < 0.8 * init  # it trained at all
  assert abs(int8 - f32) <= 0.05 * f32, (int8, f32)
  # And the pushes were quantised: float32 pushes end within 1e-5 of the reference
  # (test_e2e.py); these are further off.
  dev = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
            for a, b in zip(jax.tree.leaves(pulled.params), jax.tree.leaves(want)))
  print(f'int8 loss {int8:.5f}, float32 {f32:.5f}, initial {init:.5f}; params off by {dev:.2e}')
  assert dev > 1e-4, dev
