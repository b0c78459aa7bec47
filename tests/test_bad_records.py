"""What a new user's data does to every path that reads records (tokenizer building, prepare, `jaxtrain check`,
`jaxtrain analyze`, training): malformed records are skipped and counted alike, the bad share is taken over the
records read, check reports them as training does, Alpaca and ShareGPT files train with assistant-only masks,
and check and analyze name a source the same way. Commands run in-process on tiny files."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from jaxtrain import cli
from jaxtrain.cli import check
from jaxtrain.data import load_tokenizer, pipeline, records
from tests.conftest import REPO

# Two steps of the tiny model, with one vocabulary size and XLA attention for every run here, so the runs share
# compiled programs (JAX's persistent cache) and build no CPU kernel in their private cache dirs.
FAST = ['--config.model.vocab_size=320', '--config.model.attention_impl=xla', '--config.train.steps=2',
        '--config.optim.warmup_steps=0', '--config.train.eval_batches=1', '--config.checkpoint.every=0',
        '--config.data.tokenizer_vocab_size=300']


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'cache'))


def run(capsys, command: str, config: str, *args: str) -> tuple[int, str, list[str]]:
  """(exit status, stdout, stderr lines) of `jaxtrain COMMAND --config=CONFIG ARGS`, in this process."""
  try:
    cli.main(['jaxtrain', command, f'--config={config}', *args])
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, [line for line in err.splitlines() if line.strip() and 'Warning' not in line]


def _good(n: int) -> list[str]:
  return [json.dumps({'text': f'record {i} says {"hello " * (i % 5)}world'}) for i in range(n)]


# ----------------------------------------------------------------------------- every kind of bad record


def _malformed_corpus(root) -> dict[str, int]:
  """1000 good records and one of every kind of bad one; returns the bad count by reason prefix."""
  root.mkdir()
  lines = [line.encode() for line in _good(1000)]
  lines[10] = b'{"text": "bad bytes \xff\xfe here"}'
  lines[20] = b'{"text": "x \\ud800 y"}'  # valid JSON, a lone UTF-16 surrogate
  lines[30] = b'{"text": "nul \\u0000 inside"}'
  lines[40] = b'{"text": "raw nul \x00 byte"}'
  lines[50] = json.dumps({'text': 'huge ' * 1000}).encode()  # over data.max_doc_bytes=2000
  lines[60] = b'{"text": 5}'
  lines[70] = b'{"text": ["a", "list"]}'
  lines[80] = b'["a", "line", "that", "is", "a", "list"]'
  lines[90] = b'{"text": "broken'
  (root / 'a.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
  (root / 'good.txt').write_text('a plain text file in UTF-8, caf\u00e9\n')
  (root / 'latin.txt').write_bytes('un fichier en latin-1, caf\u00e9\n'.encode('latin-1'))
  (root / 'nul.txt').write_bytes(b'binary \x00\x01 data\n')
  records = [{'text': f'array record {i}'} for i in range(20)] + [{'text': 'y \ud83d z'}, {'text': 7}]
  (root / 'arr.json').write_text(json.dumps(records))  # json.dumps writes the surrogate as an escape
  return {'not valid JSON or UTF-8': 3, 'text holding a lone surrogate': 2, 'text holding a NUL character': 2,
          'a record over data.max_doc_bytes': 1, "field 'text' holds a": 3, "no field 'text'": 1,
          'not valid UTF-8': 1}


@pytest.mark.slow
@pytest.mark.parametrize('given', [False, True], ids=['built-tokenizer', 'given-tokenizer'])
def test_every_kind_of_malformed_record_is_skipped_and_counted_on_every_path(tmp_path, capsys, given):
  """Bad bytes, lone surrogates, NUL, a huge line, wrong types, a latin-1 file, in JSONL, a JSON array and text
  files: tokenizer building (or a given tokenizer), check, analyze and training skip and count each alike.

  The share is over the records read: 13 bad of the 1025 records read is 1.3%, under 2%; over the ~50
  documents of the eval split (data.eval_fraction=0.05) it would have been 20%."""
  expected = _malformed_corpus(tmp_path / 'data')
  args = [f'--config.data.train={tmp_path}/data/*', '--config.data.max_doc_bytes=2000',
          '--config.data.eval_fraction=0.05', '--config.data.max_bad_fraction=0.02', *FAST]
  if given:  # a tokenizer.json built on clean text, given by path
    clean = tmp_path / 'clean.jsonl'
    clean.write_text('\n'.join(_good(50)) + '\n')
    from jaxtrain.config.defaults import base_config
    cfg = base_config().data
    cfg.train, cfg.tokenizer_vocab_size = str(clean), 300
    args.append(f'--config.data.tokenizer={load_tokenizer(cfg).path}')

  total = sum(expected.values())
  code, out, err = run(capsys, 'check', 'configs/tiny.py', f'--workdir={tmp_path}/c', *args)
  assert code == 0 and not os.path.exists(tmp_path / 'c'), err
  reports = re.findall(r"^  data       (train: .*)$", out, re.M)
  assert len(reports) == 2, out  # the train and the eval split: the same bad records, of the same files
  skipped = reports[0].split('; skipped ', 1)[1].split('; first: ')[0]
  counted = {why: int(n) for n, why in re.findall(r'(\d+) (.+?)(?=, \d+ |$)', skipped)}
  for prefix, n in expected.items():
    assert sum(v for k, v in counted.items() if k.startswith(prefix)) == n, (prefix, reports[0])
  assert sum(counted.values()) == total, reports[0]

  code, out, err = run(capsys, 'analyze', 'configs/tiny.py', f'--workdir={tmp_path}/a', *args)
  assert code == 0, err
  assert re.search(rf"^source 'train', train split: .* \({total:,d} skipped\)$", out, re.M), out

  code, out, err = run(capsys, 'train', 'configs/tiny.py', f'--workdir={tmp_path}/t', *args)
  assert code == 0, err
  assert f'data {reports[0]}' in out.splitlines() and 'steps 1..2' in out, out  # the line check printed

  if not given:
    # Over data.max_bad_fraction every path stops with the same line, before writing anything.
    messages = set()
    for command in ('check', 'analyze', 'train'):
      code, _, err = run(capsys, command, 'configs/tiny.py', f'--workdir={tmp_path}/{command}-strict', *args,
                         '--config.data.max_bad_fraction=0.01')
      assert code == 2 and len(err) == 1 and not os.path.exists(tmp_path / f'{command}-strict'), (command, err)
      messages.add(err[0])
    (message,) = messages
    assert f'has {total} bad records of 1025 (1.3%, more than data.max_bad_fraction=0.01' in message, message


def test_a_given_tokenizer_that_rejects_a_record_skips_only_that_record(tmp_path):
  # Indexing catches what tokenizers refuse; should a record reach the encoder anyway (a file rewritten after
  # indexing), the TypeError of the Rust tokenizer is isolated like a ValueError.
  from jaxtrain.data import prepare

  cfg_docs = ['fine one', 'x \ud800 y', 'fine two']
  clean = tmp_path / 'clean.jsonl'
  clean.write_text('\n'.join(_good(30)) + '\n')
  from jaxtrain.config.defaults import base_config
  cfg = base_config().data
  cfg.train, cfg.tokenizer_vocab_size = str(clean), 300
  tok = load_tokenizer(cfg)
  p = prepare.prepare(cfg_docs, prepare.text_encoder(tok), 'surrogate', name='t', root=str(tmp_path / 'p'))
  assert len(p) == 2 and p.skipped == 1 and p.skipped_reasons[0].startswith('document 1: ')


# ----------------------------------------------------------------------------- Alpaca, ShareGPT, preview, names


ALPACA = [{'instruction': f'Name a colour number {i}.', 'input': 'Be brief.' if i % 2 else '',
           'output': f'Blue, the colour {i}.'} for i in range(24)]
SHAREGPT = [{'conversations': [{'from': 'system', 'value': 'You are terse.'},
                               {'from': 'human', 'value': f'What is {i} plus one?'},
                               {'from': 'gpt', 'value': f'It is {i + 1}.'},
                               {'from': 'human', 'value': 'Thanks.'},
                               {'from': 'gpt', 'value': 'You are welcome.'}]} for i in range(24)]
# A system prompt long enough that the first assistant token comes after check.SHORT_RECORD tokens.
LONG_PROMPT = [{'messages': [{'role': 'system', 'content': 'Rules: ' + 'be careful and precise. ' * 20},
                             {'role': 'user', 'content': f'Question {i}?'},
                             {'role': 'assistant', 'content': f'Answer {i}.'}]} for i in range(24)]


def _instruction_config(tmp_path) -> str:
  """configs/tiny.py with three named sources: Alpaca's JSON array, ShareGPT JSONL and chat JSONL."""
  (tmp_path / 'alpaca.json').write_text(json.dumps(ALPACA, indent=1))  # one JSON array, as Alpaca ships
  (tmp_path / 'sharegpt.jsonl').write_text('\n'.join(json.dumps(r) for r in SHAREGPT) + '\n')
  (tmp_path / 'chat.jsonl').write_text('\n'.join(json.dumps(r) for r in LONG_PROMPT) + '\n')
  path = tmp_path / 'sft.py'
  path.write_text(f'''
import importlib.util
from jaxtrain.data.sources import source

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location('tiny_config', {os.path.join(REPO, 'configs', 'tiny.py')!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.eval_fraction = 0.25
  c.data.sources.alp = source({str(tmp_path / 'alpaca.json')!r}, format='alpaca', template='chatml')
  c.data.sources.sgpt = source({str(tmp_path / 'sharegpt.jsonl')!r}, format='sharegpt', template='chatml')
  c.data.sources.long = source({str(tmp_path / 'chat.jsonl')!r}, format='chat', template='chatml')
  return c
''')
  return str(path)


def _load(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('sft_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _preview_rows(out: str, label: str) -> list[tuple[int, int]]:
  """(position, loss mask) of the preview rows check printed for the source split `label`."""
  block = out.split(f'data source {label}:')[1].split('data source')[0]
  return [(int(p), int(m)) for p, m in re.findall(r"^ +(\d+) +\d+  .* ([01])$", block, re.M)]


@pytest.mark.slow
def test_alpaca_and_sharegpt_train_on_assistant_tokens_only_and_check_and_analyze_agree(tmp_path, capsys):
  config = _instruction_config(tmp_path)
  code, checked, err = run(capsys, 'check', config, f'--workdir={tmp_path}/c', *FAST)
  assert code == 0, err
  for name in ('alp', 'sgpt', 'long'):  # the preview reaches the first assistant turn (mask 1)
    masks = [m for _, m in _preview_rows(checked, f"'{name}', train split")]
    assert 1 in masks and 0 in masks, (name, checked)
  rows = _preview_rows(checked, "'long', train split")
  assert rows[-1][0] > check.SHORT_RECORD and rows[-1][1] == 1, rows  # a long record: through its assistant turn
  code, out, err = run(capsys, 'check', config, f'--workdir={tmp_path}/c', '--preview_tokens=5', *FAST)
  assert code == 0 and len(_preview_rows(out, "'long', train split")) == 5, err

  # `jaxtrain analyze` names every source split as check does.
  code, analysed, err = run(capsys, 'analyze', config, f'--workdir={tmp_path}/a', *FAST)
  assert code == 0, err
  expected = sorted(f"'{n}', {s} split" for n in ('alp', 'sgpt', 'long') for s in ('train', 'eval'))
  by_check = sorted(re.findall(r"^data source ('\w+', \w+ split):", checked, re.M))
  by_analyze = sorted(re.findall(r"^source ('\w+', \w+ split):", analysed, re.M))
  assert by_check == by_analyze == expected, (by_check, by_analyze)
  figures = json.loads((tmp_path / 'a' / 'analysis' / 'analysis.json').read_text())
  assert sorted((f['name'], f['split']) for f in figures) == sorted(
      (n, s) for n in ('alp', 'sgpt', 'long') for s in ('train', 'eval'))
  assert (tmp_path / 'a' / 'analysis' / 'alp-train_lengths.png').exists()

  code, out, err = run(capsys, 'train', config, f'--workdir={tmp_path}/t', *FAST)
  assert code == 0 and 'steps 1..2' in out, err

  # The loss mask covers exactly the assistant turns (and their end-of-turn tokens, and the final EOS).
  from jaxtrain.config import validate
  cfg = validate.prepare(_load(config), str(tmp_path / 'x'))
  cfg.data.tokenizer_vocab_size = 300  # as FAST sets it
  tok = load_tokenizer(cfg.data)
  srcs = {s.name: s for s in pipeline.load_sources(cfg.data, tok, 'train')}
  assert all(s.prepared.tokenized == 0 for s in srcs.values())  # what the commands prepared
  for name, rows in (('alp', ALPACA), ('sgpt', SHAREGPT)):
    src = srcs[name]
    assert len(src.prepared) == len(src.docs) > 10
    for r in range(len(src.prepared)):
      ids, mask = src.prepared[r]
      record = rows[int(src.docs.name(int(src.prepared.source_index[r])).rsplit(':', 1)[1])]
      if name == 'alp':
        user = record['instruction'] + ('\n\n' + record['input'] if record['input'] else '')
        assistant = [record['output']]
      else:
        user = record['conversations'][1]['value']
        assistant = [t['value'] for t in record['conversations'] if t['from'] == 'gpt']
      assert tok.decode(ids[mask == 1]) == ''.join(a + '<|im_end|>' for a in assistant) + '<|endoftext|>', record
      assert user in tok.decode(ids[mask == 0])


def test_records_of_each_instruction_format():
  record, problem = records.to_document(ALPACA[1], 'instruction', 'alpaca')
  assert problem is None and record == [{'role': 'user', 'content': 'Name a colour number 1.\n\nBe brief.'},
                                        {'role': 'assistant', 'content': 'Blue, the colour 1.'}]
  assert records.to_document(ALPACA[0], 'instruction', 'alpaca')[0][0]['content'] == 'Name a colour number 0.'
  assert records.to_document({'instruction': 'x'}, 'instruction', 'alpaca')[1].startswith("no field 'output'")
  assert records.to_document({'instruction': 'x', 'output': 3}, 'i', 'alpaca')[1] == \
      "field 'output' holds a int where a string was expected"
  msgs, problem = records.to_document(SHAREGPT[0], 'conversations', 'sharegpt')
  assert problem is None and [m['role'] for m in msgs] == ['system', 'user', 'assistant', 'user', 'assistant']
  bad = {'conversations': [{'from': 'narrator', 'value': 'x'}]}
  assert "is from 'narrator'" in records.to_document(bad, 'conversations', 'sharegpt')[1]
  assert check.preview_length(np.ones(10)) == 10 and check.preview_length(np.ones(100)) == check.PREVIEW_TOKENS
  assert check.preview_length(np.r_[np.zeros(70), np.ones(5), np.zeros(30)]) == 75
  assert check.preview_length(np.r_[np.zeros(70), np.ones(50)]) == 70 + check.PREVIEW_TOKENS
  assert check.preview_length(np.ones(100), 7) == 7
