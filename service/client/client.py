"""The worker's client library: pytrees in, pytrees out, over lamb_sharded.v1.

    client = OptimizerClient('127.0.0.1:50051')
    client.initialize(params)                      # once, from one worker
    pulled = client.pull(like=params)              # Pulled(model_id, step, params)
    result = client.push(pulled.step, grads, num_examples=128, worker_id='w0')
    if not result.applied:
      client.wait_for_step(result.accepted_step + 1, model_id=result.model_id)

Every call has a deadline. Unary calls are retried on UNAVAILABLE by gRPC's own
retry policy (the channel's service config); pushes and pulls stream more than
gRPC buffers for transparent retries, so they are retried here, with
exponential backoff -- safely, since every push carries an idempotency key.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import random
import time
import uuid
from typing import Any, Callable, Optional, Sequence, TypeVar

import grpc
import jax
import ml_dtypes
import numpy as np
from google.protobuf import duration_pb2

from service.client import credentials
from service.client.feedback import ErrorFeedback
from service.client.sharded import Placements
from service.errors import ConfigError
from service.protocol import MAX_RECEIVE_BYTES, SERVICE_NAME, codecs, pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.protocol.chunks import (DEFAULT_CHUNK_BYTES, ChunkReceiver, HostArrays, Recycler,
                                     chunk_parser, clamp_chunk_bytes, encoded_chunk_messages)
from service.protocol.dtypes import as_wire_array, wire_dtype as to_wire_dtype
from service.protocol.specs import LeafSpec, specs_from_proto
from service.protocol.types import PushResult

T = TypeVar('T')
# gRPC's retry policy, for the unary calls. Not for the streams: with it, a pull whose
# server died mid-stream (a multi-process server's process lost) waited past its deadline,
# forever (grpcio 1.85, measured); `OptimizerClient._retrying` retries those.
_SERVICE_CONFIG = {
    'methodConfig': [{
        'name': [{'service': SERVICE_NAME, 'method': m}
                 for m in ('DescribeModel', 'WaitForStep', 'SaveCheckpoint', 'ListCheckpoints')],
        'retryPolicy': {
            'maxAttempts': 5,
            'initialBackoff': '0.2s',
            'maxBackoff': '5s',
            'backoffMultiplier': 2,
            'retryableStatusCodes': ['UNAVAILABLE'],
        },
    }],
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  initialized: bool
  model_id: str
  leaves: tuple[LeafSpec, ...]
  step: int
  num_workers: int
  quorum: int
  staleness_bound: int
  synchronous: bool
  learning_rate: float


@dataclasses.dataclass(frozen=True)
class Pulled:
  model_id: str
  step: int
  params: Any  # a pytree like `like`, or a dict path -> np.ndarray


def _passing_bytes(message) -> bytes:
  """A request serializer for streams that mix messages and already-serialized bytes."""
  return message if isinstance(message, bytes) else message.SerializeToString()


class _Stub(pb_grpc.OptimizerServiceStub):
  """The generated stub, with the chunk streams' data copied once on each end.

  InitializeModel and PushGradients streams send
  `service.protocol.chunks.encoded_chunk_messages` (each chunk's data copied
  once on its way from the array to gRPC); PullParameters responses are parsed
  by `chunk_parser` (each chunk's data a view into the received bytes, copied
  once, into the pulled arrays).
  """

  def __init__(self, channel):
    super().__init__(channel)
    for name, response in (('InitializeModel', pb.InitializeModelResponse),
                           ('PushGradients', pb.PushGradientsResponse)):
      setattr(self, name, channel.stream_unary(
          f'/{SERVICE_NAME}/{name}', request_serializer=_passing_bytes,
          response_deserializer=response.FromString))
    self.PullParameters = channel.unary_stream(  # pylint: disable=invalid-name
        f'/{SERVICE_NAME}/PullParameters',
        request_serializer=pb.PullParametersRequest.SerializeToString,
        response_deserializer=chunk_parser(pb.PullParametersResponse))


COMPRESSIONS = ('none', 'bf16', 'int8', 'int4')


def _encoding_of(compression: Optional[str]) -> int:
  """The wire encoding of a `compression` name (raw for none and bf16)."""
  if compression is not None and compression not in COMPRESSIONS:
    raise ValueError(f'compression must be one of {", ".join(COMPRESSIONS)}, got '
                     f'{compression!r}')
  return codecs.BY_NAME.get(compression, codecs.RAW)


def _flatten(tree) -> list[tuple[str, np.ndarray]]:
  if isinstance(tree, dict) and all(isinstance(k, str) and k.startswith('[') for k in tree):
    return [(k, np.asarray(v)) for k, v in tree.items()]  # already path -> array
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _on_each(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
  """fn(item) for every item at once, a thread each: a call to each process of a server.

  Threads of their own, not a pool shared by the client's calls: one process's part of
  a push waits for the others' to arrive, so concurrent pushes through one client could
  leave a part queued behind parts that wait for it (until the server's timeout).
  """
  with concurrent.futures.ThreadPoolExecutor(len(items), 'process') as pool:
    return list(pool.map(fn, items))


class ServerRestarting(RuntimeError):
  """The server restarted again and again during one pull (each time with a new model_id),
  so no whole step of one model could be pulled."""


# How many times a pull describes the server (its processes) before giving up.
_LAYOUT_TRIES = 3


class ModelMismatch(ConfigError):
  """This client's model is not the server's: a leaf it lacks or has in excess, or of
  another shape or dtype. The message names the first leaf that differs (server vs
  this client) and how many do."""


def _described(shape, dtype) -> str:
  return f'{np.dtype(dtype).name}{list(shape)}'


def model_difference(server: Sequence[LeafSpec], like, *, dtypes: bool = True) -> Optional[str]:
  """How `like` (a pytree, or a dict path -> array) differs from the server's leaves, in
  one line naming the first leaf that does; None if it does not.

  >>> server = [LeafSpec("['b']", (3,), np.dtype('float32'))]
  >>> model_difference(server, {'b': np.zeros(3, np.float32)}) is None
  True
  >>> model_difference(server, {'b': np.zeros(4, np.float32)})
  "leaf ['b']: the server's is float32[3], this worker's float32[4]"
  """
  ours = {p: _described(np.shape(x), getattr(x, 'dtype', np.float32) if dtypes else
                        np.float32) for p, x in _flatten_lazily(like)}
  theirs = {s.path: _described(s.shape, s.dtype if dtypes else np.float32) for s in server}
  differences = []
  for path, spec in theirs.items():
    if path not in ours:
      differences.append(f'leaf {path} ({spec}) is the server\'s, not this worker\'s')
    elif ours[path] != spec:
      differences.append(f'leaf {path}: the server\'s is {spec}, this worker\'s {ours[path]}')
  differences += [f'leaf {path} ({spec}) is this worker\'s, not the server\'s'
                  for path, spec in ours.items() if path not in theirs]
  if not differences:
    return None
  more = len(differences) - 1
  return differences[0] + (f' (and {more} more leaf difference{"s" if more > 1 else ""})'
                           if more else '')


def _flatten_lazily(tree) -> list[tuple[str, Any]]:
  """(path, leaf) without copying the leaves (their shape and dtype are what is asked)."""
  if isinstance(tree, dict) and all(isinstance(k, str) and k.startswith('[') for k in tree):
    return list(tree.items())
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_pulled(model_id: str, step: int, by_path: dict[str, np.ndarray], like) -> Pulled:
  """The pulled leaves, unflattened into `like`'s structure if given (ModelMismatch if its
  leaves' paths or shapes are not the pulled ones)."""
  if like is None:
    return Pulled(model_id, step, by_path)
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  specs = [LeafSpec(p, a.shape, a.dtype) for p, a in by_path.items()]
  difference = model_difference(specs, like, dtypes=False)  # a pull may ask another dtype
  if difference is not None:
    raise ModelMismatch(f'the server\'s model is not `like`\'s: {difference}')
  return Pulled(model_id, step, jax.tree_util.tree_unflatten(treedef, [by_path[p] for p in paths]))


class OptimizerClient:
  """A connection to one optimizer server (of one process, or of several).

  A multi-process server is found out from its description: the client then
  sends each process its part of every pushed leaf, in parallel, and joins
  the parts pulled from every process (`service.client.sharded`), so that the
  calls below look the same either way.
  """

  def __init__(self, target: str, *, timeout: float = 60.0, retries: int = 5,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               channel: Optional[grpc.Channel] = None,
               token: Optional[str] = None,
               root_certificates: Optional[credentials.PemSource] = None,
               client_cert: Optional[credentials.PemSource] = None,
               client_key: Optional[credentials.PemSource] = None,
               server_name_override: Optional[str] = None,
               tls: Optional[bool] = None):
    """Args:
      target: 'host:port' of the server (of any of its processes: the others are
        found out from its description).
      timeout: deadline of each call in seconds (WaitForStep takes its own).
      retries: attempts for pushes and pulls on UNAVAILABLE.
      chunk_bytes: data bytes per chunk (at most 3 MiB).
      channel: an existing channel (e.g. a secure one); else one made from the options below.
      token: a bearer token, sent as `authorization: Bearer <token>` on every call (also
        over `channel`).
      root_certificates: the CA(s) to verify the server with (PEM bytes, or a file path);
        None with TLS: the system's roots.
      client_cert, client_key: this client's certificate chain and key, for mutual TLS.
      server_name_override: the name to verify the server's certificate against (tests).
      tls: use TLS; None: if any of the certificate options is given.
    """
    if tls is None:
      tls = any(x is not None for x in (root_certificates, client_cert, client_key,
                                        server_name_override))
    if (client_cert is None) != (client_key is None):
      raise ValueError('client_cert and client_key go together')
    options = [
        ('grpc.service_config', json.dumps(_SERVICE_CONFIG)),
        ('grpc.enable_retries', 1),
        ('grpc.max_receive_message_length', MAX_RECEIVE_BYTES),
        # A server not up yet is tried again every 5 s at most (gRPC's default backs off
        # to 2 min): a worker waiting for it proceeds soon after it is up.
        ('grpc.max_reconnect_backoff_ms', 5000),
    ]
    if channel is None and tls:
      if server_name_override:
        options.append(('grpc.ssl_target_name_override', server_name_override))
      channel_credentials = grpc.ssl_channel_credentials(
          root_certificates=credentials.pem(root_certificates),
          private_key=credentials.pem(client_key),
          certificate_chain=credentials.pem(client_cert))
      channel = grpc.secure_channel(target, channel_credentials, options=options)
    self._channel = channel or grpc.insecure_channel(target, options=options)
    calls = self._channel
    if token is not None:
      calls = grpc.intercept_channel(self._channel,
                                     credentials.BearerTokenClientInterceptor(token))
    self._stub = _Stub(calls)
    self.timeout = timeout
    self.retries = retries
    self.chunk_bytes = clamp_chunk_bytes(chunk_bytes)
    self._feedback: dict[str, ErrorFeedback] = {}
    # Pulled params go into the memory of a pull whose arrays are all gone (no page faults).
    self._recycler = Recycler(keep=2)
    # For the other processes of a multi-process server: the same options, a client each.
    self._options = dict(timeout=timeout, retries=retries, chunk_bytes=chunk_bytes, token=token,
                         root_certificates=root_certificates, client_cert=client_cert,
                         client_key=client_key, server_name_override=server_name_override,
                         tls=tls)
    self._job: Optional[tuple[Placements, list['OptimizerClient']]] = None
    self._single = False  # the server was found to be a single process
    # ... serving this model_id (None: told so, as a client of one of a job's processes).
    self._single_model: Optional[str] = None

  def close(self) -> None:
    if self._job is not None:
      for c in self._job[1]:
        c.close()
    self._channel.close()

  def _processes(self):
    """(placements, a client per process) of a multi-process server; else None."""
    if self._single:
      return None
    if self._job is None:
      r = self._stub.DescribeModel(pb.DescribeModelRequest(), timeout=self.timeout)
      placements = Placements.of(r)
      if placements is None:
        self._single = r.initialized and len(r.processes) <= 1
        self._single_model = r.model_id
        return None
      clients = [OptimizerClient(e, **self._options) for e in placements.endpoints]
      for c in clients:
        c._single = True  # each talks to its process alone  # pylint: disable=protected-access
      self._job = (placements, clients)
    return self._job

  def _forget_processes(self, error: grpc.RpcError) -> None:
    """After a server's process failed a call: describe the server afresh next time.

    A group that restarted (UNAVAILABLE meanwhile, a new model_id after) may
    serve from other endpoints, and the old channels' connections are of no use.
    """
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
      self._forget_layout()

  def _forget_layout(self) -> None:
    """The server may have restarted with another number of processes (a new model_id):
    describe it afresh at the next call. A client of one of a job's processes stays one."""
    if self._single_model is not None:
      self._single, self._single_model = False, None
    job, self._job = self._job, None
    if job is not None:
      for c in job[1]:
        c.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _retrying(self, fn: Callable[[], T]) -> T:
    delay = 0.2
    for attempt in range(self.retries):
      try:
        return fn()
      except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries - 1:
          raise
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 5.0)
    raise AssertionError('unreachable')

  def describe(self, *, wait_for_ready: bool = False,
               timeout: Optional[float] = None) -> ModelInfo:
    """The model and the server's settings; `wait_for_ready` waits for the server to be up."""
    r = self._stub.DescribeModel(pb.DescribeModelRequest(), timeout=timeout or self.timeout,
                                 wait_for_ready=wait_for_ready)
    return ModelInfo(
        r.initialized, r.model_id,
        tuple(LeafSpec.from_proto(s, 'leaves') for s in r.leaves), r.step, r.num_workers,
        r.quorum, r.staleness_bound, r.step_mode == pb.STEP_MODE_SYNCHRONOUS,
        r.hyperparameters.learning_rate)

  def initialize(self, params) -> str:
    """Uploads the initial parameters (float32); returns the model_id.

    A multi-process server is sent the same stream on every process, in
    parallel, under one init id: each process keeps its part.
    """
    leaves = [(p, np.asarray(x, np.float32)) for p, x in _flatten(params)]
    header = pb.InitializeModelHeader(
        leaves=[LeafSpec(p, x.shape, x.dtype).to_proto() for p, x in leaves],
        init_id=uuid.uuid4().hex)

    def requests():
      yield pb.InitializeModelRequest(header=header)
      yield from encoded_chunk_messages(pb.InitializeModelRequest, leaves,
                                             self.chunk_bytes)

    r = self._stub.DescribeModel(pb.DescribeModelRequest(), timeout=self.timeout)
    if len(r.processes) > 1:
      clients = [OptimizerClient(p.endpoint, **self._options) for p in r.processes]
      try:
        ids = _on_each(lambda c: c._stub.InitializeModel(  # pylint: disable=protected-access
            requests(), timeout=self.timeout).model_id, clients)
      finally:
        for c in clients:
          c.close()
      return ids[0]
    return self._stub.InitializeModel(requests(), timeout=self.timeout).model_id

  def push(self, step: int, grads, num_examples: int, worker_id: str, *,
           model_id: str = '', push_id: Optional[str] = None,
           wire_dtype=None, compression: Optional[str] = None,
           error_feedback: bool | ErrorFeedback = True, local_steps: int = 1) -> PushResult:
    """Pushes the gradients computed at `step`; retried safely on UNAVAILABLE.

    Args:
      step: the step of the parameters the gradients were computed from.
      grads: a pytree with the parameters' structure (or a dict path -> array).
      num_examples: the examples averaged into `grads` (its weight).
      worker_id: this worker's stable id.
      model_id: the model_id the parameters came from ('' skips the check).
      push_id: idempotency key (default: a fresh UUID, reused by the retries).
      wire_dtype: send in this dtype (np.float32, ml_dtypes.bfloat16, np.float16).
      compression: None or 'none' (as `wire_dtype` says), 'bf16' (bfloat16 values), 'int8'
        or 'int4' (block-wise absmax quantisation, `service.protocol.codecs`; leaves of
        fewer than one block, 256 elements, travel as float32).
      error_feedback: with 'int8'/'int4', add what quantisation dropped from each leaf at
        the last push to this push's gradient before quantising (True: the client's own
        `ErrorFeedback` of `worker_id`, see `error_feedback_of`; or one given; False: none).
        The residuals are updated once the push is answered, not per retry.
      local_steps: the local steps `grads` cover: 1, a gradient; H > 1, a pseudo-gradient
        (the pulled parameters minus the worker's after H local steps: `service.client.local`),
        with `num_examples` the examples of all H steps.
    """
    push_id = push_id or uuid.uuid4().hex
    encoding = _encoding_of(compression)
    job = self._processes()
    if job is not None:  # each process its parts, in parallel, under one push id
      if isinstance(error_feedback, ErrorFeedback):
        raise ValueError('a multi-process server: each process\'s client keeps its own '
                         'residuals (error_feedback=True), not one given')
      placements, clients = job
      leaves = _flatten(grads)
      for path, _ in leaves:
        if path not in placements.parts:
          raise ValueError(f'leaf {path} is not a leaf of the server\'s model')
      # Each process's thread cuts its own parts (the copies run in parallel).
      try:
        results = _on_each(lambda i: clients[i].push(
            step, placements.part(leaves, i), num_examples, worker_id, model_id=model_id,
            push_id=push_id, wire_dtype=wire_dtype, compression=compression,
            error_feedback=bool(error_feedback), local_steps=local_steps),
            range(len(clients)))
      except grpc.RpcError as e:
        self._forget_processes(e)
        raise
      # Applied: this push completed the step on every process (else: wait for the step).
      return PushResult(min(r.accepted_step for r in results), all(r.applied for r in results),
                        min(r.current_step for r in results), all(r.duplicate for r in results),
                        results[0].model_id)  # the processes share one model_id
    if compression == 'bf16':
      if wire_dtype is not None:
        raise ValueError('give compression or wire_dtype, not both')
      wire_dtype = ml_dtypes.bfloat16
    feedback = None
    if encoding != codecs.RAW and error_feedback is not False:
      feedback = (error_feedback if isinstance(error_feedback, ErrorFeedback)
                  else self.error_feedback_of(worker_id))
    leaves, specs, residuals = [], [], {}
    for p, x in _flatten(grads):
      if encoding != codecs.RAW and x.size >= codecs.BLOCK:
        # Encoded once, before the retry loop: every attempt sends these bytes.
        if feedback is None:
          data = codecs.encode(x, encoding)
        else:  # g + r, then overwritten by what its encoding dropped: the next residual
          residuals[p] = feedback.compensated(p, x)
          data = codecs.encode(residuals[p], encoding, residual_out=residuals[p])
        leaves.append((p, data))
        specs.append(LeafSpec(p, x.shape, np.dtype(np.float32), encoding))
        continue
      x = as_wire_array(x if wire_dtype is None else x.astype(wire_dtype))
      leaves.append((p, x))
      specs.append(LeafSpec(p, x.shape, x.dtype))
    header = pb.PushGradientsHeader(
        worker_id=worker_id, step=step, num_examples=num_examples, push_id=push_id,
        model_id=model_id, leaves=[s.to_proto() for s in specs], local_steps=local_steps)

    def requests():
      yield pb.PushGradientsRequest(header=header)
      yield from encoded_chunk_messages(pb.PushGradientsRequest, leaves, self.chunk_bytes)

    try:
      r = self._retrying(lambda: self._stub.PushGradients(requests(), timeout=self.timeout))
    except grpc.RpcError as e:
      self._forget_processes(e)  # restarted (perhaps as several processes): describe it again
      raise
    if feedback is not None:
      feedback.commit(residuals)
    return PushResult(r.accepted_step, r.applied, r.current_step, r.duplicate, r.model_id)

  def error_feedback_of(self, worker_id: str) -> ErrorFeedback:
    """The residuals this client keeps for `worker_id`'s compressed pushes (made on first use).

    They live in this process only: a restarted worker starts from zero, dropping at
    most one step's quantisation error (see `service.client.feedback`).
    """
    return self._feedback.setdefault(worker_id, ErrorFeedback())

  def pull(self, *, like=None, dtype=None, if_newer_than: Optional[int] = None,
           model_id: str = '') -> Optional[Pulled]:
    """The current parameters; None if `if_newer_than` is given and they are not newer.

    Args:
      like: a pytree to unflatten into (its leaf paths must be the model's).
      dtype: receive in this dtype (default: the parameters' own).
      if_newer_than: only send if the server's step is newer than this.
      model_id: the model_id of the caller's copy, for `if_newer_than`.
    """
    request = pb.PullParametersRequest(
        dtype=to_wire_dtype(dtype) if dtype is not None else 0,
        if_model_id=model_id, max_chunk_bytes=self.chunk_bytes)
    if if_newer_than is not None:
      request.if_newer_than_step = if_newer_than
    for _ in range(_LAYOUT_TRIES):
      job = self._processes()
      if job is None:
        pulled = self._retrying(lambda: self._pull_once(request))
        described = self._single_model
      else:
        try:
          pulled = self._pull_parts(job, request)
        except grpc.RpcError as e:
          self._forget_processes(e)
          raise
        described = job[0].model_id
      if pulled is None:
        return None
      if described is None or pulled.model_id == described:
        return _as_pulled(pulled.model_id, pulled.step, pulled.params, like)
      # Another model than the one described: the server restarted, perhaps as another
      # number of processes, whose parts (or whole leaves) these are not. Describe it again.
      self._forget_layout()
      if job is None and self._processes() is None and self._single_model == pulled.model_id:
        return _as_pulled(pulled.model_id, pulled.step, pulled.params, like)  # still whole
    raise ServerRestarting(f'the server restarted {_LAYOUT_TRIES} times during one pull '
                           f'(its model_id was {described}, then {pulled.model_id})')

  def _pull_parts(self, job, request) -> Optional[Pulled]:
    """Every process's parts of one step, joined (a process behind is waited for): whole
    leaves by path.

    Parts of another model than the described one are not joined: the returned model_id
    is then one of theirs, for `pull` to describe the server again.
    """
    placements, clients = job

    def one(client: 'OptimizerClient', req) -> Optional[Pulled]:
      return client._retrying(lambda: client._pull_once(req))  # pylint: disable=protected-access
    pulled = _on_each(lambda c: one(c, request), clients)
    if all(p is None for p in pulled):
      return None  # not newer anywhere
    for p in pulled:
      if p is not None and p.model_id != placements.model_id:
        return p  # a part of a restarted server's model: not to be joined
    whole_request = pb.PullParametersRequest()
    whole_request.CopyFrom(request)
    whole_request.ClearField('if_newer_than_step')
    for _ in range(10):
      newest = max(p.step for p in pulled if p is not None)
      behind = [i for i, p in enumerate(pulled) if p is None or p.step < newest]
      if not behind:
        break
      for i in behind:  # it applies the same steps: it is about to have this one
        # (of this model: a process that restarted meanwhile ends the wait at once)
        clients[i].wait_for_step(newest, timeout=self.timeout, model_id=placements.model_id)
        pulled[i] = one(clients[i], whole_request)
        if pulled[i].model_id != placements.model_id:
          return pulled[i]
    else:
      raise RuntimeError(f'the server\'s processes serve different steps: '
                         f'{[p.step for p in pulled if p is not None]}')
    return Pulled(pulled[0].model_id, pulled[0].step,
                  placements.join([p.params for p in pulled]))

  def _pull_once(self, request) -> Optional[Pulled]:
    """One PullParameters call: the leaves by path (None: not newer)."""
    stream = self._stub.PullParameters(request, timeout=self.timeout)
    first = next(stream)
    header = first.header
    if header.not_modified:
      return None
    specs = specs_from_proto(header.leaves, 'pull header')
    receiver = ChunkReceiver(specs, 'PullParameters', HostArrays(specs, self._recycler))
    commit = None
    for msg in stream:
      if msg.WhichOneof('kind') == 'chunk':
        receiver.add(msg.chunk)
      elif msg.WhichOneof('kind') == 'commit':
        commit = msg.commit
    receiver.finish(commit)
    return Pulled(header.model_id, header.step,
                  {s.path: a for s, a in zip(specs, receiver.sink.arrays)})

  def save_checkpoint(self, wait: bool = False) -> tuple[int, str]:
    """Asks the server to checkpoint its current step now; returns (step, path).

    A multi-process server is asked through its process 0, which decides for all.
    """
    job = self._processes()
    if job is not None:
      return job[1][0].save_checkpoint(wait)
    r = self._stub.SaveCheckpoint(pb.SaveCheckpointRequest(wait=wait), timeout=self.timeout)
    return r.step, r.path

  def list_checkpoints(self) -> list:
    """The server's checkpoints (CheckpointInfo messages), in ascending step order."""
    return list(self._stub.ListCheckpoints(pb.ListCheckpointsRequest(),
                                           timeout=self.timeout).checkpoints)

  def wait_for_step(self, step: int, timeout: float = 300.0,
                    model_id: str = '') -> tuple[int, bool]:
    """Blocks (server side, no polling) until the server's step is >= `step`.

    Returns (the server's step, whether it reached `step`) -- not reached after `timeout`
    seconds. `model_id`: the history `step` is of (a push's `PushResult.model_id`); if
    the server's model is not that one, or stops being it -- it restarted from a
    checkpoint, maybe while this call was retried onto it, and the push that would
    complete `step` is lost -- the call ends at once with FAILED_PRECONDITION: pull again.
    """
    request = pb.WaitForStepRequest(step=step, model_id=model_id)
    request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout),
                                                   nanos=int((timeout % 1) * 1e9)))
    r = self._stub.WaitForStep(request, timeout=timeout + 10)
    return r.current_step, r.reached
