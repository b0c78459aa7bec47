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
  assert 'loss first->last (ELBO)' in printed and 'final eval ELBO bound' in printed
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
