"""Authentication and transport security of the server (and the client's half of them).

* Bearer tokens: the client sends `authorization: Bearer <token>` metadata on every
  call; `BearerAuthInterceptor` refuses any call without a configured token with
  UNAUTHENTICATED before it reaches the servicer. Tokens come from a file (one per
  line; blank lines and #comments ignored) and/or an environment variable (same
  format, e.g. from a Kubernetes Secret). `grpc.health.v1.Health` needs no token,
  so that probes work.
* TLS / mutual TLS: `server_credentials` builds `grpc.ssl_server_credentials` from
  PEM files; with a client CA the server requires and verifies client certificates.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
from typing import Callable, Optional, Sequence, Union

import grpc

from service import logs

log = logging.getLogger(__name__)

# Methods reachable without a token (prefixes of the full method name).
PUBLIC_METHOD_PREFIXES = ('/grpc.health.v1.Health/',)
_SCHEME = 'bearer'

PemSource = Union[bytes, str, os.PathLike]


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


def check_bearer(value: Optional[str], tokens: Sequence[bytes]) -> bool:
  """Whether an authorization header value carries one of the tokens (constant time)."""
  if not value:
    return False
  scheme, _, presented = value.strip().partition(' ')
  if scheme.lower() != _SCHEME:
    return False
  candidate = presented.strip().encode('utf-8', 'replace')
  ok = False
  for token in tokens:  # every token, no early exit
    ok |= hmac.compare_digest(candidate, token)
  return ok


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
  """A handler of the same kind as `handler` that only aborts with UNAUTHENTICATED."""
  def deny(request_or_iterator, context):
    del request_or_iterator
    context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

  def deny_stream(request_or_iterator, context):
    deny(request_or_iterator, context)
    yield  # pragma: no cover  (a generator, as the streaming kinds need)

  kwargs = dict(request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
  if handler.request_streaming and handler.response_streaming:
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
  if handler.request_streaming:
    return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
  if handler.response_streaming:
    return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
  return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class BearerAuthInterceptor(grpc.ServerInterceptor):
  """Refuses calls without `authorization: Bearer <one of tokens>` (except public methods)."""

  def __init__(self, tokens: Sequence[str],
               public_prefixes: Sequence[str] = PUBLIC_METHOD_PREFIXES,
               on_refused: Optional[Callable[[str], None]] = None):
    """Args:
      tokens: the accepted bearer tokens.
      public_prefixes: method-name prefixes served without a token (health checks).
      on_refused: called with the method's name for every call refused (metrics).
    """
    if not tokens:
      raise ValueError('BearerAuthInterceptor needs at least one token')
    self._tokens = tuple(t.encode('utf-8') for t in tokens)
    self._public = tuple(public_prefixes)
    self._on_refused = on_refused

  def intercept_service(self, continuation, handler_call_details):
    method = handler_call_details.method or ''
    if method.startswith(self._public):
      return continuation(handler_call_details)
    value = None
    for key, v in handler_call_details.invocation_metadata or ():
      if key == 'authorization':
        value = v if isinstance(v, str) else None
        break
    if check_bearer(value, self._tokens):
      return continuation(handler_call_details)
    handler = continuation(handler_call_details)  # only looks the method up
    if handler is None:
      return None  # UNIMPLEMENTED, as without auth
    log.warning('refused %s: %s', method,
                'no bearer token' if value is None else 'invalid bearer token',
                extra=logs.fields(rpc=method, code='UNAUTHENTICATED'))
    if self._on_refused is not None:
      self._on_refused(method)
    return _refusal(handler, 'missing or invalid bearer token'
                    if value is not None else 'missing bearer token (authorization metadata)')


def _read(path: str) -> bytes:
  with open(path, 'rb') as fh:
    return fh.read()


def server_credentials(cert_file: str, key_file: str,
                       client_ca_file: Optional[str] = None) -> grpc.ServerCredentials:
  """TLS credentials from PEM files; with a client CA, client certificates are required."""
  return grpc.ssl_server_credentials(
      [(_read(key_file), _read(cert_file))],
      root_certificates=_read(client_ca_file) if client_ca_file else None,
      require_client_auth=bool(client_ca_file))


# --- The client's half ---

def pem(source: Optional[PemSource]) -> Optional[bytes]:
  """PEM bytes as given, or read from a path (str or os.PathLike)."""
  if source is None or isinstance(source, bytes):
    return source
  return _read(os.fspath(source))


class _CallDetails(
    collections.namedtuple('_CallDetails', ('method', 'timeout', 'metadata', 'credentials',
                                            'wait_for_ready', 'compression')),
    grpc.ClientCallDetails):
  pass


class BearerTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor,
                                   grpc.UnaryStreamClientInterceptor,
                                   grpc.StreamUnaryClientInterceptor,
                                   grpc.StreamStreamClientInterceptor):
  """Adds `authorization: Bearer <token>` to every call (plaintext or TLS channels alike)."""

  def __init__(self, token: str):
    token = token.strip()
    if not token or any(c.isspace() for c in token):
      raise ValueError('a bearer token must be non-empty and without spaces')
    self._header = ('authorization', f'Bearer {token}')

  def _details(self, d):
    metadata = [m for m in (d.metadata or ()) if m[0] != 'authorization']
    metadata.append(self._header)
    return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                        getattr(d, 'wait_for_ready', None), getattr(d, 'compression', None))

  def intercept_unary_unary(self, continuation, client_call_details, request):
    return continuation(self._details(client_call_details), request)

  def intercept_unary_stream(self, continuation, client_call_details, request):
    return continuation(self._details(client_call_details), request)

  def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
    return continuation(self._details(client_call_details), request_iterator)

  def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
    return continuation(self._details(client_call_details), request_iterator)
