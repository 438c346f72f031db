"""Bad input: the right status code, a message naming the leaf or field, nothing changed."""

import threading

import grpc
import numpy as np
import pytest

from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from svc import params_of, push_messages, running_server, spec, stub, until

PARAMS = {"['w']": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,
          "['b']": np.ones(5, np.float32)}


def _grads(scale=1.0):
  return [(k, np.full(v.shape, scale, np.float32)) for k, v in PARAMS.items()]


@pytest.fixture(scope='module')
def srv():
  with running_server(devices=8, num_workers=2, max_inflight_pushes=2,
                      admission_timeout_s=0.5) as (running, client):
    client.initialize(PARAMS)
    yield running, client


def _swap(chunks, i, j):
  chunks[i], chunks[j] = chunks[j], chunks[i]
  return chunks


CASES = {
    # name: (push_messages kwargs, expected code, regexp the message must match)
    'unknown leaf': (dict(leaves=_grads() + [("['x']", np.ones(2, np.float32))]),
                     'INVALID_ARGUMENT', r"unknown leaf \['x'\]"),
    'missing leaf': (dict(leaves=_grads()[:1]), 'INVALID_ARGUMENT', r"leaf \['b'\] is missing"),
    'wrong shape': (dict(leaves=[("['w']", np.ones((4, 3), np.float32)), _grads()[1]]),
                    'INVALID_ARGUMENT', r"\['w'\] has shape \[4, 3\], expected \[3, 4\]"),
    'wrong order': (dict(leaves=_grads()[::-1]), 'INVALID_ARGUMENT', r"\['b'\] is at position 0"),
    'unsupported dtype': (dict(leaves=_grads(), specs=[spec("['w']", (3, 4), 0),
                                                       spec("['b']", (5,))]),
                          'INVALID_ARGUMENT', r"leaf \['w'\]: unsupported dtype"),
    'declared dtype mismatches bytes': (
        dict(leaves=_grads(), specs=[spec("['w']", (3, 4), tensor_pb2.DTYPE_BFLOAT16),
                                     spec("['b']", (5,))]),
        'INVALID_ARGUMENT', r"\['w'\].*has 24 bytes"),
    'too few bytes': (dict(leaves=[("['w']", np.ones(10, np.float32)), _grads()[1]],
                           specs=[spec("['w']", (3, 4)), spec("['b']", (5,))]),
                      'INVALID_ARGUMENT', r"chunk 1 is for leaf \['b'\].*expected leaf \['w'\]"),
    'chunk out of order': (dict(leaves=_grads(), chunk_bytes=16, mutate=lambda c: _swap(c, 1, 2)),
                           'INVALID_ARGUMENT', r"sequence 2, expected 1 \(out of order\)"),
    'duplicated chunk': (dict(leaves=_grads(), chunk_bytes=16, mutate=lambda c: c[:2] + c[1:]),
                         'INVALID_ARGUMENT', r"sequence 1, expected 2 \(duplicated\)"),
    'corrupted data': (dict(leaves=_grads(), mutate=lambda c: [
        tensor_pb2.TensorChunk(path=x.path, offset=x.offset, sequence=x.sequence,
                               data=bytes(len(x.data))) if i == 0 else x
        for i, x in enumerate(c)]), 'DATA_LOSS', r'checksum mismatch'),
    'no commit': (dict(leaves=_grads(), commit=False), 'INVALID_ARGUMENT',
                  r'ended without a commit'),
    'NaN': (dict(leaves=[("['w']", np.full((3, 4), np.nan, np.float32)), _grads()[1]]),
            'INVALID_ARGUMENT', r"leaf \['w'\].*NaN or Inf"),
    'Inf': (dict(leaves=[_grads()[0], ("['b']", np.array([1, 2, np.inf, 4, 5], np.float32))]),
            'INVALID_ARGUMENT', r"leaf \['b'\].*NaN or Inf"),
    'negative step': (dict(leaves=_grads(), step=-1), 'INVALID_ARGUMENT', r'header.step'),
    'step from the future': (dict(leaves=_grads(), step=10**6), 'FAILED_PRECONDITION',
                             r'step 1000000 is ahead of the server\'s current step \d+'),
    'zero examples': (dict(leaves=_grads(), num_examples=0), 'INVALID_ARGUMENT',
                      r'header.num_examples'),
    'empty worker id': (dict(leaves=_grads(), worker_id=''), 'INVALID_ARGUMENT',
                        r'header.worker_id'),
    'wrong model id': (dict(leaves=_grads(), model_id='not-this-one'), 'FAILED_PRECONDITION',
                       r'model_id not-this-one'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_push_is_refused_and_changes_nothing(srv, name):
  running, client = srv
  kwargs, code, pattern = CASES[name]
  before_step, before = params_of(client)
  kwargs = {'step': before_step, **kwargs}  # unless the case is about the step
  with pytest.raises(grpc.RpcError) as e:
    stub(running.port).PushGradients(iter(push_messages(**kwargs)), timeout=10)
  assert e.value.code() == getattr(grpc.StatusCode, code), e.value.details()
  assert __import__('re').search(pattern, e.value.details()), e.value.details()
  after_step, after = params_of(client)
  assert after_step == before_step
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])
  # The server still serves a well-formed step afterwards (two workers complete it).
  for w in ('ok-a', 'ok-b'):
    r = stub(running.port).PushGradients(iter(push_messages(
        leaves=_grads(), worker_id=f'{w}-{name}', step=before_step)), timeout=10)
  assert r.applied and r.current_step == before_step + 1


def test_first_message_must_be_a_header(srv):
  running, _ = srv
  msgs = push_messages(leaves=_grads())[1:]
  with pytest.raises(grpc.RpcError) as e:
    stub(running.port).PushGradients(iter(msgs), timeout=10)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'first message must be a header' in e.value.details()


def test_message_after_commit(srv):
  running, client = srv
  step, _ = params_of(client)
  msgs = push_messages(leaves=_grads(), step=step, worker_id='late-chunk')
  msgs.append(msgs[1])
  with pytest.raises(grpc.RpcError) as e:
    stub(running.port).PushGradients(iter(msgs), timeout=10)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert 'after the commit' in e.value.details()


def test_retries_are_idempotent_and_stale_pushes_name_the_step(srv):
  running, client = srv
  step, before = params_of(client)
  first = client.push(step, dict(_grads()), 1, 'idem-a', push_id='p-1')
  again = client.push(step, dict(_grads()), 1, 'idem-a', push_id='p-1')
  assert not first.applied and not first.duplicate
  assert again.duplicate and again.accepted_step == step and again.current_step == step
  # Same worker, another push for the same step: refused.
  with pytest.raises(grpc.RpcError) as e:
    client.push(step, dict(_grads()), 1, 'idem-a', push_id='p-2')
  assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
  assert 'idem-a already pushed for step' in e.value.details()
  done = client.push(step, dict(_grads()), 1, 'idem-b')
  assert done.applied and done.current_step == step + 1
  # The retry after the step was applied still answers as the first time did.
  late_retry = client.push(step, dict(_grads()), 1, 'idem-a', push_id='p-1')
  assert late_retry.duplicate and late_retry.accepted_step == step
  assert params_of(client)[0] == step + 1
  with pytest.raises(grpc.RpcError) as e:
    client.push(step, dict(_grads()), 1, 'idem-c')
  assert e.value.code() == grpc.StatusCode.ABORTED
  assert f'step {step} was already applied; the current step is {step + 1}' in e.value.details()


def test_initialize_twice_is_refused(srv):
  _, client = srv
  with pytest.raises(grpc.RpcError) as e:
    client.initialize(PARAMS)
  assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_broken_off_push_changes_nothing_and_frees_its_slot(srv):
  running, client = srv
  step, before = params_of(client)
  big = [("['w']", np.ones((3, 4), np.float32)), ("['b']", np.ones(5, np.float32))]
  msgs = push_messages(leaves=big, step=step, worker_id='cut', chunk_bytes=8)
  gate = threading.Event()

  def stalled():
    yield from msgs[:3]
    gate.wait(10)  # stall half-way

  calls = [stub(running.port).PushGradients.future(stalled(), timeout=10) for _ in range(2)]
  until(lambda: running.engine.pushes_in_flight == 2)
  # Both buffer slots (max_inflight_pushes=2) are taken: a third push is turned away.
  with pytest.raises(grpc.RpcError) as e:
    stub(running.port).PushGradients(iter(push_messages(leaves=_grads(), step=step,
                                                        worker_id='third')), timeout=10)
  assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
  for c in calls:
    c.cancel()
  gate.set()
  until(lambda: running.engine.pushes_in_flight == 0)
  assert params_of(client)[0] == step
  for k, v in params_of(client)[1].items():
    np.testing.assert_array_equal(v, before[k])
  # The slots are free again and the cut-off worker may push its step for real.
  r1 = client.push(step, dict(_grads()), 1, 'cut')
  r2 = client.push(step, dict(_grads()), 1, 'after-cut')
  assert not r1.applied and r2.applied


def test_push_before_the_model_exists():
  with running_server(devices=1) as (running, client):
    with pytest.raises(grpc.RpcError) as e:
      client.push(0, dict(_grads()), 1, 'early')
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert 'not initialised' in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
      client.pull()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    bad = dict(PARAMS, **{"['b']": np.array([1, np.nan, 1, 1, 1], np.float32)})
    with pytest.raises(grpc.RpcError) as e:
      client.initialize(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leaf ['b'] of the initial parameters contains NaN" in e.value.details()
    assert not client.describe().initialized


def test_nan_can_skip_the_step_instead():
  with running_server(devices=2, nonfinite='skip_step') as (running, client):
    client.initialize(PARAMS)
    bad = dict(_grads())
    bad["['b']"] = np.full(5, np.nan, np.float32)
    r = client.push(0, bad, 1, 'w')
    assert r.applied and r.current_step == 1
    step, after = params_of(client)
    assert step == 1
    for k, v in PARAMS.items():
      np.testing.assert_array_equal(after[k], v)
    assert running.engine.stats['steps_skipped'] == 1
