"""Identifiers a client sends (push, init and model ids, leaf paths): bounded and printable.

A client's string may end up in an error's details, a log line, a key of the
coordinator's store: each is bounded by length and character set here, and a
refusal names the field and quotes at most the start of the value (`quoted`),
so that no 1 MiB id fills the status details or a log line, and no newline in
a leaf path forges one.

Example:
  >>> check_id('push-7', 'header.push_id', PUSH_ID_MAX)
  'push-7'
  >>> quoted('a\\nb' + 'c' * 100, 8)
  "'a\\\\nbccccc'... (103 characters)"
"""

from __future__ import annotations

import re

from service.errors import InvalidArgument

PUSH_ID_MAX = 128  # push_id, init_id
MODEL_ID_MAX = 64  # the server's are 32 hexadecimal digits
PATH_MAX = 1024  # a leaf's path
_PRINTABLE_ASCII = re.compile(r'[ -~]*')


def quoted(value: str, limit: int = 80) -> str:
  """`value` as a Python literal, cut to its first `limit` characters (and saying so)."""
  if len(value) <= limit:
    return repr(value)
  return f'{value[:limit]!r}... ({len(value)} characters)'


def check_id(value: str, field: str, limit: int) -> str:
  """`value` if it is at most `limit` printable ASCII characters (empty too); else
  InvalidArgument naming `field`."""
  if len(value) > limit:
    raise InvalidArgument(f'{field} has {len(value)} characters, over {limit}: '
                          f'{quoted(value, 40)}')
  if not _PRINTABLE_ASCII.fullmatch(value):
    raise InvalidArgument(f'{field} {quoted(value, 40)} is not printable ASCII')
  return value


def check_path(path: str, what: str) -> str:
  """`path` if it is a leaf path: 1 to `PATH_MAX` printable characters (no newline, no
  control character); else InvalidArgument naming `what`."""
  if not path:
    raise InvalidArgument(f'{what}: a leaf has an empty path')
  if len(path) > PATH_MAX:
    raise InvalidArgument(f'{what}: a leaf path has {len(path)} characters, over {PATH_MAX}: '
                          f'{quoted(path, 40)}')
  if not path.isprintable():
    raise InvalidArgument(f'{what}: leaf path {quoted(path, 40)} has a character that is not '
                          f'printable (a newline, a control character)')
  return path


_INDEXED_WORKER = re.compile(r'worker-(0|[1-9][0-9]{0,8})')


def worker_name(index: int) -> str:
  """The worker id of `lamb-sharded worker --worker-index index`: `worker-<index>`."""
  return f'worker-{index}'


def worker_index(worker_id: str) -> int | None:
  """N of a worker id `worker-N` (what `lamb-sharded worker` sends), else None: a server
  that trains with `num_workers` workers refuses N >= num_workers.

  >>> worker_index('worker-2'), worker_index('worker-02'), worker_index('trainer-a')
  (2, None, None)
  """
  match = _INDEXED_WORKER.fullmatch(worker_id)
  return int(match.group(1)) if match else None
