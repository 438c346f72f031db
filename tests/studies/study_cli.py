"""What the study tests share: `lamb-sharded study ...` run as a user runs it, and the PNG check."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def study(*args, timeout=60) -> subprocess.CompletedProcess:
  """`lamb-sharded study ARGS` in a process of its own (stdout, stderr captured as text)."""
  return subprocess.run([sys.executable, '-m', 'service.cli', 'study', *args], cwd=ROOT,
                        env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                        timeout=timeout)


def is_png(path) -> bool:
  with open(path, 'rb') as f:
    return f.read(8) == PNG_MAGIC
