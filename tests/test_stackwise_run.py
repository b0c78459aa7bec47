"""The StackWise job end to end on tiny racks: stages, per-stack saves, resume, samples for each objective."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxtrain.stackwise import job as stackwise_run
from jaxtrain.stackwise.checkpoint import StackCheckpointer


def tiny_stackwise(arg='', **overrides):
  from configs import stackwise as cfg_file
  c = cfg_file.get_config(arg)
  c.model.d_model, c.model.mlp_dim, c.model.num_heads, c.model.num_kv_heads = 32, 64, 4, 2
  c.model.num_layers = 2
  c.stackwise.num_stacks = 2
  c.data.max_files, c.data.tokenizer_vocab_size, c.data.seq_len, c.data.batch_size = 16, 384, 32, 8
  c.train.steps, c.train.eval_batches = 4, 1
  c.optim.warmup_steps = 1
  c.checkpoint.every = 1
  c.log.every, c.log.progress, c.log.plot = 1, False, False
  c.sample.prompts, c.sample.max_tokens, c.sample.steps = ('def ',), 6, 3
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


@pytest.mark.slow
def test_diffusion_run_saves_changed_stacks_and_resumes(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  out = stackwise_run.run(tiny_stackwise(), workdir)
  printed = capsys.readouterr().out
  assert [r['stage'] for r in out['stages']] == [0, 1]
  # One name per figure: "eval loss" in each stage's line, the stage table and the final line; what the loss
  # is (the ELBO bound) is said once, in the table's caption and the final line.
  assert 'stages (loss: the masked-diffusion ELBO bound, nats/token;' in printed
  header = next(line for line in printed.splitlines() if line.split()[:2] == ['stage', 'stacks'])
  assert 'loss first->last' in header and 'eval loss' in header
  assert 'final eval loss ' in printed and '(the masked-diffusion ELBO bound; ppl <= ' in printed
  assert 'ELBO bound' not in printed.replace('the masked-diffusion ELBO bound', '')
  assert printed.count('eval loss') >= 2 + len(out['stages'])  # the stages' own lines, table header, final line
  # Stage 1 appends on a frozen trunk: stack0 and the frozen input side are not written again.
  assert 'stack0' not in out['stages'][1]['parts_written']
  assert 'stack1' in out['stages'][1]['parts_written']
  assert {'shared.time_proj', 'shared.embed'}.isdisjoint(out['stages'][1]['parts_written'])
  store = StackCheckpointer(os.path.join(workdir, 'rack'))
  assert store.stages() == [0, 1]
  manifest = json.load(open(os.path.join(workdir, 'rack', 'stage_1.json')))
  assert manifest['parts']['stack0'] == store.manifest(0)['parts']['stack0']
  (prompt, text), = out['samples']
  assert prompt == 'def ' and isinstance(text, str)
  assert all(np.isfinite(r['eval_loss']) for r in out['stages'])
  from jaxtrain.cli import check
  from jaxtrain.train import export
  with pytest.raises(export.ExportError, match='StackWise run'):
    export.export(workdir, str(tmp_path / 'out'))
  report = '\n'.join(check.report(tiny_stackwise()))
  assert 'stage 1: stacks [0, 1], new [1], 2 steps' in report

  # A rerun finds every stage saved: nothing trains, the records come from the manifests.
  again = stackwise_run.run(tiny_stackwise(), workdir)
  assert all(r.get('resumed') for r in again['stages'])
  assert again['eval'] == out['eval']

  # Interrupted inside stage 1 (its rack save and last checkpoint gone): the rerun restores the rack of
  # stage 0, resumes stage 1 from its step-1 checkpoint and ends with the same loss and evaluation.
  os.remove(os.path.join(workdir, 'rack', 'stage_1.json'))
  shutil.rmtree(os.path.join(workdir, 'stages', '1', 'checkpoints', '2'))
  resumed = stackwise_run.run(tiny_stackwise(), workdir)
  assert resumed['stages'][0].get('resumed') and not resumed['stages'][1].get('resumed')
  assert list(resumed['stages'][1]['changed']) == [1]
  assert resumed['stages'][1]['loss_last'] == pytest.approx(out['stages'][1]['loss_last'], abs=1e-6)
  assert resumed['eval'] == pytest.approx(out['eval'], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('arg', ['objective=clm', 'direction=prepend,time=depth'])
def test_other_objectives_sample(arg, tmp_path):
  out = stackwise_run.run(tiny_stackwise(arg, train__steps=2), str(tmp_path / 'run'))
  (_, text), = out['samples']
  assert isinstance(text, str) and len(text) > 0
  if 'prepend' in arg:
    assert [r['ratio'] for r in out['stages']] == [pytest.approx(0.15), 1.0]
    assert [r['new'] for r in out['stages']] == [[1], [0]]


@pytest.mark.slow
def test_the_run_stop_file_stops_a_stage_which_the_rerun_resumes(tmp_path, monkeypatch, capsys):
  # WORKDIR/STOP (the run's, not WORKDIR/stages/K/STOP) stops the stage at its next step: saved, exit 0, file
  # consumed; the same command then resumes inside that stage and finishes the job.
  workdir = str(tmp_path / 'run')
  stop = os.path.join(workdir, 'STOP')
  real_fit = stackwise_run.train.fit

  def fit(config, job, stage_dir, *args, **kwargs):
    if stage_dir == os.path.join(workdir, 'stages', '1'):  # touched before stage 1's first step
      open(stop, 'w').close()
    return real_fit(config, job, stage_dir, *args, **kwargs)

  monkeypatch.setattr(stackwise_run.train, 'fit', fit)
  out = stackwise_run.run(tiny_stackwise(), workdir)
  monkeypatch.undo()
  assert out['stopped'] and out['stopped'][0] == f'{stop} file' and out['eval'] is None
  assert not os.path.exists(stop)
  assert 'stopped by' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))  # StackWise keeps its tokenizer too
  assert [r['stage'] for r in out['stages']] == [0]  # stage 1 stopped after its first of 2 steps
  assert sorted(os.listdir(os.path.join(workdir, 'stages', '1', 'checkpoints'))) == ['1']
  assert StackCheckpointer(os.path.join(workdir, 'rack')).stages() == [0]

  again = stackwise_run.run(tiny_stackwise(), workdir)
  assert not again['stopped'] and again['stages'][0].get('resumed') and not again['stages'][1].get('resumed')
  with open(os.path.join(workdir, 'stages', '1', 'metrics.jsonl')) as f:
    steps = [r['step'] for r in map(json.loads, f) if 'loss' in r]
  assert steps == [1, 2]  # step 1 before the stop, step 2 after the resume: nothing ran twice
  assert np.isfinite(again['eval'])
