"""End to end on configs/tiny.py: learning, outputs in the workdir, compile-once, bitwise resume."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxtrain import cli
from jaxtrain.train import loop as train, metrics
from tests.conftest import REPO


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(REPO, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in overrides.items():
    section, key = dotted.split('.')
    config[section][key] = value
  return config


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny_full'))
  return workdir, train.run(tiny_config(), workdir)


@pytest.mark.slow
def test_loss_falls_and_outputs_exist(full_run):
  workdir, summary = full_run
  losses = summary.losses
  assert sorted(losses) == list(range(1, 31))
  assert losses[30] < losses[1] - 0.8, (losses[1], losses[30])
  assert summary.eval['eval_loss'] < losses[1] - 0.5
  assert summary.compiles == 1  # the step compiled once for the whole run
  records = metrics.read_metrics(workdir)
  train_records = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train_records] == list(range(1, 31))
  for key in ('loss', 'grad_norm', 'lr', 'loss_tokens', 'step_time', 'tokens_per_s', 'mfu'):
    assert all(key in r for r in train_records), key
  assert [r['step'] for r in records if 'eval_loss' in r] == [15, 30]
  assert os.path.getsize(os.path.join(workdir, 'loss.png')) > 1000
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['steps'] == 30
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=lambda s: (len(s), s))[-3:] == ['10', '20', '30']


@pytest.mark.slow
def test_resume_is_bitwise_identical(full_run, tmp_path):
  """A run stopped after checkpoint 10 (its later checkpoints never written) and run again continues with
  exactly the losses of the uninterrupted run."""
  workdir, summary = full_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  for step in ('20', '30'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  again = train.run(tiny_config(), resumed)
  assert again.start_step == 10
  assert again.losses == {s: loss for s, loss in summary.losses.items() if s > 10}
  assert again.eval == summary.eval


def run_cli(args, **kw):
  env = dict(os.environ)
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, **kw)


@pytest.mark.slow
def test_main_end_to_end_in_a_subprocess(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  proc = run_cli(['jaxtrain.main', '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=12',
                  '--config.log.wandb=offline'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'eval loss' in proc.stdout
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '12'))
  assert any(name.startswith('offline-run') for name in os.listdir(os.path.join(workdir, 'wandb')))
  # `jaxtrain train` is the same entry point; the run is complete, so it only reports and evaluates.
  # (in this process: a second fresh process would prove nothing more)
  cli.main(['jaxtrain', 'train', '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=12'])
  out = capsys.readouterr().out
  assert 'nothing to train' in out and 'step 12 of 12' in out


@pytest.mark.slow
def test_sources_log_their_weighted_tokens_and_finite_ones_end_by_policy(tmp_path):
  """Weights 3:1:1 as the run logs them: after every step each source's tokens/<source> is within
  (sources - 1) * seq_len tokens of its share of all tokens, with the default shuffle and packing windows (far
  larger than the small sources). 'memos' (one epoch, then dropped) keeps its 20% until its last token, then
  'notes' and 'essays' share the tokens 3:1; 'essays' (two epochs, then stop) ends the run."""
  from jaxtrain.data.sources import source
  for name, n, words in (('notes', 400, 6), ('memos', 30, 12), ('essays', 12, 40)):
    (tmp_path / f'{name}.jsonl').write_text(''.join(
        json.dumps({'text': f'{name} {i}: ' + ' '.join(f'w{(i + k) % 31}' for k in range(words))}) + '\n'
        for i in range(n)))
  config = tiny_config(**{'train.steps': 400, 'train.eval_every': 0, 'checkpoint.every': 4})
  config.data.train = str(tmp_path / 'notes.jsonl')
  config.data.sources.notes = source(str(tmp_path / 'notes.jsonl'), weight=3.0)
  config.data.sources.memos = source(str(tmp_path / 'memos.jsonl'), epochs=1, on_end='drop')
  config.data.sources.essays = source(str(tmp_path / 'essays.jsonl'), epochs=2, on_end='stop')
  workdir = str(tmp_path / 'run')
  summary = train.run(config, workdir)
  ended = summary.data_ended
  assert 0 < ended < 400 and max(summary.losses) == ended
  assert summary.eval is not None and os.path.isdir(os.path.join(workdir, 'checkpoints', str(ended)))
  records = [r for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in records] == list(range(1, ended + 1))
  seq_len = config.data.seq_len
  dropped = next(r['step'] for r in records if r['epochs/memos'] == 1.0)  # all of its tokens, exactly once
  assert 2 < dropped < ended and records[-1]['epochs/memos'] == 1.0
  for r in records:
    tokens = {n: r[f'tokens/{n}'] for n in ('notes', 'memos', 'essays')}
    assert min(tokens.values()) > 0, r  # from the first step on: no source waits for a window
    if r['step'] <= dropped:
      shares = {'notes': 0.6, 'memos': 0.2, 'essays': 0.2}
    else:  # the drop renormalises the others (a slack of one row for the switch)
      shares, tokens = {'notes': 0.75, 'essays': 0.25}, {n: tokens[n] for n in ('notes', 'essays')}
    total = sum(tokens.values())
    for n, share in shares.items():
      assert abs(tokens[n] - share * total) <= 2 * seq_len, (r['step'], tokens)
  last = records[-1]
  assert last['step'] == ended
  assert last['epochs/essays'] == pytest.approx(2.0, abs=0.15)  # two passes, then the stop
  # A resume from an earlier checkpoint continues the per-source counts where that checkpoint left them.
  at = {r['step']: r for r in records}
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(ended)))
  keep = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  again = train.run(config, workdir)
  assert again.start_step == keep and again.data_ended == ended
  resumed = {r['step']: r for r in metrics.read_metrics(workdir) if 'loss' in r}
  for step in range(keep + 1, ended + 1):
    assert all(resumed[step][f'tokens/{n}'] == at[step][f'tokens/{n}'] for n in ('notes', 'memos', 'essays'))


@pytest.mark.slow
def test_steps_per_call_changes_neither_losses_nor_outputs(full_run, tmp_path):
  """The default run (4 steps per call on CPU) and one step per call: the same losses, evaluations, logged
  steps and checkpoints (calls end at every checkpoint and evaluation step)."""
  workdir, summary = full_run
  assert train.steps_per_call(tiny_config()) == (4 if train.jax.default_backend() == 'cpu' else 1)
  one = train.run(tiny_config(**{'train.steps_per_call': 1}), str(tmp_path))
  assert sorted(one.losses) == sorted(summary.losses)
  for s, loss in one.losses.items():
    assert abs(loss - summary.losses[s]) <= 1e-5 * abs(loss), (s, loss, summary.losses[s])
  assert abs(one.eval['eval_loss'] - summary.eval['eval_loss']) <= 1e-5 * one.eval['eval_loss']
  logged = [[(r['step'], 'eval_loss' in r) for r in metrics.read_metrics(w)] for w in (workdir, str(tmp_path))]
  assert logged[0] == logged[1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == sorted(os.listdir(tmp_path / 'checkpoints'))


@pytest.mark.parametrize('stackwise', [False, True])
@pytest.mark.parametrize('case', ['empty_eval', 'nothing_held_out'])
def test_data_errors_found_by_reading_the_data_write_nothing(tmp_path, case, stackwise):
  """An eval split that holds no document is only seen when the documents are read: the run still raises its
  one-line DataError before writing anything in the workdir (it used to write config.json first)."""
  import jaxtrain
  from jaxtrain.errors import UserError
  train_file = tmp_path / 'train.jsonl'
  train_file.write_text(''.join(json.dumps({'text': f'def f{i}(x):\n  return x + {i}\n' * 20}) + '\n'
                                for i in range(1 if case == 'nothing_held_out' else 20)))
  config = tiny_config()
  config.data.train, config.data.tokenizer_vocab_size = str(train_file), 300
  if case == 'empty_eval':
    (tmp_path / 'eval.jsonl').write_text('\n')
    config.data.eval = str(tmp_path / 'eval.jsonl')
  if stackwise:
    config.stackwise.num_stacks, config.objective.kind = 2, 'diffusion'
  before = config.to_dict()
  workdir = tmp_path / 'w'
  with pytest.raises(UserError, match='data.eval' if case == 'empty_eval' else 'data.eval_fraction'):
    jaxtrain.run(config, str(workdir))
  assert not workdir.exists()
  assert config.to_dict() == before
