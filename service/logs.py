"""Logging for the server and workers: human-readable text, or one JSON object a line.

Messages about a step, a worker or a leaf carry them as structured fields
(`log.info(..., extra=fields(step=3, worker='w0'))`); the JSON format emits
each as its own key, the text format appends them as `key=value`.

    {"time": "2026-11-25T09:30:00.123Z", "level": "WARNING", "logger": "service.server",
     "message": "push rejected: ...", "step": 3, "worker": "worker-1", "leaf": "['w']",
     "reason": "nonfinite"}
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

FORMATS = ('text', 'json')
# The structured fields, in the order the text format appends them.
FIELDS = ('step', 'worker', 'leaf', 'push_id', 'reason', 'code', 'rpc', 'peer', 'seconds',
          'model_id')


def fields(**values: Any) -> dict:
  """`extra=` for a log call: the structured fields that are not None."""
  return {k: v for k, v in values.items() if v is not None}


def _context(record: logging.LogRecord) -> dict:
  return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
  """One JSON object per record: time (UTC, ISO 8601), level, logger, message, fields."""

  def format(self, record: logging.LogRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    out = {'time': when.isoformat(timespec='milliseconds').replace('+00:00', 'Z'),
           'level': record.levelname, 'logger': record.name, 'message': record.getMessage(),
           **_context(record)}
    if record.exc_info:
      out['exception'] = self.formatException(record.exc_info)
    return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
  """`time LEVEL logger: message [step=3 worker=w0 ...]`."""

  def __init__(self):
    super().__init__('%(asctime)s %(levelname)s %(name)s: %(message)s')

  def formatMessage(self, record: logging.LogRecord) -> str:
    line = super().formatMessage(record)
    context = _context(record)
    if context:
      line += ' [' + ' '.join(f'{k}={v}' for k, v in context.items()) + ']'
    return line


def setup(level: str = 'INFO', fmt: str = 'text') -> None:
  """Configures the root logger: one handler on stderr in `fmt` ('text' or 'json')."""
  if fmt not in FORMATS:
    raise ValueError(f'log format must be one of {FORMATS}, got {fmt!r}')
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(JsonFormatter() if fmt == 'json' else TextFormatter())
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  root.addHandler(handler)
  root.setLevel(level.upper())


def quiet_libraries(level: str, libraries: str = 'WARNING') -> None:
  """Keeps the libraries' own chatter below `libraries` (Orbax's per-save INFO lines, its
  notes on read-only managers, JAX's backend notes) out of a process's logs, unless
  `level` is DEBUG: absl's verbosity (Orbax logs through absl), JAX's logger, and XLA's
  C++ logging (TF_CPP_MIN_LOG_LEVEL, before JAX loads, unless already set) and gRPC's
  (GRPC_VERBOSITY, before gRPC loads, unless already set: its notes on each failed TLS
  handshake, say)."""
  debug = level.upper() == 'DEBUG'
  if 'jax' not in sys.modules:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '0' if debug else '1')
  if 'grpc' not in sys.modules:
    os.environ.setdefault('GRPC_VERBOSITY', 'INFO' if debug else 'ERROR')
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity('debug' if debug else libraries.lower())
  # JAX's own notes ("Unable to initialize backend 'tpu'") go to its Python logger.
  logging.getLogger('jax').setLevel(logging.NOTSET if debug else libraries.upper())
