"""The engine decides under its lock and waits outside it: a slow disk or a slow coordinator
holds no other call.

A real in-process server (127.0.0.1): while a checkpoint write (the Orbax save)
or a follower's checkpoint vote (the job's store) takes 10 s, DescribeModel, a
pull of the current step and grpc.health.v1's Check each answer within 1 s.
"""

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import runtime
from service.core import coordination, persistence
from svc import running_server

DELAY = 10.0  # the slow write or vote
QUICK = 1.0  # what every other call must take at most meanwhile
P0 = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'b': np.ones(5, np.float32)}


def _answers_quickly(running, client, step):
  """DescribeModel, a pull of the current step and Health.Check, each timed."""
  took = {}
  t0 = time.monotonic()
  described = client.describe()
  took['describe'] = time.monotonic() - t0
  assert described.step == step
  t0 = time.monotonic()
  pulled = client.pull()
  took['pull'] = time.monotonic() - t0
  assert pulled.step == step
  channel = grpc.insecure_channel(f'127.0.0.1:{running.port}')
  try:
    t0 = time.monotonic()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=5)
    took['health'] = time.monotonic() - t0
  finally:
    channel.close()
  assert health.status == health_pb2.HealthCheckResponse.SERVING
  assert all(t < QUICK for t in took.values()), took
  return took


@pytest.mark.parametrize('trigger', ['push', 'save_checkpoint'])
def test_a_slow_checkpoint_write_holds_no_other_call(tmp_path, monkeypatch, trigger):
  slow, writing = threading.Event(), threading.Event()
  real_save = persistence.save

  def slow_save(*args, **kwargs):
    if slow.is_set():
      writing.set()
      time.sleep(DELAY)
    return real_save(*args, **kwargs)

  monkeypatch.setattr(persistence, 'save', slow_save)
  push = lambda: client.push(0, {k: np.ones_like(v) for k, v in P0.items()}, 1, 'w')
  with running_server(devices=1, checkpoint_dir=str(tmp_path),
                      checkpoint_every_steps=1 if trigger == 'push' else 0,
                      async_checkpoints=False) as (running, client):
    client.initialize(P0)
    if trigger == 'push':  # completes step 0: step 1 is due
      call = push
    else:  # step 1 is not due: saved when asked
      push()
      call = lambda: client.save_checkpoint(wait=False)
    step = 1
    slow.set()
    caller = threading.Thread(target=call)
    t0 = time.monotonic()
    caller.start()
    assert writing.wait(DELAY / 2), 'the checkpoint was never written'
    _answers_quickly(running, client, step)
    assert time.monotonic() - t0 < DELAY  # all of that while the write was in progress
    slow.clear()
    caller.join(3 * DELAY)
    assert not caller.is_alive()
    assert client.wait_for_step(step, timeout=5) == (step, True)
    client.save_checkpoint(wait=True)
    assert step in [c.step for c in client.list_checkpoints()]


class _SlowLeader(coordination.MemoryStore):
  """The store of a job whose leader (played here) admits and accepts every push into step
  0, adopts the model first, and answers a checkpoint vote only after `DELAY`."""

  def __init__(self):
    super().__init__()
    self.voting = threading.Event()
    self.set('lamb_sharded/model_id/1/0', 'a1b2c3', overwrite=True)

  def try_get(self, key):
    if key.endswith('/admitted'):  # the asyncio server's quick look (open_push(timeout=0))
      return '1'
    return super().try_get(key)

  def blocking_get(self, key, timeout_s):
    if key.endswith('/admitted'):
      return '1'
    if key.endswith('/decision') and self.try_get(key) is None:
      self.set(key, coordination.Decision(True, 0, None).encode(), overwrite=False)
    if '/save/' in key:
      self.voting.set()
      time.sleep(DELAY)
      return 'no'
    return super().blocking_get(key, timeout_s)


def test_a_slow_checkpoint_vote_holds_no_other_call_on_a_follower(tmp_path, monkeypatch):
  store = _SlowLeader()
  follower = coordination.Job(store, 1, 2, part_timeout_s=0.5, poll_s=0.01)
  monkeypatch.setattr(runtime, 'coordination', lambda: follower)  # what the server takes
  with running_server(devices=1, checkpoint_dir=str(tmp_path), checkpoint_every_steps=1,
                      async_checkpoints=False) as (running, client):
    assert client.initialize(P0) == 'a1b2c3'  # the leader's id
    pusher = threading.Thread(
        target=client.push, args=(0, {k: np.ones_like(v) for k, v in P0.items()}, 1, 'w'))
    t0 = time.monotonic()
    pusher.start()
    assert store.voting.wait(DELAY / 2), 'the follower never asked for the vote'
    _answers_quickly(running, client, 1)
    assert time.monotonic() - t0 < DELAY
    pusher.join(DELAY)
    assert not pusher.is_alive()
