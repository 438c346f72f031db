"""The progress lines a `lamb-sharded worker --progress` prints on stdout, one JSON object each.

The worker writes them (`Progress(...).line()`), the demo reads them
(`Progress.parse(line)`): one type, so the two cannot drift apart.

    {"event": "ready", "worker": 0, "pid": 4242, "time": 1764600000.1, "server": "127.0.0.1:5"}
    {"event": "push", "worker": 0, ..., "step": 3, "loss": 0.25, "examples": 64, "applied": false}
    {"event": "done", "worker": 0, ..., "step": 200}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

EVENTS = ('ready', 'push', 'done')


@dataclasses.dataclass(frozen=True)
class Progress:
  """One progress line.

  Attributes:
    event: 'ready' (data loaded, gradient compiled), 'push' (a push was
      accepted), or 'done' (the worker reached its last step).
    worker: the worker's index.
    pid: its process id.
    time: when (seconds since the epoch).
    step: push: the step pushed for; done: the server's step at the end.
    loss: push: the loss of the worker's batch at that step.
    examples: push: the examples in the batch.
    applied: push: whether the push completed its step.
    server: ready: the server's address.
  """
  event: str
  worker: int
  pid: int
  time: float
  step: Optional[int] = None
  loss: Optional[float] = None
  examples: Optional[int] = None
  applied: Optional[bool] = None
  server: Optional[str] = None

  def line(self) -> str:
    """The JSON line (no newline); fields that are None are left out."""
    return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None})

  @classmethod
  def parse(cls, line: str) -> Optional['Progress']:
    """The progress line `line` is, or None for any other output (a library's, say)."""
    try:
      data = json.loads(line)
    except ValueError:
      return None
    if not isinstance(data, dict) or data.get('event') not in EVENTS:
      return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
      return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError:  # a required field is missing
      return None
