"""What a failed call to a server means to the person who made it: one line, with a hint.

gRPC says little when it reaches no server: a refused connection, a TLS handshake
that fails and a server that never answers all end as UNAVAILABLE or (after the
channel's retries) DEADLINE_EXCEEDED "Deadline Exceeded". `unreachable` asks the
address itself -- a TCP connection, then a TLS handshake -- to tell them apart;
`explain` turns any RpcError of a call to `address` into the line the CLI prints.

    >>> explain_code('UNAUTHENTICATED', 'bad token', '10.0.0.1:50051', token=True)
    'the server at 10.0.0.1:50051 refused the token: check --token-env/--token-file'
"""

from __future__ import annotations

import socket
import ssl
from typing import Optional

PROBE_TIMEOUT_S = 2.0


def unreachable(address: str, *, tls: bool, ca_file: Optional[str] = None,
                timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
  """Why no gRPC call reaches host:port `address` (None: it answers TCP and TLS as expected).

  Args:
    address: host:port of the server.
    tls: whether the client speaks TLS to it.
    ca_file: the CA the client verifies the server with (`--tls-ca`; None: the system's).
    timeout: seconds for each probe.
  """
  host, _, port = address.rpartition(':')
  if not port.isdigit():
    return None  # not host:port: nothing to ask
  host = host.strip('[]')
  try:
    sock = socket.create_connection((host, int(port)), timeout=timeout)
  except socket.gaierror as e:
    return f'no server at {address} (the host does not resolve: {e.strerror})'
  except ConnectionRefusedError:
    return f'no server at {address} (connection refused)'
  except TimeoutError:
    return f'no server at {address} (no answer to a connection within {timeout:g}s)'
  except OSError as e:
    return f'no server at {address} ({e.strerror or e})'
  with sock:
    try:
      with ssl._create_unverified_context().wrap_socket(  # pylint: disable=protected-access
          sock, server_hostname=host):
        speaks_tls = True
    except ssl.SSLError:
      speaks_tls = False
    except OSError:  # closed or silent: not a TLS server either
      speaks_tls = False
  if speaks_tls and not tls:
    return (f'the server at {address} speaks TLS and this client plaintext: give --tls-ca '
            '(the CA of its certificate)')
  if tls and not speaks_tls:
    return (f'the server at {address} speaks plaintext, not TLS: drop --tls-ca/--tls-cert/'
            '--tls-key (or start it with --tls-cert/--tls-key)')
  if tls:
    why = _unverified(host, int(port), ca_file, timeout)
    if why is not None:
      return (f'the certificate of the server at {address} does not verify ({why}): check '
              '--tls-ca')
  return None


def _unverified(host: str, port: int, ca_file: Optional[str], timeout: float) -> Optional[str]:
  """Why the server's certificate does not verify against `ca_file` (None: it does)."""
  try:
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((host, port), timeout=timeout) as sock:
      with context.wrap_socket(sock, server_hostname=host):
        return None
  except ssl.SSLCertVerificationError as e:
    return e.verify_message
  except (OSError, ssl.SSLError):
    return None  # not a verification failure: say nothing about it


def explain_code(code: str, details: str, address: str, *, token: bool = False,
                 timeout: Optional[float] = None, timeout_flag: str = '--timeout') -> str:
  """The line for status `code` (its name) and `details` of a call to `address`.

  `token`: whether the client sent a token; `timeout`: the call's deadline (s).
  """
  if code == 'UNAUTHENTICATED':
    if token:
      return (f'the server at {address} refused the token: check --token-env/--token-file')
    return (f'the server at {address} wants a bearer token: give --token-env or --token-file '
            f'({details})')
  if code == 'PERMISSION_DENIED':
    return f'the server at {address} does not allow this: {details}'
  if code in ('UNAVAILABLE', 'DEADLINE_EXCEEDED'):
    within = f' within {timeout_flag} {timeout:g}s' if timeout is not None else ''
    return f'the server at {address} did not answer{within} ({code}: {details})'
  return f'the server at {address} refused the call: {code}: {details}'


def explain(error, address: str, *, tls: bool = False, token: bool = False,
            ca_file: Optional[str] = None, timeout: Optional[float] = None,
            timeout_flag: str = '--timeout') -> str:
  """The line for grpc.RpcError `error` of a call to host:port `address`.

  UNAVAILABLE and DEADLINE_EXCEEDED are asked of the address (`unreachable`):
  no server there, or a TLS mismatch, is said as such.
  """
  code = error.code().name
  if code in ('UNAVAILABLE', 'DEADLINE_EXCEEDED'):
    why = unreachable(address, tls=tls, ca_file=ca_file)
    if why is not None:
      return why
  return explain_code(code, error.details() or '', address, token=token, timeout=timeout,
                      timeout_flag=timeout_flag)
