"""The README's library example runs as printed in a fresh shell: no test set-up, one device."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
