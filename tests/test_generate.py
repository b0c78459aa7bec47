"""`jaxtrain generate` on one tiny LoRA chat run (trained once for the module): greedy KV-cache decoding equals
argmax decoding recomputed without a cache from the Transformer's own logits, temperature 0 / top_k=1 are
greedy, seeded sampling is reproducible and a row's text does not depend on the other rows, EOS ends a
sample, a batch of prompts of different lengths and several samples each compiles once, --prompts files,
--num_samples, --compare_base against the base model generated directly, the .json/.md record, and bad input
(one line, exit 2, nothing written)."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models
from jaxtrain.data import chat
from jaxtrain.data.sources import source
from jaxtrain.stackwise import inference
from jaxtrain.train import export, loop as train, rundir
from tests.conftest import REPO
from tests.helpers import run_command
from tests.test_train import tiny_config

PROMPTS = ['import', 'def parse(text):\n    return', 'class A']  # 1, several and 2 tokens: one batch


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A 3-step LoRA run (rank 4) on the stdlib corpus and the chat demo (chatml template), and its model read
  back with the base beside it."""
  workdir = str(tmp_path_factory.mktemp('generate') / 'run')
  config = tiny_config(**{'train.steps': 3, 'train.eval_every': 0, 'checkpoint.every': 0, 'train.steps_per_call': 1,
                          'log.plot': False, 'log.peak_flops': 1e12, 'optim.lr': 5e-2, 'optim.warmup_steps': 0,
                          'lora.rank': 4, 'lora.alpha': 8.0})
  config.data.sources.sft = source(os.path.join(REPO, 'configs', 'data', 'sft_demo.jsonl'), format='chat')
  config.data.eval_fraction, config.data.pack_buffer = 0.1, 16
  train.run(config, workdir)
  return workdir, inference.load_run(workdir, base=True)


def _settings(**kw):
  return inference.Settings(**{'max_tokens': 8, 'stop_at_eos': False, **kw})


def _listing(workdir):
  return sorted(os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files)


def test_greedy_equals_argmax_decoding_without_cache_in_one_compile(lora_run, monkeypatch):
  workdir, loaded = lora_run
  traces = []
  decode = inference.rack.decode
  monkeypatch.setattr(inference.rack, 'decode', lambda *a: traces.append(1) or decode(*a))
  inference._sampler.cache_clear()
  tok, window = loaded.tokenizer, loaded.window
  greedy = inference.generate(loaded.rack, tok, PROMPTS, _settings(), window)
  assert len(traces) == 2  # prefill + loop body, traced once for three prompt lengths in one batch
  assert len({len(s.prompt_ids) for s in greedy}) == 3
  # The reference: the merged Transformer's full causal forward over a fixed window, argmax token by token.
  config = rundir.load_config(workdir)
  params = export.model_params_for_export(config, export.restore_state(workdir, 3), tok)
  mc = models.model_config(config.model, params['embed'].shape[0])
  graphdef = models.describe(mc)[0]
  batch = {'segment_ids': jnp.ones((1, window), jnp.int32), 'positions': jnp.arange(window)[None]}
  logits = jax.jit(lambda tokens: models.apply(graphdef, params, dict(batch, tokens=tokens))[0])
  for s in greedy:
    seq = s.prompt_ids + [0] * (window - len(s.prompt_ids))  # causal: what follows j cannot change logits at j
    for j in range(len(s.prompt_ids), len(s.prompt_ids) + 8):
      seq[j] = int(np.argmax(logits(jnp.asarray([seq]))[j - 1, :tok.vocab_size]))
    assert s.ids == seq[len(s.prompt_ids):len(s.prompt_ids) + 8], s.prompt
  # Temperature 0 is greedy whatever top_k/top_p say (and compiles nothing new); top_k=1 at any temperature is
  # greedy too.
  for kw in (dict(top_k=5, top_p=0.5, seed=2), dict(temperature=1.5, top_k=1, seed=9)):
    assert [s.ids for s in inference.generate(loaded.rack, tok, PROMPTS, _settings(**kw), window)] == \
        [s.ids for s in greedy], kw
  assert len(traces) == 4  # the top_k=1 draw: one compilation more


def test_seeded_samples_are_reproducible_distinct_and_row_independent(lora_run):
  _, loaded = lora_run
  tok, window = loaded.tokenizer, loaded.window
  s = _settings(temperature=1.0, seed=3)
  three = inference.generate(loaded.rack, tok, PROMPTS, s, window, num_samples=3)
  assert [(x.prompt, x.sample) for x in three] == [(p, j) for p in PROMPTS for j in range(3)]
  assert [x.ids for x in inference.generate(loaded.rack, tok, PROMPTS, s, window, num_samples=3)] == \
      [x.ids for x in three]
  for k in range(len(PROMPTS)):
    assert len({tuple(x.ids) for x in three[3 * k:3 * k + 3]}) > 1  # N samples, not one repeated
  one = inference.generate(loaded.rack, tok, PROMPTS, s, window)
  assert [x.ids for x in one] == [x.ids for x in three[::3]]  # sample 1 of N is what N=1 gives
  other = inference.generate(loaded.rack, tok, PROMPTS, _settings(temperature=1.0, seed=4), window)
  assert [x.ids for x in other] != [x.ids for x in one]
  # A row's text depends on its prompt, k and j, not on the rows beside it: nine rows (two batches of 5, the
  # last padded) as three.
  nine = inference.generate(loaded.rack, tok, PROMPTS * 3, s, window)
  assert [x.ids for x in nine[:3]] == [x.ids for x in one]


def test_a_sample_ends_at_eos(lora_run):
  _, loaded = lora_run
  free = inference.generate(loaded.rack, loaded.tokenizer, PROMPTS, _settings(), loaded.window)[0]
  tok = copy.copy(loaded.tokenizer)
  tok.eos_id = free.ids[2]  # the greedy continuation's third token now ends the document
  ended = inference.generate(loaded.rack, tok, PROMPTS, _settings(stop_at_eos=True), loaded.window)[0]
  assert ended.ids == free.ids[:free.ids.index(tok.eos_id) + 1]
  assert len(ended.ids) <= 3


def test_prompts_file_num_samples_and_the_record(lora_run, capsys, tmp_path):
  workdir, loaded = lora_run
  lines = [{'prompt': 'What does os.dup2 do?', 'answer': 'ignored'},
           {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is a pipe?'}]}]
  jsonl = tmp_path / 'p.jsonl'
  jsonl.write_text('\n'.join(json.dumps(x) for x in lines) + '\n\n', encoding='utf-8')
  out = tmp_path / 'rec' / 'answers'
  code, stdout, err = run_command(capsys, 'generate', f'--workdir={workdir}', f'--prompts={jsonl}', '--seed=5',
                                  '--num_samples=2', '--temperature=1', '--max_tokens=6', '--format=jsonl',
                                  f'--out={out}.json')
  assert code == 0, err
  recs = [json.loads(line) for line in stdout.splitlines()]
  assert [(('prompt' in r), r['sample']) for r in recs] == [(True, 0), (True, 1), (False, 0), (False, 1)]
  # The same as the library given the template's texts; a chat sample ends at the end of its turn.
  encoder = chat.ChatEncoder(loaded.tokenizer, 'chatml')
  texts = [encoder.render([{'role': 'user', 'content': lines[0]['prompt']}], add_generation_prompt=True),
           encoder.render(lines[1]['messages'], add_generation_prompt=True)]
  assert [r['templated'] for r in recs[::2]] == texts
  end = loaded.tokenizer.encode('<|im_end|>')
  want = inference.generate(loaded.rack, loaded.tokenizer, texts, _settings(max_tokens=6, temperature=1.0, seed=5,
                                                                            stop_at_eos=True), loaded.window,
                            stop_ids=end, num_samples=2)
  assert [r['ids'] for r in recs] == [s.ids for s in want]
  record = json.loads((tmp_path / 'rec' / 'answers.json').read_text(encoding='utf-8'))
  assert record['settings']['num_samples'] == 2 and record['chat_template'] == 'chatml'
  assert [[s['ids'] for s in e['samples']] for e in record['prompts']] == [[r['ids'] for r in recs[:2]],
                                                                           [r['ids'] for r in recs[2:]]]
  assert record['prompts'][1]['messages'] == lines[1]['messages'] and record['timing']['new_tokens'] > 0
  md = (tmp_path / 'rec' / 'answers.md').read_text(encoding='utf-8')
  assert md.count('## Prompt') == 2 and md.count('| # | sample |') == 2 and texts[1] in md
  # A .txt file, one prompt per line, text output, the record in WORKDIR/generate/ by default.
  txt = tmp_path / 'p.txt'
  txt.write_text('import\n\nclass A\n  x = 1', encoding='utf-8')
  code, stdout, err = run_command(capsys, 'generate', f'--workdir={workdir}', f'--prompts={txt}', '--nochat',
                                  '--max_tokens=8', '--nostop_at_eos')
  assert code == 0, err
  assert [line.split(' -> ')[0] for line in stdout.splitlines()[1:4]] == ["sample 'import'", "sample 'class A'",
                                                                          "sample '  x = 1'"]
  (name,) = [f for f in os.listdir(os.path.join(workdir, 'generate')) if f.endswith('.json')]
  assert f'wrote {os.path.join(workdir, "generate", name)}' in err
  os.remove(os.path.join(workdir, 'generate', name))
  os.remove(os.path.join(workdir, 'generate', name[:-5] + '.md'))


def test_compare_base_equals_generating_from_the_base_model(lora_run, capsys, tmp_path):
  workdir, loaded = lora_run
  code, stdout, err = run_command(capsys, 'generate', f'--workdir={workdir}', '--prompt=import', '--prompt=class A',
                                  '--nochat', '--nostop_at_eos', '--max_tokens=8', '--compare_base', '--format=jsonl',
                                  f'--out={tmp_path / "cmp"}')
  assert code == 0, err
  recs = [json.loads(line) for line in stdout.splitlines()]
  # The base directly: the seed's initial parameters (what this LoRA run's frozen base is) through the model.
  config = rundir.load_config(workdir)
  mc = models.model_config(config.model, loaded.tokenizer.vocab_size)
  base = inference.from_transformer(models.init_params(mc, jax.random.PRNGKey(config.train.seed)), mc)
  want = inference.generate(base, loaded.tokenizer, ['import', 'class A'], _settings(), loaded.window)
  assert [r['base']['ids'] for r in recs] == [s.ids for s in want]
  adapted = inference.generate(loaded.rack, loaded.tokenizer, ['import', 'class A'], _settings(), loaded.window)
  assert [r['ids'] for r in recs] == [s.ids for s in adapted]
  assert [r['ids'] for r in recs] != [r['base']['ids'] for r in recs]  # the adapters change the answers
  md = (tmp_path / 'cmp.md').read_text(encoding='utf-8')
  assert md.count('| # | adapted | base |') == 2
  code, stdout, _ = run_command(capsys, 'generate', f'--workdir={workdir}', '--prompt=import', '--prompt=class A',
                                '--nochat', '--nostop_at_eos', '--max_tokens=8', '--compare_base',
                                f'--out={tmp_path / "cmp2"}')
  assert code == 0 and [line.split(' ', 1)[0] for line in stdout.splitlines()[1:3]] == ['sample', 'base']


def test_a_markdown_cell_keeps_the_samples_spaces():
  """Markdown trims a table cell and HTML collapses runs of spaces: a sample's indentation (generated code), its
  runs of spaces and a sample of spaces only stay visible as &nbsp;; pipes and line breaks as before."""
  from jaxtrain.cli import generate as generate_cli

  assert generate_cli._cell('    return x') == '&nbsp;' * 4 + 'return x'
  assert generate_cli._cell('a  b|c\n  d ') == 'a&nbsp;&nbsp;b&#124;c<br>&nbsp;&nbsp;d&nbsp;'
  assert generate_cli._cell('   ') == '&nbsp;' * 3 and generate_cli._cell('x = 1') == 'x = 1'
  assert generate_cli._cell('') == ' ' and generate_cli._cell('<|im_end|>') == '&lt;&#124;im_end&#124;&gt;'


def test_bad_input_is_one_line_and_writes_nothing(lora_run, capsys, tmp_path):
  workdir, _ = lora_run
  full = tmp_path / 'full'  # the same run, as if it had trained all parameters
  shutil.copytree(workdir, full)
  config = json.loads((full / 'config.json').read_text())
  config['lora']['rank'] = 0
  (full / 'config.json').write_text(json.dumps(config))
  files = {}
  for name, text in (('empty.jsonl', '\n  \n'), ('bad.jsonl', '{"prompt": "a"}\n{"prompt": "b"\n'),
                     ('list.jsonl', '["a"]\n'), ('both.jsonl', '{"prompt": "a", "messages": []}\n'),
                     ('num.jsonl', '{"prompt": 3}\n'),
                     ('msgs.jsonl', '{"messages": [{"role": "user", "content": "a"}]}\n'),
                     ('role.jsonl', '{"messages": [{"role": "robot", "content": "a"}]}\n'),
                     ('long.txt', 'ok\n' + 'def f(x): ' * 40 + '\n'), ('p.csv', 'a\n'), ('exists.json', '{}')):
    files[name] = tmp_path / name
    files[name].write_text(text, encoding='utf-8')
  before = _listing(workdir), _listing(full)
  for args, words in (
      ([f'--prompts={files["empty.jsonl"]}'], 'holds no prompt'),
      ([f'--prompts={tmp_path / "nowhere.jsonl"}'], 'no such file'),
      ([f'--prompts={files["bad.jsonl"]}'], 'line 2: not JSON'),
      ([f'--prompts={files["list.jsonl"]}'], 'line 1: a JSON list'),
      ([f'--prompts={files["both.jsonl"]}'], 'not both'),
      ([f'--prompts={files["num.jsonl"]}'], '"prompt" is a int'),
      ([f'--prompts={files["msgs.jsonl"]}', '--nochat'], 'need a chat run'),
      ([f'--prompts={files["role.jsonl"]}'], "unknown role 'robot'"),
      ([f'--prompts={files["long.txt"]}', '--nochat', '--max_tokens=8'], 'line 2: '),
      ([f'--prompts={files["p.csv"]}'], 'give a .jsonl file'),
      (['--prompt=' + 'def f(x): ' * 40], 'give at most'),
      (['--num_samples=0'], '--num_samples=0'),
      (['--num_samples=2', '--temperature=0'], 'identical samples'),
      ([f'--out={tmp_path / "exists"}'], 'exist already'),
      ([f'--out={files["p.csv"]}/x'], 'is a file, not a folder'),
  ):
    code, out, err = run_command(capsys, 'generate', f'--workdir={workdir}', *args)
    assert code == 2 and not out, (args, out, err)
    assert err.count('\n') == 1 and err.startswith('error: ') and words in err, (args, err)
    assert 'not both' not in err or 'both.jsonl' in err, (args, err)  # said only of an object with both
  code, _, err = run_command(capsys, 'generate', f'--workdir={full}', '--compare_base')
  assert code == 2 and 'full-parameter run' in err and err.count('\n') == 1, err
  assert (_listing(workdir), _listing(full)) == before
