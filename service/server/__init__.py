"""The server's side: the servicer over the core, its assembly, auth, stream limits, metrics.

  servicer   lamb_sharded.v1.OptimizerService: decode -> one engine call -> encode
  app        `start(config)` / `serve_forever(config)`: the server assembled
  auth       bearer-token interceptor, TLS credentials
  limits     cutting off silent or endless streams
  metrics    Prometheus metrics on their own HTTP port

Imports the core and the protocol; never the client library or the examples.
"""
