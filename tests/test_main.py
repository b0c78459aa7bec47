"""User mistakes in configs and flags: exit status 2, one line naming key and value, nothing written."""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import jaxtrain
from jaxtrain import cli
from jaxtrain.errors import ConfigError
from jaxtrain.cli.common import default_workdir
from tests.conftest import REPO

BAD_FILE = '''
from jaxtrain.config.defaults import base_config
def get_config(arg=None):
  c = base_config()
  c.train.{line}
  return c
'''


SUBPROCESS_CASES = 4  # a key typo, a bad value, a config-file typo, a bad file: as real processes


def cases(tmp):
  typo = os.path.join(tmp, 'typo.py')
  with open(typo, 'w') as f:
    f.write(BAD_FILE.format(line="unlock()\n  c.train.stepz = 5"))
  wrong_type = os.path.join(tmp, 'wrong_type.py')
  with open(wrong_type, 'w') as f:
    f.write(BAD_FILE.format(line="steps = 'many'"))
  a_file = os.path.join(tmp, 'a_file')
  open(a_file, 'w').close()
  tiny = '--config=configs/tiny.py'
  return [
      ([tiny, '--config.train.stepz=3'], 'stepz'),  # unknown key on the command line
      ([tiny, '--config.train.steps=abc'], 'abc'),  # wrong type on the command line
      ([f'--config={typo}'], 'train.stepz'),  # unknown key inside a config file
      ([f'--config={wrong_type}'], "field 'steps'"),  # wrong type inside a config file
      ([tiny, '--config.data.batch_size=6'], 'data.batch_size=6'),  # not divisible by 8 devices
      ([tiny, '--config.data.seq_len=0'], 'data.seq_len=0'),
      ([tiny, '--config.train.steps=-1'], 'train.steps=-1'),
      ([tiny, '--config.model.remat=bogus'], "model.remat='bogus'"),
      ([tiny, '--config.mesh.data=3'], 'mesh'),
      ([tiny, '--config.data.tokenizer=/nonexistent/tokenizer.json'], '/nonexistent/tokenizer.json'),
      ([tiny, '--config.data.train=/nonexistent/*.jsonl'], '/nonexistent/*.jsonl'),
      ([tiny, f'--workdir={a_file}'], a_file),  # workdir is a file
      ([tiny, '--workdir=/proc/jaxtrain-cannot-write'], '/proc/jaxtrain-cannot-write'),
      (['--config=configs/nope.py'], 'nope.py'),
      (['--config=configs/llama.py:size=huge'], 'huge'),
      ([tiny, '--bogus_flag=1'], 'bogus_flag'),
      # inconsistent sections
      ([tiny, '--config.model.num_kv_heads=3'], 'model.num_kv_heads=3'),  # does not divide num_heads=4
      ([tiny, '--config.train.accum_steps=3'], 'train.accum_steps=3'),  # does not divide batch_size=8
      ([tiny, "--config.optim.no_decay=(norm"], "optim.no_decay='(norm'"),  # not a regular expression
      # out of range
      ([tiny, '--config.data.eval_fraction=1.5'], 'data.eval_fraction=1.5'),
      ([tiny, '--config.optim.b2=1.0'], 'optim.b2=1.0'),  # [0, 1): b2=1 never forgets the first gradients
      ([tiny, '--config.model.head_dim=3'], 'model.head_dim=3'),  # odd: no rotary embedding
      # wrong type
      ([tiny, '--config.model.tie_embeddings=maybe'], 'tie_embeddings=maybe'),
      # two mesh axes sized -1
      ([tiny, '--config.mesh.data=-1', '--config.mesh.fsdp=-1'], "'fsdp': -1"),
      # a Hugging Face start that is not there
      ([tiny, '--config.init.from_hf=/nonexistent/hf-model'], "init.from_hf='/nonexistent/hf-model'"),
  ]


def test_every_config_error_exits_2_with_one_line(tmp_path, capsys):
  """Each mistake through the command line (in-process: `jaxtrain.cli.main`, the code a process runs) and,
  where a notebook can make it, through `jaxtrain.run`: the same one line, exit 2, nothing written. The first
  cases also run as real processes, for the exit status and a stderr free of library noise."""
  runs = [(args + ([] if any(a.startswith('--workdir') for a in args) else [f'--workdir={tmp_path}/w{n}']), needle)
          for n, (args, needle) in enumerate(cases(str(tmp_path)))]

  def process(case):
    return subprocess.run([sys.executable, '-m', 'jaxtrain.main', *case[0]], cwd=REPO, capture_output=True,
                          text=True, timeout=300)

  with ThreadPoolExecutor(2) as pool:
    processes = list(pool.map(process, runs[:SUBPROCESS_CASES]))
  for (args, needle), proc in zip(runs[:SUBPROCESS_CASES], processes, strict=True):
    lines = [line for line in proc.stderr.splitlines() if line.strip() and 'Warning' not in line]
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], (args, proc.stderr[-2000:])
  for args, needle in runs:
    with pytest.raises(SystemExit) as exit_status:
      cli.main(['jaxtrain', 'train', *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and 'Warning' not in line]
    assert exit_status.value.code == 2, (args, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: '), (args, err[-2000:])
    assert needle in lines[0], (args, lines[0])
    assert 'Traceback' not in err
    workdir = next(a.split('=', 1)[1] for a in args if a.startswith('--workdir'))
    assert not os.path.isdir(workdir) or not os.listdir(workdir), f'{args} wrote {workdir}'
    library = library_config(args)
    if library is not None:  # the library path raises the same error, with the same line, writing nothing
      with pytest.raises(ConfigError) as e:
        jaxtrain.run(library, workdir)
        pytest.fail(f'jaxtrain.run accepted {args}')
      assert f'error: {e.value.line()}' == lines[0], args
      assert not os.path.isdir(workdir) or not os.listdir(workdir), f'jaxtrain.run wrote {workdir}'


def library_config(args):
  """The config `args` describe, built in-process as a notebook would (tiny.get_config() plus the overrides),
  or None for the mistakes only flags can make (unknown flags and files, values that do not parse)."""
  if '--config=configs/tiny.py' not in args or not all(a.startswith(('--config', '--workdir=')) for a in args):
    return None
  from configs import tiny
  config = tiny.get_config()
  for arg in args:
    if not arg.startswith('--config.'):
      continue
    key, value = arg[len('--config.'):].split('=', 1)
    section, name = key.split('.')
    if name not in config[section]:
      return None
    old = config[section][name]
    try:
      config[section][name] = value if isinstance(old, str) else type(old)(ast.literal_eval(value))
    except (ValueError, SyntaxError, TypeError):
      return None
  return config


def test_default_workdir():
  assert default_workdir('configs/llama.py:size=cpu') == os.path.join('runs', 'llama_size-cpu')
  assert default_workdir('configs/tiny.py') == os.path.join('runs', 'tiny')


def test_cli_lists_commands_and_rejects_unknown():
  ok = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', '--help'], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0 and 'train' in ok.stdout and 'export' in ok.stdout
  bad = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'trian'], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
