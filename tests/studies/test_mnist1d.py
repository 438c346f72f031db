"""The MNIST-1D task: generated here (never downloaded), deterministic, split in two; batches by
(seed, step, worker); the model learns."""

import random
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests

from service.examples.models import load_model
from studies import mnist1d, tasks


def _generate(**kwargs) -> mnist1d.Dataset:
  return mnist1d.load.__wrapped__(**kwargs)  # past the cache: a real generation


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the network fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access: {args} {kwargs}')
  for name in ('get', 'post', 'request', 'head'):
    monkeypatch.setattr(requests, name, refuse)
  monkeypatch.setattr(requests.Session, 'request', refuse)
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


def test_the_data_set_is_generated_without_the_network_and_has_the_documented_shape(no_network):
  d = _generate()
  assert d.x_train.shape == (4000, mnist1d.LENGTH) and d.x_test.shape == (1000, mnist1d.LENGTH)
  assert d.x_train.dtype == d.x_test.dtype == np.float32
  assert d.y_train.shape == (4000,) and d.y_test.shape == (1000,)
  assert d.y_train.dtype == d.y_test.dtype == np.int32
  for labels in (d.y_train, d.y_test):
    assert sorted(set(labels.tolist())) == list(range(10))  # every class in both splits
  assert np.all(np.isfinite(d.x_train)) and abs(float(np.std(d.x_train)) - 1.0) < 0.1


def test_generation_is_deterministic_and_leaves_the_global_generators_alone(no_network):
  np.random.seed(123)
  random.seed(123)
  expected_np, expected_py = np.random.random(), random.random()
  np.random.seed(123)
  random.seed(123)
  first, second = _generate(), _generate()
  assert (np.random.random(), random.random()) == (expected_np, expected_py)
  for name in ('x_train', 'y_train', 'x_test', 'y_test'):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
  other = _generate(seed=7)
  assert not np.array_equal(first.x_train, other.x_train)


def test_the_splits_share_no_signal():
  d = mnist1d.load()
  train_rows = {row.tobytes() for row in d.x_train}
  assert len(train_rows) == len(d.x_train)
  assert not any(row.tobytes() in train_rows for row in d.x_test)


def test_too_few_signals_is_an_error():
  with pytest.raises(ValueError, match='num_samples'):
    mnist1d.load(num_samples=10)


def test_a_batch_is_the_training_signals_of_its_example_indices():
  task = mnist1d.small(seed=3)
  whole_x, whole_y = task.batch(step=5, worker=0, size=12)
  idx = task.example_indices(5, 0, 12)
  np.testing.assert_array_equal(whole_x, task.data().x_train[idx])
  np.testing.assert_array_equal(whole_y, task.data().y_train[idx])


def test_an_epoch_visits_every_signal_once_whatever_the_batch():
  task = mnist1d.small()
  n = task.num_examples
  for batch in (32, 2048):  # 2048 does not divide 4,000: nothing is dropped all the same
    steps = -(-2 * n // batch)
    stream = np.concatenate([task.example_indices(s, 0, batch) for s in range(steps)])
    assert sorted(stream[:n].tolist()) == list(range(n))
    assert sorted(stream[n:2 * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # the next epoch reshuffles
  reseeded = mnist1d.small(seed=1)
  assert not np.array_equal(reseeded.example_indices(0, 0, 32), task.example_indices(0, 0, 32))


def test_the_model_has_layers_for_the_trust_ratio_and_a_gradient_step_lowers_the_loss():
  # That training learns is the --quick study's test (tests/studies/test_large_batch.py).
  task = mnist1d.small()
  params = jax.tree.map(jnp.asarray, task.init(0))
  assert len(jax.tree.leaves(params)) == 10  # 3 convolutions, 2 dense layers: w and b each
  assert task.num_params() == sum(x.size for x in jax.tree.leaves(params))
  before = task.measure(params)
  assert before['heldout_accuracy'] < 0.3 and abs(before['heldout_loss'] - np.log(10)) < 0.5
  assert task.evaluate(params) == before['heldout_loss']
  x, y = task.batch(0, 0, 64)
  loss, grads = task.grad_fn()(params, x, y)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(task.loss(stepped, x, y)) < float(loss)


def test_a_worker_can_load_it_by_name_and_the_study_finds_it():
  task = load_model('studies.mnist1d:small', seed=7)
  assert isinstance(task, mnist1d.MNIST1D) and task.seed == 7 and task.shards_global_batch
  assert tasks.make('mnist1d', quick=True, seed=7) == task
  assert tasks.make('mnist1d') == mnist1d.model()
  described = task.describe()
  assert described['train_signals'] == 4000 and described['test_signals'] == 1000
  assert tasks.Metric(**described['metric']) == tasks.HELDOUT_ACCURACY
