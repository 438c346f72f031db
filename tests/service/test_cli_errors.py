"""Every user mistake through the real CLI: one line naming the culprit, a non-zero exit.

Each row runs `lamb-sharded ...` in a subprocess and checks: the exit code (2 for
usage and settings, 1 for the rest), no traceback, and that the last line of stderr is
`lamb-sharded <cmd>: error: ...` matching the row's pattern (which names the flag,
key or file). Most rows fail before JAX is imported, so each takes a second or so.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import ipaddress
import os
import re
import socket
import subprocess
import sys

import grpc
import pytest

from service.config import ServerConfig
from service.server import app
from svc import ROOT, running_server

TOKEN = 'tok-cli-7e2b'


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _files(tmp):
  """The files the rows name, written into `tmp`."""
  files = {
      'bad_yaml': 'port: [1\n', 'unknown_key': 'nope: 1\n', 'wrong_type': '# settings\nnum-workers: two\n',
      'a_list': '- port\n', 'empty_tokens': '# no tokens here\n', 'not_npz': 'not a zip',
      'wrong_token': 'not-the-token\n',
      'huge_duration': 'max_stream_seconds: 1e10\n',
  }
  out = {}
  for name, text in files.items():
    path = os.path.join(tmp, name)
    with open(path, 'w', encoding='utf-8') as fh:
      fh.write(text)
    out[name] = path
  os.makedirs(os.path.join(tmp, 'empty_dir'))
  out['empty_dir'] = os.path.join(tmp, 'empty_dir')
  return out


CLOSED = _closed_port()
# name: (argv after `lamb-sharded`, with {file} placeholders; exit code; pattern)
CASES = {
    'no command': ([], 2, r'^lamb-sharded: error: the following arguments are required: command'),
    'unknown command': (['bogus'], 2, r"invalid choice: 'bogus'"),
    'unknown flag': (['serve', '--porrt', '1'], 2,
                     r'^lamb-sharded serve: error: unrecognized arguments: --porrt 1'),
    'flag not an int': (['serve', '--port', 'x'], 2, r'argument --port: invalid int value'),
    'port out of range': (['serve', '--port', '70000'], 2, r'--port: 70000 is not in'),
    'quorum over workers': (['serve', '--quorum', '3'], 2, r'--quorum: must be in \[0'),
    'NaN learning rate': (['serve', '--learning-rate', 'nan'], 2,
                          r'--learning-rate: must be a finite number, got nan'),
    'b1 of 1.5': (['serve', '--b1', '1.5'], 2, r'--b1: must be in \[0, 1\)'),
    'processes without a coordinator': (['serve', '--num-processes', '2'], 2,
                                        r'--coordinator-address: needed with --num-processes 2'),
    'coordinator not HOST:PORT': (['serve', '--num-processes', '2', '--coordinator-address',
                                   'host0'], 2, r"--coordinator-address: 'host0' is not HOST:PORT"),
    'process id outside the job': (['serve', '--num-processes', '2', '--process-id', '2'], 2,
                                   r'--process-id: must be in \[0, num_processes=2\)'),
    'unknown step mode': (['serve', '--step-mode', 'fast'], 2, r'--step-mode: invalid choice'),
    'a bad boolean': (['serve', '--async-checkpoints', 'maybe'], 2,
                      r'--async-checkpoints: expected true or false'),
    'config missing': (['serve', '--config', '{tmp}/missing.yaml'], 2,
                       r'--config .*missing.yaml: No such file'),
    'config not YAML': (['serve', '--config', '{bad_yaml}'], 2,
                        r'--config .*bad_yaml, line 2: not valid YAML'),
    'config unknown key': (['serve', '--config', '{unknown_key}'], 2,
                           r"--config .*unknown_key: unknown setting 'nope'"),
    'config wrong type': (['serve', '--config', '{wrong_type}'], 2,
                          r"--config .*wrong_type, line 2: num-workers: expected int, got 'two'"),
    'duration beyond a year': (['serve', '--max-stream-seconds', '1e10'], 2,
                               r'--max-stream-seconds: must be at most 31536000 seconds \(a '
                               r'year\), got 10000000000.0'),
    'YAML number without a dot': (['serve', '--config', '{huge_duration}'], 2,
                                  r'--config .*huge_duration, line 1: max_stream_seconds: must be '
                                  r'at most 31536000 seconds'),
    'config not a mapping': (['serve', '--config', '{a_list}'], 2,
                             r'--config .*a_list: expected a mapping of settings, got list'),
    'tls cert without key': (['serve', '--tls-cert', '{bad_yaml}'], 2,
                             r'--tls-cert: --tls-cert and --tls-key go together'),
    'tls files missing': (['serve', '--tls-cert', '/nope.pem', '--tls-key', '/nope.key'], 2,
                          r'--tls-cert: no such file: /nope.pem'),
    'token env unset': (['serve', '--auth-token-env', 'LAMB_TEST_UNSET_TOKEN'], 2,
                        r'--auth-token-env: .*LAMB_TEST_UNSET_TOKEN is not set'),
    'token file empty': (['serve', '--auth-token-file', '{empty_tokens}'], 2,
                         r'--auth-token-file: .*holds no token'),
    'init params missing': (['serve', '--init-params', '/nope.npz'], 2,
                            r'--init-params: no such file: /nope.npz'),
    'init params not npz': (['serve', '--port', '0', '--metrics-port', '-1', '--devices', '1',
                             '--init-params', '{not_npz}'], 2,
                            r'--init-params .*not_npz: not a .npz of parameters'),
    'worker: server not host:port': (['worker', '--server', 'nohost', '--worker-index', '0',
                                      '--steps', '1'], 2,
                                     r"^lamb-sharded worker: error: --server: expected "
                                     r"host:port, got 'nohost'"),
    'worker: negative index': (['worker', '--server', 'h:1', '--worker-index', '-1',
                                '--steps', '1'], 2, r'--worker-index: must be >= 0, got -1'),
    'worker: zero batch': (['worker', '--server', 'h:1', '--worker-index', '0', '--steps', '1',
                            '--batch-size', '0'], 2, r'--batch-size: must be >= 1, got 0'),
    'worker: model not importable': (['worker', '--server', 'h:1', '--worker-index', '0',
                                      '--steps', '1', '--model', 'nopkg.nomodel:make'], 2,
                                     r'--model nopkg.nomodel:make: cannot import nopkg.nomodel'),
    'worker: model no function': (['worker', '--server', 'h:1', '--worker-index', '0',
                                   '--steps', '1', '--model', 'service.examples.models:nope'],
                                  2, r'--model .*: service.examples.models has no function nope'),
    'worker: model not a spec': (['worker', '--server', 'h:1', '--worker-index', '0',
                                  '--steps', '1', '--model', 'resnet'], 2,
                                 r"--model: 'resnet' is neither a built-in model"),
    'worker: key without cert': (['worker', '--server', 'h:1', '--worker-index', '0',
                                  '--steps', '1', '--tls-key', '{bad_yaml}'], 2,
                                 r'--tls-key: --tls-cert and --tls-key go together'),
    'worker: token file missing': (['worker', '--server', 'h:1', '--worker-index', '0',
                                    '--steps', '1', '--token-file', '/nope'], 2,
                                   r'--token-file: no such file: /nope'),
    'export: no such dir': (['export', '--checkpoint-dir', '/nope', '--out', '{tmp}/p.npz'], 2,
                            r'--checkpoint-dir: no such directory: /nope'),
    'export: no checkpoint': (['export', '--checkpoint-dir', '{empty_dir}', '--out',
                               '{tmp}/p.npz'], 2,
                              r'--checkpoint-dir: no complete checkpoint in .*empty_dir'),
    'export: out dir missing': (['export', '--checkpoint-dir', '{empty_dir}', '--out',
                                 '/nope/p.npz'], 2, r'--out /nope/p.npz: no such directory'),
    'checkpoint: no server': (['checkpoint', 'list', '--server', f'127.0.0.1:{CLOSED}',
                               '--timeout', '1'], 1,
                              rf'no server at 127.0.0.1:{CLOSED} \(connection refused\)$'),
    'status: no server': (['status', '--server', f'127.0.0.1:{CLOSED}', '--timeout', '1'], 1,
                          rf'no server at 127.0.0.1:{CLOSED} \(connection refused\)$'),
    'worker: no server': (['worker', '--server', f'127.0.0.1:{CLOSED}', '--worker-index', '0',
                           '--steps', '1', '--connect-timeout', '1'], 1,
                          rf'no server at 127.0.0.1:{CLOSED} \(connection refused\); gave up '
                          r'after --connect-timeout 1s$'),
    'status: host does not resolve': (['status', '--server', 'no-such-host.invalid:1',
                                       '--timeout', '1'], 1,
                                      r'no server at no-such-host.invalid:1 \(the host does not '
                                      r'resolve'),
    # Real servers ({auth}: plaintext with bearer tokens; {tls}: TLS; {silent}: a port that
    # accepts connections and never answers).
    'status: wrong token': (['status', '--server', '{auth}', '--token-file', '{wrong_token}'], 1,
                            r'the server at 127.0.0.1:\d+ refused the token: check '
                            r'--token-env/--token-file$'),
    'worker: wrong token': (['worker', '--server', '{auth}', '--worker-index', '0', '--steps',
                             '1', '--token-file', '{wrong_token}'], 1,
                            r'the server at 127.0.0.1:\d+ refused the token'),
    'checkpoint: no token': (['checkpoint', 'list', '--server', '{auth}'], 1,
                             r'the server at 127.0.0.1:\d+ wants a bearer token: give '
                             r'--token-env or --token-file'),
    'status: plaintext to TLS': (['status', '--server', '{tls}', '--timeout', '1'], 1,
                                 r'the server at 127.0.0.1:\d+ speaks TLS and this client '
                                 r'plaintext: give --tls-ca'),
    'status: TLS to plaintext': (['status', '--server', '{auth}', '--tls-ca', '{tls_cert}',
                                  '--timeout', '1'], 1,
                                 r'the server at 127.0.0.1:\d+ speaks plaintext, not TLS'),
    'status: another CA': (['status', '--server', '{tls}', '--tls-ca', '{other_cert}',
                            '--timeout', '1'], 1,
                           r'the certificate of the server at 127.0.0.1:\d+ does not verify '
                           r'\(.*\): check --tls-ca'),
    'status: no answer': (['status', '--server', '{silent}', '--timeout', '1'], 1,
                          r'the server at 127.0.0.1:\d+ did not answer within --timeout 1s '
                          r'\(DEADLINE_EXCEEDED'),
    'status: a key as --tls-ca': (['status', '--server', 'h:1', '--tls-ca', '{tls_key}'], 2,
                                  r'--tls-ca: .* holds a PEM key, not a PEM certificate$'),
    'serve: a certificate as --tls-key': (['serve', '--tls-cert', '{tls_cert}', '--tls-key',
                                           '{tls_cert}'], 2,
                                          r'--tls-key: .* holds a PEM certificate, not a PEM '
                                          r'key$'),
    'demo: no workers': (['demo', '--workers', '0'], 2, r'--workers: must be >= 1, got 0$'),
    'demo: batch not a multiple': (['demo', '--workers', '3', '--batch-size', '256'], 2,
                                   r'--batch-size: 256 is not a multiple of --workers 3$'),
    'status: metrics not host:port': (['status', '--server', 'h:1', '--metrics', '9090'], 2,
                                      r"--metrics: expected host:port, got '9090'"),
}


def _run(argv, env=None, timeout=60):
  return subprocess.run([sys.executable, '-m', 'service.cli', *argv], cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT, **(env or {})},
                        capture_output=True, text=True, timeout=timeout)


def _check(proc, code, pattern, cmd):
  assert proc.returncode == code, (proc.returncode, proc.stderr)
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert not any(line.startswith('usage:') for line in lines), proc.stderr
  assert sum('error:' in line for line in lines) == 1, proc.stderr
  last = lines[-1]
  prefix = f'lamb-sharded {cmd}: error: ' if cmd else 'lamb-sharded: error: '
  assert last.startswith(prefix), proc.stderr
  assert re.search(pattern, last), (pattern, proc.stderr)


def _self_signed(directory, name):
  """A self-signed certificate for 127.0.0.1 and its key: (cert path, key path)."""
  from cryptography import x509  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
  key = ec.generate_private_key(ec.SECP256R1())
  subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), critical=False)
          .sign(key, hashes.SHA256()))
  paths = (os.path.join(directory, f'{name}.pem'), os.path.join(directory, f'{name}.key'))
  with open(paths[0], 'wb') as fh:
    fh.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(paths[1], 'wb') as fh:
    fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
  return paths


@pytest.fixture(scope='module')
def servers(tmp_path_factory):
  """{auth}, {tls}, {silent}: real servers for the rows that call one, and the certificates."""
  d = str(tmp_path_factory.mktemp('servers'))
  tokens = os.path.join(d, 'tokens')
  with open(tokens, 'w', encoding='utf-8') as fh:
    fh.write(TOKEN + '\n')
  cert, key = _self_signed(d, 'server')
  other, _ = _self_signed(d, 'other')
  with contextlib.ExitStack() as stack:
    auth, _ = stack.enter_context(running_server(devices=1, auth_token_file=tokens))
    tls, _ = stack.enter_context(running_server(devices=1, tls_cert=cert, tls_key=key,
                                                health_port=0))
    silent = stack.enter_context(socket.socket())
    silent.bind(('127.0.0.1', 0))
    silent.listen()
    yield {'auth': f'127.0.0.1:{auth.port}', 'tls': f'127.0.0.1:{tls.port}',
           'silent': f'127.0.0.1:{silent.getsockname()[1]}', 'tls_cert': cert,
           'tls_key': key, 'other_cert': other}


@pytest.mark.parametrize('name', list(CASES))
def test_a_user_mistake_is_one_line_naming_it(tmp_path, request, name):
  argv, code, pattern = CASES[name]
  files = {'tmp': str(tmp_path), **_files(str(tmp_path))}
  if any(f'{{{k}}}' in a for a in argv for k in ('auth', 'tls', 'silent', 'tls_cert',
                                                   'tls_key')):
    files.update(request.getfixturevalue('servers'))
  argv = [a.format(**files) for a in argv]
  cmd = argv[0] if argv and argv[0] != 'bogus' else None
  _check(_run(argv), code, pattern, cmd)


def test_log_level_debug_shows_the_traceback(tmp_path):
  proc = _run(['serve', '--config', str(tmp_path / 'missing.yaml'), '--log-level', 'DEBUG'])
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr and 'ConfigError' in proc.stderr


def test_a_second_server_on_the_same_port_refuses_to_start():
  with running_server(devices=1) as (running, _):
    grpc_port, metrics_port = running.port, running.metrics_port
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      same_port = pool.submit(_run, ['serve', '--host', '127.0.0.1', '--port', str(grpc_port),
                                     '--metrics-port', '-1', '--devices', '1'])
      same_metrics = pool.submit(_run, ['serve', '--host', '127.0.0.1', '--port', '0',
                                        '--metrics-port', str(metrics_port), '--devices', '1'])
      _check(same_port.result(), 1,
             rf'--port {grpc_port}: cannot listen on 127.0.0.1:{grpc_port}: the port is in use',
             'serve')
      _check(same_metrics.result(), 1,
             rf'--metrics-port {metrics_port}: cannot listen on 127.0.0.1:{metrics_port}: the '
             r'port is in use', 'serve')


def test_grpc_servers_do_not_share_a_port():
  # gRPC sets SO_REUSEPORT unless told not to: then a second server binds a port that
  # is already served, and the kernel splits the connections between the two.
  options = app._server_options(ServerConfig())  # pylint: disable=protected-access
  first = grpc.server(concurrent.futures.ThreadPoolExecutor(1), options=options)
  second = grpc.server(concurrent.futures.ThreadPoolExecutor(1), options=options)
  try:
    port = first.add_insecure_port('127.0.0.1:0')
    first.start()
    with pytest.raises(RuntimeError, match='Failed to bind'):
      second.add_insecure_port(f'127.0.0.1:{port}')
  finally:
    first.stop(None)
    second.stop(None)


# --- A worker waiting for its server ---

def _worker(address, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'service.cli', 'worker', '--server', address, '--worker-index', '0',
       '--steps', '2', '--init', '--log-level', 'WARNING', *extra], cwd=ROOT,
      env={**os.environ, 'PYTHONPATH': ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)


def test_a_worker_says_it_waits_for_no_server_then_names_the_address():
  port = _closed_port()
  proc = _worker(f'127.0.0.1:{port}', '--connect-timeout', '6')
  try:
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  waiting = [line for line in err.splitlines()
             if f'waiting for the server at 127.0.0.1:{port}' in line]
  assert waiting, err
  _check(subprocess.CompletedProcess(proc.args, proc.returncode, '', err), 1,
         rf'no server at 127.0.0.1:{port} \(connection refused\); gave up after '
         r'--connect-timeout 6s$', 'worker')


def test_a_worker_started_before_its_server_proceeds_once_it_is_up():
  port = _closed_port()
  proc = _worker(f'127.0.0.1:{port}', '--connect-timeout', '120')
  try:
    first = proc.stderr.readline()  # after WAITING_EVERY_S without a server
    assert f'waiting for the server at 127.0.0.1:{port}' in first, first
    config = ServerConfig(host='127.0.0.1', port=port, metrics_port=-1, devices=1).validate()
    running = app.start(config)
    try:
      _, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, err
      assert running.engine.step == 2
    finally:
      running.stop(grace=0)
  finally:
    proc.kill()


def test_yaml_numbers_are_read_as_users_write_them(tmp_path):
  """YAML 1.1 reads `1e1` (no dot) as a string; a float setting takes it as the number."""
  from service.config import ServerConfig, load_yaml  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'server.yaml'
  path.write_text('stream_idle_timeout_s: 1e1\nadmission_timeout_s: 2.5E+1\nhost: 1e3\n')
  values = load_yaml(str(path))
  assert values == {'stream_idle_timeout_s': 10.0, 'admission_timeout_s': 25.0, 'host': '1e3'}
  ServerConfig(**values).validate()
