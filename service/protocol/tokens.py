"""Bearer tokens, as both ends of the wire know them.

A client sends `authorization: Bearer <token>` metadata on every call; the
server compares it with the tokens it was configured with. Tokens are kept one
per line (blank lines and #comments ignored) in a file and/or an environment
variable (e.g. from a Kubernetes Secret) -- the same format for the server's
list and a worker's own token.
"""

from __future__ import annotations

import os
from typing import Optional

METADATA_KEY = 'authorization'
SCHEME = 'Bearer'


WORKERS = 'workers='  # a server's token line: `TOKEN workers=ID[,ID...]` binds it


def parse_entries(text: str, source: str) -> list[tuple[str, Optional[frozenset[str]]]]:
  """The (token, the worker ids it is bound to or None) of a token file's text: one per
  line, blank lines and #comments ignored.

  A line is a token, or (on a server) a token and `workers=ID[,ID...]`: the only
  worker ids that token may push as.

  Example:
    >>> [(t, sorted(w) if w else w) for t, w in parse_entries("abc\\ndef workers=w0,w1", "f")]
    [('abc', None), ('def', ['w0', 'w1'])]
  """
  entries = []
  for number, raw in enumerate(text.splitlines(), 1):
    line = raw.strip()
    if not line or line.startswith('#'):
      continue
    token, _, rest = line.partition(' ')
    rest = rest.strip()
    if not token.isascii() or not token.isprintable():
      raise ValueError(f'{source}, line {number}: a token must be printable ASCII without '
                       f'spaces')
    workers = None
    if rest:
      if not rest.startswith(WORKERS) or any(c.isspace() for c in rest):
        raise ValueError(f'{source}, line {number}: after the token, only '
                         f'{WORKERS}ID[,ID...] (the worker ids it may push as)')
      workers = frozenset(w for w in rest[len(WORKERS):].split(',') if w)
      if not workers:
        raise ValueError(f'{source}, line {number}: {WORKERS} names no worker id')
    entries.append((token, workers))
  return entries


def parse_tokens(text: str, source: str) -> list[str]:
  """The tokens of a token file's text (`parse_entries`, without the workers they bind)."""
  return [token for token, _ in parse_entries(text, source)]


def load_tokens(token_file: Optional[str] = None, token_env: Optional[str] = None,
                environ=None) -> list[str]:
  """Every token configured by a file and/or an environment variable (both may be given).

  Raises ValueError if a source is named but yields no token (a misconfigured secret
  must not silently turn authentication off).
  """
  return [token for token, _ in load_entries(token_file, token_env, environ)]


def load_entries(token_file: Optional[str] = None, token_env: Optional[str] = None,
                 environ=None) -> list[tuple[str, Optional[frozenset[str]]]]:
  """`load_tokens`, each token with the worker ids it is bound to (None: any)."""
  environ = os.environ if environ is None else environ
  tokens: list = []
  if token_file:
    with open(token_file, encoding='utf-8') as fh:
      from_file = parse_entries(fh.read(), token_file)
    if not from_file:
      raise ValueError(f'auth token file {token_file} holds no token')
    tokens += from_file
  if token_env:
    value = environ.get(token_env)
    if value is None:
      raise ValueError(f'auth token environment variable {token_env} is not set')
    from_env = parse_entries(value, f'${token_env}')
    if not from_env:
      raise ValueError(f'auth token environment variable {token_env} holds no token')
    tokens += from_env
  return tokens


def metadata(token: str) -> tuple[str, str]:
  """The call metadata that carries `token`."""
  token = token.strip()
  if not token or any(c.isspace() for c in token):
    raise ValueError('a bearer token must be non-empty and without spaces')
  return METADATA_KEY, f'{SCHEME} {token}'
