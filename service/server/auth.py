"""Authentication and transport security of the server.

* Bearer tokens (`service.protocol.tokens`): `BearerAuthInterceptor` refuses any
  call without one of the configured tokens with UNAUTHENTICATED before it reaches
  the servicer. `grpc.health.v1.Health` needs no token, so that probes work. A
  token may be bound to worker ids (`bound_workers`): it may push as no other.
* TLS / mutual TLS: `server_credentials` builds `grpc.ssl_server_credentials` from
  PEM files; with a client CA the server requires and verifies client certificates.
"""

from __future__ import annotations

import hmac
import logging
from typing import Callable, Mapping, Optional, Sequence

import grpc

from service import logs
from service.protocol import tokens as tokens_lib

log = logging.getLogger(__name__)

# Methods reachable without a token (prefixes of the full method name).
PUBLIC_METHOD_PREFIXES = ('/grpc.health.v1.Health/',)


def check_bearer(value: Optional[str], tokens: Sequence[bytes]) -> bool:
  """Whether an authorization header value carries one of the tokens (constant time)."""
  if not value:
    return False
  scheme, _, presented = value.strip().partition(' ')
  if scheme.lower() != tokens_lib.SCHEME.lower():
    return False
  candidate = presented.strip().encode('utf-8', 'replace')
  ok = False
  for token in tokens:  # every token, no early exit
    ok |= hmac.compare_digest(candidate, token)
  return ok


def bound_workers(metadata, bindings: Mapping[str, frozenset]) -> Optional[frozenset]:
  """The worker ids the call's bearer token may push as (None: any, or no binding)."""
  if not bindings:
    return None
  for key, value in metadata or ():
    if key == tokens_lib.METADATA_KEY and isinstance(value, str):
      scheme, _, presented = value.strip().partition(' ')
      if scheme.lower() == tokens_lib.SCHEME.lower():
        return bindings.get(presented.strip())
  return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
  """A handler of the same kind as `handler` that only aborts with UNAUTHENTICATED."""
  async def deny(request_or_iterator, context):
    del request_or_iterator
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

  async def deny_stream(request_or_iterator, context):
    await deny(request_or_iterator, context)
    yield  # pragma: no cover  (an async generator, as the streaming kinds need)

  kwargs = dict(request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
  if handler.request_streaming and handler.response_streaming:
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
  if handler.request_streaming:
    return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
  if handler.response_streaming:
    return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
  return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
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

  async def intercept_service(self, continuation, handler_call_details):
    method = handler_call_details.method or ''
    if method.startswith(self._public):
      return await continuation(handler_call_details)
    value = None
    for key, v in handler_call_details.invocation_metadata or ():
      if key == tokens_lib.METADATA_KEY:
        value = v if isinstance(v, str) else None
        break
    if check_bearer(value, self._tokens):
      return await continuation(handler_call_details)
    handler = await continuation(handler_call_details)  # only looks the method up
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
