"""`jaxtrain eval`: a tiny run's checkpoints scored again equal the run's own evaluations, bits per byte by hand,
the per-position curve and the other tallies against numpy, LoRA (chat) and QLoRA runs, StackWise racks (a
masked-diffusion rack's ELBO equals the job's own eval at each stage, a causal rack scores as a decoder, MLM and
time-as-depth racks against the stage's own loss), a restore that reads the parameters only, and bad input (one
line, exit 2, nothing written)."""

import contextlib
import functools
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import cli, models, sharding
from jaxtrain.data.sources import source
from jaxtrain.evaluation import run as eval_run, sets, stats
from jaxtrain.evaluation.score import Scorer, eval_mesh, make_rack_score_fn
from jaxtrain.stackwise import job as stackwise_job, plan as stackwise_plan
from jaxtrain.train import export, loop as train, metrics, rundir
from tests.conftest import REPO
from tests.helpers import packed_batch
from tests.test_stackwise_run import tiny_stackwise
from tests.test_train import tiny_config

# Every run: 1 step per call (the smallest train program to compile), 2 eval batches, no loss plot, a stated
# peak (no probe matmul).
SMALL = {'train.steps_per_call': 1, 'train.eval_batches': 2, 'log.plot': False, 'log.peak_flops': 1e12}
# Starts with one-byte ASCII (its first token, never predicted, is plain), then 2-, 3- and 4-byte characters.
KNOWN = 'Grüße aus Köln: 東京 and naïve café ☕ 🙂.\n'


def jaxtrain(*argv: str) -> tuple[int, str, list[str]]:
  """(exit status, stdout, stderr lines) of `jaxtrain eval ARGV` in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.main(['jaxtrain', 'eval', *argv])
      code = 0
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), [line for line in err.getvalue().splitlines() if line.strip()]


def read(workdir: str, name: str) -> dict:
  with open(os.path.join(workdir, 'eval', name), encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A 4-step run of configs/tiny.py with checkpoints and in-run evaluations at steps 2 and 4, evaluated at
  every step with a further set of one known text."""
  root = tmp_path_factory.mktemp('eval')
  workdir = str(root / 'run')
  train.run(tiny_config(**SMALL, **{'train.steps': 4, 'train.eval_every': 2, 'checkpoint.every': 2}), workdir)
  known = root / 'known.txt'
  known.write_text(KNOWN, encoding='utf-8')
  code, out, err = jaxtrain(f'--workdir={workdir}', '--all-steps', f'--data=known={known}')
  assert code == 0, err
  return workdir, out


def test_eval_equals_the_runs_own_evaluation_at_every_step(tiny_run):
  workdir, out = tiny_run
  logged = {r['step']: r for r in metrics.read_metrics(workdir) if 'eval_loss' in r}
  assert sorted(logged) == [2, 4]
  for step in (2, 4):
    record = read(workdir, f'{step}.json')
    s = record['sets']['stdlib']
    assert abs(s['loss'] - logged[step]['eval_loss']) < 1e-5, (s['loss'], logged[step])
    assert s['tokens'] == logged[step]['eval_tokens'] and s['batches'] == 2 and not s['complete']
    assert record['in_run']['comparable'] and record['in_run']['difference'] < 1e-5
    assert math.isclose(s['ppl'], math.exp(s['loss'])) and s['pieces_scored'] < s['pieces']
    assert f'in-run eval_loss at step {step} (metrics.jsonl): {logged[step]["eval_loss"]:.6f}' in out
    assert os.path.getsize(os.path.join(workdir, 'eval', f'{step}_positions.png')) > 1000
    with open(os.path.join(workdir, 'eval', f'{step}.md'), encoding='utf-8') as f:
      md = f.read()
    assert '| **micro** |' in md and '## known' in md and '| token | id | count |' in md
  assert read(workdir, '4.json')['timings']['compiles'] == 1  # one compile: both sets, both steps
  curve = read(workdir, 'curve.json')
  assert curve['steps'] == [2, 4]
  assert curve['sets']['stdlib']['loss'][1] == read(workdir, '4.json')['sets']['stdlib']['loss']
  assert curve['in_run_eval_loss'] == [logged[2]['eval_loss'], logged[4]['eval_loss']]
  assert os.path.getsize(os.path.join(workdir, 'eval', 'curve.png')) > 1000
  assert 'stdlib' in out and 'micro' in out and 'macro' in out and 'curve.png' in out


def test_bits_per_byte_of_a_known_text_by_hand(tiny_run):
  """The known text is one document: every token after the first is predicted once (the set is far smaller
  than the packing window, so its piece comes round again and again: it is scored once), then EOS."""
  workdir, _ = tiny_run
  record = read(workdir, '4.json')
  s = record['sets']['known']
  config = rundir.load_config(workdir)
  tok = rundir.load_tokenizer(config, workdir)
  ids = tok.encode(KNOWN) + [tok.eos_id]
  first = tok.decode(ids[:1])
  assert first.isascii() and KNOWN.startswith(first)
  by_hand = len(KNOWN.encode('utf-8')) - len(first)  # every byte but the first token's; EOS has none
  assert (s['tokens'], s['bytes'], s['pieces'], s['complete']) == (len(ids) - 1, by_hand, 1, True)
  assert s['repeats_skipped'] > 0 and s['batches'] == 1
  # The nats, from the checkpoint's parameters through the model by itself, in float64.
  mc = models.model_config(config.model, tok.vocab_size)
  graphdef, _, _ = models.describe(mc)
  n = len(ids)
  batch = {'tokens': np.asarray([ids], np.int32), 'segment_ids': np.ones((1, n), np.int32),
           'positions': np.arange(n, dtype=np.int32)[None]}
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  params = jax.device_put(export.restore_state(workdir, 4)['params'], NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    logits = np.asarray(jax.jit(functools.partial(models.apply, graphdef))(params, batch), np.float64)[0]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nats = -sum(logp[t, ids[t + 1]] for t in range(n - 1))
  assert s['nats'] == pytest.approx(nats, rel=1e-5)
  assert s['bits_per_byte'] == pytest.approx(nats / math.log(2) / by_hand, rel=1e-5)
  micro = record['micro']
  both = record['sets'].values()
  assert micro['tokens'] == sum(x['tokens'] for x in both)
  assert micro['bits_per_byte'] == pytest.approx(sum(x['nats'] for x in both) / math.log(2) /
                                                 sum(x['bytes'] for x in both))
  assert record['macro']['loss'] == pytest.approx(np.mean([x['loss'] for x in both]))


def test_token_bytes_add_up_to_the_texts_bytes(tiny_run):
  workdir, _ = tiny_run
  tok = rundir.load_tokenizer(rundir.load_config(workdir), workdir)
  table = tok.token_bytes()
  assert table[tok.eos_id] == 0
  for text in (KNOWN, 'def f(x):\n    return x  # ok', '\u00e9\u00e8' * 7):
    assert table[tok.encode(text)].sum() == len(text.encode('utf-8'))


def test_tallies_of_a_synthetic_batch_equal_numpy():
  """Loss by position, top tokens, loss-masked vs other tokens and bits per byte against plain loops."""
  rng = np.random.default_rng(0)
  b, t, vocab = 3, 12, 9
  positions = np.asarray([list(range(5)) + list(range(7)), list(range(12)), list(range(4)) + [0] * 8], np.int32)
  ce = rng.uniform(0.5, 4.0, (b, t))
  targets = rng.integers(0, vocab, (b, t))
  scored = (rng.uniform(size=(b, t)) < 0.9).astype(np.float32)
  weights = scored * (rng.uniform(size=(b, t)) < 0.7)  # the rest: scored tokens outside the loss mask
  token_bytes = rng.integers(0, 4, vocab)
  tally = stats.Tally(token_bytes, t)
  tally.add({'ce': ce, 'weights': weights, 'scored': scored, 'targets': targets}, positions)
  nats, count, ref_bytes = {}, {}, 0.0
  by_token: dict[int, list[float]] = {}
  for i in range(b):
    for j in range(t):
      if weights[i, j]:
        p = positions[i, j + 1] if j + 1 < t else 0  # the target's position
        nats[p] = nats.get(p, 0.0) + ce[i, j]
        count[p] = count.get(p, 0) + 1
        by_token.setdefault(int(targets[i, j]), []).append(ce[i, j])
        ref_bytes += token_bytes[targets[i, j]]
  pos = tally.positions()
  assert pos['position'] == sorted(nats)
  np.testing.assert_allclose(pos['loss'], [nats[p] / count[p] for p in sorted(nats)])
  assert pos['tokens'] == [count[p] for p in sorted(nats)]
  top = tally.top_tokens(str, k=3)
  expected = sorted(by_token, key=lambda k: -sum(by_token[k]))[:3]
  assert [x['id'] for x in top] == expected
  assert [x['count'] for x in top] == [len(by_token[k]) for k in expected]
  np.testing.assert_allclose([x['mean'] for x in top], [np.mean(by_token[k]) for k in expected])
  m = tally.metrics()
  assert m['tokens'] == weights.sum() and m['bytes'] == ref_bytes
  assert m['loss'] == pytest.approx((ce * weights).sum() / weights.sum())
  assert m['bits_per_byte'] == pytest.approx((ce * weights).sum() / math.log(2) / ref_bytes)
  other = scored * (weights == 0)
  chat = tally.chat()
  assert chat['other']['tokens'] == other.sum()
  assert chat['other']['loss'] == pytest.approx((ce * other).sum() / other.sum())
  both = stats.Tally.merged([tally, tally])
  assert both.metrics()['loss'] == pytest.approx(m['loss']) and both.metrics()['tokens'] == 2 * m['tokens']


def test_a_piece_is_scored_once():
  """Pieces are (document id, piece index); padding (-1) is never scored; a repeat is masked out."""
  batch = {'doc_ids': np.asarray([[4, 4, 7, 7, -1], [7, 7, 4, 9, 9]]),
           'doc_chunks': np.asarray([[-1, -1, 0, 0, -1], [0, 0, 1, -1, -1]]),
           'segment_ids': np.asarray([[1, 1, 2, 2, 0], [1, 1, 2, 3, 3]])}
  seen = {(9, -1)}
  fresh, again = sets.first_pass(batch, seen)
  assert fresh.tolist() == [[True, True, True, True, False], [False, False, True, False, False]]
  assert again == 2 and seen == {(4, -1), (7, 0), (4, 1), (9, -1)}


def test_a_run_from_another_machine_gets_a_mesh_that_fits():
  """The run's mesh where it fits these 8 devices and its rows; else data parallel over a divisor of the rows."""
  assert dict(eval_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}, 8).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(eval_mesh({'data': 64, 'fsdp': 1, 'tensor': 1}, 12).shape) == {'data': 6, 'fsdp': 1, 'tensor': 1}
  assert dict(eval_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, 4).shape) == {'data': 4, 'fsdp': 1, 'tensor': 1}


@pytest.fixture(scope='module')
def adapter_runs(tmp_path_factory):
  """A LoRA run on chat data (the shipped SFT demo: template, assistant-only loss) and a QLoRA (NF4) run, 2
  steps each, evaluated at their last step."""
  root = tmp_path_factory.mktemp('adapters')
  common = dict(SMALL, **{'train.steps': 2, 'train.eval_every': 0, 'checkpoint.every': 0, 'optim.lr': 5e-2,
                          'optim.warmup_steps': 0, 'lora.rank': 4, 'lora.alpha': 8.0})
  lora = tiny_config(**common)
  lora.data.sources.sft = source(os.path.join(REPO, 'configs', 'data', 'sft_demo.jsonl'), format='chat')
  lora.data.eval_fraction, lora.data.pack_buffer = 0.1, 16  # a window smaller than the set: no piece twice
  qlora = tiny_config(**common, **{'lora.quantize': 'nf4'})
  out = {}
  for name, config in (('lora', lora), ('qlora', qlora)):
    workdir = str(root / name)
    train.run(config, workdir)
    code, _, err = jaxtrain(f'--workdir={workdir}')
    assert code == 0, err
    out[name] = workdir
  return out


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['lora', 'qlora'])
def test_lora_and_qlora_runs_evaluate_with_their_adapters(adapter_runs, kind):
  workdir = adapter_runs[kind]
  record = read(workdir, '2.json')
  (name, s), = record['sets'].items()
  logged = [r['eval_loss'] for r in metrics.read_metrics(workdir) if r['step'] == 2 and 'eval_loss' in r]
  assert abs(s['loss'] - logged[-1]) < 1e-5 and record['in_run']['comparable']
  assert ('nf4-quantized frozen' in record['model']) == (kind == 'qlora') and 'LoRA params' in record['model']
  if kind == 'lora':  # chat: the assistant's tokens are the loss; the prompts' are scored beside them
    assert name == 'sft' and s['chat']['other']['tokens'] > 0 and s['chat']['assistant']['tokens'] == s['tokens']
  # The base alone (adapters zeroed) scores differently on the same batches.
  config = rundir.load_config(workdir)
  tok = rundir.load_tokenizer(config, workdir)
  scorer = Scorer(config, tok, workdir)
  evset = sets.read(sets.run_sets(config, tok)[0], tok, rows=scorer.rows, seed=0, max_batches=2)
  with jax.set_mesh(scorer.mesh):
    weights = scorer.weights(2)
    base = dict(weights, params=jax.tree.map(jnp.zeros_like, weights['params']))
    (adapted, _), (plain, _) = (eval_run.score_sets(scorer, w, [evset], tok.token_bytes())[0]
                                for w in (weights, base))
  assert adapted.metrics()['loss'] == pytest.approx(s['loss'], abs=1e-6)
  assert abs(plain.metrics()['loss'] - s['loss']) > 1e-4, (plain.metrics(), s['loss'])


@pytest.mark.slow
def test_generate_sends_a_chat_runs_prompts_through_its_template(adapter_runs):
  from jaxtrain.data import chat

  workdir = adapter_runs['lora']
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    cli.main(['jaxtrain', 'generate', f'--workdir={workdir}', '--prompt=What does os.dup2 do?', '--max_tokens=6',
              '--temperature=1', '--seed=3', '--format=jsonl'])
  rec = json.loads(out.getvalue())
  config = rundir.load_config(workdir)
  tok = rundir.load_tokenizer(config, workdir)
  encoder = chat.ChatEncoder(tok, 'chatml')
  text = encoder.render([{'role': 'user', 'content': 'What does os.dup2 do?'}], add_generation_prompt=True)
  assert rec['prompt'] == 'What does os.dup2 do?' and rec['templated'] == text
  assert rec['prompt_ids'] == tok.encode(text)
  end = tok.encode('<|im_end|>')[0]
  assert end not in rec['ids'][:-1] and tok.eos_id not in rec['ids'][:-1]  # a sample ends at its turn's end


def _listing(workdir: str) -> dict[str, float]:
  found = {}
  for directory, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(directory, name)
      found[path] = os.path.getmtime(path)
  return found


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_run, tmp_path):
  workdir, _ = tiny_run
  fake = tmp_path / 'rack'
  fake.mkdir()
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['stackwise']['num_stacks'] = 2
  (fake / 'config.json').write_text(json.dumps(config), encoding='utf-8')
  (tmp_path / 'latin1.txt').write_bytes('café naïve\n'.encode('latin-1'))
  (tmp_path / 'empty.txt').write_bytes(b'')
  before = _listing(workdir)
  cases = [
      ([f'--workdir={tmp_path}/nope'], f'error: --workdir={tmp_path}/nope does not exist'),
      ([f'--workdir={workdir}', '--step=3'], f"error: --step=3: no such checkpoint in {workdir}/checkpoints; "
                                             'available: 2, 4'),
      ([f'--workdir={workdir}', f'--data=extra={tmp_path}/none/*.jsonl'],
       f"error: --data='extra={tmp_path}/none/*.jsonl': the glob '{tmp_path}/none/*.jsonl' matches no file"),
      ([f'--workdir={workdir}', '--data=oops'], "error: --data='oops': expected NAME=GLOB"),
      ([f'--workdir={workdir}', f'--data=stdlib={REPO}/README.md'],
       f"error: --data='stdlib={REPO}/README.md': 'stdlib' is already the name of one of the run's sets"),
      ([f'--workdir={workdir}', '--step=2', '--all-steps'], 'error: --step=2 and --all-steps: choose one'),
      ([f'--workdir={workdir}', '--batches=-1'], "error: --batches=-1: expected a number of batches"),
      ([f'--workdir={fake}'], f'error: --workdir={fake}: no stage of this StackWise run has finished'),
      ([f'--workdir={workdir}', '--stage=1'], f'error: --stage=1: {workdir} is a plain run, not a StackWise run: '
                                              'choose its checkpoint with --step=N'),
      (['--step=2'], 'error: --workdir is required'),
      # --data files that do not read: named as given (not as the set's internal config key), and no remedy eval
      # cannot take (it has no --config to raise data.max_bad_fraction)
      ([f'--workdir={workdir}', f'--data=lat={tmp_path}/latin1.txt'],
       f"error: --data='lat={tmp_path}/latin1.txt': has 1 bad records of 1 (100.0%, more than "
       f"data.max_bad_fraction=0.01; first: not valid UTF-8 (byte 0xe9) at {tmp_path}/latin1.txt); fix or remove "
       "those records (eval skips"),
      ([f'--workdir={workdir}', f'--data=e={tmp_path}/empty.txt'],
       f"error: --data='e={tmp_path}/empty.txt': holds no non-empty document for the eval split; expected files "
       "with text in field/column text_field='text'"),
  ]
  for argv, needle in cases:
    code, out, err = jaxtrain(*argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(needle) and not out, (argv, code, err)
  assert _listing(workdir) == before and os.listdir(fake) == ['config.json']


def test_a_checkpoint_deleted_while_read_says_so(tiny_run, tmp_path):
  # A run still training deletes old checkpoints (checkpoint.keep): one read then finds its step gone.
  import shutil

  workdir, _ = tiny_run
  copy = tmp_path / 'run'
  shutil.copytree(os.path.join(workdir, 'checkpoints'), copy / 'checkpoints')
  shutil.rmtree(copy / 'checkpoints' / '2')
  with pytest.raises(export.ExportError, match=r'checkpoint 2 of .* was deleted while it was read .*saved now: 4\)'):
    export.restore_state(str(copy), 2)


def test_all_steps_skips_a_checkpoint_deleted_while_it_ran(tiny_run, tmp_path, monkeypatch):
  """--all-steps on a run still training: a checkpoint that checkpoint.keep deletes after the listing is skipped
  with a note (not exit 2 with the earlier steps' files already written); the others are scored."""
  import shutil

  from jaxtrain.evaluation import run as run_lib

  workdir, _ = tiny_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  shutil.rmtree(copy / 'checkpoints' / '4')
  monkeypatch.setattr(run_lib, '_steps', lambda *a, **k: [2, 4])  # the listing made before 4 went
  code, out, err = jaxtrain(f'--workdir={copy}', '--all-steps')
  assert code == 0, err
  assert err == [f'note: checkpoint 4 of {copy} was deleted while this ran (the run is still training and keeps '
                 'only its newest checkpoint.keep); skipped'], err
  assert sorted(os.listdir(copy / 'eval')) == ['2.json', '2.md', '2_positions.png', 'curve.json', 'curve.png']
  assert read(str(copy), 'curve.json')['steps'] == [2]


def test_a_restore_reads_the_parameters_only(tiny_run, monkeypatch):
  """eval, generate and export restore the parameters: orbax deserializes no optimizer moment, step or rng."""
  import orbax.checkpoint as ocp

  workdir, _ = tiny_run
  read_leaves: list[str] = []
  for handler in (ocp.type_handlers.NumpyHandler, ocp.type_handlers.ArrayHandler, ocp.type_handlers.ScalarHandler):
    def spy(self, infos, args=None, _deserialize=handler.deserialize):
      read_leaves.extend(info.name for info in infos)
      return _deserialize(self, infos, args)
    monkeypatch.setattr(handler, 'deserialize', spy)
  state = export.restore_state(workdir, 4)
  path = os.path.join(workdir, 'checkpoints', '4', 'state')
  saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  assert sorted(saved) == ['opt_state', 'params', 'rng', 'step']  # what a full restore would read
  params = {'params.' + '.'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
      saved['params'])[0]}
  assert list(state) == ['params'] and sorted(read_leaves) == sorted(params)
  # The same arrays as the full state holds.
  full = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
  jax.tree.map(np.testing.assert_array_equal, state['params'], full['params'])


# Tiny StackWise runs (2 stacks of 1 block, no samples), trained on first use: a masked-diffusion rack grown in
# 2 stages of 1 step, a causal one trained jointly in 1 stage of 2 steps.
RACKS = {'diffusion': '', 'clm': 'objective=clm,direction=joint'}


@pytest.fixture(scope='module')
def racks(tmp_path_factory):
  """name -> (workdir, the job's per-stage records)."""
  done = {}

  def get(name):
    if name not in done:
      workdir = str(tmp_path_factory.mktemp(name) / 'run')
      config = tiny_stackwise(RACKS[name], train__steps=2, checkpoint__every=0, train__steps_per_call=1)
      config.sample.prompts = ()
      with contextlib.redirect_stdout(io.StringIO()):
        done[name] = (workdir, stackwise_job.run(config, workdir)['stages'])
    return done[name]
  return get


@pytest.mark.slow
def test_a_diffusion_racks_elbo_equals_the_jobs_own_eval_at_every_stage(racks):
  workdir, stages = racks('diffusion')
  code, out, err = jaxtrain(f'--workdir={workdir}', '--all-steps')
  assert code == 0, err
  assert [r['stage'] for r in stages] == [0, 1]
  for logged in stages:
    k = logged['stage']
    record = read(workdir, f'stage_{k}.json')
    s = record['sets']['stdlib']
    assert record['stage'] == k and record['objective'] == 'diffusion' and 'step' not in record
    assert f'stacks {list(range(k + 1))}' in record['model'] and record['checkpoint'].endswith(f'rack/stage_{k}.json')
    # The ELBO and the unweighted masked CE the job logged for the stage's rack, on the same batch and masks.
    assert abs(s['loss'] - logged['eval_loss']) < 1e-5, (s['loss'], logged)
    assert abs(s['masked_ce'] - logged['eval_masked_ce']) < 1e-5
    in_stage = [r for r in metrics.read_metrics(os.path.join(workdir, 'stages', str(k))) if 'eval_loss' in r][-1]
    assert s['tokens'] == in_stage['eval_tokens'] and 0 < s['masked'] < s['tokens']  # ELBO per maskable token
    assert record['in_run']['comparable'] and record['in_run']['logged_in'] == f'rack/stage_{k}.json'
    assert s['bits_per_byte'] == pytest.approx(s['nats'] / math.log(2) / s['bytes'])  # a bound, as the loss
    assert s['chat'] is None and s['positions']['position'][0] == 0  # a masked token is scored where it stands
    assert f'in-run eval_loss at stage {k} (rack/stage_{k}.json): {logged["eval_loss"]:.6f}' in out
    assert 'ELBO' in record['definitions']['loss']
  assert read(workdir, 'stage_1.json')['timings']['compiles'] == 2  # one program per stage's depth
  curve = read(workdir, 'curve.json')
  assert curve['stages'] == [0, 1] and curve['in_run_eval_loss'] == [r['eval_loss'] for r in stages]
  assert 'loss: the masked-diffusion ELBO' in out and 'mCE' in out
  with open(os.path.join(workdir, 'eval', 'stage_1.md'), encoding='utf-8') as f:
    assert '| set | tokens | bytes | loss | ppl | bits/byte | mCE | scored |' in f.read()


@pytest.mark.slow
def test_a_causal_rack_scores_as_a_decoder(racks):
  workdir, stages = racks('clm')
  code, out, err = jaxtrain(f'--workdir={workdir}')
  assert code == 0, err
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == ['stage_0.json', 'stage_0.md', 'stage_0_positions.png']
  record = read(workdir, 'stage_0.json')
  s = record['sets']['stdlib']
  assert record['objective'] == 'clm' and 'masked_ce' not in s
  assert abs(s['loss'] - stages[-1]['eval_loss']) < 1e-5 and record['in_run']['comparable']
  assert s['positions']['position'][0] == 1 and math.isfinite(s['bits_per_byte'])  # next-token: from position 1
  assert out.startswith('eval run stage 0: the rack of stage 0 of 1 (stacks [0, 1])')
  assert 'loss: next-token cross-entropy' in out


@pytest.mark.parametrize('arg', ['objective=mlm', 'direction=prepend,time=depth'])
def test_masked_rack_outputs_add_up_to_the_stages_own_eval_loss(arg):
  """Every stage of a fresh MLM and time-as-depth rack: the score function's per-token outputs, tallied,
  equal the sums of the stage's own loss function (`stackwise.plan.make_loss_fn`, as its eval step runs it)."""
  config = tiny_stackwise(arg)
  vocab = 300
  rd, obj = stackwise_plan.rack_setup(config, vocab)
  stages = stackwise_plan.plan(config)
  rack_params = stackwise_plan.initial_rack(rd, 0, vocab)
  batch = packed_batch([[5, 9, 14], [32], [20, 7], [3, 3, 3, 3]], 32, vocab=vocab, seed=1)
  batch['doc_ids'] = np.cumsum(batch['positions'] == 0).reshape(batch['tokens'].shape).astype(np.int32)
  batch['doc_chunks'] = np.full_like(batch['tokens'], -1)
  batch['scored'] = (batch['segment_ids'] > 0).astype(np.int32)
  score = jax.jit(make_rack_score_fn(rd, obj, stages))
  for stage in stages:
    view = {'shared': rack_params['shared'], 'stacks': {str(i): rack_params['stacks'][str(i)] for i in stage.order}}
    tally = stats.Tally(np.ones(rd.rc.block.vocab_size), 32, obj.kind)
    tally.add(jax.device_get(score({'params': view}, batch)), batch['positions'])
    loss_fn = stackwise_plan.make_loss_fn(config, rd, obj, stage, stackwise_plan.depth_schedule(config))
    _, sums = jax.device_get(jax.jit(loss_fn, static_argnums=2)(view, batch, None))
    m = tally.metrics()
    assert m['tokens'] == sums['tokens'] and m['masked'] == sums['masked_sum'] > 0
    assert m['loss'] == pytest.approx(sums['loss_sum'] / sums['tokens'], rel=1e-5)
    assert m['masked_ce'] == pytest.approx(sums['masked_ce_sum'] / sums['masked_sum'], rel=1e-5)
    assert math.isnan(m['bits_per_byte']) == (obj.kind == 'mlm')


@pytest.mark.slow
def test_a_rack_asked_for_what_it_has_not_is_one_line_exit_2(racks):
  workdir, _ = racks('diffusion')
  rack = os.path.join(workdir, 'rack')
  before = _listing(workdir)
  cases = [
      (['--stage=5'], f'error: --stage=5: no rack of that stage in {rack}; saved stages: 0, 1'),
      (['--stage=-1'], f'error: --stage=-1: no rack of that stage in {rack}; saved stages: 0, 1'),
      (['--step=2'], 'error: --step=2: a StackWise run saves its rack per stage, not per step: choose one with '
                     '--stage=K'),
      (['--best'], 'error: --best: a StackWise run keeps the rack of each stage, not a best checkpoint'),
      (['--stage=0', '--all-steps'], 'error: --stage=0 and --all-steps: choose one'),
  ]
  for argv, needle in cases:
    code, out, err = jaxtrain(f'--workdir={workdir}', *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith(needle) and not out, (argv, code, err)
  assert _listing(workdir) == before
  # Without --stage: the last saved stage, as `jaxtrain generate` chooses.
  config = rundir.load_config(workdir)
  assert eval_run._stages(workdir, config, None, None, False, False) == [1]  # pylint: disable=protected-access
