"""`lamb-sharded`: the command-line entry point.

Subcommands import JAX lazily, so that each can set up the XLA environment (for
example the number of simulated CPU devices) before JAX initialises.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from service import config as config_lib
from service import runtime

# The worker's --compression choices: service.client.COMPRESSIONS (not imported here: it
# loads JAX and gRPC, and parsing the command line must not).
COMPRESSIONS = ('none', 'bf16', 'int8', 'int4')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='lamb-sharded', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)

  serve = sub.add_parser('serve', help='run the optimizer server')
  config_lib.add_flags(serve)

  worker = sub.add_parser('worker', help='train a model through a server')
  worker.add_argument('--server', required=True,
                      help='host:port of the server (-: read it from the first line of stdin)')
  worker.add_argument('--worker-index', type=int, required=True, help='this worker\'s index')
  worker.add_argument('--num-workers', type=int, default=1, help='how many workers train')
  worker.add_argument('--steps', type=int, required=True, help='train until this step')
  worker.add_argument('--batch-size', type=int, default=64, help='examples per push')
  worker.add_argument('--model', default='regression', choices=('regression', 'digits'),
                      help='model to train (default regression)')
  worker.add_argument('--seed', type=int, default=0, help='seed of the model and data')
  worker.add_argument('--init', action='store_true',
                      help='initialise the model if the server has none')
  worker.add_argument('--timeout', type=float, default=60.0, help='deadline per call (s)')
  worker.add_argument('--connect-timeout', type=float, default=600.0,
                      help='how long to wait for the server to come (back) up (s)')
  worker.add_argument('--log-level', default='INFO', help='logging level (default INFO)')
  worker.add_argument('--log-format', default='text', choices=config_lib.LOG_FORMATS,
                      help='log lines as text, or one JSON object a line (default text)')
  worker.add_argument('--token-file', help='file of the bearer token (its first token)')
  worker.add_argument('--token-env', help='environment variable holding the bearer token')
  worker.add_argument('--tls-ca', help='PEM file of the CA to verify the server with (TLS)')
  worker.add_argument('--tls-cert', help='PEM certificate (chain) of this worker, for mutual '
                      'TLS (with --tls-key)')
  worker.add_argument('--tls-key', help='PEM private key of this worker, for mutual TLS')
  worker.add_argument('--progress', action='store_true',
                      help='print JSON progress lines on stdout (ready, each push, done)')
  worker.add_argument('--compression', default='none', choices=COMPRESSIONS,
                      help='how gradients travel: none (float32), bf16, or int8/int4 block-wise '
                      'quantisation with error feedback (default none)')
  worker.add_argument('--lifeline', action='store_true',
                      help='exit when stdin closes (stdin is a pipe from a supervisor)')

  export = sub.add_parser('export', help='write the parameters of a checkpoint to a .npz file')
  export.add_argument('--checkpoint-dir', required=True, help='the server\'s checkpoint directory')
  export.add_argument('--step', type=int, default=None, help='which step (default: the newest)')
  export.add_argument('--out', required=True, help='the .npz file to write (keys: leaf paths)')

  ckpt = sub.add_parser('checkpoint', help='save a checkpoint now, or list them (via a server)')
  ckpt.add_argument('action', choices=('save', 'list'))
  ckpt.add_argument('--server', required=True, help='host:port of the server')
  ckpt.add_argument('--wait', action='store_true', help='save: return once written')

  demo = sub.add_parser(
      'demo', help='train an MLP on handwritten digits through a local optimizer server '
      'and worker processes, end to end')
  demo.add_argument('--workers', type=int, default=4, help='worker processes (default 4)')
  demo.add_argument('--devices', type=int, default=8,
                    help='simulated CPU devices of the server\'s mesh (default 8)')
  demo.add_argument('--steps', type=int, default=200, help='train until this step (default 200)')
  demo.add_argument('--batch-size', type=int, default=256,
                    help='global batch per step, split evenly over the workers (default 256)')
  demo.add_argument('--port', type=int, default=0,
                    help='server port on 127.0.0.1 (default 0: a free one)')
  demo.add_argument('--out', default='runs/demo',
                    help='output directory: summary.json, loss.png, checkpoints/, logs/ '
                    '(default runs/demo)')
  demo.add_argument('--resume', action='store_true',
                    help='continue from the newest checkpoint in OUT/checkpoints instead of '
                    'starting over')
  demo.add_argument('--seed', type=int, default=0, help='seed of the init and the batches')
  demo.add_argument('--compression', default='none', choices=COMPRESSIONS,
                    help='the workers\' --compression (default none)')
  return parser


def _client_security(args) -> dict:
  """OptimizerClient's token/TLS arguments from --token-*, --tls-ca, --tls-cert, --tls-key."""
  from service.protocol.tokens import load_tokens  # pylint: disable=import-outside-toplevel
  options = {}
  if args.token_file or args.token_env:
    options['token'] = load_tokens(args.token_file, args.token_env)[0]
  if args.tls_ca:
    options['root_certificates'] = args.tls_ca
  if bool(args.tls_cert) != bool(args.tls_key):
    raise SystemExit('lamb-sharded worker: --tls-cert and --tls-key go together')
  if args.tls_cert:
    options['client_cert'], options['client_key'] = args.tls_cert, args.tls_key
  return options


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  from service import logs  # pylint: disable=import-outside-toplevel
  if args.command == 'worker':
    logs.setup(args.log_level, args.log_format)
  if args.command == 'serve':
    config = config_lib.from_args(args)
    logs.setup(config.log_level, config.log_format)
    if config.devices:  # on a CPU-only host, simulate that many devices
      runtime.simulate_cpu_devices(config.devices)
    from service.server import app  # pylint: disable=import-outside-toplevel
    return app.serve_forever(config)
  if args.command == 'worker':
    # SIGTERM (a pod being deleted; PID 1 in a container has no default action) ends
    # the worker like Ctrl-C: nothing of its state needs saving, the server holds it all.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from service.examples import worker  # pylint: disable=import-outside-toplevel
    try:
      return worker.run(args.server, args.worker_index, args.num_workers, args.steps,
                        args.batch_size, model=args.model, seed=args.seed, init=args.init,
                        timeout=args.timeout, connect_timeout=args.connect_timeout,
                        progress=args.progress, lifeline=args.lifeline,
                        compression=args.compression,
                        client_options=_client_security(args))
    except KeyboardInterrupt:
      return 128 + signal.SIGTERM
  if args.command == 'export':
    from service.core.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    step, params = Checkpointer(args.checkpoint_dir).load_params(args.step)
    import numpy as np  # pylint: disable=import-outside-toplevel
    np.savez(args.out, **params)
    print(f'wrote {len(params)} leaves of step {step} to {args.out}')
    return 0
  if args.command == 'checkpoint':
    from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
    with OptimizerClient(args.server) as client:
      if args.action == 'save':
        step, path = client.save_checkpoint(wait=args.wait)
        print(f'checkpoint of step {step}: {path}')
      else:
        for c in client.list_checkpoints():
          print(f'{c.step:>8}  {"complete" if c.complete else "writing "}  '
                f'{c.size_bytes / 2**20:10.1f} MiB  {c.path}')
    return 0
  if args.command == 'demo':  # the server process simulates the devices, not this one
    from service.examples import demo  # pylint: disable=import-outside-toplevel
    return demo.run(workers=args.workers, devices=args.devices, steps=args.steps,
                    batch_size=args.batch_size, port=args.port, out=args.out,
                    resume=args.resume, seed=args.seed, compression=args.compression)
  raise AssertionError(args.command)


if __name__ == '__main__':
  sys.exit(main())
