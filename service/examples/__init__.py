"""Examples on the worker's side: the worker CLI's training loop, its toy models, the demo.

  worker     `lamb-sharded worker`: pull, gradient, push, wait -- with recovery
  models     the toy models it trains (regression, digits), data deterministic by step
  progress   the JSON progress lines a worker prints and the demo reads
  demo       `lamb-sharded demo`: a server and workers as processes, end to end

Built on the client library; the server never imports any of it.
"""
