"""The client's half of the transport security: TLS material and the bearer token."""

from __future__ import annotations

import collections
import os
from typing import Optional, Union

import grpc

from service.protocol import tokens as tokens_lib

PemSource = Union[bytes, str, os.PathLike]


def pem(source: Optional[PemSource]) -> Optional[bytes]:
  """PEM bytes as given, or read from a path (str or os.PathLike)."""
  if source is None or isinstance(source, bytes):
    return source
  with open(os.fspath(source), 'rb') as fh:
    return fh.read()


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
    self._header = tokens_lib.metadata(token)

  def _details(self, d):
    metadata = [m for m in (d.metadata or ()) if m[0] != tokens_lib.METADATA_KEY]
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
