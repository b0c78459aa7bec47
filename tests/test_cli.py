"""The command line: every command parses absl flags through jaxtrain.cli.common, answers --help, and turns
every user mistake into one line on stderr and exit status 2 (in-process: each run parses onto fresh flags)."""

import ast
import os
import subprocess
import sys

import pytest

from jaxtrain import cli
from jaxtrain.cli import common, merge_adapters
from jaxtrain.errors import ConfigError, NonFiniteError, UserError
from tests.conftest import REPO
from tests.helpers import run_command


def status(argv, capsys):
  """(exit status, stdout, stderr lines) of `jaxtrain ARGV` run in this process."""
  code, out, err = run_command(capsys, *argv)
  return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize('command', list(cli.COMMANDS))
def test_every_command_rejects_an_unknown_flag_in_one_line_and_answers_help(command, capsys):
  code, _, err = status([command, '--bogus=1'], capsys)
  assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and 'bogus' in err[0], (code, err)
  code, out, err = status([command, '--help'], capsys)
  assert code == 0 and out.startswith(f'usage: jaxtrain {command} ') and not err, (code, err)


@pytest.mark.parametrize('argv, needle', [
    (['samples', '--workdir=/nonexistent'], 'error: --step is required'),
    (['export', '--out=/tmp/o'], 'error: --workdir is required'),
    (['check'], 'error: --config is required'),
    (['blocklist', '--workdir=/x', 'stray'], "error: unexpected arguments ['stray']"),
    (['samples', '--workdir=/x', '--step=two'], 'error: flag --step=two: '),
    (['train', '--config=configs/tiny.py', '--config.train.stepz=3'],
     "error: --config.train.stepz: unknown config key 'train.stepz': train has no key 'stepz'; did you mean "
     "'train.steps'?"),
    (['check', '--config=configs/tiny.py', '--config.data.sources.web.weight=2'],
     "unknown config key 'data.sources.web.weight': data.sources has no key 'web' (a source is defined in the "
     "config file"),
    (['check', '--config=configs/nope.py'], 'error: --config=configs/nope.py: no such config file'),
    (['merge-adapters', '--adapters', 'a', 'b', '--weights', '1', 'x', '--out=/tmp/o'],
     "error: --weights='1,x': must be numbers"),
])
def test_user_mistakes_exit_2_in_one_line(argv, needle, capsys):
  code, out, err = status(argv, capsys)
  assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and needle in err[0], (code, err)
  assert not out


@pytest.mark.parametrize('config, needle', [
    ('configs/tiny.py:size=1b', "config argument 'size=1b': this config file takes no arguments (valid: none)"),
    ('configs/lora_sft.py:bogus=1', "config argument 'bogus=1': expected key=value with key one of data, hf, "
                                    'quantize, rank, template'),
    ('configs/stackwise.py:size=1b', "config argument size='1b': valid values are cpu, 125m"),
    ('configs/llama.py:sise=cpu', "config argument 'sise=cpu': expected key=value with key one of size"),
])
def test_config_files_refuse_unknown_arguments_in_one_line(config, needle, capsys):
  code, out, err = status(['check', f'--config={config}'], capsys)  # check: nothing is written even before
  assert code == 2 and len(err) == 1 and err[0] == f'error: flag --config={config}: {needle}', (code, err)
  assert not out


def test_commands_and_unknown_command(capsys):
  code, out, _ = status(['--help'], capsys)
  assert code == 0 and all(f'  {name} ' in out for name in cli.COMMANDS)
  code, out, err = status([], capsys)
  assert code == 2 and 'usage: jaxtrain COMMAND' in out
  assert err == [f"error: no command given; expected one of {', '.join(cli.COMMANDS)}"]
  code, _, err = status(['trian'], capsys)
  assert code == 2 and err == [f"error: unknown command 'trian'; valid: {', '.join(cli.COMMANDS)}"]


def test_the_error_handler():
  for error, code in ((ConfigError('train.steps', -1, 'must be >= 1'), 2), (UserError('a\n  b'), 2),
                      (NonFiniteError('3 consecutive non-finite steps'), 1)):
    with pytest.raises(SystemExit) as e:
      with common.errors():
        raise error
    assert e.value.code == code
  with pytest.raises(KeyError):  # a bug is not a user mistake: it keeps its traceback
    with common.errors():
      raise KeyError('x')


def test_merge_adapters_takes_space_separated_lists():
  argv = ['p', '--adapters', 'a', 'b', '--weights', '0.7', '-0.3', '--method', 'ties', '--out=o', '--', '--x']
  assert merge_adapters.normalize(argv) == ['p', '--adapters=a,b', '--weights=0.7,-0.3', '--method', 'ties',
                                            '--out=o', '--', '--x']
  assert merge_adapters.normalize(['p', '--adapters=a,b']) == ['p', '--adapters=a,b']


def test_module_entry_points():
  proc = subprocess.run([sys.executable, '-m', 'jaxtrain', 'samples', '--workdir=/x', '--step=1', 'stray'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr == "error: unexpected arguments ['stray']: give every setting as a " \
      '--flag\n', proc.stderr


def test_only_the_entry_points_import_the_command_line():
  root = os.path.join(REPO, 'jaxtrain')
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, root)
      if not name.endswith('.py') or rel.startswith('cli' + os.sep) or rel in ('__main__.py', 'main.py'):
        continue
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ''] + [f'{node.module}.{a.name}' for a in node.names] \
            if isinstance(node, ast.ImportFrom) else []
        bad = [n for n in names if n in ('jaxtrain.cli', 'jaxtrain.main') or n.startswith('jaxtrain.cli.')]
        assert not bad, f'{rel} imports {bad}'


def test_config_overrides_are_read_from_the_arguments_parsed_in_process(capsys):
  # config_flags looks for --config.KEY overrides in sys.argv unless told otherwise: an in-process call (a
  # notebook, a test) must see the overrides it was given, each call its own.
  for value in ('abc', 'xyz'):
    with pytest.raises(SystemExit) as e:
      cli.main(['jaxtrain', 'check', '--config=configs/tiny.py', f'--config.train.steps={value}'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"'{value}'" in err and 'Unknown command line flag' not in err, err
