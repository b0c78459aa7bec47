"""Tests of jaxtrain.data: sources and splits, tokenizers, packing invariants, determinism and resume."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from jaxtrain.data import DataError, Tokenizer, list_files, load_tokenizer, make_dataset, sample_ids
from jaxtrain.data import pipeline, sources
from jaxtrain.data.tokenizer import EOS
from jaxtrain.config.defaults import base_config

SEQ_LEN = 64
VOCAB = 300


@pytest.fixture(scope='module', autouse=True)
def _cache_dir(tmp_path_factory):
  # Module-wide so the built tokenizers are shared by the tests, yet never leak into the user's cache.
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JAXTRAIN_CACHE', str(tmp_path_factory.mktemp('jaxtrain_cache')))
    yield


def _words(i: int, n: int) -> str:
  return ' '.join(f'w{(i * 7 + k) % 23}x{k % 5}' for k in range(n))


# 40 short documents, 3 long ones (several seq_len pieces each), one empty and one blank line (both skipped).
TEXTS = [f'document {i}: {_words(i, 4 + i % 9)}.' for i in range(40)]
LONG_TEXTS = [f'long {j}: ' + _words(100 + j, 150 + 40 * j) for j in range(3)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  lines = [json.dumps({'id': i, 'text': t}) for i, t in enumerate(TEXTS + LONG_TEXTS)]
  lines.insert(5, json.dumps({'id': -1, 'text': ''}))
  lines.insert(9, '')
  (root / 'a.jsonl').write_text('\n'.join(lines[:20]) + '\n')
  (root / 'b.jsonl').write_text('\n'.join(lines[20:]) + '\n')
  return root


def _cfg(**overrides):
  cfg = base_config().data
  cfg.tokenizer_vocab_size = VOCAB
  cfg.seq_len = SEQ_LEN
  cfg.prefetch = 0
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope='module')
def jsonl_cfg(corpus):
  return _cfg(train=f'{corpus}/*.jsonl', eval_fraction=0.2)


@pytest.fixture(scope='module')
def jsonl_tok(jsonl_cfg):
  return load_tokenizer(jsonl_cfg)


@pytest.fixture(scope='module')
def stdlib_cfg():
  return _cfg(train='stdlib', max_files=12, eval_fraction=0.2)


@pytest.fixture(scope='module')
def stdlib_tok(stdlib_cfg):
  return load_tokenizer(stdlib_cfg)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(batch):
  """Token tuples of every (row, segment) of a batch, in row order."""
  out = []
  for tokens, seg in zip(batch['tokens'], batch['segment_ids'], strict=True):
    for s in range(1, seg.max() + 1):
      out.append(tuple(tokens[seg == s].tolist()))
  return out


def _pieces(tok: Tokenizer, text: str) -> list[tuple[int, ...]]:
  ids = tok.encode(text) + [tok.eos_id]
  return [tuple(ids[i:i + SEQ_LEN]) for i in range(0, len(ids), SEQ_LEN)]


def _assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(stdlib_tok):
  tok = stdlib_tok
  assert tok.vocab_size == VOCAB
  assert tok.decode([tok.eos_id]) == EOS
  for text in ['def f(x):\n    return x + 1\n', 'ünïcödé — 中文 🙂', '  \t\n', 'a' * 500]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.encode_batch(['import os', 'x = 1']) == [tok.encode('import os'), tok.encode('x = 1')]
  # BPE merges happened (only 43 of them at this vocabulary): fewer tokens than bytes.
  code = 'import os\nimport sys\n\ndef main():\n    return None\n'
  assert len(tok.encode(code)) < 0.85 * len(code.encode())


def test_tokenizer_cache_hit(stdlib_cfg, stdlib_tok):
  assert stdlib_tok.path.startswith(os.path.join(os.environ['JAXTRAIN_CACHE'], 'tokenizers'))
  start = time.perf_counter()
  again = load_tokenizer(stdlib_cfg)
  assert time.perf_counter() - start < 1.0
  assert again.path == stdlib_tok.path
  assert again._backend.get_vocab() == stdlib_tok._backend.get_vocab()
  text = open(list_files(stdlib_cfg, 'eval')[0]).read()
  assert again.encode(text) == stdlib_tok.encode(text)
  # Another vocabulary size is another tokenizer.
  other = load_tokenizer(_cfg(train='stdlib', max_files=12, eval_fraction=0.2, tokenizer_vocab_size=320))
  assert other.path != stdlib_tok.path and other.vocab_size == 320


def test_tokenizer_build_is_deterministic(stdlib_cfg, stdlib_tok, tmp_path, monkeypatch):
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path))
  rebuilt = load_tokenizer(stdlib_cfg)
  assert rebuilt.path.startswith(str(tmp_path))
  with open(rebuilt.path, 'rb') as a, open(stdlib_tok.path, 'rb') as b:
    assert a.read() == b.read()


def test_tokenizer_from_file_and_directory(stdlib_tok, tmp_path):
  from transformers import PreTrainedTokenizerFast

  text = 'for i in range(3):\n    print(i)\n'
  from_file = load_tokenizer(_cfg(tokenizer=stdlib_tok.path))
  assert from_file.eos_id == stdlib_tok.eos_id and from_file.encode(text) == stdlib_tok.encode(text)

  hf = PreTrainedTokenizerFast(tokenizer_file=stdlib_tok.path, eos_token=EOS)
  hf.save_pretrained(tmp_path / 'hf')
  from_dir = load_tokenizer(_cfg(tokenizer=str(tmp_path / 'hf')))
  assert from_dir.eos_id == stdlib_tok.eos_id
  assert from_dir.vocab_size == stdlib_tok.vocab_size
  assert from_dir.encode(text) == stdlib_tok.encode(text)
  assert from_dir.decode(from_dir.encode(text)) == text


def test_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match=r"data\.tokenizer='/no/such/tokenizer\.json' does not exist") as e:
    load_tokenizer(_cfg(tokenizer='/no/such/tokenizer.json'))
  assert e.value.key == 'data.tokenizer' and e.value.value == '/no/such/tokenizer.json'
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(DataError, match='not a readable tokenizer.json'):
    load_tokenizer(_cfg(tokenizer=str(tmp_path / 'bad.json')))
  with pytest.raises(DataError, match=r'data\.tokenizer_vocab_size=100 .*at least 257'):
    load_tokenizer(_cfg(train='stdlib', max_files=12, tokenizer_vocab_size=100))


# ----------------------------------------------------------------------------- sources and splits


def test_stdlib_split_by_file(stdlib_cfg):
  train, evals = list_files(stdlib_cfg, 'train'), list_files(stdlib_cfg, 'eval')
  assert train and evals and not set(train) & set(evals)
  root = sources.stdlib_root()
  rels = sorted(os.path.relpath(f, root) for f in train + evals)
  assert rels == list(sources._stdlib_relpaths(root)[:12])
  assert all(r.endswith('.py') and not r.startswith('test/') for r in rels)
  assert len(sources.load_documents(stdlib_cfg, 'eval')) == len([f for f in evals if os.path.getsize(f)])


def test_stdlib_corpus_excludes_tests_and_packages():
  rels = sources._stdlib_relpaths(sources.stdlib_root())
  assert len(rels) > 300 and list(rels) == sorted(rels)
  bad = {'test', 'tests', 'idlelib', 'lib2to3'}
  assert not [r for r in rels if bad & set(r.split('/')[:-1]) or 'site-packages' in r]
  assert 'os.py' in rels and 'json/decoder.py' in rels


def test_jsonl_split_by_document(jsonl_cfg):
  train = list(sources.load_documents(jsonl_cfg, 'train'))
  evals = list(sources.load_documents(jsonl_cfg, 'eval'))
  assert train and evals and not set(train) & set(evals)
  assert sorted(train + evals) == sorted(TEXTS + LONG_TEXTS)  # The empty document is skipped.
  assert list_files(jsonl_cfg, 'train') == list_files(jsonl_cfg, 'eval') == sorted(
      os.path.join(os.path.dirname(list_files(jsonl_cfg, 'train')[0]), n) for n in ('a.jsonl', 'b.jsonl'))


def test_explicit_eval_globs_and_other_formats(corpus, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'body': ['parquet one', '', None, 'parquet two'], 'n': [1, 2, 3, 4]}),
                 tmp_path / 'p.parquet')
  (tmp_path / 'notes.txt').write_text('plain text document\n')
  (tmp_path / 'empty.txt').write_text('')
  cfg = _cfg(train=f'{tmp_path}/*.parquet, {tmp_path}/*.txt', eval=f'{corpus}/b.jsonl', text_field='body',
             eval_fraction=0.5)
  train = sources.load_documents(cfg, 'train')
  # Sorted files (notes.txt < p.parquet), all of them train since data.eval is set; empty ones skipped.
  assert list(train) == ['plain text document\n', 'parquet one', 'parquet two']
  assert [train.name(i) for i in range(3)] == ['notes.txt:0', 'p.parquet:0', 'p.parquet:3']  # Parquet: row.
  with pytest.raises(DataError, match=r"data\.eval=.* has 25 bad records of 25 \(100\.0%, more than "
                                      r"data\.max_bad_fraction=0\.01; first: no field 'body' \(present: \['id', "
                                      r"'text'\]\) at .*b\.jsonl:1;"):
    sources.load_documents(cfg, 'eval')
  cfg.text_field = 'text'
  with pytest.raises(DataError, match=r"data\.text_field='text' is not a column of .*p\.parquet \(columns: \['body', "
                                      r"'n'\]\)") as e:
    sources.load_documents(cfg, 'train')
  assert e.value.key == 'data.text_field'
  assert len(sources.load_documents(cfg, 'eval')) == 25  # Every non-empty document of b.jsonl.


def test_source_errors(corpus, tmp_path):
  with pytest.raises(DataError, match=r"data\.train='/nowhere/\*\.jsonl' matches no file") as e:
    list_files(_cfg(train='/nowhere/*.jsonl'), 'train')
  assert (e.value.key, e.value.value) == ('data.train', '/nowhere/*.jsonl')
  with pytest.raises(DataError, match=r"data\.eval=.* has a glob '/nowhere/x' that matches no file"):
    list_files(_cfg(train=f'{corpus}/*.jsonl', eval=f'{corpus}/a.jsonl,/nowhere/x'), 'eval')

  # One bad record of two is over data.max_bad_fraction: the run stops and names the first bad place.
  (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"text": oops}\n')
  with pytest.raises(DataError, match=r"data\.train=.* has 1 bad records of 2 \(50\.0%.*first: not valid JSON or UTF-8 "
                                      r".* at .*bad\.jsonl:2\); fix or remove"):
    sources.load_documents(_cfg(train=str(tmp_path / 'bad.jsonl')), 'train')
  (tmp_path / 'bad.jsonl').write_text('{"text": "fine"}\n{"content": "x", "id": 3}\n')
  with pytest.raises(DataError, match=r"first: no field 'text' \(present: \['content', 'id'\]\) at .*bad\.jsonl:2"):
    sources.load_documents(_cfg(train=str(tmp_path / 'bad.jsonl')), 'train')

  (tmp_path / 'c.jsonl.gz').write_bytes(b'\x1f\x8b')
  with pytest.raises(DataError, match=r"data\.train=.* matches a compressed file .*c\.jsonl\.gz"):
    sources.load_documents(_cfg(train=str(tmp_path / '*.gz')), 'train')

  with pytest.raises(DataError, match=r'data\.eval_fraction=0\.0 holds out no document.*set data\.eval or raise'):
    sources.load_documents(_cfg(train=f'{corpus}/*.jsonl', eval_fraction=0.0), 'eval')
  with pytest.raises(DataError, match=r'data\.eval_fraction=0\.0 leaves no eval file.*set data\.eval or raise'):
    list_files(_cfg(train='stdlib', max_files=12, eval_fraction=0.0), 'eval')


# ----------------------------------------------------------------------------- packing


def test_batch_packing_invariants(jsonl_cfg, jsonl_tok):
  tok = jsonl_tok
  ds = make_dataset(jsonl_cfg, tok, split='train', seed=0, batch_size=4)
  batches = _take(iter(ds), 12)
  expected = {p for t in sources.load_documents(jsonl_cfg, 'train') for p in _pieces(tok, t)}
  seen = set()
  for b in batches:
    assert sorted(b) == ['doc_chunks', 'doc_ids', 'loss_mask', 'positions', 'segment_ids', 'tokens']
    for k, v in b.items():
      assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32, k
    seg, pos, mask = b['segment_ids'], b['positions'], b['loss_mask']
    np.testing.assert_array_equal(mask, seg > 0)
    np.testing.assert_array_equal(b['doc_ids'] >= 0, seg > 0)  # -1 exactly on padding.
    assert (b['doc_chunks'][seg == 0] == -1).all()
    assert (seg[:, 0] == 1).all()  # Every row starts with a document.
    for row_seg, row_pos, row_tok in zip(seg, pos, b['tokens'], strict=True):
      real = row_seg > 0
      n = real.sum()
      assert real[:n].all() and not real[n:].any()  # Padding only at the end of the row.
      assert (row_pos[~real] == 0).all() and (row_tok[~real] == 0).all()
      steps = np.diff(row_seg[:n])
      assert set(steps.tolist()) <= {0, 1}  # 1, 1, ..., 2, 2, ..., 3: ids count up by one.
      starts = np.flatnonzero(np.r_[True, steps == 1])
      for s, e in zip(starts, np.r_[starts[1:], n], strict=True):
        np.testing.assert_array_equal(row_pos[s:e], np.arange(e - s))
    for piece in _segments(b):
      assert piece in expected  # Each segment is a whole document or one of its seq_len pieces.
      assert piece[-1] == tok.eos_id or len(piece) == SEQ_LEN  # Only a document's last piece holds EOS.
      seen.add(piece)
  assert len(seen) > 10


def test_long_documents_are_split_without_loss(jsonl_cfg, jsonl_tok):
  tok = jsonl_tok
  cfg = _cfg(train=jsonl_cfg.train, eval=jsonl_cfg.train)  # Eval = every document, in file order.
  docs = list(sources.load_documents(cfg, 'eval'))
  it = iter(make_dataset(cfg, tok, split='eval', seed=0, batch_size=4))
  seen = [p for b in _take(it, 200) for p in _segments(b)]  # more than the first packing window
  for text in LONG_TEXTS:
    pieces = _pieces(tok, text)
    assert len(pieces) >= 3 and all(len(p) == SEQ_LEN for p in pieces[:-1])
    assert all(p in seen for p in pieces)
    assert tok.decode([t for p in pieces for t in p]) == text + EOS
  # Every piece of every document shows up, and nothing else; eval repeats, so pieces recur.
  expected = [p for t in docs for p in _pieces(tok, t)]
  assert set(seen) == set(expected)
  assert len(seen) > 2 * len(expected)


# ----------------------------------------------------------------------------- determinism and resume


def test_same_seed_same_batches(jsonl_cfg, jsonl_tok):
  make = lambda seed: _take(iter(make_dataset(jsonl_cfg, jsonl_tok, split='train', seed=seed, batch_size=4)), 6)
  a, b, c = make(3), make(3), make(4)
  _assert_equal_batches(a, b)
  assert any(not np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, c, strict=True))


def test_epochs_are_reshuffled(jsonl_cfg, jsonl_tok):
  (src,) = pipeline.load_sources(jsonl_cfg, jsonl_tok, 'train')
  ds = pipeline.document_dataset(src, split='train', seed=0)
  stream = [tuple(d.tolist()) for _, d, _ in ds[:200]]
  n = len(sources.load_documents(jsonl_cfg, 'train'))
  first, second = stream[:n], stream[n:2 * n]
  assert len(set(first)) == n and set(first) == set(second)  # Each epoch is a permutation of all documents.
  assert first != second


@pytest.fixture(scope='module')
def small_docs(tmp_path_factory):
  """150 short documents, so that an epoch lasts only a few batches."""
  path = tmp_path_factory.mktemp('small') / 'small.jsonl'
  path.write_text(''.join(json.dumps({'text': f'note {i}: {_words(i, 2 + i % 5)}'}) + '\n' for i in range(150)))
  return path


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_gives_identical_batches(small_docs, jsonl_tok, prefetch):
  cfg = _cfg(train=str(small_docs), eval_fraction=0.1, prefetch=prefetch, shuffle_window=32, pack_buffer=48)
  make = lambda: iter(make_dataset(cfg, jsonl_tok, split='train', seed=7, batch_size=4))
  it = make()
  reference = _take(it, 28)
  # An epoch is ~14 batches (~139 documents of ~24 tokens, ~10 per batch) and a packing window of 48 pieces
  # about 5 batches: the states below fall before, around and after both kinds of boundary.
  for n in (0, 5, 13, 14, 15, 16, 21):
    it = make()
    _take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # Must survive the JSON round trip of grain's handler.
    _take(it, 3)  # Moving on must not change the saved state.
    restored = make()
    restored.set_state(state)
    _assert_equal_batches(_take(restored, 28 - n), reference[n:])


def test_eval_is_repeatable(jsonl_cfg, jsonl_tok):
  # 100 batches: past the first packing window, whose rows come out in a fixed shuffled order.
  make = lambda: _take(iter(make_dataset(jsonl_cfg, jsonl_tok, split='eval', seed=0, batch_size=4)), 100)
  first = make()
  _assert_equal_batches(first, make())
  _assert_equal_batches(first, _take(iter(make_dataset(jsonl_cfg, jsonl_tok, split='eval', seed=99,
                                                      batch_size=4)), 100))
  eval_pieces = {p for t in sources.load_documents(jsonl_cfg, 'eval') for p in _pieces(jsonl_tok, t)}
  train_pieces = {p for t in sources.load_documents(jsonl_cfg, 'train') for p in _pieces(jsonl_tok, t)}
  seen = {p for b in first for p in _segments(b)}
  assert seen == eval_pieces and not seen & train_pieces


def test_processes_see_disjoint_documents(jsonl_cfg, jsonl_tok):
  tok = jsonl_tok
  jsonl_cfg = jsonl_cfg.copy_and_resolve_references()
  jsonl_cfg.shuffle_window = 0  # one epoch then fills the first batches exactly (the window mixes epochs)
  docs = list(sources.load_documents(jsonl_cfg, 'train'))
  per_process = []
  for index in range(2):
    (src,) = pipeline.load_sources(jsonl_cfg, tok, 'train')
    ds = pipeline.document_dataset(src, split='train', seed=0, process_index=index, process_count=2)
    mine = docs[index::2]
    epoch = [(i, tok.decode(d[:-1])) for i, d, _ in ds[:len(mine)]]
    assert sorted(t for _, t in epoch) == sorted(mine)
    assert all(docs[i] == t for i, t in epoch)  # Indices are global: into the unsharded documents.
    epoch = [t for _, t in epoch]
    # The packed batches of this process hold exactly its documents.
    it = iter(make_dataset(jsonl_cfg, tok, split='train', seed=0, batch_size=4, process_index=index,
                           process_count=2))
    batches = _take(it, 200)  # past the first packing window
    seen = {p for b in batches for p in _segments(b)}
    assert seen == {p for t in mine for p in _pieces(tok, t)}
    assert all((b['doc_ids'][b['doc_ids'] >= 0] % 2 == index).all() for b in batches)
    per_process.append(set(epoch))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(docs)


def test_stdlib_batches(stdlib_cfg, stdlib_tok):
  it = iter(make_dataset(stdlib_cfg, stdlib_tok, split='train', seed=0, batch_size=8))
  state = it.get_state()
  b = _take(it, 3)
  assert all(x['tokens'].shape == (8, SEQ_LEN) for x in b)
  assert np.mean([x['loss_mask'].mean() for x in b]) > 0.9  # Code files are long: little padding.
  it2 = iter(make_dataset(stdlib_cfg, stdlib_tok, split='train', seed=0, batch_size=8))
  it2.set_state(state)
  _assert_equal_batches(_take(it2, 3), b)
  # The first segment of an eval row is piece K of an eval file, named relative to the stdlib root.
  e = next(iter(make_dataset(stdlib_cfg, stdlib_tok, split='eval', seed=0, batch_size=2)))
  row = e['tokens'][0][e['segment_ids'][0] == 1]
  source, name, index, *chunk = sample_ids(stdlib_cfg, 'eval', e)[0][0].split(':')
  assert source == 'stdlib' and index == '0'
  eval_files = [os.path.relpath(f, sources.stdlib_root()).replace(os.sep, '/') for f in list_files(stdlib_cfg, 'eval')]
  assert name in eval_files
  k = int(chunk[0][len('chunk'):]) if chunk else 0
  with open(os.path.join(sources.stdlib_root(), name)) as fh:
    ids = stdlib_tok.encode(fh.read()) + [stdlib_tok.eos_id]
  assert row.tolist() == ids[k * SEQ_LEN:(k + 1) * SEQ_LEN]


def test_make_dataset_argument_errors(jsonl_cfg, jsonl_tok):
  with pytest.raises(ValueError, match='split=.test. is not valid'):
    make_dataset(jsonl_cfg, jsonl_tok, split='test', seed=0, batch_size=2)
  with pytest.raises(ValueError, match='batch_size=0 is not valid'):
    make_dataset(jsonl_cfg, jsonl_tok, split='train', seed=0, batch_size=0)
  with pytest.raises(ValueError, match='process_index=2 is not valid for process_count=2'):
    make_dataset(jsonl_cfg, jsonl_tok, split='train', seed=0, batch_size=2, process_index=2, process_count=2)
  with pytest.raises(DataError, match=r'data\.seq_len=0 is not valid'):
    make_dataset(_cfg(train=jsonl_cfg.train, seq_len=0), jsonl_tok, split='train', seed=0, batch_size=2)
  with pytest.raises(DataError, match=r"data\.process_split='hosts' is not valid; expected one of \('documents', "
                                      r"'rows'\)") as e:
    make_dataset(_cfg(train=jsonl_cfg.train, process_split='hosts'), jsonl_tok, split='train', seed=0, batch_size=2)
  assert e.value.key == 'data.process_split'


def test_shuffle_window_mixes_pieces_and_resumes(stdlib_cfg, stdlib_tok):
  plain = stdlib_cfg.copy_and_resolve_references()
  plain.shuffle_window = 0
  windowed = stdlib_cfg.copy_and_resolve_references()
  windowed.shuffle_window = 64
  first = lambda cfg: next(iter(make_dataset(cfg, stdlib_tok, split='train', seed=0, batch_size=8)))
  # Without the window, consecutive pieces of one long file fill the first batch: few distinct documents.
  count = lambda b: len({p[:8] for p in _segments(b)})
  assert not np.array_equal(first(plain)['tokens'], first(windowed)['tokens'])
  it = iter(make_dataset(windowed, stdlib_tok, split='train', seed=0, batch_size=8))
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  again = iter(make_dataset(windowed, stdlib_tok, split='train', seed=0, batch_size=8))
  again.set_state(state)
  _assert_equal_batches(_take(again, 3), expected)
  assert count(first(windowed)) >= count(first(plain))


# ----------------------------------------------------------------------------- provenance


def _names_in_files(corpus) -> dict[str, str]:
  """Document text -> '<file>:<line index>', read straight from the corpus files."""
  names = {}
  for f in ('a.jsonl', 'b.jsonl'):
    for i, line in enumerate((corpus / f).read_text().split('\n')):
      text = json.loads(line)['text'] if line.strip() else ''
      if text:
        names[text] = f'{f}:{i}'
  return names


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_sample_ids_name_the_documents_of_each_row(corpus, jsonl_cfg, jsonl_tok, split):
  tok = jsonl_tok
  # Eval = every document in file order, which reaches the long documents' pieces within a few batches.
  cfg = jsonl_cfg if split == 'train' else _cfg(train=jsonl_cfg.train, eval=jsonl_cfg.train)
  docs = sources.load_documents(cfg, split)
  names = _names_in_files(corpus)
  piece_of = {}  # token tuple -> (text, K, number of pieces of the document)
  for text in docs:
    pieces = _pieces(tok, text)
    piece_of.update({p: (text, k, len(pieces)) for k, p in enumerate(pieces)})
  chunks = 0
  for b in _take(iter(make_dataset(cfg, tok, split=split, seed=0, batch_size=4)), 12):
    ids = sample_ids(cfg, split, b)
    assert len(ids) == 4
    for r, row_ids in enumerate(ids):
      expected = []
      for s in range(1, b['segment_ids'][r].max() + 1):
        in_seg = b['segment_ids'][r] == s
        tokens = tuple(b['tokens'][r][in_seg].tolist())
        text, k, n = piece_of[tokens]
        (doc,) = set(b['doc_ids'][r][in_seg].tolist())  # One document per segment ...
        assert docs[doc] == text  # ... the one the tokens came from.
        if n == 1:
          assert tok.decode(tokens) == text + EOS
          expected.append(f'train:{names[text]}')
        else:
          chunks += 1
          assert tok.decode(tokens) in text + EOS
          expected.append(f'train:{names[text]}:chunk{k}')
      assert row_ids == list(dict.fromkeys(expected))
  assert chunks > 0


# ----------------------------------------------------------------------------- data.process_split='rows'


def _concat_rows(parts: list[dict]) -> dict:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize('split', ['train', 'eval'])
def test_rows_split_concatenates_to_one_process_batches(jsonl_cfg, jsonl_tok, split):
  cfg = jsonl_cfg.copy_and_resolve_references()
  cfg.process_split = 'rows'
  cfg.shuffle_window = 64  # Still mixes several epochs; the default window makes each iterator cost seconds.
  make = lambda index, count: iter(make_dataset(cfg, jsonl_tok, split=split, seed=5, batch_size=4 // count,
                                                process_index=index, process_count=count))
  one, procs = make(0, 1), [make(0, 2), make(1, 2)]
  for _ in range(5):  # Process 0's rows then process 1's are the one-process batch, bit for bit.
    parts = [next(p) for p in procs]
    assert all(p['tokens'].shape == (2, SEQ_LEN) for p in parts)
    _assert_equal_batches([_concat_rows(parts)], [next(one)])
  # The state is the global stream's: the same in both processes and in the one-process run.
  state = json.loads(json.dumps(procs[0].get_state()))
  assert procs[1].get_state() == state == one.get_state()
  after = _take(one, 3)
  restored = [make(0, 2), make(1, 2)]
  for it in restored:
    it.set_state(state)
  _assert_equal_batches([_concat_rows([next(p) for p in restored]) for _ in range(3)], after)
  single = make(0, 1)  # One process resumes from the two processes' checkpoint.
  single.set_state(state)
  _assert_equal_batches(_take(single, 3), after)
