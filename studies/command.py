"""What every study's command does around its runs: the progress bar, and `python -m` entry."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from service.errors import ConfigError


def run_with_progress(run_all: Callable[[Any], None], enabled: bool) -> None:
  """Calls `run_all(bar)` with a tqdm bar on stderr counting steps (its total grows as runs
  are planned), closed whatever happens."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=0, unit='step', desc='study', dynamic_ncols=True, file=sys.stderr,
             disable=not enabled, smoothing=0.05)
  try:
    run_all(bar)
  finally:
    bar.close()


def main(module: str, doc: str, add_flags: Callable[[argparse.ArgumentParser], None],
         config_from_args: Callable[[argparse.Namespace], Any], run: Callable[[Any], Any],
         argv: Optional[Sequence[str]] = None) -> int:
  """`python -m MODULE [flags]`: parses the flags, runs the study; a bad setting is one
  line naming it and status 2."""
  parser = argparse.ArgumentParser(prog=f'python -m {module}', description=doc.splitlines()[0])
  add_flags(parser)
  args = parser.parse_args(argv)
  try:
    run(config_from_args(args))
  except ConfigError as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  return 0
