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


def parse_tokens(text: str, source: str) -> list[str]:
  """The tokens of a token file's text: one per line, blank lines and #comments ignored."""
  tokens = []
  for number, raw in enumerate(text.splitlines(), 1):
    line = raw.strip()
    if not line or line.startswith('#'):
      continue
    if any(c.isspace() for c in line) or not line.isascii() or not line.isprintable():
      raise ValueError(f'{source}, line {number}: a token must be printable ASCII without '
                       f'spaces')
    tokens.append(line)
  return tokens


def load_tokens(token_file: Optional[str] = None, token_env: Optional[str] = None,
                environ=None) -> list[str]:
  """Every token configured by a file and/or an environment variable (both may be given).

  Raises ValueError if a source is named but yields no token (a misconfigured secret
  must not silently turn authentication off).
  """
  environ = os.environ if environ is None else environ
  tokens: list[str] = []
  if token_file:
    with open(token_file, encoding='utf-8') as fh:
      from_file = parse_tokens(fh.read(), token_file)
    if not from_file:
      raise ValueError(f'auth token file {token_file} holds no token')
    tokens += from_file
  if token_env:
    value = environ.get(token_env)
    if value is None:
      raise ValueError(f'auth token environment variable {token_env} is not set')
    from_env = parse_tokens(value, f'${token_env}')
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
