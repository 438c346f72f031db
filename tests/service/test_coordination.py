"""The job's agreement (`coordination.Job`) against an in-memory store: processes as threads.

Milliseconds each: short timeouts, no JAX, no server. The real multi-process
tests (tests/multihost/) check the same through JAX's coordinator.
"""

import threading
import time

import pytest

from service import errors
from service.core import coordination
from service.core.coordination import Decision, Job, MemoryStore

FAST = dict(part_timeout_s=0.2, poll_s=0.01)


def job(count=2, **kw):
  """A store and `count` processes' views of a job over it (process 0 leads)."""
  store = MemoryStore()
  return store, [Job(store, i, count, **{**FAST, **kw}) for i in range(count)]


def in_thread(fn, *args):
  out = {}

  def run():
    try:
      out['value'] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      out['error'] = e
  t = threading.Thread(target=run)
  t.start()
  return t, out


def test_the_memory_store_writes_once_without_overwrite_and_waits():
  store = MemoryStore()
  assert store.set('k', 'a', overwrite=False)
  assert not store.set('k', 'b', overwrite=False)
  assert store.try_get('k') == 'a'
  assert store.set('k', 'c', overwrite=True) and store.try_get('k') == 'c'
  t0 = time.monotonic()
  assert store.blocking_get('missing', 0.05) is None
  assert time.monotonic() - t0 >= 0.05
  threading.Timer(0.02, store.set, ('late', 'x', False)).start()
  assert store.blocking_get('late', 2.0) == 'x'
  store.delete('k')
  store.delete('k')  # gone already: nothing
  assert store.try_get('k') is None


def test_every_part_offered_is_accepted_with_the_step_everywhere():
  _, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  t, out = in_thread(follower.rule, key, None)
  ruling = leader.rule(key, 'leaf a')
  assert ruling.decision is None  # every part is in: the leader decides
  assert leader.accept(key, 7, ruling.poison) == Decision(True, 7, 'leaf a')
  t.join(2)
  assert out['value'].decision == Decision(True, 7, 'leaf a')


def test_the_followers_poison_reaches_the_leaders_ruling():
  _, (leader, f1, f2) = job(3)
  key = leader.push_key('m', 'w0', 'p0')
  f1._kv.set(f'{key}/part/1', '{"poison": null}', overwrite=True)  # pylint: disable=protected-access
  f2._kv.set(f'{key}/part/2', '{"poison": "leaf b"}', overwrite=True)  # pylint: disable=protected-access
  ruling = leader.rule(key, None)
  assert ruling.decision is None and ruling.poisons == (None, None, 'leaf b')
  assert ruling.poison == 'leaf b'


def test_a_part_that_never_comes_refuses_the_push_after_the_timeout():
  store, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  t0 = time.monotonic()
  ruling = leader.rule(key, None)
  assert 0.2 <= time.monotonic() - t0 < 2
  assert not ruling.decision.accepted and ruling.decision.error.reason == 'part_missing'
  # ... and everywhere: the follower, late, finds the refusal.
  assert not follower.rule(key, None).decision.accepted
  assert Decision.decode(store.try_get(f'{key}/decision')).error.reason == 'part_missing'


def test_the_first_decision_wins_an_accept_after_a_refusal_does_not_stand():
  _, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  refusal = follower.refuse(key, errors.InvalidArgument('chunk 3 is malformed', reason='bad'))
  assert not refusal.accepted and 'server process 1 refused' in str(refusal.error)
  late = leader.accept(key, 4, None)
  assert not late.accepted and isinstance(late.error, errors.InvalidArgument)
  assert late.error.reason == 'bad'
  # The leader's wait for the parts ends at once with the refusal.
  assert not leader.rule(key, None).decision.accepted
  # A refusal after an accept does not stand either.
  key2 = leader.push_key('m', 'w0', 'p1')
  assert leader.accept(key2, 5, None).accepted
  assert follower.refuse(key2, errors.Aborted('too late')) == Decision(True, 5, None)


def test_a_lost_decision_refuses_the_push_on_the_follower():
  _, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  follower.part_timeout_s = -9.9  # waits 0.1 s for a decision
  decision = follower.rule(key, None).decision
  assert not decision.accepted and decision.error.reason == 'no_decision'
  assert not leader.accept(key, 0, None).accepted  # the refusal was written first


def test_async_order_the_followers_get_the_leaders_steps_in_order():
  _, (leader, follower) = job()
  keys = [leader.push_key('m', f'w{i}', 'p') for i in range(5)]
  threads = [in_thread(follower.rule, k, None) for k in keys]
  for step, key in enumerate(keys):  # the leader decides one at a time, steps in order
    assert leader.rule(key, None).decision is None
    assert leader.accept(key, step, None).accepted
  got = []
  for t, out in threads:
    t.join(2)
    got.append(out['value'].decision.step)
  assert got == [0, 1, 2, 3, 4]


def test_a_follower_admits_a_push_once_the_leader_did():
  _, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  with pytest.raises(errors.ResourceExhausted) as e:
    follower.await_admitted(key, 0)  # a quick look, no wait
  assert e.value.reason == 'busy'
  t0 = time.monotonic()
  with pytest.raises(errors.ResourceExhausted):
    follower.await_admitted(key, 0.05)
  assert time.monotonic() - t0 < 1
  leader.await_admitted(key, 0)  # the leader admits alone
  threading.Timer(0.02, leader.admitted, (key,)).start()
  follower.await_admitted(key, 2.0)
  follower.await_admitted(key, 0)
  # A push refused meanwhile: its error, not a wait.
  key2 = leader.push_key('m', 'w0', 'p1')
  leader.refuse(key2, errors.FailedPrecondition('step closed', reason='stale'))
  with pytest.raises(errors.FailedPrecondition):
    follower.await_admitted(key2, 1.0)


def test_events_come_in_order_and_votes_are_shared():
  _, (leader, follower) = job()
  assert follower.next_event('m', 0.01) is None
  leader.close_step('m', 3, 2)
  leader.ask_save('m', 4)
  leader.close_step('m', 4, 1)
  assert [follower.next_event('m', 0.5) for _ in range(3)] == [
      ('close', 3, 2), ('save', 4), ('close', 4, 1)]
  assert follower.next_event('m', 0.01) is None
  assert follower.next_event('other', 0.01) is None  # per model
  leader.vote_save('m', 5, True)
  leader.vote_save('m', 6, False)
  assert follower.save_due('m', 5) and not follower.save_due('m', 6)
  follower.part_timeout_s = 0.01
  assert not follower.save_due('m', 7)  # no vote: not saved


def test_model_id_same_step_and_shutdown_are_shared():
  _, (leader, follower) = job()
  t, out = in_thread(follower.model_id, 1, 'theirs')
  assert leader.model_id(1, 'mine') == 'mine'
  t.join(2)
  assert out['value'] == 'mine'
  t, out = in_thread(follower.same_step, 'm', 9)
  assert leader.same_step('m', 9) == [9, 9]
  t.join(2)
  assert out['value'] == [9, 9]
  assert leader.shutdown_requested() is None
  follower.request_shutdown()
  assert leader.shutdown_requested() == 1


def test_forget_before_drops_the_records_of_old_pushes():
  store, (leader, follower) = job()
  keys = []
  for step in range(3):
    key = leader.push_key('m', 'w', str(step))
    follower._kv.set(f'{key}/part/1', '{"poison": null}', overwrite=True)  # pylint: disable=protected-access
    leader.admitted(key)
    assert leader.rule(key, None).decision is None and leader.accept(key, step, None).accepted
    keys.append(key)
  leader.forget_before(2)
  left = store.keys()
  assert not [k for k in left if k.startswith(keys[0]) or k.startswith(keys[1])]
  assert [k for k in left if k.startswith(keys[2])]


def test_malformed_values_are_logged_and_ignored(caplog):
  store, (leader, follower) = job()
  key = leader.push_key('m', 'w0', 'p0')
  # A part that does not parse is not a part: the push times out, refused.
  store.set(f'{key}/part/1', 'not json', overwrite=True)
  assert leader.rule(key, None).decision.error.reason == 'part_missing'
  # A decision that does not parse: ignored while waiting, never crashes.
  key2 = leader.push_key('m', 'w0', 'p1')
  store.set(f'{key2}/decision', '{"step": "x"}', overwrite=False)
  follower.part_timeout_s = -9.95
  assert not follower.rule(key2, None).decision.accepted
  with pytest.raises(errors.ResourceExhausted):
    follower.await_admitted(key2, 0)
  assert not leader.accept(key2, 0, None).accepted  # unreadable first decision: refused
  for text in ('', '[]', '{"code": 3}', 'null', '{"step": 1, "poison": 5}'):
    with pytest.raises(ValueError):
      Decision.decode(text)
  # Events, votes, steps and the shutdown request.
  store.set('lamb_sharded/events/m/0', 'close x', overwrite=False)
  store.set('lamb_sharded/events/m/1', 'bogus 1 2 3', overwrite=False)
  store.set('lamb_sharded/events/m/2', 'save 5', overwrite=False)
  assert follower.next_event('m', 0.01) is None
  assert follower.next_event('m', 0.01) is None
  assert follower.next_event('m', 0.01) == ('save', 5)
  store.set('lamb_sharded/save/m/1', '\x00junk', overwrite=True)
  assert not follower.save_due('m', 1)
  store.set('lamb_sharded/shutdown', 'me', overwrite=True)
  assert leader.shutdown_requested() is None
  store.set('lamb_sharded/final/m/1', 'eleven', overwrite=True)
  leader.part_timeout_s = 0.01
  assert leader.same_step('m', 3) == [3, -1]
  assert 'malformed' in caplog.text


def test_a_lone_process_decides_everything_at_once():
  alone = coordination.Coordination()
  assert alone.leader and alone.alone and not alone.requires_ids
  key = alone.push_key('m', 'w0', 'p0')
  alone.await_admitted(key, 0)
  ruling = alone.rule(key, 'leaf a')
  assert ruling.decision is None and ruling.poison == 'leaf a'
  assert alone.accept(key, 3, 'leaf a') == Decision(True, 3, 'leaf a')
  assert not alone.refuse(key, errors.Aborted('no')).accepted
  assert alone.model_id(1, 'x') == 'x' and alone.same_step('m', 4) == [4]
  assert alone.shutdown_requested() is None
