"""The tokenized prepare cache: hits without encoding, misses on any changed part, crash and concurrency safety,
skipped records, records equal to direct encoding, pickling and grain resume over a prepared source."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zlib

import grain
import numpy as np
import pytest
import tokenizers

from jaxtrain.data import prepare as prep
from jaxtrain.data import sources
from jaxtrain.data.tokenizer import EOS, Tokenizer, build_bpe
from jaxtrain.config.defaults import base_config
from tests.conftest import REPO


def _text(i: int) -> str:
  words = ' '.join(f'w{(i * 13 + k * 7) % 31}' for k in range(3 + (i * 5) % 17))
  return f'doc {i}: {words}.'


TEXTS = [_text(i) for i in range(40)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'cache'))


def _tokenizer(directory, texts=TEXTS, vocab=300) -> Tokenizer:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'tokenizer.json')
  build_bpe(iter(texts), vocab).save(path)
  backend = tokenizers.Tokenizer.from_file(path)
  return Tokenizer(backend, eos_id=backend.token_to_id(EOS), path=path)


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> Tokenizer:
  return _tokenizer(str(tmp_path_factory.mktemp('tok')))


class Counting:
  """An encoder that counts its calls and the records it was given."""

  def __init__(self, encode):
    self.encode, self.calls, self.records = encode, 0, 0

  def __call__(self, batch):
    self.calls += 1
    self.records += len(batch)
    return self.encode(batch)


def _direct(tok: Tokenizer, text: str) -> np.ndarray:
  return np.asarray(tok.encode(text) + [tok.eos_id], np.int32)


def _fp(tok: Tokenizer, **extra) -> str:
  return prep.fingerprint_of({'docs': 'hand-made', 'tokenizer': prep.tokenizer_identity(tok), 'template': 'none',
                              **extra})


def test_records_equal_direct_encoding_and_offsets_add_up(tok):
  p = prep.prepare(TEXTS, prep.text_encoder(tok), _fp(tok), name='hand', chunk_docs=7)
  expected = [_direct(tok, t) for t in TEXTS]
  assert len(p) == len(TEXTS) and p.skipped == 0 and p.tokenized == len(TEXTS)
  for i, want in enumerate(expected):
    ids, mask = p[i]
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(mask, np.ones(len(want), np.uint8))
  np.testing.assert_array_equal(p[-1][0], expected[-1])
  np.testing.assert_array_equal(p.lengths, [len(e) for e in expected])
  assert p.total_tokens == sum(len(e) for e in expected) == int(p.offsets[-1])
  np.testing.assert_array_equal(p.source_index, np.arange(len(TEXTS)))
  assert p.directory == os.path.join(os.environ['JAXTRAIN_CACHE'], 'prepared', _fp(tok))
  with pytest.raises(IndexError):
    p[len(TEXTS)]
  # The chunking of the encoder calls does not change a byte.
  q = prep.prepare(TEXTS, prep.text_encoder(tok), _fp(tok), name='hand', root=os.path.join(p.directory, '..', 'x'))
  for key in ('tokens', 'masks', 'offsets'):
    np.testing.assert_array_equal(getattr(p, key), getattr(q, key))


def test_cache_hit_returns_identical_arrays_without_calling_the_encoder(tok):
  cold = Counting(prep.text_encoder(tok))
  first = prep.prepare(TEXTS, cold, _fp(tok), name='hand', chunk_docs=16)
  assert cold.calls == 3 and cold.records == len(TEXTS)  # ceil(40 / 16) chunks
  arrays = {k: np.array(getattr(first, k)) for k in ('tokens', 'masks', 'offsets', 'source_index')}
  warm = Counting(prep.text_encoder(tok))
  again = prep.prepare(TEXTS, warm, _fp(tok), name='hand', chunk_docs=16)
  assert warm.calls == 0 and again.tokenized == 0 and first.tokenized == len(TEXTS)
  for k, v in arrays.items():
    np.testing.assert_array_equal(getattr(again, k), v)
    assert isinstance(getattr(again, k), np.memmap)  # mapped, not read into memory
  with open(os.path.join(again.directory, 'meta.json')) as fh:
    meta = json.load(fh)
  assert meta['format'] == prep.FORMAT_VERSION and meta['documents'] == 40 and meta['tokens'] == again.total_tokens


def test_every_fingerprint_part_changes_the_key(tok, tmp_path):
  ident = prep.tokenizer_identity(tok)
  base = {'docs': 'abc', 'tokenizer': ident, 'template': 'none'}
  key = prep.fingerprint_of(base)
  assert key == prep.fingerprint_of(dict(reversed(list(base.items()))))  # key order does not matter
  assert len({key, prep.fingerprint_of({**base, 'template': 'chatml'}), prep.fingerprint_of({**base, 'docs': 'abd'}),
              prep.fingerprint_of({**base, 'text_field': 'body'})}) == 4
  with pytest.raises(ValueError, match='JSON values'):
    prep.fingerprint_of({'docs': object()})

  # A tokenizer with other merges at another path, and the same path rewritten with other content, both miss.
  other = _tokenizer(str(tmp_path / 'other'), texts=TEXTS[::-1] + ['zzz qqq ' * 20], vocab=290)
  assert prep.tokenizer_identity(other)['content'] != ident['content']
  rewritten = _tokenizer(str(tmp_path / 'same'), vocab=300)
  before = prep.tokenizer_identity(rewritten)
  time.sleep(0.01)  # a distinct mtime, so the per-process hash cache sees a new file
  _tokenizer(str(tmp_path / 'same'), vocab=280)
  assert prep.tokenizer_identity(rewritten)['content'] != before['content']

  first = Counting(prep.text_encoder(tok))
  p_tok = prep.prepare(TEXTS, first, _fp(tok), name='a')
  second = Counting(prep.text_encoder(other))
  p_other = prep.prepare(TEXTS, second, _fp(other), name='a')
  third = Counting(prep.text_encoder(tok))
  p_tmpl = prep.prepare(TEXTS, third, _fp(tok, template='chatml'), name='a')
  assert (first.calls, second.records, third.records) == (1, 40, 40)
  assert len({p_tok.directory, p_other.directory, p_tmpl.directory}) == 3
  np.testing.assert_array_equal(p_other[3][0], _direct(other, TEXTS[3]))


def test_changed_file_content_misses(tok, tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  (data / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:10]))
  cfg = base_config().data
  cfg.train, cfg.eval_fraction = str(data / '*.jsonl'), 0.0

  def build():
    docs = sources.load_documents(cfg, 'train')
    enc = Counting(prep.text_encoder(tok))
    return prep.prepare(docs, enc, prep.split_fingerprint(cfg, tok, docs), name='train'), enc

  p1, e1 = build()
  p2, e2 = build()
  assert (e1.records, e2.records, p1.directory) == (10, 0, p2.directory)
  (data / 'a.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[10:20]))
  p3, e3 = build()
  assert e3.records == 10 and p3.directory != p1.directory
  np.testing.assert_array_equal(p3[0][0], _direct(tok, TEXTS[10]))
  np.testing.assert_array_equal(p1[0][0], _direct(tok, TEXTS[0]))  # the old cache is still whole


def test_skipped_records_are_counted_with_reasons(tok):
  base = prep.text_encoder(tok)

  def picky(batch):
    for r in batch:
      if isinstance(r, str) and 'REJECT' in r:
        raise ValueError('has a forbidden word')
    return base(batch)

  docs = list(TEXTS[:20])
  docs[3], docs[7], docs[11], docs[12] = '', 'REJECT me', 123, 'also REJECT'
  enc = Counting(picky)
  p = prep.prepare(docs, enc, _fp(tok, case='skips'), name='picky', chunk_docs=8)
  kept = [i for i in range(20) if i not in (3, 7, 11, 12)]
  assert (len(p), p.skipped, p.source_documents) == (16, 4, 20)
  np.testing.assert_array_equal(p.source_index, kept)
  for k, i in enumerate(kept):
    np.testing.assert_array_equal(p[k][0], _direct(tok, docs[i]))
  assert p.skipped_reasons == ['document 3: empty document', 'document 7: has a forbidden word',
                               'document 11: is a int, not a text string', 'document 12: has a forbidden word']
  # Chunks [0, 8) with one bad record and [8, 16) with three are bisected; [16, 20) encodes in one call.
  assert enc.calls <= 1 + 2 * 3 + 1 + 2 * 3 * 3 + 1
  assert prep.prepare(docs, enc, _fp(tok, case='skips'), name='picky').skipped == 4  # read back from meta.json


def test_encoder_contract_and_fingerprint_are_checked(tok):
  with pytest.raises(TypeError, match='2 results for 3 records'):
    prep.prepare(TEXTS[:3], lambda b: prep.text_encoder(tok)(b)[:2], 'f1', name='x')
  with pytest.raises(TypeError, match='0/1'):
    prep.prepare(TEXTS[:3], lambda b: [(ids, mask * 2) for ids, mask in prep.text_encoder(tok)(b)], 'f2', name='x')
  with pytest.raises(ValueError, match='fingerprint'):
    prep.prepare(TEXTS, prep.text_encoder(tok), '../escape', name='x')
  root = os.path.join(os.environ['JAXTRAIN_CACHE'], 'prepared')
  assert sorted(e for e in os.listdir(root) if not e.endswith('.lock')) == []  # failed builds leave nothing


def test_leftover_temp_dir_and_broken_cache_are_ignored(tok):
  fp = _fp(tok)
  root = prep.default_root()
  os.makedirs(root)
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  leftover = os.path.join(root, f'.tmp-{fp}-{socket.gethostname()}-{int(dead.stdout)}-deadbeef')
  os.makedirs(leftover)
  with open(os.path.join(leftover, 'tokens.npy'), 'wb') as fh:
    fh.write(b'half a file')
  with open(os.path.join(leftover, 'meta.json'), 'w') as fh:
    fh.write('{}')
  p = prep.prepare(TEXTS, prep.text_encoder(tok), fp, name='hand')
  assert p.tokenized == 40 and not os.path.exists(leftover)
  np.testing.assert_array_equal(p[5][0], _direct(tok, TEXTS[5]))

  os.remove(os.path.join(p.directory, 'offsets.npy'))  # a cache damaged by hand is rebuilt, not read
  again = prep.prepare(TEXTS, prep.text_encoder(tok), fp, name='hand')
  assert again.tokenized == 40
  np.testing.assert_array_equal(again.offsets, np.r_[0, np.cumsum([len(_direct(tok, t)) for t in TEXTS])])


def test_failed_build_leaves_no_cache(tok):
  base = prep.text_encoder(tok)
  calls = []

  def dies(batch):
    calls.append(len(batch))
    if len(calls) == 2:
      raise RuntimeError('killed mid-build')
    return base(batch)

  with pytest.raises(RuntimeError, match='mid-build'):
    prep.prepare(TEXTS, dies, _fp(tok), name='hand', chunk_docs=10)
  root = prep.default_root()
  assert [e for e in os.listdir(root) if not e.endswith('.lock')] == []
  p = prep.prepare(TEXTS, base, _fp(tok), name='hand')
  assert p.tokenized == 40 and len(p) == 40


_CHILD = textwrap.dedent("""
  import os, sys, time, types, zlib
  # jaxtrain/data/__init__.py imports grain (seconds on a loaded machine); the cache needs none of it.
  package = types.ModuleType('jaxtrain.data')
  package.__path__ = [os.path.join(os.getcwd(), 'jaxtrain', 'data')]
  sys.modules['jaxtrain.data'] = package
  import numpy as np, tokenizers
  from jaxtrain.data import prepare as prep
  from jaxtrain.data.tokenizer import EOS, Tokenizer
  path, fp, delay, texts = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
  backend = tokenizers.Tokenizer.from_file(path)
  base = prep.text_encoder(Tokenizer(backend, eos_id=backend.token_to_id(EOS), path=path))
  def slow(batch):
    print('encoding', flush=True)
    time.sleep(delay)
    return base(batch)
  p = prep.prepare(texts, slow, fp, name='child', chunk_docs=5)
  print('done', p.tokenized, zlib.crc32(np.asarray(p.tokens).tobytes()), flush=True)
""")


def _child(tok: Tokenizer, fp: str, delay: float) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', _CHILD, tok.path, fp, str(delay), *TEXTS], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def _temp_dirs() -> list[str]:
  return [e for e in os.listdir(prep.default_root()) if e.startswith('.tmp-')]


def test_killed_build_is_ignored_and_a_concurrent_build_waits(tok):
  fp = _fp(tok)
  victim = _child(tok, fp, delay=60.0)
  assert victim.stdout.readline().strip() == 'encoding'  # its temp dir exists and it holds the lock
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert _temp_dirs() and not os.path.exists(os.path.join(prep.default_root(), fp))
  p = prep.prepare(TEXTS, prep.text_encoder(tok), fp, name='hand')
  assert p.tokenized == 40 and _temp_dirs() == []
  np.testing.assert_array_equal(p[39][0], _direct(tok, TEXTS[39]))

  # A process building a new fingerprint holds the lock; this one waits, then reads that cache.
  fp2 = _fp(tok, case='race')
  builder = _child(tok, fp2, delay=0.2)
  assert builder.stdout.readline().strip() == 'encoding'
  waits = []
  mine = Counting(prep.text_encoder(tok))
  q = prep.prepare(TEXTS, mine, fp2, name='hand', log=waits.append)
  out, err = builder.communicate(timeout=120)
  assert builder.returncode == 0, err[-2000:]
  _, tokenized, crc = out.strip().splitlines()[-1].split()
  assert (int(tokenized), q.tokenized, mine.calls) == (40, 0, 0)
  assert len(waits) == 1 and 'waiting for another process' in waits[0]
  assert int(crc) == zlib.crc32(np.asarray(q.tokens).tobytes()) and _temp_dirs() == []
  np.testing.assert_array_equal(q.tokens, p.tokens)


def test_pickles_by_path_and_grain_resumes_bitwise(tok):
  p = prep.prepare(TEXTS, prep.text_encoder(tok), _fp(tok), name='hand')
  q = pickle.loads(pickle.dumps(p))
  assert len(pickle.dumps(p)) < 1000 and q.directory == p.directory
  np.testing.assert_array_equal(q[7][0], p[7][0])

  def dataset():
    return grain.MapDataset.source(p).shuffle(seed=5).map(lambda r: r[0] * 1).to_iter_dataset()

  it = iter(dataset())
  head = [next(it) for _ in range(9)]
  state = it.get_state()
  json.dumps(state)
  rest = [next(it) for _ in range(12)]
  resumed = iter(dataset())
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(12)], strict=True):
    np.testing.assert_array_equal(a, b)
  seen = {tuple(x.tolist()) for x in head + rest}
  assert len(seen) == 21 and all(x in {tuple(_direct(tok, t).tolist()) for t in TEXTS} for x in seen)


def test_prepare_split_on_the_stdlib_corpus(tok):
  cfg = base_config().data
  cfg.max_files, cfg.eval_fraction = 8, 0.0
  docs, p = prep.prepare_split(cfg, tok, 'train')
  assert len(p) + p.skipped == len(docs) == 8
  for k in range(len(p)):
    np.testing.assert_array_equal(p[k][0], _direct(tok, docs[int(p.source_index[k])]))
  _, again = prep.prepare_split(cfg, tok, 'train')
  assert again.tokenized == 0 and again.directory == p.directory
