"""User mistakes in configs and flags: exit status 2, one line naming key and value, nothing written."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import pytest

from jaxtrain.config import validate as config_lib
from jaxtrain.config.defaults import base_config
from jaxtrain.main import default_workdir
from tests.conftest import REPO

BAD_FILE = '''
from jaxtrain.config.defaults import base_config
def get_config(arg=None):
  c = base_config()
  c.train.{line}
  return c
'''


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
      ([tiny, '--config.optim.warmup_steps=1000'], 'optim.warmup_steps=1000'),  # longer than steps=30
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


def test_every_config_error_exits_2_with_one_line(tmp_path):
  runs = cases(str(tmp_path))

  def call(case):
    args, needle = case
    if not any(a.startswith('--workdir') for a in args):
      args = args + [f'--workdir={tmp_path}/w{abs(hash(tuple(args)))}']
    proc = subprocess.run([sys.executable, '-m', 'jaxtrain.main', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    return args, needle, proc

  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(call, runs))
  for args, needle, proc in results:
    lines = [line for line in proc.stderr.splitlines() if line.strip() and 'Warning' not in line]
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: '), (args, proc.stderr[-2000:])
    assert needle in lines[0], (args, lines[0])
    assert 'Traceback' not in proc.stderr
    workdir = next(a.split('=', 1)[1] for a in args if a.startswith('--workdir'))
    assert not os.path.isdir(workdir) or not os.listdir(workdir), f'{args} wrote {workdir}'


def test_validate_messages_name_key_value_and_valid():
  c = base_config()
  c.model.num_heads, c.model.num_kv_heads = 6, 4
  with pytest.raises(config_lib.ConfigError, match=r'config.model.num_kv_heads=4: must divide model.num_heads=6'):
    config_lib.validate(c, '/tmp/x', 8)
  c = base_config()
  c.train.accum_steps = 3
  with pytest.raises(config_lib.ConfigError, match=r'data.batch_size=8: must be divisible by train.accum_steps=3'):
    config_lib.validate(c, '/tmp/x', 1)
  c = base_config()
  c.optim.warmup_steps = 500
  with pytest.raises(config_lib.ConfigError, match=r'optim.warmup_steps=500: must be <= train.steps=200'):
    config_lib.validate(c, '/tmp/x', 1)
  raw = base_config().to_dict()
  raw['train']['steps'] = 1.5  # a config assembled from a dict bypasses ConfigDict's own type checks
  c = ml_collections.ConfigDict(raw)
  with pytest.raises(config_lib.ConfigError, match=r'train.steps=1.5: must be an integer'):
    config_lib.check_schema(c)


@pytest.mark.parametrize('changes, needle', [
    ({'norm': 'batchnorm'}, "model.norm='batchnorm': must be one of rmsnorm, layernorm"),
    ({'mlp': 'relu'}, "model.mlp='relu': must be one of swiglu, gelu, gelu_tanh"),
    ({'positions': 'learned'}, "model.max_positions=0: must be >= data.seq_len=256 with model.positions='learned'"),
    ({'rope_scaling': 'llama3', 'rope_high_freq_factor': 1.0},
     'model.rope_high_freq_factor=1.0: must be > model.rope_low_freq_factor=1.0'),
    ({'sliding_window': -2}, 'model.sliding_window=-2: must be >= 0'),
])
def test_architecture_keys_are_validated(changes, needle):
  c = base_config()
  c.model.update(changes)
  with pytest.raises(config_lib.ConfigError, match=needle):
    config_lib.check_values(c, 1)


def test_default_workdir():
  assert default_workdir('configs/llama.py:size=cpu') == os.path.join('runs', 'llama_size-cpu')
  assert default_workdir('configs/tiny.py') == os.path.join('runs', 'tiny')


def test_cli_lists_commands_and_rejects_unknown():
  ok = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', '--help'], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0 and 'train' in ok.stdout and 'export' in ok.stdout
  bad = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'trian'], cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
