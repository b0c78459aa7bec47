"""Resume safety: checkpoints of another config or state, or of a newer format, are refused with one line before
anything in the workdir changes; --start_over moves them aside; truncated checkpoints are still corrupt, and
neither they nor an interrupted save let library noise reach the terminal."""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from jaxtrain import sharding
from jaxtrain.config.defaults import base_config
from jaxtrain.stackwise import job as stackwise_run
from jaxtrain.train import checkpoint, loop as train, optim, resume
from tests.conftest import REPO
from tests.helpers import tiny

ARGS = ['--config=configs/tiny.py', '--config.train.steps=4', '--config.train.eval_every=0',
        '--config.checkpoint.every=2', '--config.log.plot=false']


def cli(workdir: str, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'jaxtrain.main', *ARGS, f'--workdir={workdir}', *extra], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def tree_hash(directory: str) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, directory).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def tiny_config(**overrides):
  from configs.tiny import get_config
  c = get_config()
  c.train.steps, c.train.eval_every, c.checkpoint.every, c.log.plot = 4, 0, 2, False
  for k, v in overrides.items():
    section, key = k.split('.')
    c[section][key] = v
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  """A 4-step run from the command line, checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('resume') / 'run')
  proc = cli(workdir)
  assert proc.returncode == 0, proc.stderr
  return workdir


def copy_of(workdir: str, tmp_path) -> str:
  out = str(tmp_path / 'run')
  subprocess.run(['cp', '-r', workdir, out], check=True)
  return out


def test_another_model_is_refused_in_one_line_and_nothing_changes(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = tree_hash(workdir)
  proc = cli(workdir, '--config.model.d_model=48')
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: config.model.d_model=48:') and 'model.d_model=32' in lines[0], lines[0]
  assert '--workdir' in lines[0] and '--start_over' in lines[0]
  assert tree_hash(workdir) == before


def test_start_over_moves_the_checkpoints_aside_and_trains_from_zero(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  proc = cli(workdir, '--config.model.d_model=48', '--start_over')
  assert proc.returncode == 0, proc.stderr
  assert 'steps 1..4' in proc.stdout and 'resumed' not in proc.stdout, proc.stdout
  [aside] = glob.glob(os.path.join(workdir, 'old-*'))
  assert sorted(os.listdir(os.path.join(aside, 'checkpoints'))) == sorted(os.listdir(os.path.join(trained,
                                                                                                 'checkpoints')))
  with open(os.path.join(aside, 'metrics.jsonl')) as f:  # the old run's rows kept whole, the new run's alone
    assert [json.loads(line)['step'] for line in f if '"loss"' in line][-1] == 4
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f if '"loss"' in line][0] == 1
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['d_model'] == 48
  with open(os.path.join(aside, 'config.json')) as f:  # old-<time>/ stays a run directory: its config, tokenizer
    assert json.load(f)['model']['d_model'] == 32
  assert os.listdir(os.path.join(aside, 'tokenizer')) == os.listdir(os.path.join(trained, 'tokenizer'))


def _old_pipeline(workdir: str) -> str:
  """The step-4 data position as jaxtrain before per-source packing saved it (its packer's state around the mix)."""
  path = os.path.join(workdir, 'checkpoints', '4', 'data', 'process_0-of-1.json')
  with open(path) as f:
    state = json.load(f)
  with open(path, 'w') as f:
    json.dump({'parent': {'parent_window_start_state': state}, 'window_index': 0}, f)
  return 'holds the data position of an older jaxtrain'


def _two_processes(workdir: str) -> str:
  """The step-4 data position as two processes with process_split='documents' write it."""
  data = os.path.join(workdir, 'checkpoints', '4', 'data')
  os.rename(os.path.join(data, 'process_0-of-1.json'), os.path.join(data, 'process_0-of-2.json'))
  shutil.copy(os.path.join(data, 'process_0-of-2.json'), os.path.join(data, 'process_1-of-2.json'))
  return 'was written by 2 processes'


@pytest.mark.parametrize('damage', [_old_pipeline, _two_processes])
def test_a_data_position_this_run_cannot_continue_is_refused_before_any_write(trained, tmp_path, damage, capsys):
  """A workdir of the jaxtrain before per-source packing, or of another process count: one line naming
  --start_over, before config.json or the tokenizer copy is rewritten (both were rewritten, then refused)."""
  from jaxtrain import cli as jaxtrain_cli
  workdir = copy_of(trained, tmp_path)
  expected = damage(workdir)
  before = tree_hash(workdir), os.stat(os.path.join(workdir, 'config.json')).st_mtime_ns
  with pytest.raises(SystemExit) as e:
    jaxtrain_cli.main(['jaxtrain', 'train', *ARGS, f'--workdir={workdir}'])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0] and ('--start_over' in err[0] or "process_split='rows'" in err[0]), err
  assert (tree_hash(workdir), os.stat(os.path.join(workdir, 'config.json')).st_mtime_ns) == before


def test_an_allowed_change_resumes(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  result = train.run(tiny_config(**{'train.steps': 6, 'log.every': 2, 'checkpoint.keep': 2}), workdir)
  assert result.start_step == 4 and sorted(result.losses) == [5, 6]


def test_a_newer_format_is_refused(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  meta_path = os.path.join(workdir, 'checkpoints', '4', '_CHECKPOINT_METADATA')
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta['custom_metadata'] == {'jaxtrain_format': checkpoint.FORMAT}  # every checkpoint records it
  meta['custom_metadata']['jaxtrain_format'] = checkpoint.FORMAT + 1
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  before = tree_hash(workdir)
  with pytest.raises(checkpoint.ResumeError, match=f'format {checkpoint.FORMAT + 1}, newer than format'):
    train.run(tiny_config(), workdir)
  assert tree_hash(workdir) == before


def test_another_state_is_refused_not_moved_aside(trained, tmp_path):
  """Same config, another state (as after a code change): the tree is compared before any restore."""
  workdir = copy_of(trained, tmp_path)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with jax.set_mesh(mesh):
    tx, _ = optim.make_optimizer(tiny_config().optim, 4)
    _, abstract, _, _ = train.state_factory(tiny(d_model=48, vocab_size=512), tx, 0, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), every=2, keep=3)
  with pytest.raises(checkpoint.ResumeError,
                     match=r'holds another train state: \S+ is float32\[.* in this run and float32\[') as e:
    ckpt.restore_latest(abstract, None)
  ckpt.close()
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_a_truncated_checkpoint_is_still_corrupt_and_resumes_quietly(trained, tmp_path):
  """The previous checkpoint is used, in one line of ours: orbax's failed read left no asyncio or TensorStore
  tracebacks ("Event loop is closed", "Exception ignored in <coroutine ...>"; some runs printed hundreds)."""
  workdir = copy_of(trained, tmp_path)
  files = [f for f in glob.glob(f'{workdir}/checkpoints/4/state/**', recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  proc = cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == '', proc.stderr[-3000:]
  assert f'checkpoint {workdir}/checkpoints/4 is incomplete or corrupt' in proc.stdout, proc.stdout
  assert f'resumed from {workdir}/checkpoints/2' in proc.stdout and 'steps 3..4' in proc.stdout, proc.stdout
  assert glob.glob(f'{workdir}/checkpoints/4.corrupt-*')


def test_an_interrupted_save_is_discarded_in_one_line(trained, tmp_path):
  """What `kill -9` during the save of step 6 leaves (tried: `6.orbax-checkpoint-tmp/` holding the step's
  _CHECKPOINT_METADATA and partly written `state.orbax-checkpoint-tmp/`, `data.orbax-checkpoint-tmp/`) is
  reported in our line, not in orbax's warning when step 6 is saved again."""
  workdir = copy_of(trained, tmp_path)
  ckpts = os.path.join(workdir, 'checkpoints')
  tmp = os.path.join(ckpts, '6.orbax-checkpoint-tmp')
  shutil.copytree(os.path.join(ckpts, '4', 'state'), os.path.join(tmp, 'state.orbax-checkpoint-tmp'),
                  ignore=shutil.ignore_patterns('commit_success.txt', '_METADATA', 'manifest.ocdbt'))
  shutil.copytree(os.path.join(ckpts, '4', 'data'), os.path.join(tmp, 'data.orbax-checkpoint-tmp'))
  with open(os.path.join(ckpts, '4', '_CHECKPOINT_METADATA')) as f:
    meta = dict(json.load(f), commit_timestamp_nsecs=None)
  with open(os.path.join(tmp, '_CHECKPOINT_METADATA'), 'w') as f:
    json.dump(meta, f)
  proc = cli(workdir, '--config.train.steps=6')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == '', proc.stderr[-3000:]  # orbax: "Attempted to create temporary directory ..."
  assert 'resuming from step 4; the interrupted save of step 6 was discarded' in proc.stdout.splitlines(), proc.stdout
  assert 'steps 5..6' in proc.stdout, proc.stdout
  assert sorted(os.listdir(ckpts)) == ['2', '4', '6']


def test_resumable_keys_and_saved_configs_of_older_versions():
  saved = json.loads(base_config().to_json_best_effort())
  del saved['curriculum']  # written before the key existed: its default
  config = base_config()
  config.train.steps, config.log.every, config.checkpoint.keep, config.mesh.data = 999, 3, 9, 2
  assert resume.config_difference(saved, config) is None
  config.lora.rank = 8
  assert resume.config_difference(saved, config) == ('lora.rank', 0, 8)
  config.lora.rank, config.curriculum.kind = 0, 'linear'
  assert resume.config_difference(saved, config) == ('curriculum.kind', 'none', 'linear')
  config.curriculum.kind = 'none'  # a job can hold a resumable key fixed (StackWise: stage lengths)
  assert resume.config_difference(saved, config, fixed=('train.steps',)) == (
      'train.steps', saved['train']['steps'], 999)
  saved['data']['sources'] = {'chat': {'path': 'chat.jsonl', 'weight': 1.0}}  # a source taken out: refused
  key, before, now = resume.config_difference(saved, config)
  assert (key, before) == ('data.sources.chat.path', 'chat.jsonl') and now is not None


def test_a_source_taken_out_or_added_is_refused_by_name(tmp_path):
  """Taking a source out of data.sources passed the config comparison, then the run rewrote config.json and
  the tokenizer copy and failed on the data position in another kind of line; adding one said `=absent`."""
  from jaxtrain.data.sources import source
  two = tiny_config()
  two.data.sources.web = source('stdlib', max_files=4)
  two.data.sources.chat = source('chat.jsonl', format='chat')
  one = tiny_config()
  one.data.sources.web = source('stdlib', max_files=4)
  os.makedirs(tmp_path / 'checkpoints' / '4')
  for saved, now, expected in ((two, one, 'config.data.sources.chat: is not set, but the checkpoints in'),
                               (one, two, 'config.data.sources.chat: is set, but the checkpoints in')):
    with open(tmp_path / 'config.json', 'w') as f:
      f.write(saved.to_json_best_effort())
    with pytest.raises(checkpoint.ResumeError) as e:
      resume.check(now, str(tmp_path))
    assert str(e.value).startswith(expected) and '--start_over' in str(e.value), str(e.value)


def test_stackwise_compares_the_shared_config_with_its_rack(tmp_path, monkeypatch):
  """WORKDIR/config.json is shared by the rack and the stages' checkpoints: any of them is enough to compare."""
  from configs.stackwise import get_config
  config = get_config(None)
  workdir = str(tmp_path)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  os.makedirs(os.path.join(workdir, 'rack'))
  open(os.path.join(workdir, 'rack', 'stage_0.json'), 'w').close()
  changed = config.copy_and_resolve_references()
  changed.stackwise.trunk_rank = config.stackwise.trunk_rank + 1
  with pytest.raises(checkpoint.ResumeError, match='config.stackwise.trunk_rank='):
    resume.check(changed, workdir, ['rack', 'stages/0/checkpoints'])
  resume.check(config, workdir, ['rack', 'stages/0/checkpoints'])  # the same config resumes
  longer = config.copy_and_resolve_references()
  longer.train.steps = config.train.steps + 4  # stage lengths follow train.steps: a finished rack cannot grow
  with pytest.raises(checkpoint.ResumeError, match='config.train.steps='):
    resume.check(longer, workdir, ['rack', 'stages/0/checkpoints'], fixed=('train.steps',))
  moved = resume.start_over(workdir, ('rack', 'stages'), say=lambda _: None)
  assert [os.path.relpath(m, workdir).split(os.sep)[1] for m in moved] == ['rack']
  assert os.listdir(workdir) and not os.path.exists(os.path.join(workdir, 'rack'))
  assert stackwise_run.run.__defaults__[-1] is False  # run(config, workdir, start_over=False)
