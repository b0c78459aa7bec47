"""`jaxtrain analyze`: exact figures on hand-made corpora (lengths, duplicates, near-duplicates, chats), the PNG,
MinHash invariants, and the command line on the tiny config."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxtrain.data import analyze
from jaxtrain.data import prepare as prep
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'cache'))


class Docs(list):
  """A list of records with names, where reading `bad` raises like an invalid UTF-8 file does."""

  def __init__(self, records, bad=()):
    super().__init__(records)
    self.bad = set(bad)

  def __getitem__(self, i):
    if i in self.bad:
      raise UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte')
    return super().__getitem__(i)

  def name(self, i: int) -> str:
    return f'r{i}'


def _by_length(lengths: dict[str, int]):
  """An encoder giving record `text` lengths[text] tokens (EOS included), loss mask 1."""
  def encode(batch):
    return [(np.arange(lengths[t], dtype=np.int32) % 50, np.ones(lengths[t], np.uint8)) for t in batch]
  return encode


def _word_encoder(batch):
  """One token per word of each text (id = word length), plus EOS 0."""
  out = []
  for t in batch:
    ids = np.asarray([len(w) for w in t.split()] + [0], np.int32)
    out.append((ids, np.ones(len(ids), np.uint8)))
  return out


def test_length_percentiles_histogram_and_seq_len_on_known_lengths(tmp_path):
  rng = np.random.default_rng(0)
  lengths = list(range(10, 201, 10))  # 20 records of 10, 20, ..., 200 tokens, stored shuffled
  texts = [f'record of {n}' for n in rng.permutation(lengths)]
  p = prep.prepare(texts, _by_length({t: int(t.split()[-1]) for t in texts}), 'lengths', name='known')
  a = analyze.analyze_source('known', texts, p, out=str(tmp_path / 'out'))
  # Nearest rank over 20 values: pK is the ceil(K/100 * 20)-th smallest.
  assert a.percentiles == {'p5': 10, 'p25': 50, 'p50': 100, 'p75': 150, 'p95': 190, 'p99': 200, 'max': 200}
  assert a.suggested_seq_len == 256 and a.tokens == sum(lengths) and a.records == 20
  assert a.histogram == [(8, 16, 1), (16, 32, 2), (32, 64, 3), (64, 128, 6), (128, 256, 8)]
  report = analyze.format_report(a)
  assert 'suggested data.seq_len: 256 (p95 190' in report
  bars = {int(m.group(1).replace(',', '')): len(m.group(3))
          for m in re.finditer(r'\[ *([\d,]+), *[\d,]+\) +(\d+) +[\d.]+%  (#*)', report)}
  assert bars == {8: 5, 16: 10, 32: 15, 64: 30, 128: 40}  # scaled to the fullest bin, 40 characters

  from matplotlib import image
  png = tmp_path / 'out' / 'known_lengths.png'
  assert a.plot == str(png) and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert image.imread(str(png)).shape[:2] == (360, 700)  # figsize (7, 3.6) at 100 dpi


def test_percentile_and_seq_len_edges():
  assert analyze.length_percentiles(np.array([7])) == {f'p{q}': 7 for q in analyze.PERCENTILES} | {'max': 7}
  assert analyze.length_percentiles(np.array([], np.int64))['max'] == 0
  assert [analyze.suggest_seq_len(n) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]
  assert analyze.length_histogram(np.array([1, 2, 3, 4, 7, 8, 20])) == [(1, 2, 1), (2, 4, 2), (4, 8, 2), (8, 16, 1),
                                                                         (16, 32, 1)]


def _random_doc(rng, vocab, n=120) -> list[str]:
  return list(rng.choice(vocab, n))


def _shingles(text: str, n: int = 5) -> set:
  words = re.findall(r'\w+', text.casefold())
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _planted_corpus():
  rng = np.random.default_rng(1)
  vocab = [f'tok{i}' for i in range(2000)]
  docs = [_random_doc(rng, vocab) for _ in range(30)]
  texts = [' '.join(d) for d in docs]
  texts.append('  ' + ' '.join(docs[0]).upper().replace(' ', ' \n\t '))  # 30: exact copy of 0 after normalising
  texts.append(texts[1])  # 31: verbatim copy of 1
  near = list(docs[2])
  near[60] = 'changed'
  texts.append(' '.join(near))  # 32: one word of 2 changed (Jaccard 111/121)
  far = list(docs[3])
  for k in range(0, 120, 3):
    far[k] = f'other{k}'
  texts.append(' '.join(far))  # 33: every third word of 3 changed: not a near duplicate
  near2 = list(docs[2])
  near2[20] = 'altered'
  texts.append(' '.join(near2))  # 34: another word of 2 changed: joins the cluster of 2 and 32
  texts.append(' '.join(docs[4]))  # 35: unreadable (a copy of 4 that must not count)
  return texts


def test_planted_duplicates_and_near_duplicates_give_exact_rates(tmp_path):
  texts = _planted_corpus()
  docs = Docs(texts, bad={35})
  p = prep.prepare(docs, _word_encoder, 'planted', name='planted')
  assert p.skipped == 1 and p.skipped_reasons[0].startswith('r35: unreadable')
  a = analyze.analyze_source('planted', docs, p)
  assert (a.documents, a.compared, a.records) == (36, 35, 35)
  assert a.exact_duplicates == 2 and a.exact_examples == ((0, 30), (1, 31))
  assert a.exact_rate == pytest.approx(2 / 35)
  # Components {0, 30}, {1, 31}, {2, 32, 34} and 29 singletons: 35 - 31 records would be dropped.
  assert a.near.count == 4 and a.near_rate == pytest.approx(4 / 35)
  assert (a.near.threshold, a.near.bands, a.near.rows) == (0.8, 16, 8)
  assert a.near.pairs in (4, 5)  # 32 ~ 34 (Jaccard 106/126) may fall either side of 0.8 by estimate alone
  report = analyze.format_report(a)
  assert 'exact duplicates: 2 (5.71%' in report and 'near duplicates: 4 (11.43%; Jaccard >= 0.8' in report
  assert 'r30 = r0' in report and 'r2 ~ r32' in report

  # MinHash estimates track the true Jaccard of the word 5-gram sets.
  sig = analyze.minhash_signatures(texts)
  for i, j in ((2, 32), (2, 34), (32, 34), (3, 33), (0, 30), (5, 6)):
    s_i, s_j = _shingles(texts[i]), _shingles(texts[j])
    true = len(s_i & s_j) / len(s_i | s_j)
    est = analyze.estimated_jaccard(sig, np.array([i]), np.array([j]))[0]
    assert abs(est - true) < 0.12, (i, j, est, true)


def test_minhash_is_seeded_and_independent_of_grouping():
  rng = np.random.default_rng(2)
  texts = [' '.join(rng.choice([f'v{i}' for i in range(500)], 40)) for _ in range(5)]
  texts.append(''.join(rng.choice(list('abcdefgh '), 6000)))  # more shingles than one numpy block
  texts.append('')  # no shingle: the empty signature
  texts.append('two words')  # shorter than one shingle: one shingle
  for shingle in ('word', 'char'):
    together = analyze.minhash_signatures(texts, shingle=shingle, seed=3)
    alone = np.concatenate([analyze.minhash_signatures([t], shingle=shingle, seed=3) for t in texts])
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (8, analyze.NUM_PERM) and together.dtype == np.uint32
    assert (together[6] == 0xFFFFFFFF).all() and (together[7] != 0xFFFFFFFF).all()
    assert not np.array_equal(together, analyze.minhash_signatures(texts, shingle=shingle, seed=4))
  assert analyze.lsh_bands(0.8, 128) == (16, 8) and analyze.lsh_bands(0.9, 128) == (11, 11)


_CHATS = [
    [{'role': 'system', 'content': 'be nice'}, {'role': 'user', 'content': 'hello there friend'},
     {'role': 'assistant', 'content': 'hi'}],
    {'messages': [{'role': 'user', 'content': 'a b'}, {'role': 'assistant', 'content': 'c d e'},
                  {'role': 'user', 'content': 'f'}, {'role': 'assistant', 'content': 'g h'}]},
    [{'role': 'user', 'content': 'lonely question here'}],
]


def _chat_encoder(batch):
  """One token per word of each message, loss 1 on assistant words only, then EOS (loss 0)."""
  out = []
  for record in batch:
    ids, mask = [], []
    for m in analyze.messages_of(record):
      words = m['content'].split()
      ids += [len(w) for w in words]
      mask += [int(m['role'] == 'assistant')] * len(words)
    out.append((np.asarray(ids + [0], np.int32), np.asarray(mask + [0], np.int32)))
  return out


def test_chat_statistics_on_hand_made_conversations():
  p = prep.prepare(_CHATS, _chat_encoder, 'chats', name='chat')
  a = analyze.analyze_source('chat', _CHATS, p)
  c = a.chat
  assert c.conversations == 3 and c.turns == {'mean': pytest.approx(8 / 3), 'p50': 3, 'p95': 4, 'max': 4}
  assert c.roles == {'assistant': 3, 'system': 1, 'user': 4}
  assert c.assistant_turns_mean == 1.0 and c.without_assistant == 1
  # Tokens 7 + 9 + 4 = 20, of which 1 + 5 + 0 are assistant words.
  assert a.tokens == 20 and c.loss_token_share == pytest.approx(6 / 20) and c.without_loss_tokens == 1
  report = analyze.format_report(a)
  assert 'chat: 3 conversations; turns per conversation mean 2.67, p50 3, p95 4, max 4' in report
  assert 'loss tokens 30.0% of all tokens; 1 conversations without any' in report
  assert analyze.chat_stats(['plain text']) is None
  json.dumps(a.to_dict())


def _tiny_config():
  spec = importlib.util.spec_from_file_location('config_tiny', os.path.join(REPO, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_cli_prints_the_report_in_seconds_and_writes_the_figures(tmp_path, monkeypatch):
  from jaxtrain.data import load_tokenizer, sources

  env = dict(os.environ, JAXTRAIN_CACHE=str(tmp_path / 'cache'))
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'analyze', '--config=configs/tiny.py',
                         f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert seconds < 60  # about 10 s on an idle 2-core machine: tokenizer build, tokenizing 24 files, analysis

  config = _tiny_config()
  monkeypatch.setenv('JAXTRAIN_CACHE', env['JAXTRAIN_CACHE'])  # the child's caches
  tok = load_tokenizer(config.data)
  out = proc.stdout
  figures = json.loads((tmp_path / 'run' / 'analysis' / 'analysis.json').read_text())
  for split, fig in zip(('train', 'eval'), figures, strict=True):
    docs, p = prep.prepare_split(config.data, tok, split)
    assert p.tokenized == 0  # the command left the cache behind
    assert len(docs) == len(sources.load_documents(config.data, split))
    assert re.search(rf"^source 'stdlib', {split} split: {len(docs):,d} documents, {len(p):,d} prepared records, "
                     rf"{p.total_tokens:,d} tokens", out, re.M), out
    assert fig['percentiles'] == analyze.length_percentiles(p.lengths)
    assert fig['suggested_seq_len'] == analyze.suggest_seq_len(fig['percentiles']['p95'])
    assert (tmp_path / 'run' / 'analysis' / f'stdlib-{split}_lengths.png').stat().st_size > 5000

  bad = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'analyze', '--config=configs/tiny.py',
                        f'--workdir={tmp_path / "run2"}', f'--config.data.train={tmp_path}/none/*.jsonl'], cwd=REPO,
                       capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and re.match(r'error: (config\.)?data\.train=', bad.stderr.strip()), bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / 'run2').exists()
