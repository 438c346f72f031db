"""Errors of the service's core, each carrying its canonical gRPC status code name.

The core (wire, engine) raises these; only the servicer maps them to gRPC, so
the core knows nothing of gRPC. Messages name the leaf or field at fault.
"""

from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
  """Base class; `code` is the name of a canonical gRPC status code.

  `reason` is a short machine-readable cause (a metrics label, a log field;
  default: the code in lower case) and `leaf` the leaf at fault, if any.
  """
  code = 'INTERNAL'

  def __init__(self, message: str, *, reason: Optional[str] = None,
               leaf: Optional[str] = None):
    super().__init__(message)
    self.reason = reason or self.code.lower()
    self.leaf = leaf


class InvalidArgument(ServiceError):
  code = 'INVALID_ARGUMENT'


class FailedPrecondition(ServiceError):
  code = 'FAILED_PRECONDITION'


class AlreadyExists(ServiceError):
  code = 'ALREADY_EXISTS'


class Aborted(ServiceError):
  code = 'ABORTED'


class OutOfRange(ServiceError):
  code = 'OUT_OF_RANGE'


class ResourceExhausted(ServiceError):
  code = 'RESOURCE_EXHAUSTED'


class DataLoss(ServiceError):
  code = 'DATA_LOSS'


class Unavailable(ServiceError):
  code = 'UNAVAILABLE'


class DeadlineExceeded(ServiceError):
  code = 'DEADLINE_EXCEEDED'


class PermissionDenied(ServiceError):
  code = 'PERMISSION_DENIED'


class ConfigError(ValueError):
  """A setting that cannot work, raised before anything starts.

  The message names the flag (`--port`), YAML key or file at fault;
  `lamb-sharded` prints it as one line and exits 2 (a usage error). `setting`:
  the ServerConfig field at fault, if one is (so that a value from a YAML file
  is reported as its key, file and line).
  """

  def __init__(self, message: str, setting: Optional[str] = None):
    super().__init__(message)
    self.setting = setting


class NoServer(ConnectionError):
  """No server answered at an address within the time a client waits for one (a worker's
  --connect-timeout). The message names the address and why; `lamb-sharded` exits 1."""


class StartupError(RuntimeError):
  """The server cannot start as configured although its settings are valid (a port is in
  use, say). The message names what and its flag; `lamb-sharded` exits 1."""
