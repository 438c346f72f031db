"""One process, every optimizer: lamb_sharded.lamb matches optax.lamb, on 1 or 2 devices,
and the service path (a real server and 2 workers) gives the same parameters."""

import jax
import numpy as np
import pytest

from studies import charlm, mnist1d, service_runs, train


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def _moved(params, task) -> float:
  return _max_diff(params, task.init(0))


@pytest.fixture(scope='module')
def task():
  return charlm.small()


def test_lamb_sharded_matches_optax_lamb_in_the_study(task):
  trainer = train.Trainer(task, train.make_mesh(1))
  ours = trainer.train(train.Run('lamb', 8, 0.02, 0, 5))
  theirs = trainer.train(train.Run('optax_lamb', 8, 0.02, 0, 5))
  adamw = trainer.train(train.Run('adamw', 8, 0.02, 0, 5))
  assert _moved(ours, task) > 1e-3
  assert _max_diff(ours, theirs) < 1e-6
  assert _max_diff(ours, adamw) > 1e-3  # a different optimizer: the comparison is not vacuous


def test_two_devices_give_the_one_device_result(task):
  one = train.Trainer(task, train.make_mesh(1)).train(train.Run('lamb', 8, 0.02, 0, 3))
  two_trainer = train.Trainer(task, train.make_mesh(2))
  assert any(s != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
      two_trainer.specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
  two = two_trainer.train(train.Run('lamb', 8, 0.02, 0, 3))
  assert _max_diff(one, two) < 1e-5


def test_a_run_records_its_curve_and_a_diverged_one_says_so(task):
  trainer = train.Trainer(task, train.make_mesh(1))
  run = train.Run('adamw', 8, 0.004, 0, 120)
  trainer.train(run)
  assert run.curve[0][0] == 0 and len(run.curve) <= train.CURVE_POINTS + 1
  assert run.heldout_loss < run.curve[0][1] - 0.5 and not run.diverged
  assert run.tokens == 120 * 8 * task.context
  blown = train.Run('adamw', 8, 1e6, 0, 120)
  trainer.train(blown)
  assert blown.diverged and blown.heldout_loss == float('inf')


@pytest.mark.parametrize('name', ['charlm', 'mnist1d'])
def test_the_service_path_gives_the_in_process_parameters(name, tmp_path, request):
  """`--through-service` of each task: a real server and 2 workers that load it by name."""
  task = request.getfixturevalue('task') if name == 'charlm' else mnist1d.small()
  run = train.Run('lamb', 8, 0.02, 0, 4)
  local = train.Trainer(task, train.make_mesh(1)).train(run)
  via = train.Run('lamb', 8, 0.02, 0, 4)
  remote = service_runs.ServiceTrainer(task, f'studies.{name}:small', 2, str(tmp_path),
                                       devices=1).train(via)
  assert via.path == 'service' and [s for s, _ in via.curve] == [0, 1, 2, 3]
  assert _moved(remote, task) > 1e-3
  assert _max_diff(local, remote) < 1e-5
  np.testing.assert_allclose([v for _, v in via.curve], [v for _, v in run.curve], rtol=1e-5)
  assert via.heldout_loss == pytest.approx(run.heldout_loss, rel=1e-5)
