"""The Prometheus metrics of a fleet: as many series after pushes of 40 workers as of one.

A label per worker would make every scrape, and the time series database behind
it, grow with the fleet; the metrics count pushes, bytes and latencies in total.
"""

import urllib.request

import numpy as np

from svc import running_server

P0 = {"['w']": np.ones((16, 8), np.float32), "['b']": np.ones(8, np.float32)}
FLEET = 40


def _series(metrics_port: int) -> set[tuple]:
  """The (name, labels) of every sample the metrics port serves now."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=import-outside-toplevel
  with urllib.request.urlopen(f'http://127.0.0.1:{metrics_port}/metrics', timeout=10) as r:
    text = r.read().decode()
  return {(s.name, tuple(sorted(s.labels.items())))
          for family in text_string_to_metric_families(text) for s in family.samples}


def test_series_do_not_grow_with_the_workers():
  # One worker per step: every push completes its step, whoever pushes it.
  with running_server(devices=1, num_workers=1) as (running, client):
    client.initialize(P0)
    grads = {k: np.full_like(v, 0.1) for k, v in P0.items()}
    for step in range(2):
      client.push(step, grads, 1, 'w0')
    client.pull()
    one = _series(running.metrics_port)
    for i in range(FLEET):
      client.push(2 + i, grads, 1 + i, f'fleet-worker-{i}')
    client.pull()
    fleet = _series(running.metrics_port)
    assert client.describe().step == 2 + FLEET
  assert len(fleet) == len(one), sorted(fleet ^ one)
  assert fleet == one
  assert not any('fleet-worker' in value for _, labels in fleet for _, value in labels)
