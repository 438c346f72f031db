"""What every study task (studies/tasks.py) promises the study and the service's workers."""

import dataclasses
import json

import numpy as np
import pytest

from studies import charlm, mnist1d


@pytest.mark.parametrize('make', [charlm.small, mnist1d.small], ids=['charlm', 'mnist1d'])
def test_a_step_batch_is_the_workers_slices_put_together(make):
  # W workers of a step each take their slice of the global batch: put together, the slices
  # are the batch one worker of the same global size takes.
  task = make(seed=3)
  whole_x, whole_y = task.batch(step=5, worker=0, size=12)
  parts = [task.batch(step=5, worker=w, size=4, num_workers=3) for w in range(3)]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_x)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_y)
  assert len(whole_x) == len(whole_y) == 12


@pytest.mark.parametrize('make', [charlm.small, mnist1d.small], ids=['charlm', 'mnist1d'])
def test_a_description_has_what_the_study_reads(make):
  # results.json, the plots and the study's first line read these keys of every task.
  task = make()
  d = task.describe()
  assert {'name', 'title', 'summary', 'parameters', 'batch_unit'} <= set(d)
  assert d['parameters'] == task.num_params() > 0
  assert (d['example_size'], d['example_unit'], d['loss_unit']) == (
      task.example_size, task.example_unit, task.loss_unit)
  assert d['metric'] == dataclasses.asdict(task.metric) and d['metric']['key']
  json.dumps(d)  # it goes into results.json as it is
