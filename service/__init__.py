"""The lamb-sharded optimizer service: server, worker client, CLI.

A thin layer over the pure `lamb_sharded` library; nothing here is imported by it.
Sub-packages by side, one level deep:

  protocol/   both ends of the wire: dtypes, leaf specs, checksum, chunks, tokens, _gen/
  core/       no gRPC: the engine and its parts (step rules, admission, ledger, model
              plan and state, accumulation, persistence, placement)
  server/     the servicer, the server's assembly, auth, stream limits, metrics
  client/     the client library and its credentials
  examples/   the worker, its toy models, the demo
  cli, config, errors, logs, runtime   the command line and what every side shares
"""
