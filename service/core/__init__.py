"""The service's core: the engine and its parts. No gRPC here (a test checks the imports).

  engine        the facade: owns the lock and the threads, calls the parts below
  rules         step rules: sync/async, staleness, straggler quorum (pure Python)
  coordination  what the processes agree on: a lone process, or a job over a key-value store
  admission     pushes and bytes in flight, draining
  ledger        answered pushes: idempotent retries
  push          `PushSession`: one push being received
  model         the model's plan (shardings, layouts, jitted step) apart from its state
  accumulator   the step's gradient sum on the host
  optimizer     the schedule and `lamb_sharded.lamb` from the config
  persistence   checkpoint metadata, save/restore, compatibility, .npz params
  checkpoint    Orbax (the only module that knows it)
  placement     the sharding rule, recycled host buffers, host <-> mesh transfers
  layout        which host bytes each device's block holds (pure NumPy)
  finite        NaN/Inf checks
"""
