"""The stream checksum (StreamCommit.checksum): the wrapping 64-bit sum of each chunk's words."""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest

from service.protocol import chunks as wire
from service.protocol.specs import LeafSpec
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.errors import DataLoss
from service.protocol.checksum import MASK64, chunk_checksum
from svc import params_of, push_messages, running_server, stub

MiB = 1 << 20


def _reference(data: bytes) -> int:
  """StreamCommit.checksum of one chunk, word by word in plain Python."""
  data = bytes(data) + bytes(-len(data) % 8)
  return sum(int.from_bytes(data[i:i + 8], 'little') for i in range(0, len(data), 8)) % 2 ** 64


def _random(n: int, seed: int = 0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize('n', [0, 1, 7, 8, 9, 15, 16, 17, 4096, MiB + 3])
def test_equals_the_reference(n):
  data = _random(n, seed=n)
  assert chunk_checksum(data) == _reference(data)


def test_fixed_values():
  assert chunk_checksum(b'') == 0
  assert chunk_checksum(b'\x01') == 1
  assert chunk_checksum(b'\x00' * 7 + b'\x01') == 1 << 56  # little endian
  assert chunk_checksum(b'\x01\x02\x03') == 0x030201  # the partial word, zero-padded at its end
  assert chunk_checksum(b'\x05' + b'\x00' * 7 + b'\x07') == 12  # a second word, partial


def test_any_buffer_and_any_alignment():
  data = _random(3 * 4096 + 11, seed=1)
  raw = memoryview(data)
  for start in range(9):  # views that start off any 8-byte boundary
    piece = raw[start:start + 4096 + start]
    assert chunk_checksum(piece) == _reference(piece), start
  array = np.frombuffer(data[:4096], np.float32).reshape(32, 32)
  assert chunk_checksum(array) == _reference(data[:4096])
  assert chunk_checksum(bytearray(data)) == _reference(data)


def test_wraps_modulo_2_64():
  for n in (8, 16, 8 * 1001, MiB, MiB + 5):
    data = b'\xff' * n
    words, tail = divmod(n, 8)
    expected = (words * MASK64 + (256 ** tail - 1)) % 2 ** 64
    assert chunk_checksum(data) == expected == _reference(data), n
    assert 0 <= chunk_checksum(data) <= MASK64


def test_every_single_bit_flip_changes_it():
  data = bytearray(_random(203, seed=2))  # 25 words and a partial one
  good = chunk_checksum(data)
  for bit in range(len(data) * 8):
    data[bit // 8] ^= 1 << (bit % 8)
    assert chunk_checksum(data) != good, bit
    data[bit // 8] ^= 1 << (bit % 8)
  assert chunk_checksum(data) == good


def test_bit_flips_in_a_full_chunk_change_it():
  data = bytearray(_random(MiB, seed=3))
  good = chunk_checksum(data)
  rng = np.random.default_rng(4)
  for bit in [0, 7, 63, 64, len(data) * 8 - 1, *rng.integers(0, len(data) * 8, 200).tolist()]:
    data[bit // 8] ^= 1 << (bit % 8)
    assert chunk_checksum(data) != good, bit
    data[bit // 8] ^= 1 << (bit % 8)


def test_does_not_copy_the_data():
  data = _random(8 * MiB + 5, seed=5)
  for start, most in ((0, 16 * 1024), (3, 256 * 1024)):
    # Unaligned, as a received chunk's data usually is, NumPy's reduction reads the
    # words through its fixed 64 KiB ufunc buffer: still no copy of the 8 MiB.
    view = memoryview(data)[start:]
    chunk_checksum(view)
    tracemalloc.start()
    try:
      chunk_checksum(view)
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    assert peak < most, (start, peak)


def _chunks_of(arrays, chunk_bytes):
  return [item for item in wire.chunk_stream(arrays, chunk_bytes)
          if not isinstance(item, tensor_pb2.StreamCommit)]


def test_stream_commit_sums_each_chunk_padded_on_its_own():
  # Leaves of 4102 and 20 bytes in chunks of at most 4096: data of 4096, 6 and 20 bytes.
  arrays = [("['a']", np.frombuffer(_random(4102, seed=6), np.float16)),
            ("['b']", np.arange(5, dtype=np.float32))]
  items = list(wire.chunk_stream(arrays, 4096))
  commit, chunks = items[-1], items[:-1]
  assert [len(data) for _, _, data, _ in chunks] == [4096, 6, 20]
  assert commit.checksum == sum(_reference(data) for _, _, data, _ in chunks) % 2 ** 64
  # Not the checksum of the concatenation: the 6-byte chunk is padded where it ends.
  assert commit.checksum != _reference(b''.join(data for _, _, data, _ in chunks))
  # The hand-encoded messages carry the same commit.
  encoded = list(wire.encoded_chunk_messages(pb.PushGradientsRequest, arrays, 4096))
  assert pb.PushGradientsRequest.FromString(encoded[-1]).commit == commit


def _receive(arrays, chunk_bytes, mutate=lambda data: data):
  specs = [LeafSpec(p, a.shape, a.dtype) for p, a in arrays]
  receiver = wire.ChunkReceiver(specs, 'test')
  parse = wire.chunk_parser(pb.PushGradientsRequest)
  commit = None
  for raw in wire.encoded_chunk_messages(pb.PushGradientsRequest, arrays, chunk_bytes):
    msg = parse(mutate(raw))
    if msg.WhichOneof('kind') == 'chunk':
      receiver.add(msg.chunk)
    else:
      commit = msg.commit
  receiver.finish(commit)
  return receiver.sink.arrays


def test_receiver_accepts_what_the_sender_sends():
  arrays = [("['a']", np.frombuffer(_random(3 * 4096 + 6, seed=7), np.float16).copy()),
            ("['b']", np.arange(5, dtype=np.float32))]
  out = _receive(arrays, 4096)
  for (_, a), b in zip(arrays, out):
    np.testing.assert_array_equal(a, b)


def test_receiver_refuses_a_flipped_bit_with_data_loss():
  arrays = [("['a']", np.frombuffer(_random(3 * 4096 + 6, seed=8), np.float16).copy())]
  seen = []

  def flip_in_the_second_chunk(raw):
    seen.append(raw)
    if len(seen) != 2:
      return raw
    raw = bytearray(raw)
    raw[-100] ^= 0x10  # inside the data (the data field comes last)
    return bytes(raw)

  with pytest.raises(DataLoss, match=r'test: checksum mismatch: commit says 0x[0-9a-f]{16}, '
                                     r'received data has 0x[0-9a-f]{16}'):
    _receive(arrays, 4096, flip_in_the_second_chunk)


def test_a_corrupted_push_to_a_real_server_is_data_loss():
  grads = [("['w']", np.linspace(-1, 1, 3000, dtype=np.float32))]

  def flip_one_bit(chunks):
    c = chunks[1]
    data = bytearray(c.data)
    data[1001] ^= 0x04
    chunks[1] = tensor_pb2.TensorChunk(path=c.path, offset=c.offset, sequence=c.sequence,
                                       data=bytes(data))
    return chunks

  with running_server(devices=1) as (running, client):
    client.initialize({"['w']": np.zeros(3000, np.float32)})
    step, before = params_of(client)
    with pytest.raises(grpc.RpcError) as e:
      stub(running.port).PushGradients(iter(push_messages(
          leaves=grads, step=step, chunk_bytes=4096, mutate=flip_one_bit)), timeout=10)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
    assert 'checksum mismatch' in e.value.details(), e.value.details()
    after_step, after = params_of(client)
    assert after_step == step
    np.testing.assert_array_equal(after["['w']"], before["['w']"])
    # The same push, unaltered, goes through.
    r = stub(running.port).PushGradients(iter(push_messages(
        leaves=grads, step=step, chunk_bytes=4096)), timeout=10)
    assert r.applied
