"""`lamb-sharded`: the command-line entry point.

Subcommands import JAX lazily, so that each can set up the XLA environment (for
example the number of simulated CPU devices) before JAX initialises.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Optional, Sequence

from service import config as config_lib
from service import runtime
from service.errors import ConfigError, NoServer, StartupError


PROG = 'lamb-sharded'


class _Parser(argparse.ArgumentParser):
  """argparse, with a usage error as one line: `lamb-sharded <cmd>: error: <what>` (exit 2)."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _client_flags(parser: argparse.ArgumentParser, timeout: float) -> None:
  """--server, --timeout and the token/TLS flags of a command that calls a server."""
  parser.add_argument('--server', required=True, help='host:port of the server')
  parser.add_argument('--timeout', type=float, default=timeout,
                      help=f'deadline of each call in seconds (default {timeout:g})')
  _security_flags(parser)


def _security_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--token-file', help='file of the bearer token (its first token)')
  parser.add_argument('--token-env', help='environment variable holding the bearer token')
  parser.add_argument('--tls-ca', help='PEM file of the CA to verify the server with (TLS)')
  parser.add_argument('--tls-cert', help='PEM certificate (chain) of this client, for mutual '
                      'TLS (with --tls-key)')
  parser.add_argument('--tls-key', help='PEM private key of this client, for mutual TLS')


def _log_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--log-level', default='WARNING', type=str.upper,
                      choices=config_lib.LOG_LEVELS,
                      help='logging level (default WARNING; DEBUG also shows tracebacks)')

# The worker's --compression choices: service.client.COMPRESSIONS (not imported here: it
# loads JAX and gRPC, and parsing the command line must not).
COMPRESSIONS = ('none', 'bf16', 'int8', 'int4')


def _version() -> str:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return importlib.metadata.version('lamb-sharded')
  except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
    return 'unknown (not installed)'


def _show_defaults(parser: argparse.ArgumentParser) -> None:
  """Appends `(default X)` to the help of every flag with a default that does not say it."""
  for action in parser._actions:  # pylint: disable=protected-access
    default = action.default
    if (action.help and 'default' not in action.help and default is not None
        and default is not False and default is not argparse.SUPPRESS
        and action.option_strings):
      action.help += f' (default {default})'


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument('--version', action='version', version=f'{PROG} {_version()}')
  sub = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
  parser.commands = sub.choices  # name -> its parser, for errors in its own name

  serve = sub.add_parser('serve', help='run the optimizer server')
  config_lib.add_flags(serve)

  worker = sub.add_parser('worker', help='train a model through a server')
  worker.add_argument('--server', required=True,
                      help='host:port of the server (-: read it from the first line of stdin)')
  worker.add_argument('--worker-index', type=int, required=True, help='this worker\'s index')
  worker.add_argument('--num-workers', type=int, default=1, help='how many workers train')
  worker.add_argument('--steps', type=int, required=True, help='train until this step')
  worker.add_argument('--batch-size', type=int, default=64, help='examples per push')
  worker.add_argument('--model', default='regression', metavar='{regression,digits,MODULE:FN}',
                      help='model to train: a built-in one, or MODULE:FN, a function of your '
                      'own called as FN(seed=...) that returns a model (init, grad_fn, batch: '
                      'see service/examples/models.py) (default regression)')
  worker.add_argument('--seed', type=int, default=0, help='seed of the model and data')
  worker.add_argument('--init', action='store_true',
                      help='initialise the model if the server has none')
  worker.add_argument('--timeout', type=float, default=60.0, help='deadline per call (s)')
  worker.add_argument('--connect-timeout', type=float, default=600.0,
                      help='how long to wait for the server to come (back) up (s)')
  worker.add_argument('--log-level', default='INFO', type=str.upper,
                      choices=config_lib.LOG_LEVELS,
                      help='logging level (default INFO; DEBUG also shows tracebacks)')
  worker.add_argument('--log-format', default='text', choices=config_lib.LOG_FORMATS,
                      help='log lines as text, or one JSON object a line (default text)')
  _security_flags(worker)
  worker.add_argument('--progress', action='store_true',
                      help='print JSON progress lines on stdout (ready, each push, done)')
  worker.add_argument('--compression', default='none', choices=COMPRESSIONS,
                      help='how gradients travel: none (float32), bf16, or int8/int4 block-wise '
                      'quantisation with error feedback (default none)')
  worker.add_argument('--local-steps', type=int, default=1,
                      help='steps of the inner optimizer between pushes: 1, push each step\'s '
                      'gradient; H > 1, push the pseudo-gradient of H local steps (DiLoCo; '
                      'the server\'s --optimizer is then the outer one)')
  worker.add_argument('--inner-optimizer', default='adamw', choices=('adamw', 'adam', 'sgd'),
                      help='with --local-steps > 1: the optimizer of the local steps')
  worker.add_argument('--inner-learning-rate', type=float, default=1e-3,
                      help='with --local-steps > 1: its learning rate')
  worker.add_argument('--inner-weight-decay', type=float, default=0.0,
                      help='with --local-steps > 1 and adamw: its weight decay')
  worker.add_argument('--pull-dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='how the parameters travel to the worker (bfloat16: half the '
                      'bytes; it trains in float32 from them)')
  worker.add_argument('--lifeline', action='store_true',
                      help='exit when stdin closes (stdin is a pipe from a supervisor)')

  export = sub.add_parser('export', help='write the parameters of a checkpoint to a .npz file')
  export.add_argument('--checkpoint-dir', required=True, help='the server\'s checkpoint directory')
  export.add_argument('--step', type=int, default=None, help='which step (default: the newest)')
  export.add_argument('--out', required=True, help='the .npz file to write (keys: leaf paths)')
  _log_flag(export)

  ckpt = sub.add_parser('checkpoint', help='save a checkpoint now, or list them (via a server)')
  ckpt.add_argument('action', choices=('save', 'list'))
  _client_flags(ckpt, timeout=60.0)  # save --wait writes the whole state
  ckpt.add_argument('--wait', action='store_true', help='save: return once written')
  _log_flag(ckpt)

  status = sub.add_parser(
      'status', help='what a running server is doing: its model, step, settings, '
      'checkpoints and (with --metrics) pushes in flight and waiting workers')
  _client_flags(status, timeout=10.0)
  status.add_argument('--metrics', metavar='HOST:PORT',
                      help="the server's metrics port (its --metrics-port), to add what only "
                      'the metrics tell: pushes in flight, workers waiting, counters')
  status.add_argument('--json', action='store_true', help='print one JSON object')
  _log_flag(status)

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
  _log_flag(demo)

  study = sub.add_parser(
      'study', help='a study of the optimizer on a real task: large-batch (LAMB against '
      'AdamW as the global batch grows; docs/studies.md), diloco (local steps and outer '
      'optimizers through the service; docs/study-diloco.md)')
  studies = study.add_subparsers(dest='name', required=True, parser_class=_Parser,
                                 metavar='{large-batch,diloco}')
  from studies import diloco, large_batch  # pylint: disable=import-outside-toplevel  # no JAX
  large_batch.add_flags(studies.add_parser(
      'large-batch', help='LAMB against AdamW as the global batch grows'))
  diloco.add_flags(studies.add_parser(
      'diloco', help='K workers taking local steps (DiLoCo): communication against loss'))
  study.studies = studies.choices
  for name, command in sub.choices.items():
    if name != 'serve':  # serve's flags say their defaults (service.config.add_flags)
      _show_defaults(command)
  for command in studies.choices.values():
    _show_defaults(command)
  return parser


def _need_file(path: Optional[str], flag: str) -> None:
  if path is not None and not os.path.isfile(path):
    raise ConfigError(f'{flag}: no such file: {path}')


def _client_security(args) -> dict:
  """OptimizerClient's token/TLS arguments from --token-*, --tls-ca, --tls-cert, --tls-key."""
  from service.protocol.tokens import load_tokens  # pylint: disable=import-outside-toplevel
  options = {}
  for flag in ('token_file', 'tls_ca', 'tls_cert', 'tls_key'):
    _need_file(getattr(args, flag), '--' + flag.replace('_', '-'))
  if args.token_file or args.token_env:
    try:
      options['token'] = load_tokens(args.token_file, args.token_env)[0]
    except ValueError as e:
      raise ConfigError(f'{"--token-file" if args.token_file else "--token-env"}: {e}') from None
  if args.tls_ca:
    options['root_certificates'] = args.tls_ca
  if bool(args.tls_cert) != bool(args.tls_key):
    raise ConfigError(f'{"--tls-cert" if args.tls_cert else "--tls-key"}: --tls-cert and '
                      '--tls-key go together')
  for flag, kind in (('tls_ca', 'certificate'), ('tls_cert', 'certificate'), ('tls_key', 'key')):
    config_lib.check_pem(getattr(args, flag), kind, '--' + flag.replace('_', '-'))
  if args.tls_cert:
    options['client_cert'], options['client_key'] = args.tls_cert, args.tls_key
  return options


_ADDRESS = re.compile(r'.+:\d{1,5}')


def _check_server(address: str, flag: str = '--server') -> None:
  if not _ADDRESS.fullmatch(address) or not 0 < int(address.rsplit(':', 1)[1]) < 65536:
    raise ConfigError(f'{flag}: expected host:port, got {address!r}')


def _setup_logs(args) -> None:
  """Logs of a one-shot command (export, checkpoint, status): the libraries' below ERROR
  are chatter there (Orbax's notes on a read-only checkpoint manager, say)."""
  from service import logs  # pylint: disable=import-outside-toplevel
  logs.setup(args.log_level)
  logs.quiet_libraries(args.log_level, libraries='ERROR')


def _serve(args) -> int:
  config = config_lib.from_args(args).check_files()
  job = config.job()  # a multi-process server's coordinator and index, before JAX loads
  from service.server import supervise  # pylint: disable=import-outside-toplevel
  if job is not None and not supervise.is_child():  # JAX runs in a child this one watches
    return supervise.run(args.argv, job[1], config.num_processes, job[0], config.log_level)
  if supervise.is_child():
    supervise.die_with_parent()
  args.log_level = config.log_level  # --log-level DEBUG (flag or YAML) shows tracebacks
  from service.protocol.tokens import load_tokens  # pylint: disable=import-outside-toplevel
  try:  # a misconfigured secret fails here, before JAX is even loaded
    load_tokens(config.auth_token_file, config.auth_token_env)
  except ValueError as e:
    raise ConfigError(f'{"--auth-token-file" if config.auth_token_file else "--auth-token-env"}'
                      f': {e}') from None
  from service import logs  # pylint: disable=import-outside-toplevel
  logs.setup(config.log_level, config.log_format)
  if config.devices:  # on a CPU-only host, simulate that many devices
    runtime.simulate_cpu_devices(config.devices)
  logs.quiet_libraries(config.log_level)
  from service.server import app  # pylint: disable=import-outside-toplevel
  return app.serve_forever(config)


def _worker(args) -> int:
  if args.server != '-':
    _check_server(args.server)
  for flag, value, low in (('--num-workers', args.num_workers, 1), ('--steps', args.steps, 0),
                           ('--batch-size', args.batch_size, 1),
                           ('--local-steps', args.local_steps, 1)):
    if value < low:
      raise ConfigError(f'{flag}: must be >= {low}, got {value}')
  if args.worker_index < 0:
    raise ConfigError(f'--worker-index: must be >= 0, got {args.worker_index}')
  for flag, value in (('--timeout', args.timeout), ('--connect-timeout', args.connect_timeout),
                      ('--inner-learning-rate', args.inner_learning_rate)):
    if not value > 0:
      raise ConfigError(f'{flag}: must be > 0, got {value}')
  if not args.inner_weight_decay >= 0:
    raise ConfigError(f'--inner-weight-decay: must be >= 0, got {args.inner_weight_decay}')
  client_options = _client_security(args)
  from service import logs  # pylint: disable=import-outside-toplevel
  logs.setup(args.log_level, args.log_format)
  logs.quiet_libraries(args.log_level)
  from service.examples.models import load_model  # pylint: disable=import-outside-toplevel
  model = load_model(args.model, args.seed)
  # SIGTERM (a pod being deleted; PID 1 in a container has no default action) ends
  # the worker like Ctrl-C: nothing of its state needs saving, the server holds it all.
  signal.signal(signal.SIGTERM, signal.default_int_handler)
  from service.examples import worker  # pylint: disable=import-outside-toplevel
  try:
    return worker.run(args.server, args.worker_index, args.num_workers, args.steps,
                      args.batch_size, model=model, seed=args.seed, init=args.init,
                      timeout=args.timeout, connect_timeout=args.connect_timeout,
                      progress=args.progress, lifeline=args.lifeline,
                      client_options=client_options, compression=args.compression,
                      local_steps=args.local_steps, inner_optimizer=args.inner_optimizer,
                      inner_learning_rate=args.inner_learning_rate,
                      inner_weight_decay=args.inner_weight_decay, pull_dtype=args.pull_dtype)
  except KeyboardInterrupt:
    return 128 + signal.SIGTERM


def _export(args) -> int:
  if not os.path.isdir(args.checkpoint_dir):
    raise ConfigError(f'--checkpoint-dir: no such directory: {args.checkpoint_dir}')
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise ConfigError(f'--out {args.out}: no such directory: {out_dir}')
  if args.step is not None and args.step < 0:
    raise ConfigError(f'--step: must be >= 0, got {args.step}')
  _setup_logs(args)
  from service.core import checkpoint  # pylint: disable=import-outside-toplevel
  if checkpoint.latest_step(args.checkpoint_dir) is None:
    # Asked read-only, before a Checkpointer exists: Orbax's Checkpointer starts a thread
    # cleaning up old temporary directories that its close() does not wait for, and an
    # exit right after it (this error) met that thread still running (a traceback).
    raise ConfigError(f'--checkpoint-dir: no complete checkpoint in {args.checkpoint_dir}')
  checkpointer = checkpoint.Checkpointer(args.checkpoint_dir)
  try:
    step, params = checkpointer.load_params(args.step)
  except FileNotFoundError as e:
    raise ConfigError(f'{"--step" if args.step is not None else "--checkpoint-dir"}: '
                      f'{e}') from None
  finally:
    checkpointer.close()
  import numpy as np  # pylint: disable=import-outside-toplevel
  np.savez(args.out, **params)
  print(f'wrote {len(params)} leaves of step {step} to {args.out}')
  return 0


def _checkpoint(args) -> int:
  _check_server(args.server)
  options = _client_security(args)
  _setup_logs(args)
  from service.client import OptimizerClient  # pylint: disable=import-outside-toplevel
  with OptimizerClient(args.server, timeout=args.timeout, **options) as client:
    if args.action == 'save':
      step, path = client.save_checkpoint(wait=args.wait)
      print(f'checkpoint of step {step}: {path}')
    else:
      for c in client.list_checkpoints():
        print(f'{c.step:>8}  {"complete" if c.complete else "writing "}  '
              f'{c.size_bytes / 2**20:10.1f} MiB  {c.path}')
  return 0


def _status(args) -> int:
  _check_server(args.server)
  if args.metrics is not None:
    _check_server(args.metrics, '--metrics')
  options = _client_security(args)
  _setup_logs(args)
  from service.examples import status  # pylint: disable=import-outside-toplevel
  report = status.gather(args.server, args.metrics, timeout=args.timeout, **options)
  print(status.as_json(report) if args.json else status.as_text(report))
  return 0


def _demo(args) -> int:  # the server process simulates the devices, not this one
  for flag, value in (('--workers', args.workers), ('--devices', args.devices),
                      ('--steps', args.steps), ('--batch-size', args.batch_size)):
    if value < 1:
      raise ConfigError(f'{flag}: must be >= 1, got {value}')
  if args.batch_size % args.workers:
    raise ConfigError(f'--batch-size: {args.batch_size} is not a multiple of --workers '
                      f'{args.workers}')
  from service.examples import demo  # pylint: disable=import-outside-toplevel
  return demo.run(workers=args.workers, devices=args.devices, steps=args.steps,
                  batch_size=args.batch_size, port=args.port, out=args.out,
                  resume=args.resume, seed=args.seed, compression=args.compression)


def _study(args) -> int:
  from studies import diloco, large_batch  # pylint: disable=import-outside-toplevel
  study = {'large-batch': large_batch, 'diloco': diloco}[args.name]
  study.run(study.config_from_args(args))
  return 0


COMMANDS = {'serve': _serve, 'worker': _worker, 'export': _export, 'checkpoint': _checkpoint,
            'status': _status, 'demo': _demo, 'study': _study}


def _explain(error: Exception, args) -> tuple[int, str]:
  """(exit code, one line) for an error that ends a command."""
  if isinstance(error, ConfigError):
    return 2, str(error)
  if isinstance(error, (StartupError, NoServer)):
    return 1, str(error)
  grpc = sys.modules.get('grpc')
  if grpc is not None and isinstance(error, grpc.RpcError):
    from service.client import hints  # pylint: disable=import-outside-toplevel
    flag = lambda name: getattr(args, name, None)  # pylint: disable=unnecessary-lambda-assignment
    return 1, hints.explain(error, flag('server') or '?', tls=bool(flag('tls_ca') or
                                                               flag('tls_cert')),
                            token=bool(flag('token_file') or flag('token_env')),
                            ca_file=flag('tls_ca'), timeout=flag('timeout'))
  if isinstance(error, OSError) and error.filename is not None:
    return 1, f'{error.filename}: {error.strerror}'
  return 1, (f'{type(error).__name__}: {error} (--log-level DEBUG shows where)')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs one command; a mistake ends it with one line on stderr and exit 2 (usage, settings)
  or 1 (anything else), never a traceback -- unless --log-level DEBUG."""
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  if unknown:  # said by the command's parser: `lamb-sharded serve: error: ...`
    parser.commands[args.command].error(f'unrecognized arguments: {" ".join(unknown)}')
  args.argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return COMMANDS[args.command](args)
  except KeyboardInterrupt:  # Ctrl-C before a command's own handling of it (e.g. starting)
    return 128 + signal.SIGINT
  except Exception as e:  # pylint: disable=broad-except
    if str(getattr(args, 'log_level', '')).upper() == 'DEBUG':
      raise
    code, message = _explain(e, args)
    print(f'{PROG} {args.command}: error: {message}', file=sys.stderr, flush=True)
    return code


if __name__ == '__main__':
  sys.exit(main())
