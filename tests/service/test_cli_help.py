"""`lamb-sharded --version` and `serve --help` by topic (the parser only: nothing starts)."""

import argparse
import dataclasses
import importlib.metadata
import subprocess
import sys

from service import cli, config as config_lib
from svc import ROOT


def test_every_setting_is_in_exactly_one_help_topic():
  listed = [name for names in config_lib.GROUPS.values() for name in names]
  fields = [f.name for f in dataclasses.fields(config_lib.ServerConfig)]
  assert sorted(listed) == sorted(fields)  # none missing, none twice


def test_serve_help_groups_the_flags_by_topic_with_each_default_once():
  serve = cli.build_parser().commands['serve']
  text = serve.format_help()
  positions = [text.index(f'\n{title}:\n') for title in config_lib.GROUPS]
  assert positions == sorted(positions)
  network = text[positions[0]:positions[1]]
  assert '--port' in network and '--learning-rate' not in network
  assert text.count('(default: 50051)') == 1


def test_version():
  out = subprocess.run([sys.executable, '-m', 'service.cli', '--version'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True).stdout
  assert out.strip() == f'lamb-sharded {importlib.metadata.version("lamb-sharded")}'


def test_every_flag_with_a_default_says_it():
  """`worker --help` (and every command's) shows each default, once."""
  parser = cli.build_parser()
  for name, command in parser.commands.items():
    text = command.format_help()
    for action in command._actions:  # pylint: disable=protected-access
      if action.option_strings and not any(action.default is v for v in (
          None, False, True, argparse.SUPPRESS)):
        assert action.help.count('default') == 1, (name, action.option_strings, action.help)
    if name == 'worker':
      assert '(default 600.0)' in ' '.join(text.split()), text  # --connect-timeout
      assert '--seed SEED seed of the model and data (default 0)' in ' '.join(text.split())
