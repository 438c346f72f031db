"""The documentation works as printed: README.md, docs/*.md and deploy/README.md.

* The README's library example runs in a fresh shell: no test set-up, one device.
* Every doctest (a ```python block of `>>>` lines) of README.md and docs/*.md runs with the test
  suite: pytest collects those pages (`--doctest-glob='*.md'`, testpaths in pyproject.toml).
* Every other ```python block is an excerpt of a file of the repository, as it is there.
* Every relative link resolves to a file of the repository.
* Every `lamb-sharded ...` command of a ```sh block parses with the real command-line parser
  (`service.cli.build_parser`), every `python FILE` names a file of the repository and every
  `python -m MODULE` a module that imports.
* The two-process example of docs/multiprocess.md runs as printed (on free ports).
"""

import importlib.util
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from service import cli
from service.core.persistence import load_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'multihost'))
import mp_server  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / 'README.md', ROOT / 'deploy' / 'README.md', *(ROOT / 'docs').glob('*.md')])
# Pages other sessions are writing at the same time: a link to them may point ahead.
PAGES_TO_COME = {'docs/low-bit-state.md', 'docs/studies.md'}


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def blocks(path: pathlib.Path) -> list[tuple[str, str, int]]:
  """The fenced code blocks of a page: (language, text, line of the opening fence)."""
  found, lang, start, lines = [], None, 0, []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if lang is None and line.startswith('```'):
      lang, start, lines = line[3:].strip(), n, []
    elif lang is not None and line.startswith('```'):
      found.append((lang, '\n'.join(lines) + '\n', start))
      lang = None
    elif lang is not None:
      lines.append(line)
  assert lang is None, f'{_name(path)}: the block opened at line {start} is not closed'
  return found


# ------------------------------------------------------------------------------------------
# The library example, in a fresh process.

def _library_example() -> str:
  """The first ```python block of the README's "## The library" section."""
  readme = (ROOT / 'README.md').read_text()
  section = readme[readme.index('## The library'):readme.index('## The optimizer service')]
  match = re.search(r'```python\n(.*?)```', section, re.S)
  assert match, 'no ```python block in the library section'
  return match.group(1)


def test_library_example_runs_in_a_fresh_process_on_one_device(tmp_path):
  example = _library_example()
  # The point of the test: JAX sees exactly the devices a newcomer's shell has.
  example += '>>> jax.device_count()\n1\n'
  path = tmp_path / 'example.txt'
  path.write_text(example)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = str(ROOT)
  proc = subprocess.run([sys.executable, '-m', 'doctest', str(path)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------
# Python blocks.

def test_pytest_runs_the_doctests_of_every_page():
  options = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['pytest']['ini_options']
  assert "--doctest-glob='*.md'" in options['addopts']
  assert {'README.md', 'docs'} <= set(options['testpaths'])


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_python_blocks_are_doctests_or_excerpts_of_the_repository(page):
  sources = None
  for lang, text, line in blocks(page):
    if lang != 'python' or '>>>' in text:
      continue  # a doctest: run by pytest (above)
    if sources is None:
      sources = [p.read_text() for d in ('service', 'lamb_sharded', 'tests', 'deploy')
                 for p in (ROOT / d).rglob('*.py')]
    if not any(text in s for s in sources):  # a line of code to show a call: it must compile
      assert '\n' not in text.strip(), (
          f'{_name(page)}, line {line}: a ```python block that is neither a doctest nor a '
          f'part of a file of the repository')
      compile(text, f'{_name(page)}:{line}', 'exec')


# ------------------------------------------------------------------------------------------
# Links.

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


@pytest.mark.parametrize('page', PAGES, ids=_name)
def test_relative_links_resolve(page):
  text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)  # not in code blocks
  for target in LINK.findall(text):
    if re.match(r'[a-z]+:', target) or target.startswith('#'):
      continue  # https:, mailto:, an anchor of the page itself
    path = (page.parent / target.split('#')[0]).resolve()
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    if name in PAGES_TO_COME and not path.exists():
      continue
    assert path.exists(), f'{_name(page)}: the link ({target}) leads nowhere'


def test_the_readme_links_every_page_of_docs():
  readme = (ROOT / 'README.md').read_text()
  for page in (ROOT / 'docs').glob('*.md'):
    assert f'](docs/{page.name})' in readme, f'README.md does not link docs/{page.name}'
  for name in PAGES_TO_COME:
    assert f']({name})' in readme, name


# ------------------------------------------------------------------------------------------
# Shell commands.

ENDS = {'&', '&&', '||', '|', ';', '>', '2>', '>>', '2>&1', '<'}


def commands(text: str) -> list[list[str]]:
  """The simple commands of a sh block, as argv lists (continuations joined, comments and
  redirections dropped; `...`, "more flags", dropped too)."""
  out = []
  for line in text.replace('\\\n', ' ').splitlines():
    words = shlex.split(line, comments=True)
    current = []
    for w in words + [';']:
      if w in ENDS or w.startswith(('>', '2>')):
        if current:
          out.append(current)
        current = [] if w in ENDS - {'>', '2>', '>>', '<'} else None
        continue
      if current is not None:
        current.append(w)
    if current:
      out.append(current)
  return [[w for w in c if w != '...'] for c in out]


def program(argv: list[str]) -> tuple[str, list[str]]:
  """(program, its args): past VAR=value assignments, and past `kubectl exec ... --`."""
  while argv and re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*=.*', argv[0]):
    argv = argv[1:]
  if argv[:2] == ['kubectl', 'exec'] and '--' in argv:
    argv = argv[argv.index('--') + 1:]
  return (argv[0], argv[1:]) if argv else ('', [])


def sh_commands():
  for page in PAGES:
    for lang, text, line in blocks(page):
      if lang == 'sh':
        for argv in commands(text):
          yield page, line, argv


def test_every_lamb_sharded_command_parses_with_the_cli():
  parser, seen = cli.build_parser(), 0
  for page, line, argv in sh_commands():
    prog, args = program(argv)
    if prog != 'lamb-sharded':
      continue
    seen += 1
    try:
      parser.parse_args(args)
    except SystemExit as e:  # argparse has printed why
      raise AssertionError(f'{_name(page)}, the block at line {line}: `lamb-sharded '
                           f'{" ".join(args)}` is refused by the CLI') from e
  assert seen >= 20, seen


def test_every_python_command_names_a_file_or_module_of_the_repository():
  seen = 0
  for page, line, argv in sh_commands():
    prog, args = program(argv)
    if not re.fullmatch(r'(\S*/)?python(3(\.11)?)?', prog) or not args:
      continue
    seen += 1
    where = f'{_name(page)}, the block at line {line}'
    if args[0] == '-m':
      module = args[1]
      if module in ('pytest', 'pip'):
        continue
      assert importlib.util.find_spec(module), f'{where}: no module {module}'
    elif not args[0].startswith('-'):
      assert (ROOT / args[0]).is_file(), f'{where}: no file {args[0]}'
  assert seen >= 5, seen


# ------------------------------------------------------------------------------------------
# The two-process example, as printed.

def test_the_two_process_example_runs_as_printed(tmp_path):
  page = ROOT / 'docs' / 'multiprocess.md'
  text = page.read_text()
  section = text[text.index('## Two processes on one machine'):]
  script = next(t for lang, t, _ in blocks(page) if lang == 'sh' and t in section)
  for old, new in zip((8476, 50051, 50052, 9090, 9091), mp_server.free_ports(5)):
    script = script.replace(str(old), str(new))
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
         'PATH': f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'}
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen(['bash', '-c', script], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, by its id
      proc.wait()
  logs = '\n'.join(f'--- {p.name}\n' + p.read_text()[-2000:]
                   for p in sorted((tmp_path / 'runs' / 'mp').glob('*.log')))
  assert proc.returncode == 0, out + logs
  assert re.search(r'^step\s+50\b', out, re.M), out + logs
  assert re.search(r'^workers\s+2 expected, 2 seen', out, re.M), out + logs
  assert 'wrote ' in out and 'of step 50' in out, out + logs
  params = load_params(str(tmp_path / 'runs' / 'mp' / 'params.npz'))
  assert all(np.all(np.isfinite(leaf)) for layer in params.values() for leaf in layer.values())
