"""The StackWise job end to end on tiny racks: stages, per-stack saves, resume, samples for each objective, and
what a user does with a finished run: `jaxtrain generate` (by objective) and `jaxtrain export` (causal racks)."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

from jaxtrain.stackwise import job as stackwise_run
from jaxtrain.stackwise.checkpoint import StackCheckpointer
from tests.helpers import run_command as command


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


# One tiny trained run per objective, trained once for the whole module on first use: the job tests read
# them and the sample/export tests run the command line on them (a copy where a test edits the run).
RUNS = {'diffusion': ('', {}), 'clm': ('objective=clm', {'train__steps': 2}),
        'depth': ('direction=prepend,time=depth', {'train__steps': 2})}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """name -> (workdir, the job's result, what the job printed)."""
  done = {}

  def get(name):
    if name not in done:
      arg, overrides = RUNS[name]
      workdir = str(tmp_path_factory.mktemp(name) / 'run')
      printed = io.StringIO()
      with contextlib.redirect_stdout(printed):
        out = stackwise_run.run(tiny_stackwise(arg, **overrides), workdir)
      done[name] = (workdir, out, printed.getvalue())
    return done[name]
  return get


@pytest.mark.slow
def test_diffusion_run_saves_changed_stacks_and_resumes(trained, tmp_path):
  first, out, printed = trained('diffusion')
  workdir = str(tmp_path / 'run')
  shutil.copytree(first, workdir)  # the reruns below edit the run; the other tests read the original
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
  assert f'more samples: jaxtrain generate --workdir={first}' in printed
  from jaxtrain.cli import check
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
@pytest.mark.parametrize('name', ['clm', 'depth'])
def test_other_objectives_sample(name, trained):
  _, out, _ = trained(name)
  (_, text), = out['samples']
  assert isinstance(text, str) and len(text) > 0
  if name == 'depth':
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
  # `jaxtrain runs` reads the job's run.json over its stages: stopped one step into stage 1.
  stage_steps = json.load(open(os.path.join(workdir, 'run.json')))['stage_steps']
  (run,) = runs(capsys, workdir)
  assert run['status'] == 'stopped' and run['kind'] == 'stackwise' and (run['stage'], run['stages']) == (1, 2)
  assert (run['step'], run['steps']) == (stage_steps[0] + 1, sum(stage_steps)) and 'in stage 1' in run['reason']
  # The unfinished run already samples: the rack of its last saved stage, said on stderr.
  code, out, err = command(capsys, 'generate', f'--workdir={workdir}', '--max_tokens=3', '--steps=2')
  assert code == 0 and out.startswith('the rack of stage 0 of 2 (stacks [0])'), err
  assert f'note: {workdir} has saved 1 of its 2 stages' in err

  again = stackwise_run.run(tiny_stackwise(), workdir)
  assert not again['stopped'] and again['stages'][0].get('resumed') and not again['stages'][1].get('resumed')
  with open(os.path.join(workdir, 'stages', '1', 'metrics.jsonl')) as f:
    steps = [r['step'] for r in map(json.loads, f) if 'loss' in r]
  assert steps == [1, 2]  # step 1 before the stop, step 2 after the resume: nothing ran twice
  assert np.isfinite(again['eval'])
  (run,) = runs(capsys, workdir)
  assert run['status'] == 'done' and run['step'] == run['steps'] == sum(stage_steps) and run['stage'] == 1
  assert run['loss'] == pytest.approx(again['stages'][1]['loss_last'])  # the last stage's own metrics


# ----------------------------------------------------------------------------- jaxtrain generate / export


def runs(capsys, workdir):
  """The records of `jaxtrain runs WORKDIR --json`."""
  code, out, err = command(capsys, 'runs', workdir, '--json')
  assert code == 0, err
  return json.loads(out)['runs']


def records(capsys, *args):
  code, out, err = command(capsys, *args, '--format=jsonl')
  assert code == 0, err
  return [json.loads(line) for line in out.splitlines()]


def refused(capsys, *args) -> str:
  """The one line a refused command prints; it exits 2 and prints nothing else."""
  code, out, err = command(capsys, *args)
  assert code == 2 and out == '' and len(err.splitlines()) == 1 and err.startswith('error: '), (code, out, err)
  return err


def greedy_continuation(loaded, prompt_ids, n, masked=False):
  """The argmax continuation computed from the whole rack's logits (no cache, no sampler): n causal steps on
  one fixed-length buffer (causal: the tail cannot change earlier logits), or for a masked rack the argmax at
  every MASK of [prompt, MASK * n] in one pass."""
  import jax
  import jax.numpy as jnp
  from jaxtrain.models import rack
  r, vocab = loaded.rack, loaded.tokenizer.vocab_size
  size = len(prompt_ids) + n
  batch = {'segment_ids': jnp.ones((1, size), jnp.int32), 'positions': jnp.arange(size)[None]}
  logits = jax.jit(lambda p, tokens: rack.forward(r.rd, p, batch, r.order, tokens=tokens)[0, :, :vocab])
  if masked:
    return [int(i) for i in np.argmax(logits(r.params, jnp.asarray([prompt_ids + [r.obj.mask_id] * n])), -1)
            [len(prompt_ids):]]
  seq = list(prompt_ids) + [0] * n
  for j in range(len(prompt_ids), size):
    seq[j] = int(np.argmax(logits(r.params, jnp.asarray([seq]))[j - 1]))
  return seq[len(prompt_ids):]


@pytest.mark.slow
def test_sample_clm_repeats_the_jobs_samples_and_decodes_greedily(trained, capsys):
  from jaxtrain.stackwise import inference
  workdir, _, printed = trained('clm')
  # No flags: the run's own sample settings and seed, so the job's printed samples come out again.
  code, out, err = command(capsys, 'generate', f'--workdir={workdir}')
  assert code == 0, err
  header, *lines = out.splitlines()
  assert header.startswith(f'the rack of stage 1 of 2 (stacks [0, 1]) of {workdir}: clm, KV-cache decoding')
  assert lines == [line for line in printed.splitlines() if line.startswith('sample ')]
  # Greedy KV-cache decoding is the argmax continuation of the rack's own logits: max_tokens (the run's 6;
  # the same compiled sampler as above) long, or up to and including EOS when the document ends first.
  (rec,) = records(capsys, 'generate', f'--workdir={workdir}', '--prompt=def f(x):')
  loaded = inference.load(workdir)
  eos = loaded.tokenizer.eos_id
  assert rec['prompt_ids'] == loaded.tokenizer.encode('def f(x):')
  want = greedy_continuation(loaded, rec['prompt_ids'], 6)
  assert rec['ids'] == (want[:want.index(eos) + 1] if eos in want else want)
  assert len(rec['ids']) == 6 or rec['ids'][-1] == eos
  assert rec['text'] == loaded.tokenizer.decode(rec['ids'])


@pytest.mark.slow
def test_sample_diffusion_unmasks_every_position_the_same_way_for_a_seed(trained, capsys):
  from jaxtrain.stackwise import inference
  workdir = trained('diffusion')[0]
  loaded = inference.load(workdir)
  args = ('generate', f'--workdir={workdir}', '--prompt=def ', '--prompt=class A', '--max_tokens=7', '--steps=3',
          '--temperature=1')
  first = records(capsys, *args, '--seed=3')
  assert records(capsys, *args, '--seed=3') == first
  assert records(capsys, *args, '--seed=4') != first
  for rec in first:
    assert len(rec['ids']) == 7  # a fixed canvas: no early end
    assert loaded.rack.obj.mask_id not in rec['ids']  # every MASK filled by the last step
    assert max(rec['ids']) < loaded.tokenizer.vocab_size
  code, out, _ = command(capsys, *args[:2], '--max_tokens=7', '--steps=3')
  assert code == 0 and 'diffusion (time=input), iterative unmasking in 3 steps (cosine), 7 tokens, greedy' in out


@pytest.mark.slow
def test_sample_depth_rack_fills_the_canvas_in_one_pass(trained, capsys):
  from jaxtrain.stackwise import inference
  workdir = trained('depth')[0]
  (rec,) = records(capsys, 'generate', f'--workdir={workdir}', '--prompt=def f(', '--max_tokens=6')
  loaded = inference.load(workdir)
  assert len(rec['ids']) == 6 and loaded.rack.obj.mask_id not in rec['ids']
  # One pass through the depth (the front stack denoises the heaviest noise): the greedy sample is the argmax
  # of one forward pass over [prompt, MASK * 6].
  assert rec['ids'] == greedy_continuation(loaded, rec['prompt_ids'], 6, masked=True)
  err = refused(capsys, 'generate', f'--workdir={workdir}', '--steps=4')
  assert '--steps' in err and 'one pass through the depth' in err


@pytest.mark.slow
def test_mlm_rack_samples_by_unmasking_without_a_time_input(trained):
  from jaxtrain.stackwise import inference, plan
  from jaxtrain.train import rundir
  workdir = trained('diffusion')[0]
  tokenizer = rundir.load_tokenizer(rundir.load_config(workdir), workdir)
  rd, obj = plan.rack_setup(tiny_stackwise('objective=mlm'), tokenizer.vocab_size)
  assert obj.kind == 'mlm' and not obj.time_input and rd.rc.time_embedding == 'none'
  r = inference.Rack(rd, obj, (0, 1), plan.initial_rack(rd, 0, tokenizer.vocab_size))
  settings = inference.Settings(max_tokens=5, steps=2, temperature=1.0, seed=1)
  first = inference.generate(r, tokenizer, ['def '], settings, 32)
  assert inference.generate(r, tokenizer, ['def '], settings, 32) == first
  (s,) = first
  assert len(s.ids) == 5 and obj.mask_id not in s.ids and s.prompt_ids == tokenizer.encode('def ')


@pytest.mark.slow
def test_export_clm_rack_loads_in_transformers_with_equal_logits(trained, capsys, tmp_path):
  import jax.numpy as jnp
  import torch
  import transformers
  from jaxtrain.models import rack
  from jaxtrain.stackwise import inference
  workdir = trained('clm')[0]
  out = str(tmp_path / 'hf')
  code, text, err = command(capsys, 'export', f'--workdir={workdir}', '--format=hf', f'--out={out}')
  assert code == 0, err
  assert 'the rack of stage 1 of 2 (stacks [0, 1])' in text and 'as LlamaForCausalLM with 2 layers' in text
  (export,) = runs(capsys, workdir)[0]['exports']  # recorded in the run directory for `jaxtrain runs`
  assert (export['out'], export['stage'], export['step'], export['format']) == (out, 1, None, 'hf')
  loaded = inference.load(workdir)
  r = loaded.rack
  prompt = 'def f(x):\n    return x + 1\n'
  ids = loaded.tokenizer.encode(prompt)
  assert transformers.AutoTokenizer.from_pretrained(out).encode(prompt, add_special_tokens=False) == ids
  tokens = np.concatenate([ids, np.random.default_rng(0).integers(0, r.rd.rc.block.vocab_size, 32 - len(ids))])
  batch = {'tokens': jnp.asarray(tokens[None]), 'segment_ids': jnp.ones((1, 32), jnp.int32),
           'positions': jnp.arange(32)[None]}
  ours = np.asarray(rack.forward(r.rd, r.params, batch, r.order))
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens[None], dtype=torch.long)).logits.numpy()
  diff = float(np.abs(ours - theirs).max())
  with capsys.disabled():  # the measured figure, shown with -s
    print(f'\nStackWise clm rack -> HF Llama: max |logit diff| {diff:.2e} (|logits| up to {np.abs(ours).max():.2f})')
  assert diff <= 1e-4
  # transformers' greedy generate (stopping at the exported EOS) continues as `jaxtrain generate` does.
  (rec,) = records(capsys, 'generate', f'--workdir={workdir}', f'--prompt={prompt}', '--max_tokens=6')
  with torch.no_grad():
    generated = model.generate(torch.as_tensor([ids]), max_new_tokens=6, do_sample=False)
  assert generated[0, len(ids):].tolist() == rec['ids']


@pytest.mark.slow
def test_export_refuses_racks_that_are_no_causal_lm(trained, capsys, tmp_path):
  out = str(tmp_path / 'hf')
  diffusion = trained('diffusion')[0]
  err = refused(capsys, 'export', f'--workdir={diffusion}', '--format=hf', f'--out={out}')
  assert 'objective diffusion (time=input)' in err and 'only objective=clm racks export' in err
  clm = trained('clm')[0]
  assert 'no separate adapters' in refused(capsys, 'export', f'--workdir={clm}', '--format=peft', f'--out={out}')
  assert '--stage=K' in refused(capsys, 'export', f'--workdir={clm}', '--step=1', f'--out={out}')
  # A causal rack whose blocks no transformers class has (MLA attention): refused from its config alone.
  mla = tmp_path / 'mla'
  shutil.copytree(os.path.join(clm, 'tokenizer'), mla / 'tokenizer')
  with open(os.path.join(clm, 'config.json')) as f:
    config = json.load(f)
  config['model'].update(attention='mla', mla_kv_rank=16, mla_q_rank=0, mla_nope_dim=4, mla_rope_dim=4, mla_v_dim=8)
  (mla / 'config.json').write_text(json.dumps(config))
  err = refused(capsys, 'export', f'--workdir={mla}', f'--out={out}')
  assert 'its clm rack maps onto no Hugging Face model' in err and "attention='mla'" in err
  assert not os.path.exists(out)


@pytest.mark.slow
def test_sample_refusals_are_one_line(trained, capsys, tmp_path):
  clm = trained('clm')[0]
  # A run whose first stage has not finished: its config and tokenizer, no rack yet. Nothing is written.
  fresh = tmp_path / 'fresh'
  shutil.copytree(os.path.join(clm, 'tokenizer'), fresh / 'tokenizer')
  shutil.copy(os.path.join(clm, 'config.json'), fresh / 'config.json')
  before = sorted(str(p) for p in fresh.rglob('*'))
  assert 'no stage of this StackWise run has finished' in refused(capsys, 'generate', f'--workdir={fresh}')
  assert sorted(str(p) for p in fresh.rglob('*')) == before
  assert 'temprature' in refused(capsys, 'generate', f'--workdir={clm}', '--temprature=1')
  assert 'give 1..31' in refused(capsys, 'generate', f'--workdir={clm}', '--max_tokens=40')
  # A prompt of the user's that does not fit beside --max_tokens is refused, not silently cut to its last tokens.
  err = refused(capsys, 'generate', f'--workdir={clm}', '--prompt=' + 'def f(x): ' * 20, '--max_tokens=8')
  assert 'tokens, but the model trained on 32-token rows' in err and 'give at most 24 prompt tokens' in err
  assert 'trained on no chat source' in refused(capsys, 'generate', f'--workdir={clm}', '--chat')
  assert 'saved stages: 0, 1' in refused(capsys, 'generate', f'--workdir={clm}', '--stage=5')
  assert '--stage=K' in refused(capsys, 'generate', f'--workdir={clm}', '--step=2')
  assert 'KV-cache decoding' in refused(capsys, 'generate', f'--workdir={clm}', '--schedule=linear')
  assert 'does not exist' in refused(capsys, 'generate', f'--workdir={tmp_path / "nowhere"}')


def test_sample_settings_from_a_run_always_fit_its_window():
  from jaxtrain.stackwise import inference
  s = inference.Settings.from_config(tiny_stackwise(sample__max_tokens=64, train__seed=5))  # rows of 32 tokens
  assert (s.max_tokens, s.seed, s.steps) == (31, 5, 3)
  s.check(32, causal=True)
  with pytest.raises(inference.SampleError, match=r"config.sample.top_p=0.0: must be in \(0, 1\]"):
    inference.Settings(top_p=0.0).check(32, causal=False, prefix='config.sample.')
  inference.Settings(max_tokens=32).check(32, causal=False)  # a masked canvas may fill the whole row
  with pytest.raises(inference.SampleError, match='give 1..31'):
    inference.Settings(max_tokens=32).check(32, causal=True)
