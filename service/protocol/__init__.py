"""Both ends of the wire: `lamb_sharded.v1`'s messages and the rules of its streams.

Pure NumPy and protobuf; no gRPC, no JAX (the gRPC stubs, `_gen/..._pb2_grpc`,
are imported by the server and the client themselves). The server (`service.server`)
and the client library (`service.client`) both build on this package, and
nothing in it knows either of them.

  dtypes     the wire's tensor dtypes and their NumPy equivalents
  specs      `LeafSpec`: a leaf's path, shape, dtype and encoding
  checksum   the stream checksum (wrapping 64-bit word sum)
  codecs     block-wise int8/int4 gradient encodings: encode, and a streaming decoder
  chunks     splitting leaves into chunks, and `ChunkReceiver`, which checks a stream
  tokens     bearer tokens: their file/environment format and the metadata they travel in
  types      domain values both ends exchange (`PushHeader`, `PushResult`)
  _gen/      the Python code generated from proto/ (`python tools/gen_proto.py`)
"""

from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import tensor_pb2
from service.protocol.chunks import MAX_MESSAGE_BYTES

SERVICE_NAME = pb.DESCRIPTOR.services_by_name['OptimizerService'].full_name
# The largest message either end accepts: a chunk of at most MAX_CHUNK_BYTES of data
# plus its envelope, well inside MAX_MESSAGE_BYTES, and a few KiB of slack.
MAX_RECEIVE_BYTES = MAX_MESSAGE_BYTES + (64 << 10)

__all__ = ['pb', 'tensor_pb2', 'SERVICE_NAME', 'MAX_RECEIVE_BYTES']
