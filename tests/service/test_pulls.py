"""Pulls: full chunks whatever the devices' blocks, one encoding shared by concurrent pullers.

In-process engines on the 8-device CPU mesh and a real server: the bytes each
puller gets are checked against the params, and the sharing against what the
shared stream actually made.
"""

import math
import threading
import time

import numpy as np
import pytest

from service.config import ServerConfig
from service.core import pull as pull_lib
from service.core.engine import Engine
from service.core.pull import PullHeader
from service.protocol import pb
from service.protocol.chunks import ChunkReceiver, chunk_parser
from service.protocol.specs import LeafSpec
from svc import push_arrays, running_server

# Split over the 8 devices along dim 0, along dim 1, and replicated (7 does not divide).
P0 = {"['rows']": np.arange(64 * 96, dtype=np.float32).reshape(64, 96) / 7,
      "['cols']": np.arange(3 * 16, dtype=np.float32).reshape(3, 16) - 5,
      "['odd']": np.linspace(-1, 1, 7, dtype=np.float32)}


@pytest.fixture
def engine():
  e = Engine(ServerConfig(devices=8, learning_rate=0.1))
  e.initialize([LeafSpec(k, v.shape, v.dtype) for k, v in P0.items()],
               [v.copy() for v in P0.values()])
  yield e
  e.close()


def _receive(messages, specs):
  """The arrays a client makes of a pull's serialized messages, and each leaf's chunk sizes."""
  receiver, parse, commit = ChunkReceiver(specs, 'pull'), chunk_parser(
      pb.PullParametersResponse), None
  sizes = {s.path: [] for s in specs}
  for raw in messages:
    msg = parse(raw)
    if msg.WhichOneof('kind') == 'chunk':
      receiver.add(msg.chunk)
      sizes[msg.chunk.path].append(len(msg.chunk.data))
    else:
      commit = msg.commit
  receiver.finish(commit)
  return dict(zip((s.path for s in specs), receiver.sink.arrays)), sizes


def test_chunks_are_full_across_the_devices_blocks(engine):
  # 5000 bytes divides no block: chunks cross block boundaries, and every chunk of a leaf
  # but its last holds exactly 5000 bytes (a chunk per block piece would make many more).
  stream = engine.pull(chunk_bytes=5000)
  header = next(stream)
  got, sizes = _receive(stream, header.leaves)
  for k, v in P0.items():
    np.testing.assert_array_equal(got[k], v)
    n = math.ceil(v.nbytes / 5000)
    assert sizes[k] == [5000] * (n - 1) + [v.nbytes - 5000 * (n - 1)], (k, sizes[k])


def test_concurrent_pulls_share_one_encoding(engine, monkeypatch):
  made = []
  encode = pull_lib.encode

  def counting(specs, arrays, chunk_bytes):
    made.append(chunk_bytes)
    return encode(specs, arrays, chunk_bytes)
  monkeypatch.setattr(pull_lib, 'encode', counting)
  pulls = [engine.pull(chunk_bytes=4096) for _ in range(3)]
  headers = [next(p) for p in pulls]  # all three joined before any message was made
  assert len(made) == 1
  results = [None] * 3

  def read(i):
    results[i] = _receive(pulls[i], headers[i].leaves)[0]
  threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert len(made) == 1
  for got in results:
    for k, v in P0.items():
      np.testing.assert_array_equal(got[k], v)
  # Another pull of the same step, after the others ended, encodes again (nothing is kept).
  list(engine.pull(chunk_bytes=4096))
  assert len(made) == 2


def test_a_pull_that_comes_late_or_another_dtype_gets_its_own_stream(engine, monkeypatch):
  made = []
  encode = pull_lib.encode
  monkeypatch.setattr(pull_lib, 'encode', lambda *a: (made.append(a[2]), encode(*a))[1])
  first = engine.pull(chunk_bytes=4096)
  header = next(first)
  next(first), next(first)  # two messages passed: the first one is dropped already
  late = engine.pull(chunk_bytes=4096)
  late_header = next(late)
  bf16 = engine.pull(dtype=np.dtype('bfloat16'), chunk_bytes=4096)
  bf16_header = next(bf16)
  assert len(made) == 3
  got, _ = _receive(late, late_header.leaves)
  for k, v in P0.items():
    np.testing.assert_array_equal(got[k], v)
  got, _ = _receive(bf16, bf16_header.leaves)
  for k, v in P0.items():
    np.testing.assert_array_equal(got[k], v.astype('bfloat16'))
  first.close()


def test_an_abandoned_shared_pull_leaves_the_others_whole_and_frees_the_params(engine):
  a, b = engine.pull(chunk_bytes=4096), engine.pull(chunk_bytes=4096)
  header = next(a)
  next(b)
  next(a)
  a.close()  # gone after one message; b goes on alone
  got, _ = _receive(b, header.leaves)
  for k, v in P0.items():
    np.testing.assert_array_equal(got[k], v)
  assert engine._readers == 0  # pylint: disable=protected-access
  with engine.reading() as snap:
    held = snap.arrays
  push_arrays(engine, 'w', 0, {k: np.ones_like(v) for k, v in P0.items()})
  assert all(x.is_deleted() for x in held)  # nobody reads step 0: its memory was donated


def test_a_shared_pull_streams_its_step_while_the_next_is_applied(engine):
  a, b = engine.pull(chunk_bytes=4096), engine.pull(chunk_bytes=4096)
  header = next(a)
  next(b)
  push_arrays(engine, 'w', 0, {k: np.ones_like(v) for k, v in P0.items()})  # step 0 applied
  assert isinstance(header, PullHeader) and header.step == 0
  for p in (a, b):
    got, _ = _receive(p, header.leaves)
    for k, v in P0.items():
      np.testing.assert_array_equal(got[k], v)
  assert next(engine.pull()).step == 1


def test_a_failing_source_fails_every_reader():
  def source():
    yield b'one'
    raise RuntimeError('device read failed')
  released = []
  stream = pull_lib.SharedStream(source(), release=lambda: released.append(True))
  a, b = stream.join(), stream.join()
  assert next(a) == b'one' and next(b) == b'one'
  for r in (a, b):
    with pytest.raises(RuntimeError, match='device read failed'):
      next(r)
  assert released == [True]


def test_a_lone_reader_makes_its_items_and_a_second_reader_starts_the_thread():
  # One reader: each item is made on the reader's own thread when it asks (no thread
  # switch per message). A second reader that joins in time starts the stream's thread,
  # which makes the rest ahead of both; every reader gets every item, in order.
  makers = []

  def source():
    for i in range(40):
      makers.append(threading.current_thread().name)
      yield i
  released = []
  stream = pull_lib.SharedStream(source(), release=lambda: released.append(True), ahead=4)
  a = stream.join()
  assert next(a) == 0 and makers == [threading.current_thread().name]
  b = stream.join()  # item 0 is still there: a has not passed it yet
  assert b is not None and next(b) == 0
  assert [next(a) for _ in range(3)] == [1, 2, 3]
  assert set(makers[1:]) == {'pull-encode'}
  assert list(a) == list(range(4, 40)) and [next(b) for _ in range(39)] == list(range(1, 40))
  assert released == [True] and len(makers) == 40
  # Alone to the end, with a failing source: the reader gets the error, the source is let go.
  def failing():
    yield 'x'
    raise RuntimeError('device read failed')
  stream = pull_lib.SharedStream(failing(), release=lambda: released.append(True))
  c = stream.join()
  assert next(c) == 'x'
  with pytest.raises(RuntimeError, match='device read failed'):
    next(c)
  assert released == [True, True]


def test_several_workers_pull_the_same_step_over_grpc():
  with running_server(devices=8) as (running, client):
    client.initialize(P0)
    out = [None] * 4

    def pull(i):
      out[i] = client.pull().params
    threads = [threading.Thread(target=pull, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    for got in out:
      for k, v in P0.items():
        np.testing.assert_array_equal(got[k], v)


def test_a_pull_of_the_step_the_caller_has_is_a_header_alone(engine):
  mid = next(engine.pull()).model_id
  items = list(engine.pull(newer_than=0, model_id=mid))
  assert len(items) == 1 and items[0].not_modified and items[0].step == 0
  assert engine._readers == 0  # pylint: disable=protected-access
  assert len(list(engine.pull(newer_than=0, model_id='another'))) > 1  # another model: all


def _memory(pulled) -> set:
  return {a.__array_interface__['data'][0] for a in pulled.params.values()}


def test_a_pull_reuses_the_memory_of_an_earlier_one_only_once_it_is_dropped():
  with running_server(devices=8, learning_rate=0.1) as (_, client):
    client.initialize(P0)
    held = client.pull()
    second = client.pull()
    assert not _memory(held) & _memory(second)  # `held` is alive: fresh memory
    client.push(0, {k: np.ones_like(v) for k, v in P0.items()}, 1, 'w')
    del second  # free: the next pull may write into it
    view = held.params["['rows']"][3:5]  # any view keeps the whole allocation alive
    jax_alias = [np.asarray(held.params["['cols']"])]
    del held
    third = client.pull()
    assert third.step == 1
    assert not _memory(third) & {view.__array_interface__['data'][0] - 3 * 96 * 4}
    for k, v in P0.items():
      assert not np.array_equal(third.params[k], v)  # the step changed every leaf
    np.testing.assert_array_equal(view, P0["['rows']"][3:5])  # untouched by the third pull
    np.testing.assert_array_equal(jax_alias[0], P0["['cols']"])
    kept = _memory(third)
    del third
    assert _memory(client.pull()) == kept  # dropped: reused


def test_poll_takes_only_what_needs_no_wait():
  """`poll` (what the asyncio server calls on its event loop) never waits for another
  thread: a lone reader makes its item itself; a reader of a shared stream whose item
  is still being made gets NOT_READY, and the item once it is there."""
  lone = pull_lib.SharedStream(iter([b'one', b'two']), release=lambda: None).join()
  assert [lone.poll(), lone.poll()] == [b'one', b'two']
  with pytest.raises(StopIteration):
    lone.poll()
  gate = threading.Event()

  def slow():
    gate.wait(30)
    yield b'one'
  stream = pull_lib.SharedStream(slow(), release=lambda: None)
  a, b = stream.join(), stream.join()
  t0 = time.monotonic()
  assert a.poll() is pull_lib.NOT_READY and b.poll() is pull_lib.NOT_READY
  assert time.monotonic() - t0 < 1
  gate.set()
  assert next(a) == b'one'
  assert b.poll() == b'one'
