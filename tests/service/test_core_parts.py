"""The engine's pure parts, alone: step rules, the ledger of answered pushes, admission.

No JAX, no server: each part is plain Python that the engine calls under its lock.
"""

import pytest

from service.core.admission import Admission
from service.core.ledger import Ledger
from service.core.rules import StepRules, Steps
from service.errors import (Aborted, AlreadyExists, FailedPrecondition, ResourceExhausted,
                            Unavailable)
from service.protocol.types import PushResult


def test_sync_steps_take_one_push_per_worker_of_the_current_step():
  steps = Steps(StepRules(num_workers=3), step=5)
  with pytest.raises(FailedPrecondition, match='header.step 6 is ahead of .* 5') as e:
    steps.check('a', 6)
  assert e.value.reason == 'future_step'
  with pytest.raises(Aborted, match='step 4 was already applied; the current step is 5') as e:
    steps.check('a', 4)
  assert e.value.reason == 'stale_step'
  steps.check('a', 5)
  assert not steps.add('a', 'p1', now=1.0)
  with pytest.raises(AlreadyExists, match="worker a already pushed for step 5 .*'p1'"):
    steps.check('a', 5)
  assert not steps.add('b', 'p2', now=2.0)
  assert steps.first_push_at == 1.0
  assert steps.add('c', '', now=3.0)  # the third worker completes the step
  assert steps.advance() == 6
  assert steps.contributors == {} and steps.first_push_at is None
  steps.check('a', 6)  # a new step: 'a' may push again


def test_async_steps_take_every_push_within_the_staleness_bound():
  steps = Steps(StepRules(mode='async', num_workers=4, staleness_bound=2), step=10)
  steps.check('a', 8)
  with pytest.raises(Aborted, match='gradients of step 7 are too stale: .* bound is 2'):
    steps.check('a', 7)
  assert steps.add('a', 'p', now=0.0)  # every push makes a step
  steps.add('a', 'q', now=0.0)  # and a worker may push twice


def test_the_straggler_timeout_applies_with_a_quorum_only_once_due():
  rules = StepRules(num_workers=4, quorum=2, straggler_timeout_s=2.0)
  steps = Steps(rules)
  assert steps.straggler_wait(now=100.0) is None  # no push yet: no timeout running
  steps.add('a', '', now=10.0)
  assert steps.straggler_wait(now=10.5) == pytest.approx(1.5)
  assert steps.straggler_wait(now=12.5) is None  # due, but one push is below the quorum
  steps.add('b', '', now=12.6)
  assert steps.straggler_wait(now=12.7) == 0.0  # due with a quorum: apply now
  steps.advance()
  assert steps.straggler_wait(now=50.0) is None
  no_timeout = Steps(StepRules(num_workers=4, quorum=2))
  no_timeout.add('a', '', now=0.0)
  no_timeout.add('b', '', now=0.0)
  assert no_timeout.straggler_wait(now=1e9) is None


def test_poison_keeps_the_first_culprit_until_the_step_advances():
  steps = Steps(StepRules())
  steps.poison('leaf x of worker a')
  steps.poison('leaf y of worker b')
  assert steps.poisoned_by == 'leaf x of worker a'
  steps.advance()
  assert steps.poisoned_by is None


def test_the_ledger_answers_retries_as_the_first_push_was_answered():
  ledger = Ledger()
  first = PushResult(accepted_step=3, applied=False, current_step=3)
  ledger.record('w0', 'p1', 3, first)
  ledger.record('w1', '', 3, first)  # no push id: nothing to answer a retry with
  assert ledger.answer('w0', 'p1', current_step=7) == PushResult(3, False, 7, duplicate=True)
  assert ledger.answer('w1', '', current_step=7) is None
  assert ledger.answer('w1', 'p1', current_step=7) is None  # push ids are per worker
  ledger.forget_before(3)
  assert ledger.answer('w0', 'p1', current_step=7) is not None
  ledger.forget_before(4)
  assert ledger.answer('w0', 'p1', current_step=7) is None


def test_admission_counts_the_sum_as_one_of_the_buffers():
  a = Admission(max_pushes=2)
  assert a.has_room(10, held=0) and a.has_room(10, held=1)
  slot = a.admit(10)
  assert a.has_room(10, held=0) and not a.has_room(10, held=1)
  assert str(a.busy("the step's sum")).startswith("1 pushes (10 bytes) are already in flight "
                                                  "beside the step's sum")
  assert a.release(slot) and not a.release(slot)  # freed once, however often asked
  assert (a.pushes, a.bytes) == (0, 0)


def test_admission_bounds_bytes_and_refuses_when_draining():
  a = Admission(max_pushes=8, max_bytes=100)
  with pytest.raises(ResourceExhausted, match='the push has 101 bytes, over max_inflight') as e:
    a.check_size(101)
  assert e.value.reason == 'too_large'
  a.admit(60)
  assert a.has_room(40, held=0) and not a.has_room(41, held=0)
  a.draining = True
  with pytest.raises(Unavailable, match='shutting down') as e:
    a.check_size(1)
  assert e.value.reason == 'shutting_down'
