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
  assert leader.shutdown_requested() == (1, False)  # preempted: the job is to go on
  leader.request_shutdown(final=True)
  assert follower.shutdown_requested() == (0, True)  # the operator's stop


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


# ------------------------------------------------------------------------------------------
# Authenticated values: a job's store is a SignedStore; what anyone else writes is not acted on.

SECRET = b'the job secret, 32 bytes long...'


def signed_job(count=2, secret=SECRET, session='run 1', **kw):
  """The raw store beneath, and `count` processes' views of a job over it, signed."""
  raw = MemoryStore()
  signed = coordination.SignedStore(raw, secret, session, poll_s=0.005)
  return raw, [Job(signed, i, count, **{**FAST, **kw}) for i in range(count)]


def forgeries(key, value):
  """What an outsider can write at `key` for `value`: unsigned, a made-up MAC, the MAC of
  another secret, of another session (a replay of an earlier run), of another key."""
  other_secret = coordination.SignedStore(MemoryStore(), b'another secret, 32 bytes long.',
                                          'run 1')
  other_run = coordination.SignedStore(MemoryStore(), SECRET, 'run 0')
  same = coordination.SignedStore(MemoryStore(), SECRET, 'run 1')
  out = [value, '0' * 64 + ':' + value, ':' + value, 'x' * 5000]
  for store, at in ((other_secret, key), (other_run, key), (same, key + '/other')):
    store.set(at, value, overwrite=True)
    out.append(store._store.try_get(at))  # pylint: disable=protected-access
  return out


def test_a_signed_value_reads_back_and_nothing_else_does(caplog):
  raw = MemoryStore()
  store = coordination.SignedStore(raw, SECRET, 'run 1', poll_s=0.005)
  assert store.set('k', 'v:with:colons\n', overwrite=False)
  assert store.try_get('k') == 'v:with:colons\n' and raw.try_get('k') != 'v:with:colons\n'
  assert store.blocking_get('k', 0.1) == 'v:with:colons\n'
  for forged in forgeries('k2', 'v'):
    raw.set('k2', forged, overwrite=True)
    assert store.try_get('k2') is None
    t0 = time.monotonic()
    assert store.blocking_get('k2', 0.05) is None  # waited as for an absent key
    assert time.monotonic() - t0 >= 0.05
  assert not store.set('k2', 'v', overwrite=False)  # written first by someone: not ours
  with pytest.raises(ValueError):
    coordination.SignedStore(raw, b'')


def test_a_forged_value_is_logged_once_per_key_quoted_and_bounded(caplog):
  raw, (leader, _) = signed_job()
  raw.set('lamb_sharded/shutdown', '1\nFAKE LOG LINE' + 'x' * 10_000, overwrite=True)
  for _ in range(5):
    assert leader.shutdown_requested() is None
  lines = [r.getMessage() for r in caplog.records if 'unauthenticated' in r.getMessage()]
  assert len(lines) == 1, lines
  assert "'lamb_sharded/shutdown'" in lines[0] and '\n' not in lines[0]
  assert len(lines[0]) < 500


def test_a_forged_shutdown_is_not_acted_on():
  raw, (leader, follower) = signed_job()
  for forged in forgeries('lamb_sharded/shutdown', '1'):
    raw.set('lamb_sharded/shutdown', forged, overwrite=True)
    assert leader.shutdown_requested() is None and follower.shutdown_requested() is None
  follower.request_shutdown()  # the real one
  assert leader.shutdown_requested() == (1, False)
  signed = leader._kv  # pylint: disable=protected-access
  for malformed in ('7 final', '1', '1 final ', '-1 restart', '0 maybe'):
    signed.set('lamb_sharded/shutdown', malformed, overwrite=True)
    assert follower.shutdown_requested() is None  # signed, but malformed


def test_a_forged_decision_is_never_acted_on():
  raw, (leader, follower) = signed_job()
  for n, forged in enumerate(forgeries('x', '{"step": 99, "poison": null}')):
    key = leader.push_key('m', 'w0', f'p{n}')
    raw.set(f'{key}/decision', forged.replace('/x', key) if forged else forged, overwrite=False)
    # The follower does not take the forged step: it finds no decision and refuses.
    follower.part_timeout_s = -9.95
    decision = follower.rule(key, None).decision
    assert not decision.accepted and decision.step != 99
    # The leader cannot accept over it either: the push is refused everywhere, never half.
    late = leader.accept(key, 3, None)
    assert not late.accepted and late.error.reason == 'no_decision'
  # A forged accept of a push the leader refuses: the refusal stands.
  key = leader.push_key('m', 'w0', 'q')
  raw.set(f'{key}/part/1', '{"poison": null}', overwrite=True)  # a forged part: not a part
  assert leader.rule(key, None).decision.error.reason == 'part_missing'


def test_a_forged_or_malformed_event_is_passed_over_and_the_leaders_next_one_read(monkeypatch):
  monkeypatch.setattr(coordination, 'EVENT_SKIP_S', 0.05)
  raw, (leader, follower) = signed_job()
  raw.set('lamb_sharded/events/m/0', 'close 999999 0', overwrite=False)  # an outsider's, first
  leader.close_step('m', 3, 2)  # written as event 1: 0 is taken
  got, deadline = [], time.monotonic() + 2
  while not got and time.monotonic() < deadline:
    event = follower.next_event('m', 0.02)
    if event is not None:
      got.append(event)
  assert got == [('close', 3, 2)]
  # Signed but malformed (a bug, not an outsider): logged, ignored, the thread goes on.
  for text in ('close', 'close x 1', 'save -1', 'save 1 2', '', '\x00' * 100, 'save ' + '9' * 5000):
    leader._publish('m', text)  # pylint: disable=protected-access
    assert follower.next_event('m', 0.5) is None
  leader.ask_save('m', 4)
  assert follower.next_event('m', 0.5) == ('save', 4)


def test_forged_votes_steps_model_ids_and_parts_are_absent():
  raw, (leader, follower) = signed_job()
  follower.part_timeout_s = leader.part_timeout_s = 0.02
  raw.set('lamb_sharded/save/m/1', 'yes', overwrite=True)
  assert not follower.save_due('m', 1)
  raw.set('lamb_sharded/final/m/1', '3', overwrite=True)
  assert leader.same_step('m', 3) == [3, -1]
  signed = leader._kv  # pylint: disable=protected-access
  signed.set('lamb_sharded/model_id/1/0', 'bad id\n' * 3, overwrite=True)
  with pytest.raises(errors.Unavailable):
    follower.model_id(1, 'mine')


def test_the_stores_keys_stay_bounded_over_many_steps():
  """Accepted and refused pushes, events, votes and adoptions, step after step: the store
  holds a bounded number of keys (every record goes once every process is done with it)."""
  store, (leader, follower) = job(linger_s=0.02)
  sizes = []
  for step in range(100):
    key = leader.push_key('m', 'w0', f'a{step}')
    leader.admitted(key)
    follower.await_admitted(key, 0)
    t, out = in_thread(follower.rule, key, None)
    assert leader.rule(key, None).decision is None and leader.accept(key, step, None).accepted
    t.join(2)
    assert out['value'].decision.accepted
    refused = leader.push_key('m', 'w1', f'r{step}')
    leader.admitted(refused)
    follower.refuse(refused, errors.InvalidArgument('malformed', reason='bad'))
    assert not leader.rule(refused, None).decision.accepted
    leader.close_step('m', step, 1)
    leader.ask_save('m', step)
    assert follower.next_event('m', 0.5) == ('close', step, 1)
    assert follower.next_event('m', 0.5) == ('save', step)
    leader.vote_save('m', step, step % 2 == 0)
    assert follower.save_due('m', step) == (step % 2 == 0)
    if step % 10 == 0:
      t, out = in_thread(follower.model_id, step // 10 + 1, 'theirs')
      leader.model_id(step // 10 + 1, f'id{step}')
      t.join(2)
    time.sleep(0.021)  # the refusals' linger_s
    leader.forget_before(step - 2)
    follower.forget_before(step - 2)
    sizes.append(len(store.keys()))
  assert max(sizes) <= 40, (max(sizes), store.keys())
  assert sizes[-1] <= sizes[20] + 2, sizes


def test_a_multi_process_server_needs_a_job_secret_from_a_file_or_the_environment(tmp_path):
  from service.config import ServerConfig  # pylint: disable=import-outside-toplevel
  from service.errors import ConfigError  # pylint: disable=import-outside-toplevel
  job = dict(num_processes=2, coordinator_address='host0:8476', process_id=1)
  assert ServerConfig().job_secret({}) is None  # one process: none needed
  with pytest.raises(ConfigError, match='--job-secret-file: needed with --num-processes 2'):
    ServerConfig(**job).job({})
  with pytest.raises(ConfigError, match=r'--job-secret-env: .*\$S is empty'):
    ServerConfig(**job, job_secret_env='S').job({})
  with pytest.raises(ConfigError, match='--job-secret-env: .* is 5 bytes; it needs at least 16'):
    ServerConfig(**job, job_secret_env='S').job({'S': 'short'})
  assert ServerConfig(**job, job_secret_env='S').job_secret({'S': ' 0123456789abcdef \n'}) == \
      b'0123456789abcdef'
  path = tmp_path / 'secret'
  path.write_bytes(b'0123456789abcdef\n')
  assert ServerConfig(**job, job_secret_file=str(path)).job_secret({}) == b'0123456789abcdef'
  assert ServerConfig(**job, job_secret_file=str(path)).job({}) == ('host0:8476', 1)
  with pytest.raises(ConfigError, match='--job-secret-file: .*missing'):
    ServerConfig(**job, job_secret_file=str(tmp_path / 'missing')).job_secret({})
