"""Bearer-token auth, TLS and mutual TLS, and the plaintext health port: real servers."""

import contextlib
import datetime
import ipaddress
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.protocol import SERVICE_NAME
from service.protocol.tokens import load_tokens, parse_tokens
from service.server.auth import check_bearer
from service.server import app as server_lib
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2 as pb
from service.protocol._gen.lamb_sharded.v1 import optimizer_service_pb2_grpc as pb_grpc
from service.client import OptimizerClient
from service.config import ServerConfig, parse
from svc import ROOT, params_of, push_messages

x509 = pytest.importorskip('cryptography.x509')
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = 'tok-3f1a9c'
P0 = {"['w']": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
      "['b']": np.linspace(0.5, 1, 3, dtype=np.float32)}
G = {k: np.full(v.shape, 0.25, np.float32) for k, v in P0.items()}


@contextlib.contextmanager
def server(**overrides):
  config = ServerConfig(host='127.0.0.1', port=0, devices=1, learning_rate=0.1,
                        **{'metrics_port': 0, **overrides}).validate()
  running = server_lib.start(config)
  try:
    yield running
  finally:
    running.stop(grace=0)


def _token_file(tmp_path, *tokens):
  path = tmp_path / 'tokens'
  path.write_text('# the workers\' tokens\n\n' + '\n'.join(tokens) + '\n')
  return str(path)


def _code(call):
  with pytest.raises(grpc.RpcError) as e:
    call()
  return e.value.code()


def _health(channel, service=''):
  return health_pb2_grpc.HealthStub(channel).Check(
      health_pb2.HealthCheckRequest(service=service), timeout=10).status


# --- Bearer tokens ---

def test_tokens_are_parsed_and_checked():
  assert parse_tokens('# c\n\n  a1 \nb2\n', 'f') == ['a1', 'b2']
  with pytest.raises(ValueError):
    parse_tokens('a b\n', 'f')
  toks = [b'a1', b'b2']
  assert check_bearer('Bearer b2', toks)
  assert check_bearer('bearer a1', toks)
  assert not check_bearer('Bearer a', toks)
  assert not check_bearer('Basic a1', toks)
  assert not check_bearer('a1', toks)
  assert not check_bearer(None, toks)
  with pytest.raises(ValueError, match='not set'):
    load_tokens(token_env='NO_SUCH_VAR_X', environ={})
  with pytest.raises(ValueError, match='no token'):
    load_tokens(token_env='V', environ={'V': '# only a comment\n'})


def test_flags_exist():
  c = parse(['--auth-token-file', 'f', '--auth-token-env', 'E', '--tls-cert', 'c',
             '--tls-key', 'k', '--tls-client-ca', 'ca', '--health-port', '0'])
  assert (c.auth_token_file, c.auth_token_env, c.tls_cert, c.tls_key, c.tls_client_ca,
          c.health_port) == ('f', 'E', 'c', 'k', 'ca', 0)
  with pytest.raises(ValueError, match='go together'):
    ServerConfig(tls_cert='c').validate()
  with pytest.raises(ValueError, match='mutual TLS'):
    ServerConfig(tls_client_ca='ca').validate()


def test_without_a_valid_token_nothing_is_reached_or_changed(tmp_path):
  with server(auth_token_file=_token_file(tmp_path, 'other', TOKEN)) as running:
    target = f'127.0.0.1:{running.port}'
    with OptimizerClient(target, timeout=30, token=TOKEN) as good:
      good.initialize(P0)
      assert good.push(0, G, 1, 'w0').applied
      before = params_of(good)
    stub = pb_grpc.OptimizerServiceStub(grpc.insecure_channel(target))
    for metadata in (None, [('authorization', 'Bearer wrong')],
                     [('authorization', TOKEN)], [('authorization', 'Basic ' + TOKEN)]):
      assert _code(lambda: stub.DescribeModel(pb.DescribeModelRequest(), timeout=10,
                                              metadata=metadata)) == \
          grpc.StatusCode.UNAUTHENTICATED
      msgs = push_messages(list(G.items()), step=1, push_id='evil')
      assert _code(lambda: stub.PushGradients(iter(msgs), timeout=10, metadata=metadata)) == \
          grpc.StatusCode.UNAUTHENTICATED
      assert _code(lambda: list(stub.PullParameters(pb.PullParametersRequest(), timeout=10,
                                                    metadata=metadata))) == \
          grpc.StatusCode.UNAUTHENTICATED
      assert _code(lambda: stub.SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=10,
                                               metadata=metadata)) == \
          grpc.StatusCode.UNAUTHENTICATED
    for kwargs in ({}, {'token': 'wrong'}):  # the client library too
      with OptimizerClient(target, timeout=10, retries=1, **kwargs) as bad:
        assert _code(bad.describe) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda bad=bad: bad.push(1, G, 1, 'w0')) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(bad.pull) == grpc.StatusCode.UNAUTHENTICATED
    # Reflection needs a token; health does not.
    channel = grpc.insecure_channel(target)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    assert _code(lambda: list(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services='')]), timeout=10))) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    # Nothing changed; the second configured token works too.
    with OptimizerClient(target, timeout=30, token='other') as good:
      after = params_of(good)
      assert good.describe().step == 1
    assert before[0] == after[0] == 1
    for k in P0:
      np.testing.assert_array_equal(before[1][k], after[1][k])


def test_an_uninitialised_server_stays_so(monkeypatch):
  monkeypatch.setenv('LAMB_TEST_TOKENS', f'# from a Secret\n{TOKEN}\n')
  with server(auth_token_env='LAMB_TEST_TOKENS') as running:
    target = f'127.0.0.1:{running.port}'
    with OptimizerClient(target, timeout=10, retries=1) as bad:
      assert _code(lambda: bad.initialize(P0)) == grpc.StatusCode.UNAUTHENTICATED
    with OptimizerClient(target, timeout=30, token=TOKEN) as good:
      assert not good.describe().initialized
      good.initialize(P0)
      assert good.describe().initialized


def test_missing_token_source_fails_at_start(tmp_path):
  (tmp_path / 'empty').write_text('# nothing\n')
  with pytest.raises(ValueError, match='no token'):
    server_lib.start(ServerConfig(host='127.0.0.1', port=0, devices=1,
                                  auth_token_file=str(tmp_path / 'empty')))


def test_no_auth_configured_warns(caplog):
  with caplog.at_level('WARNING', logger='service.server'):
    with server() as running:
      with OptimizerClient(f'127.0.0.1:{running.port}', timeout=30) as client:
        assert not client.describe().initialized
  assert 'no authentication configured' in caplog.text


# --- TLS ---

def _key():
  return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key):
  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _cert(name, key, issuer_name, issuer_key, *, ca=False, san=None, client=False):
  now = datetime.datetime.now(datetime.timezone.utc)
  b = (x509.CertificateBuilder()
       .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
       .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
       .public_key(key.public_key()).serial_number(x509.random_serial_number())
       .not_valid_before(now - datetime.timedelta(minutes=5))
       .not_valid_after(now + datetime.timedelta(days=1))
       .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
  if ca:
    b = b.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False), critical=True)
  else:
    usage = x509.ExtendedKeyUsageOID.CLIENT_AUTH if client else \
        x509.ExtendedKeyUsageOID.SERVER_AUTH
    b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
  if san:
    b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
  return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
  d = tmp_path_factory.mktemp('pki')
  ca_key, other_key = _key(), _key()
  ca = _cert('test CA', ca_key, 'test CA', ca_key, ca=True)
  other_ca = _cert('other CA', other_key, 'other CA', other_key, ca=True)
  srv_key = _key()
  srv = _cert('localhost', srv_key, 'test CA', ca_key, san=[
      x509.DNSName('localhost'), x509.IPAddress(ipaddress.ip_address('127.0.0.1'))])
  cli_key, bad_key = _key(), _key()
  cli = _cert('worker-0', cli_key, 'test CA', ca_key, client=True)
  bad = _cert('intruder', bad_key, 'other CA', other_key, client=True)
  files = {}
  for name, data in (('ca.pem', ca), ('other_ca.pem', other_ca), ('server.pem', srv),
                     ('server.key', _pem_key(srv_key)), ('client.pem', cli),
                     ('client.key', _pem_key(cli_key)), ('bad.pem', bad),
                     ('bad.key', _pem_key(bad_key))):
    (d / name).write_bytes(data)
    files[name] = str(d / name)
  return files


def _tls_server(pki, mtls=False, **overrides):
  return server(tls_cert=pki['server.pem'], tls_key=pki['server.key'], health_port=0,
                tls_client_ca=pki['ca.pem'] if mtls else None, **overrides)


def _fails(client):
  with client:
    code = _code(lambda: client.describe(timeout=5))
  assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), code


def test_tls_and_the_plaintext_health_port(pki):
  with _tls_server(pki) as running:
    assert running.health_port and running.health_port != running.port
    target = f'127.0.0.1:{running.port}'
    with OptimizerClient(target, timeout=30, root_certificates=pki['ca.pem']) as client:
      client.initialize(P0)
      assert client.push(0, G, 1, 'w0').applied
      assert params_of(client)[0] == 1
    with open(pki['ca.pem'], 'rb') as fh:  # PEM bytes work as well as a path
      with OptimizerClient('localhost:%d' % running.port, timeout=30,
                           root_certificates=fh.read()) as client:
        assert client.describe().step == 1
    # Plaintext to the TLS port, or TLS with an unrelated root: refused.
    _fails(OptimizerClient(target, timeout=5, retries=1))
    _fails(OptimizerClient(target, timeout=5, retries=1, root_certificates=pki['other_ca.pem']))
    # The health port: plaintext, health only, the same status.
    health_channel = grpc.insecure_channel(f'127.0.0.1:{running.health_port}')
    for name in ('', SERVICE_NAME):
      assert _health(health_channel, name) == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.OptimizerServiceStub(health_channel)
    assert _code(lambda: stub.DescribeModel(pb.DescribeModelRequest(), timeout=10)) == \
        grpc.StatusCode.UNIMPLEMENTED
    refl = reflection_pb2_grpc.ServerReflectionStub(health_channel)
    assert _code(lambda: list(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services='')]), timeout=10))) == \
        grpc.StatusCode.UNIMPLEMENTED
    running.stop(grace=0)  # the health port stops with the server
    assert _code(lambda: _health(health_channel)) == grpc.StatusCode.UNAVAILABLE


def test_no_health_port_without_tls():
  with server() as running:
    assert running.health_port is None and running.health_server is None


def test_mutual_tls_and_tokens(pki, tmp_path):
  with _tls_server(pki, mtls=True, auth_token_file=_token_file(tmp_path, TOKEN)) as running:
    target = f'127.0.0.1:{running.port}'
    cert = dict(root_certificates=pki['ca.pem'], client_cert=pki['client.pem'],
                client_key=pki['client.key'])
    with OptimizerClient(target, timeout=30, token=TOKEN, **cert) as client:
      client.initialize(P0)
      assert client.describe().initialized
    # The right certificate but no token: UNAUTHENTICATED.
    with OptimizerClient(target, timeout=10, retries=1, **cert) as client:
      assert _code(client.describe) == grpc.StatusCode.UNAUTHENTICATED
    # No client certificate, or one from another CA: the handshake fails.
    _fails(OptimizerClient(target, timeout=5, retries=1, token=TOKEN,
                           root_certificates=pki['ca.pem']))
    _fails(OptimizerClient(target, timeout=5, retries=1, token=TOKEN,
                           root_certificates=pki['ca.pem'], client_cert=pki['bad.pem'],
                           client_key=pki['bad.key']))
    # Probes need neither certificates nor tokens.
    health_channel = grpc.insecure_channel(f'127.0.0.1:{running.health_port}')
    assert _health(health_channel) == health_pb2.HealthCheckResponse.SERVING
    with OptimizerClient(target, timeout=30, token=TOKEN, **cert) as client:
      assert client.describe().step == 0


def test_worker_cli_with_mutual_tls_and_a_token(pki, tmp_path):
  with _tls_server(pki, mtls=True, auth_token_file=_token_file(tmp_path, TOKEN)) as running:
    proc = subprocess.run(
        [sys.executable, '-m', 'service.cli', 'worker', '--server',
         f'localhost:{running.port}', '--worker-index', '0', '--steps', '2', '--init',
         '--batch-size', '8', '--log-level', 'WARNING', '--connect-timeout', '30',
         '--token-env', 'LAMB_WORKER_TOKEN', '--tls-ca', pki['ca.pem'],
         '--tls-cert', pki['client.pem'], '--tls-key', pki['client.key']],
        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT, 'LAMB_WORKER_TOKEN': TOKEN},
        capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert running.engine.describe().step == 2


def test_a_health_port_in_use_refuses_to_start(pki):
  from service.errors import StartupError  # pylint: disable=import-outside-toplevel
  from service.server import app  # pylint: disable=import-outside-toplevel
  with _tls_server(pki) as running:
    taken = running.health_port
    config = ServerConfig(host='127.0.0.1', port=0, metrics_port=-1, devices=1,
                          tls_cert=pki['server.pem'], tls_key=pki['server.key'],
                          health_port=taken).validate()
    with pytest.raises(StartupError, match=rf'--health-port {taken}: cannot listen on '
                       rf'127.0.0.1:{taken}: the port is in use'):
      app.start(config)
    assert _health(grpc.insecure_channel(f'127.0.0.1:{taken}')) == \
        health_pb2.HealthCheckResponse.SERVING  # the first server's, untouched


def test_a_token_bound_to_workers_pushes_as_them_only(tmp_path):
  """A token line `TOKEN workers=ID,...` binds it: pushing as another worker id is
  PERMISSION_DENIED, naming the worker, and changes nothing; an unbound token may push
  as any worker."""
  tokens = _token_file(tmp_path, 'tok-bound workers=w0,w1', 'tok-free')
  with server(auth_token_file=tokens, num_workers=3) as running:
    target = f'127.0.0.1:{running.port}'
    with OptimizerClient(target, timeout=30, token='tok-bound') as bound, \
        OptimizerClient(target, timeout=30, token='tok-free') as free:
      bound.initialize(P0)
      assert bound.push(0, G, 1, 'w0').accepted_step == 0
      with pytest.raises(grpc.RpcError) as e:
        bound.push(0, G, 1, 'w2')
      assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
      assert 'this token may push as w0, w1 only, not as worker w2' in e.value.details()
      assert running.engine.pushes_in_flight == 0
      assert free.push(0, G, 1, 'w2').accepted_step == 0  # unbound: any worker
      assert bound.push(0, G, 1, 'w1').applied  # the step: w0, w2 and w1, nothing else
  with pytest.raises(ValueError, match=r'line 1: after the token, only workers='):
    parse_tokens('tok group=w0\n', 'f')
