"""The char-LM task: batches by (seed, step, worker), the model, the held-out evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from service.examples.models import load_model
from studies import charlm


def test_a_batch_is_windows_of_the_text_and_their_next_characters():
  lm = charlm.small(seed=3)
  whole_x, whole_y = lm.batch(step=5, worker=0, size=12)
  assert whole_x.shape == (12, lm.context) and whole_x.dtype == np.int32
  np.testing.assert_array_equal(whole_x[:, 1:], whole_y[:, :-1])  # the next character


def test_an_epoch_visits_each_window_once_and_the_next_one_reshuffles():
  lm = charlm.CharLM(context=8, width=8, depth=1, heads=2, train_chars=20_000,
                     heldout_chars=5_000, eval_windows=4)
  batch = 100
  steps = lm.steps_per_epoch(batch)
  epoch = np.concatenate([lm.window_indices(s, 0, batch) for s in range(steps)])
  assert len(set(epoch.tolist())) == len(epoch) == steps * batch
  assert steps * batch > lm.num_windows - batch  # only the remainder is dropped
  x, _ = lm.batch(3, 0, batch)
  text = lm.corpus().train
  for row, i in zip(x, lm.window_indices(3, 0, batch)):
    np.testing.assert_array_equal(row, text[i * lm.context:(i + 1) * lm.context])
  assert not np.array_equal(lm.window_indices(steps, 0, batch), lm.window_indices(0, 0, batch))
  reseeded = charlm.CharLM(**{**lm.__dict__, 'seed': 1})
  assert not np.array_equal(reseeded.window_indices(0, 0, batch), lm.window_indices(0, 0, batch))


def test_training_lowers_the_held_out_loss_from_chance():
  lm = charlm.small()
  params = jax.tree.map(jnp.asarray, lm.init(0))
  before = lm.evaluate(params)
  assert abs(before - math.log(128)) < 0.2  # near uniform over the vocabulary
  opt = optax.adam(3e-3)
  state = opt.init(params)
  grad_fn = lm.grad_fn()
  for step in range(60):
    _, grads = grad_fn(params, *lm.batch(step, 0, 32))
    updates, state = opt.update(grads, state)
    params = optax.apply_updates(params, updates)
  assert lm.evaluate(params) < before - 1.0


def test_a_worker_can_load_it_by_name():
  lm = load_model('studies.charlm:small', seed=7)
  assert isinstance(lm, charlm.CharLM) and lm.seed == 7 and lm.shards_global_batch
  assert lm.num_params() == sum(x.size for x in jax.tree.leaves(lm.init(0)))
