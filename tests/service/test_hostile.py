"""Hostile requests: 92 kinds of malformed, oversized, truncated or stalled calls, and
extreme values (0, -1, int64/uint64 limits, huge Durations) of every numeric field.

One table; every row is a request a broken or malicious client could send,
the gRPC status code it must get and a pattern its message must match. For
every row the test also checks that the model is unchanged (pulled params
bit-identical, same step), that the push left no slot or bytes in flight, and
that the server then still applies a well-formed step of two workers.

Raw rows bypass the generated stubs (bytes in, identity serializer) to send
what no well-behaved client can: bytes that are not protobuf, messages of the
wrong type, empty messages.
"""

from __future__ import annotations

import re
import threading

import grpc
import numpy as np
import pytest

from service.protocol import codecs
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.protocol.checksum import MASK64, chunk_checksum
from svc import params_of, push_messages, running_server, spec, stub, until

SERVICE = '/lamb_sharded.v1.OptimizerService/'
PARAMS = {"['w']": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,
          "['b']": np.ones(5, np.float32)}
SPECS = [spec("['w']", (3, 4)), spec("['b']", (5,))]
IDLE_S = 1.0  # the hostile server's stream_idle_timeout_s


def _grads(scale=1.0):
  return [(k, np.full(v.shape, scale, np.float32)) for k, v in PARAMS.items()]


@pytest.fixture(scope='module')
def srv():
  with running_server(devices=2, num_workers=2, max_inflight_pushes=2, admission_timeout_s=0.5,
                      stream_idle_timeout_s=IDLE_S,
                      allowed_workers='w0, ok-a, ok-b') as (running, client):
    client.initialize(PARAMS)
    _good_step(running, client)  # start at step 1, so that a stale step exists
    yield running, client


def _good_step(running, client):
  step, _ = params_of(client)
  for w in ('ok-a', 'ok-b'):
    r = stub(running.port).PushGradients(iter(push_messages(
        leaves=_grads(), worker_id=w, step=step)), timeout=10)
  assert r.applied and r.current_step == step + 1


# ----------------------------------------------------------------------------- request makers
# Each takes (running, step) and returns (status code, details) of the call.

def _outcome(fn):
  try:
    fn()
  except grpc.RpcError as e:
    return e.code(), e.details()
  return grpc.StatusCode.OK, ''


def _raw_push(messages):
  """A push of raw bytes: a list, or a function of the step returning one."""
  def run(running, step):
    data = messages(step) if callable(messages) else messages
    with grpc.insecure_channel(f'127.0.0.1:{running.port}') as channel:
      call = channel.stream_unary(SERVICE + 'PushGradients',
                                  response_deserializer=pb.PushGradientsResponse.FromString)
      return _outcome(lambda: call(iter(data), timeout=10))
  return run


def _raw_unary(method: str, data: bytes):
  def run(running, step):
    del step
    with grpc.insecure_channel(f'127.0.0.1:{running.port}') as channel:
      return _outcome(lambda: channel.unary_unary(SERVICE + method)(data, timeout=10))
  return run


def _push(**kwargs):
  """A push built by svc.push_messages(**kwargs) for the current step (unless given)."""
  def run(running, step):
    msgs = push_messages(**{'leaves': _grads(), 'worker_id': 'w0', 'step': step, **kwargs})
    return _outcome(lambda: stub(running.port).PushGradients(iter(msgs), timeout=10))
  return run


def _push_messages(build):
  """A push of the messages build(step) returns."""
  def run(running, step):
    msgs = build(step)
    return _outcome(lambda: stub(running.port).PushGradients(iter(msgs), timeout=10))
  return run


def _header(step, **kw):
  return pb.PushGradientsRequest(header=pb.PushGradientsHeader(
      **{'worker_id': 'w0', 'step': step, 'num_examples': 1, 'leaves': SPECS, **kw}))


def _chunk(path, data, offset=0, sequence=0):
  return pb.PushGradientsRequest(chunk=tensor_pb2.TensorChunk(
      path=path, offset=offset, data=data, sequence=sequence))


def _commit_of(chunks):
  checksum, total = 0, 0
  for c in chunks:
    checksum = (checksum + chunk_checksum(c.chunk.data)) & MASK64
    total += len(c.chunk.data)
  return pb.PushGradientsRequest(commit=tensor_pb2.StreamCommit(
      chunk_count=len(chunks), total_bytes=total, checksum=checksum))


def _oversized_message(step):
  chunks = [_chunk("['w']", bytes(5 << 20))]
  return [_header(step)] + chunks + [_commit_of(chunks)]


def _past_the_end(step):
  chunks = [_chunk("['w']", np.ones(16, np.float32).tobytes())]
  return [_header(step)] + chunks + [_commit_of(chunks)]


def _second_header(step):
  msgs = push_messages(leaves=_grads(), worker_id='w0', step=step)
  return msgs[:1] + msgs[:1] + msgs[1:]


def _wrong_counts(step):
  msgs = push_messages(leaves=_grads(), worker_id='w0', step=step)
  msgs[-1].commit.chunk_count += 1
  return msgs


def _checksum(step):
  msgs = push_messages(leaves=_grads(), worker_id='w0', step=step)
  msgs[-1].commit.checksum ^= 1
  return msgs


def _header_with_unknown_field_type(step):
  # PushGradientsRequest.header (field 1) holding worker_id (field 1, a string) sent as a
  # varint: parsers keep it as an unknown field, so the header has no worker id.
  del step
  return [b'\x0a\x02\x08\x05']


def _partial_push_then(action):
  """Sends the header and one chunk, then `action(call, running)` cancels or stalls."""
  def run(running, step):
    msgs = push_messages(leaves=_grads(), worker_id='w0', step=step, chunk_bytes=8)
    gate = threading.Event()

    def requests():
      yield from msgs[:2]
      gate.wait(IDLE_S * 5)

    call = stub(running.port).PushGradients.future(requests(), timeout=30)
    try:
      until(lambda: running.engine.pushes_in_flight == 1)
      action(call)
      until(call.done)
      return call.code(), call.details() or ''
    finally:
      gate.set()
  return run


def _cancel(call):
  call.cancel()


def _stall(call):
  del call  # the server cuts it off by itself


def _pull(**kwargs):
  def run(running, step):
    del step
    return _outcome(lambda: list(stub(running.port).PullParameters(
        pb.PullParametersRequest(**kwargs), timeout=10)))
  return run


def _unary(method, request, metadata=None):
  def run(running, step):
    del step
    return _outcome(lambda: getattr(stub(running.port), method)(request, timeout=10,
                                                               metadata=metadata))
  return run


def _pull_header(**kwargs):
  """A pull; its outcome's details describe what came: the header and the chunks' count."""
  def run(running, step):
    del step
    def call():
      msgs = list(stub(running.port).PullParameters(pb.PullParametersRequest(**kwargs),
                                                    timeout=10))
      h = msgs[0].header
      return (f'step={h.step} not_modified={h.not_modified} '
              f'chunks={sum(m.WhichOneof("kind") == "chunk" for m in msgs)}')
    return _answer(call)
  return run


def _pull_if_current(newer_than):
  """A pull with if_model_id the server's and if_newer_than_step `newer_than`."""
  def run(running, step):
    return _pull_header(if_newer_than_step=newer_than,
                        if_model_id=running.engine.describe().model_id)(running, step)
  return run


def _wait(step_of, seconds=None, nanos=0):
  """WaitForStep(step_of(step), timeout=Duration(seconds, nanos)); details: what it said."""
  def run(running, step):
    request = pb.WaitForStepRequest(step=step_of(step))
    if seconds is not None:
      request.timeout.seconds, request.timeout.nanos = seconds, nanos
    return _answer(lambda: (lambda r: f'reached={r.reached} current_step={r.current_step}')(
        stub(running.port).WaitForStep(request, timeout=10)))
  return run


def _answer(fn):
  """Like _outcome, but an answer's details are what fn() returns."""
  try:
    return grpc.StatusCode.OK, fn()
  except grpc.RpcError as e:
    return e.code(), e.details()


def _commit_field(**fields):
  """A well-formed push whose commit has `fields` set to other values."""
  def build(step):
    msgs = push_messages(leaves=_grads(), worker_id='w0', step=step)
    for k, v in fields.items():
      setattr(msgs[-1].commit, k, v)
    return msgs
  return _push_messages(build)


def _initialize_again(running, step):
  del step
  msgs = [pb.InitializeModelRequest(header=pb.InitializeModelHeader(leaves=SPECS))]
  return _outcome(lambda: stub(running.port).InitializeModel(iter(msgs), timeout=10))


def _encoded(encoding, mutate=None, leaf=0, dtype=tensor_pb2.DTYPE_FLOAT32):
  """A push whose leaf number `leaf` is block-encoded, its bytes (uint8) mutated in place."""
  def build(step):
    leaves, specs = _grads(0.5), list(SPECS)
    path, x = leaves[leaf]
    data = codecs.encode(x, encoding if encoding in codecs.QMAX else codecs.INT8)
    data = mutate(data) if mutate is not None else data
    leaves[leaf] = (path, data)
    specs[leaf] = tensor_pb2.TensorSpec(path=path, shape=list(x.shape), dtype=dtype,
                                        encoding=encoding)
    return push_messages(leaves=leaves, specs=specs, worker_id='w0', step=step)
  return _push_messages(build)


def _scale(value):
  def mutate(data):
    data[:4].view('<f4')[0] = value
    return data
  return mutate


def _byte(i, value):
  def mutate(data):
    data[i] = value
    return data
  return mutate


def _mutated(fn):
  return dict(chunk_bytes=16, mutate=fn)


def _set(chunks, i, **fields):
  for k, v in fields.items():
    setattr(chunks[i], k, v)
  return chunks


BIG = 'x' * 10_000
I64_MAX, I64_MIN, U64_MAX = 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1
DURATION_MAX_S = 315_576_000_000  # google.protobuf.Duration: +-10,000 years
# Extreme values of every numeric and Duration field of every request (there are no
# float fields in requests; NaN and Inf come in tensor data, see 'NaN in a gradient').
EXTREMES = {
    # PushGradientsHeader.step, .num_examples
    'step: int64 max': (_push(step=I64_MAX), 'FAILED_PRECONDITION',
                        rf'header.step {I64_MAX} is ahead of the server'),
    'step: int64 min': (_push(step=I64_MIN), 'INVALID_ARGUMENT',
                        rf'header.step must be >= 0, got {I64_MIN}'),
    'num_examples: int64 min': (
        _push(num_examples=I64_MIN), 'INVALID_ARGUMENT',
        rf'header.num_examples must be in \[1, 2147483647\], got {I64_MIN}'),
    # TensorSpec.shape, .dtype
    'shape: a dimension of int64 max': (_push(specs=[spec("['w']", (I64_MAX,)), SPECS[1]]),
                                        'INVALID_ARGUMENT', rf'shape \[{I64_MAX}\], over 1 TiB'),
    'shape: a dimension of int64 min': (_push(specs=[spec("['w']", (I64_MIN, 4)), SPECS[1]]),
                                        'INVALID_ARGUMENT', r'has a negative dimension'),
    'shape: a dimension of 0': (_push(specs=[spec("['w']", (0, 4)), SPECS[1]]),
                                'INVALID_ARGUMENT', r'has shape \[0, 4\], expected \[3, 4\]'),
    'dtype: -1': (_push(specs=[spec("['w']", (3, 4), -1), SPECS[1]]), 'INVALID_ARGUMENT',
                  r'unsupported dtype -1'),
    # TensorChunk.offset, .sequence
    'offset: -1': (_push(**_mutated(lambda c: _set(c, 0, offset=-1))), 'INVALID_ARGUMENT',
                   r'has offset -1, expected 0'),
    'offset: int64 max': (_push(**_mutated(lambda c: _set(c, 0, offset=I64_MAX))),
                          'INVALID_ARGUMENT', rf'has offset {I64_MAX}, expected 0'),
    'offset: int64 min': (_push(**_mutated(lambda c: _set(c, 0, offset=I64_MIN))),
                          'INVALID_ARGUMENT', rf'has offset {I64_MIN}, expected 0'),
    'sequence: -1': (_push(**_mutated(lambda c: _set(c, 0, sequence=-1))), 'INVALID_ARGUMENT',
                     r'has sequence -1, expected 0'),
    'sequence: int64 max': (_push(**_mutated(lambda c: _set(c, 0, sequence=I64_MAX))),
                            'INVALID_ARGUMENT', rf'has sequence {I64_MAX}, expected 0'),
    'sequence: int64 min': (_push(**_mutated(lambda c: _set(c, 0, sequence=I64_MIN))),
                            'INVALID_ARGUMENT', rf'has sequence {I64_MIN}, expected 0'),
    # StreamCommit.chunk_count, .total_bytes, .checksum
    'chunk_count: -1': (_commit_field(chunk_count=-1), 'INVALID_ARGUMENT',
                        r'commit says -1 chunks'),
    'chunk_count: int64 max': (_commit_field(chunk_count=I64_MAX), 'INVALID_ARGUMENT',
                               rf'commit says {I64_MAX} chunks'),
    'chunk_count: int64 min': (_commit_field(chunk_count=I64_MIN), 'INVALID_ARGUMENT',
                               rf'commit says {I64_MIN} chunks'),
    'total_bytes: -1': (_commit_field(total_bytes=-1), 'INVALID_ARGUMENT',
                        r'commit says \d+ chunks and -1 bytes'),
    'total_bytes: int64 max': (_commit_field(total_bytes=I64_MAX), 'INVALID_ARGUMENT',
                               rf'and {I64_MAX} bytes'),
    'total_bytes: int64 min': (_commit_field(total_bytes=I64_MIN), 'INVALID_ARGUMENT',
                               rf'and {I64_MIN} bytes'),
    'checksum: uint64 max': (_commit_field(checksum=U64_MAX), 'DATA_LOSS',
                             r'commit says 0xffffffffffffffff'),
    'checksum: 0': (_commit_field(checksum=0), 'DATA_LOSS', r'commit says 0x0000000000000000'),
    'Inf in a gradient': (_push(leaves=[_grads()[0], ("['b']", np.full(5, np.inf, np.float32))]),
                          'INVALID_ARGUMENT', r"leaf \['b'\] of worker w0.*NaN or Inf"),
    # PullParametersRequest.if_newer_than_step, .max_chunk_bytes, .dtype: sent, or not
    # modified, never refused (chunk sizes are clamped to [4 KiB, 3 MiB]).
    'pull: if_newer_than_step int64 max': (_pull_if_current(I64_MAX), 'OK',
                                           r'not_modified=True chunks=0'),
    'pull: if_newer_than_step int64 min': (_pull_if_current(I64_MIN), 'OK',
                                           r'not_modified=False chunks=2'),
    'pull: max_chunk_bytes -1': (_pull_header(max_chunk_bytes=-1), 'OK',
                                 r'not_modified=False chunks=2'),
    'pull: max_chunk_bytes int64 max': (_pull_header(max_chunk_bytes=I64_MAX), 'OK',
                                        r'not_modified=False chunks=2'),
    'pull: max_chunk_bytes int64 min': (_pull_header(max_chunk_bytes=I64_MIN), 'OK',
                                        r'not_modified=False chunks=2'),
    'pull: dtype -1': (_pull(dtype=-1), 'INVALID_ARGUMENT', r'request.dtype: unsupported dtype -1'),
    # WaitForStepRequest.step, .timeout (a Duration)
    'wait: step int64 max, 1 ms': (_wait(lambda s: I64_MAX, 0, 1_000_000), 'OK',
                                   r'reached=False current_step=\d+'),
    'wait: step int64 min': (_wait(lambda s: I64_MIN), 'INVALID_ARGUMENT',
                             rf'step must be >= 0, got {I64_MIN}'),
    'wait: timeout of -1 s': (_wait(lambda s: s + 1, -1), 'INVALID_ARGUMENT',
                              r'timeout must be a Duration >= 0 .* got seconds=-1 nanos=0'),
    'wait: timeout of int64 max s': (_wait(lambda s: s + 1, I64_MAX), 'INVALID_ARGUMENT',
                                     rf'got seconds={I64_MAX}'),
    'wait: timeout of int64 min s': (_wait(lambda s: s + 1, I64_MIN), 'INVALID_ARGUMENT',
                                     rf'got seconds={I64_MIN}'),
    'wait: timeout nanos -1': (_wait(lambda s: s + 1, 0, -1), 'INVALID_ARGUMENT',
                               r'got seconds=0 nanos=-1'),
    'wait: timeout nanos int32 max': (_wait(lambda s: s + 1, 0, 2 ** 31 - 1), 'INVALID_ARGUMENT',
                                      rf'nanos={2 ** 31 - 1}'),
    'wait: the longest timeout, step reached': (_wait(lambda s: s, DURATION_MAX_S, 999_999_999),
                                                'OK', r'reached=True'),
}
CASES = {
    # Not protobuf, wrong types, wrong shapes of stream.
    'random bytes': (_raw_push([b'\x07' + bytes(range(200))]), 'INVALID_ARGUMENT',
                     r'message 1: a message of 201 bytes that does not parse as '
                     r'PushGradientsRequest'),
    'random bytes after the header': (
        _raw_push(lambda step: [_header(step).SerializeToString(), b'\xff' * 32]),
        'INVALID_ARGUMENT',
        r'message 2: .* does not parse'),
    'an empty message': (_raw_push([b'']), 'INVALID_ARGUMENT',
                         r'first message must be a header, got an empty message'),
    'a message of another type': (
        _raw_push([pb.PullParametersRequest(if_newer_than_step=3,
                                            max_chunk_bytes=5).SerializeToString()]),
        'INVALID_ARGUMENT', r'first message must be a header|does not parse'),
    'a field of the wrong wire type': (_raw_push(_header_with_unknown_field_type),
                                       'INVALID_ARGUMENT', r'header.worker_id is empty'),
    'an empty stream': (_raw_push([]), 'INVALID_ARGUMENT', r'empty stream'),
    'a header only': (_push_messages(lambda step: [_header(step)]), 'INVALID_ARGUMENT',
                      r'ended without a commit'),
    'a second header': (_push_messages(_second_header), 'INVALID_ARGUMENT',
                        r'unexpected message kind header'),
    'a message after the commit': (
        _push_messages(lambda step: (lambda m: m + m[1:2])(
            push_messages(leaves=_grads(), worker_id='w0', step=step))),
        'INVALID_ARGUMENT', r'after the commit'),
    # Sizes.
    'a leaf declared over 1 TiB': (
        _push(specs=[spec("['w']", (2 ** 40,)), SPECS[1]]), 'INVALID_ARGUMENT',
        r"leaf \['w'\] declares shape \[1099511627776\], over 1 TiB"),
    'dimensions whose product overflows': (
        _push(specs=[spec("['w']", (2 ** 62, 2 ** 62)), SPECS[1]]), 'INVALID_ARGUMENT',
        r'over 1 TiB'),
    'a negative dimension': (_push(specs=[spec("['w']", (-3, 4)), SPECS[1]]),
                             'INVALID_ARGUMENT', r"leaf \['w'\] has a negative dimension"),
    'a message over 4 MiB': (_push_messages(_oversized_message), 'RESOURCE_EXHAUSTED',
                             r'larger than max'),
    'a chunk past the end of its leaf': (_push_messages(_past_the_end), 'INVALID_ARGUMENT',
                                         r"leaf \['w'\] .* has 48 bytes, but chunk 0 ends at "
                                         r'byte 64'),
    'oversized metadata': (_unary('DescribeModel', pb.DescribeModelRequest(),
                                  metadata=[('x-junk', 'x' * 100_000)]),
                           'RESOURCE_EXHAUSTED', r'metadata size exceeds'),
    # Chunks.
    'a chunk offset far away': (_push(**_mutated(lambda c: _set(c, 1, offset=2 ** 40))),
                                'INVALID_ARGUMENT', r'has offset 1099511627776, expected 16'),
    'a duplicated chunk': (_push(**_mutated(lambda c: c[:2] + c[1:])), 'INVALID_ARGUMENT',
                           r'sequence 1, expected 2 \(duplicated\)'),
    'chunks out of order': (_push(**_mutated(lambda c: [c[0], c[2], c[1]] + c[3:])),
                            'INVALID_ARGUMENT', r'sequence 2, expected 1 \(out of order\)'),
    'a chunk of a leaf not in the header': (
        _push(**_mutated(lambda c: _set(c, 0, path="['zzz']"))), 'INVALID_ARGUMENT',
        r"leaf \['zzz'\] \(not a leaf of the header\)"),
    'an empty chunk': (_push(**_mutated(lambda c: _set(c, 0, data=b''))), 'INVALID_ARGUMENT',
                       r'chunk 0 of leaf .* is empty'),
    'a checksum mismatch': (_push_messages(_checksum), 'DATA_LOSS', r'checksum mismatch'),
    'a commit with wrong counts': (_push_messages(_wrong_counts), 'INVALID_ARGUMENT',
                                   r'commit says \d+ chunks'),
    # Header fields.
    'a negative step': (_push(step=-5), 'INVALID_ARGUMENT', r'header.step must be >= 0'),
    'a step from the future': (_push(step=10 ** 9), 'FAILED_PRECONDITION',
                               r'step 1000000000 is ahead'),
    'a stale step': (lambda running, step: _push(step=step - 1)(running, step), 'ABORTED',
                     r'was already applied'),
    'zero examples': (_push(num_examples=0), 'INVALID_ARGUMENT', r'header.num_examples'),
    'negative examples': (_push(num_examples=-7), 'INVALID_ARGUMENT', r'header.num_examples'),
    'an unknown worker id': (_push(worker_id='intruder'), 'PERMISSION_DENIED',
                             r'worker intruder is not one of the allowed workers'),
    'a worker id with a newline': (_push(worker_id='w0\nFAKE LOG LINE'), 'INVALID_ARGUMENT',
                                   r'header.worker_id .* is not a valid worker id'),
    'a worker id of 10 kB': (_push(worker_id=BIG), 'INVALID_ARGUMENT',
                             r'is not a valid worker id'),
    'a push id of 10 kB': (_push(push_id=BIG), 'INVALID_ARGUMENT', r'header.push_id has 10000'),
    'a leaf twice in the header': (_push(specs=[SPECS[0], SPECS[0], SPECS[1]]),
                                   'INVALID_ARGUMENT', r"leaf \['w'\] appears twice"),
    'an unknown dtype': (_push(specs=[spec("['w']", (3, 4), 99), SPECS[1]]),
                         'INVALID_ARGUMENT', r"leaf \['w'\]: unsupported dtype 99"),
    'NaN in a gradient': (_push(leaves=[("['w']", np.full((3, 4), np.nan, np.float32)),
                                        _grads()[1]]),
                          'INVALID_ARGUMENT', r"leaf \['w'\] of worker w0.*NaN or Inf"),
    'a wrong model id': (_push(model_id='0' * 32), 'FAILED_PRECONDITION',
                         r'model_id 0{32} is not the server'),
    # Identifiers are bounded and printable: none is echoed whole into the details or a log.
    'a model id of 1 MiB': (_push(model_id='m' * (1 << 20)), 'INVALID_ARGUMENT',
                            r"^header.model_id has 1048576 characters, over 64: 'm{40}'\.\.\. "
                            r'\(1048576 characters\)$'),
    'a push id with a newline': (_push(push_id='p1\nFAKE LOG LINE'), 'INVALID_ARGUMENT',
                                 r"header.push_id 'p1\\nFAKE LOG LINE' is not printable ASCII"),
    'a leaf path with a newline': (
        _push(specs=[spec("['w']\nFAKE LOG LINE", (3, 4)), SPECS[1]]), 'INVALID_ARGUMENT',
        r'leaf path .*FAKE LOG LINE. has a character that is not printable'),
    'a leaf path of 1 MiB': (_push(specs=[spec('x' * (1 << 20), (3, 4)), SPECS[1]]),
                             'INVALID_ARGUMENT', r'a leaf path has 1048576 characters, over 1024'),
    'pull: a model id of 10 kB': (_pull(if_model_id=BIG, if_newer_than_step=0),
                                  'INVALID_ARGUMENT', r'request.if_model_id has 10000 characters'),
    # Block-encoded leaves (int8/int4): bad scales, codes and byte counts.
    'int8: a NaN scale': (_encoded(codecs.INT8, _scale(np.nan)), 'INVALID_ARGUMENT',
                          r"leaf \['w'\]: block 0 of 1 has scale nan \(int8 block scales must "
                          r'be finite, >= 0'),
    'int4: a negative scale': (_encoded(codecs.INT4, _scale(-0.5)), 'INVALID_ARGUMENT',
                               r"leaf \['w'\]: block 0 of 1 has scale -0.5"),
    'int8: an infinite scale': (_encoded(codecs.INT8, _scale(np.inf)), 'INVALID_ARGUMENT',
                                r"leaf \['w'\]: block 0 of 1 has scale inf"),
    'int8: a scale whose values overflow': (
        _encoded(codecs.INT8, _scale(3e38)), 'INVALID_ARGUMENT',
        r"leaf \['w'\]: block 0 of 1 has scale 3\.0\d*e\+38 \(int8 block scales must be finite, "
        r">= 0 and <= 2.67939e\+36, float32's max / 127\)"),
    'int8: code -128': (_encoded(codecs.INT8, _byte(4 + 5, 0x80)), 'INVALID_ARGUMENT',
                        r"leaf \['w'\]: element 5 has code -128, outside \[-127, 127\]"),
    'int4: code -8': (_encoded(codecs.INT4, _byte(4 + 2, 0x08)), 'INVALID_ARGUMENT',
                      r"leaf \['w'\]: element 4 has code -8, outside \[-7, 7\]"),
    'int4: a nonzero padding nibble': (
        _encoded(codecs.INT4, _byte(4 + 2, 0x70), leaf=1), 'INVALID_ARGUMENT',
        r"leaf \['b'\]: the padding nibble after the last of its 5 elements is 7"),
    'int8: a byte too many': (_encoded(codecs.INT8, lambda d: np.append(d, np.uint8(1))),
                              'INVALID_ARGUMENT',
                              r"leaf \['w'\] \(float32\[3, 4\] in int8 blocks\) has 16 bytes, "
                              r'but chunk 0 ends at byte 17'),
    'int4: truncated codes': (_encoded(codecs.INT4, lambda d: d[:-1], leaf=1),
                              'INVALID_ARGUMENT',
                              r"leaf \['b'\] is incomplete: got 6 of 7 bytes before the commit"),
    'int8: only the scales': (_encoded(codecs.INT8, lambda d: d[:4], leaf=1),
                              'INVALID_ARGUMENT',
                              r"leaf \['b'\] is incomplete: got 4 of 9 bytes"),
    'int8: an encoded leaf of dtype bfloat16': (
        _encoded(codecs.INT8, dtype=tensor_pb2.DTYPE_BFLOAT16), 'INVALID_ARGUMENT',
        r"leaf \['w'\] is in int8 blocks with dtype bfloat16; encoded leaves decode to "
        r'DTYPE_FLOAT32'),
    'an unknown encoding': (_encoded(7), 'INVALID_ARGUMENT',
                            r"leaf \['w'\]: unsupported encoding 7"),
    # Truncated and stalled streams.
    'a push cancelled half-way': (_partial_push_then(_cancel), 'CANCELLED', r''),
    'a push stalled half-way': (_partial_push_then(_stall), 'DEADLINE_EXCEEDED',
                                r'push of worker w0 for step \d+: no message for 1s '
                                r'\(stream_idle_timeout_s\); cut off, its data discarded'),
    # Other RPCs.
    'pull: random bytes': (_raw_unary('PullParameters', b'\x07abc'), 'INVALID_ARGUMENT',
                           r'does not parse as PullParametersRequest'),
    'pull: an unknown dtype': (_pull(dtype=42), 'INVALID_ARGUMENT',
                               r'request.dtype: unsupported dtype 42'),
    'describe: random bytes': (_raw_unary('DescribeModel', b'\xff\xff'), 'INVALID_ARGUMENT',
                               r'does not parse as DescribeModelRequest'),
    'wait: a negative step': (_unary('WaitForStep', pb.WaitForStepRequest(step=-1)),
                              'INVALID_ARGUMENT', r'step must be >= 0'),
    'wait: in another model': (_unary('WaitForStep', pb.WaitForStepRequest(
        step=10**6, model_id='f' * 32)), 'FAILED_PRECONDITION',
        r"model_id f{32} is not the server's model [0-9a-f]{32}: pull the parameters again"),
    'initialise again': (_initialize_again, 'ALREADY_EXISTS', r'already initialised'),
    'an unknown method': (_raw_unary('DropAllTables', b''), 'UNIMPLEMENTED', r''),
    'save without a checkpoint dir': (_unary('SaveCheckpoint', pb.SaveCheckpointRequest()),
                                      'FAILED_PRECONDITION', r'no --checkpoint-dir'),
    **EXTREMES,
}


def test_every_case_says_what_message_it_expects():
  # An empty pattern accepts any message: only a stream the client itself cancelled and a
  # method the server does not have carry no message of the service's to check.
  vague = [name for name, (_, code, pattern) in CASES.items()
           if not pattern and code not in ('CANCELLED', 'UNIMPLEMENTED')]
  assert not vague, vague


@pytest.mark.parametrize('name', list(CASES))
def test_hostile_request(srv, name):
  running, client = srv
  make, code, pattern = CASES[name]
  before_step, before = params_of(client)
  got_code, details = make(running, before_step)
  assert got_code == getattr(grpc.StatusCode, code), (got_code, details)
  assert re.search(pattern, details), details
  # Nothing changed, nothing is left in flight.
  until(lambda: running.engine.pushes_in_flight == 0 and running.engine.inflight_bytes == 0)
  after_step, after = params_of(client)
  assert after_step == before_step
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])
  # And the server still applies a well-formed step.
  _good_step(running, client)


def test_num_examples_of_int64_max_does_not_poison_the_model():
  # The step's sum scales each push by its num_examples in float32: int64 max times a
  # finite gradient is Inf, and the step turns every parameter into NaN.
  with running_server(devices=1, num_workers=1) as (running, client):
    client.initialize(PARAMS)
    got_code, details = _push(num_examples=I64_MAX)(running, 0)
    _, after = params_of(client)
  assert all(np.isfinite(v).all() for v in after.values()), after
  assert got_code == grpc.StatusCode.INVALID_ARGUMENT, (got_code, details)
  assert 'header.num_examples' in details


def test_an_initialisation_with_a_bad_leaf_path_or_init_id_creates_nothing():
  """InitializeModel checks the leaf paths and the init id as pushes do: a newline in a
  path, an init id of 10 kB -- INVALID_ARGUMENT naming the field, and no model."""
  with running_server(devices=1) as (running, _):
    for header, pattern in (
        (pb.InitializeModelHeader(leaves=[spec("['w']\nFAKE LOG LINE", (3, 4))]),
         r'leaf path .* has a character that is not printable'),
        (pb.InitializeModelHeader(leaves=SPECS, init_id=BIG),
         r'header.init_id has 10000 characters, over 128')):
      msgs = [pb.InitializeModelRequest(header=header)]
      code, details = _outcome(lambda: stub(running.port).InitializeModel(iter(msgs), timeout=10))
      assert code == grpc.StatusCode.INVALID_ARGUMENT and re.search(pattern, details), details
      assert len(details) < 300
    assert not running.engine.describe().initialized


def test_one_initialisation_at_a_time_the_others_already_exists_at_once():
  """Four InitializeModel streams at once (the base deployment's --init workers): the
  first is received, the others get ALREADY_EXISTS at once -- before their streams
  end, so before any of their model is allocated -- and the first creates the model."""
  params = {"['w']": np.arange(12, dtype=np.float32).reshape(3, 4),
            "['b']": np.ones(5, np.float32)}
  msgs = push_messages(list(params.items()), chunk_bytes=16)
  header = pb.InitializeModelRequest(header=pb.InitializeModelHeader(
      leaves=[spec(p, a.shape) for p, a in params.items()], init_id='first'))
  body = [pb.InitializeModelRequest(chunk=m.chunk) for m in msgs[1:-1]]
  commit = pb.InitializeModelRequest(commit=msgs[-1].commit)
  gates = [threading.Event() for _ in range(4)]

  def stream(gate):
    yield header
    yield body[0]
    gate.wait(30)  # held open half-way
    yield from body[1:]
    yield commit
  with running_server(devices=1) as (running, client):
    first = stub(running.port).InitializeModel.future(stream(gates[0]), timeout=60)
    until(lambda: running.engine._init_claim is not None)  # pylint: disable=protected-access
    others = [stub(running.port).InitializeModel.future(stream(g), timeout=60)
              for g in gates[1:]]
    try:
      for call in others:
        until(call.done, timeout=10)  # their streams are still held open
        assert call.code() == grpc.StatusCode.ALREADY_EXISTS, call.details()
        assert 'another InitializeModel is being received' in call.details()
    finally:
      for g in gates:
        g.set()
    assert first.result().step == 0
    step, got = params_of(client)
  assert step == 0
  for k, v in params.items():
    np.testing.assert_array_equal(got[k], v)


def _slowly(fn, opened: threading.Event, delay_s: float):
  """`fn`, whose result comes `delay_s` after it is made (`opened` set then): a window in
  which the client's cancel reaches the RPC while the pool still holds what it opened."""
  def slow(*args):
    result = fn(*args)
    opened.set()
    threading.Event().wait(delay_s)
    return result
  return slow


def test_a_push_cancelled_while_it_is_admitted_frees_its_slot(monkeypatch):
  with running_server(devices=1, num_workers=2) as (running, client):
    client.initialize({'w': np.zeros(64, np.float32)})
    opened = threading.Event()
    monkeypatch.setattr(running.engine, 'open_push',
                        _slowly(running.engine.open_push, opened, 1.0))
    msgs = push_messages(leaves=[("['w']", np.ones(64, np.float32))], worker_id='w0',
                         chunk_bytes=8)
    call = stub(running.port).PushGradients.future(iter(msgs), timeout=30)
    assert opened.wait(10) and running.engine.pushes_in_flight == 1
    call.cancel()  # while the session is still on its way to the RPC
    until(lambda: running.engine.pushes_in_flight == 0, timeout=10)
    assert running.engine.inflight_bytes == 0


def test_an_initialisation_cancelled_while_it_is_admitted_lets_another_one_in(monkeypatch):
  with running_server(devices=1) as (running, client):
    opened = threading.Event()
    open_init = running.engine.open_init
    monkeypatch.setattr(running.engine, 'open_init', _slowly(open_init, opened, 1.0))
    msgs = [pb.InitializeModelRequest(header=pb.InitializeModelHeader(
        leaves=[spec("['w']", (64,))], init_id='first'))]
    call = stub(running.port).InitializeModel.future(iter(msgs), timeout=30)
    assert opened.wait(10)
    call.cancel()
    monkeypatch.setattr(running.engine, 'open_init', open_init)
    until(lambda: running.engine._init_claim is None, timeout=10)  # pylint: disable=protected-access
    client.initialize({'w': np.zeros(64, np.float32)})  # not "another is being received"
    assert client.describe().initialized
