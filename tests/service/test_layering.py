"""The service's import graph: each side imports only what its place in the layering allows.

    protocol  <-  core  <-  server          (the server's side)
    protocol  <-  client  <-  examples      (the worker's side)

cli, config, errors, logs and runtime sit at the top level and may be imported by
any side (cli imports every side, lazily). Read from the source (every import
statement, also inside functions), and checked once more in a fresh interpreter:
importing the core loads no gRPC at all, not even through another module.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = ROOT / 'service'
SIDES = ('protocol', 'core', 'server', 'client', 'examples')
# side -> what its modules must never import (prefixes of module names).
FORBIDDEN = {
    'protocol': ('grpc', 'jax', 'service.core', 'service.server', 'service.client',
                 'service.examples'),
    'core': ('grpc', 'grpc_health', 'grpc_reflection', 'service.server', 'service.client',
             'service.examples'),
    'server': ('service.client', 'service.examples'),
    'client': ('service.core', 'service.server', 'service.examples'),
    'examples': ('service.core.engine', 'service.server'),
}


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def _modules(side: str) -> list[pathlib.Path]:
  return [p for p in sorted((SERVICE / side).rglob('*.py')) if '_gen' not in p.parts]


def test_the_tree_has_its_sides_one_level_deep():
  for side in SIDES:
    assert (SERVICE / side / '__init__.py').is_file(), side
  nested = [p for side in SIDES for p in (SERVICE / side).iterdir()
            if p.is_dir() and p.name not in ('_gen', '__pycache__')]
  assert not nested, nested
  top = sorted(p.name for p in SERVICE.glob('*.py'))
  assert top == ['__init__.py', 'cli.py', 'config.py', 'errors.py', 'logs.py', 'runtime.py']


@pytest.mark.parametrize('side', SIDES)
def test_no_side_imports_what_its_layer_forbids(side):
  modules = _modules(side)
  assert len(modules) >= 3, modules
  bad = [(p.relative_to(ROOT).as_posix(), name) for p in modules for name in _imports(p)
         if any(name == f or name.startswith(f + '.') for f in FORBIDDEN[side])]
  assert not bad, bad


def test_the_checker_sees_a_forbidden_import(tmp_path):
  # The check above must be able to fail: a core module importing grpc inside a function.
  probe = tmp_path / 'probe.py'
  probe.write_text('def f():\n  import grpc\n  from service.server import app\n')
  assert {'grpc', 'service.server', 'service.server.app'} <= _imports(probe)


def test_importing_the_core_loads_no_grpc():
  code = ('import sys; import service.core.engine, service.core.persistence, '
          'service.protocol.chunks; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("grpc", "grpc_health", "grpc_reflection")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.strip() == '[]', out
