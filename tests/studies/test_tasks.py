"""What every study task (studies/tasks.py) promises the study and the service's workers."""

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
