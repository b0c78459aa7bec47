"""`jaxtrain analyze`: what a data source holds before a run trains on it.

  jaxtrain analyze --config=configs/tiny.py [--out=DIR]      # DIR: WORKDIR/analysis by default

For each split of the configured data it prepares (tokenizes once, cached: jaxtrain/data/prepare.py) and
reports: documents and tokens; token-length percentiles and a histogram (text bars here, a PNG in --out); the
exact-duplicate rate; the near-duplicate rate from MinHash + LSH; turn statistics for chat records; and a
suggested data.seq_len. The same figures go to --out/analysis.json.

Definitions (the tests check each on hand-made corpora):
  percentiles     nearest rank over the records' token counts (EOS included): pK is the smallest length L such
                  that at least K% of the records have length <= L (numpy's 'inverted_cdf'); max is the longest.
  histogram       power-of-two bins [2^k, 2^(k+1)) of token counts.
  suggested seq_len  p95 rounded up to a multiple of 128 (at least 128): 95% of the records fit one row.
  exact duplicates   records whose normalised text (NFKC, case-folded, whitespace runs collapsed; a chat as
                  'role: content' lines) equals an earlier record's; rate = duplicates / records compared
                  (readable and not empty after normalising).
  near duplicates    records a near-dedup at Jaccard >= `threshold` (default 0.8) over shingles would drop:
                  records minus connected components of the near-duplicate graph, so exact duplicates count too.
                  Shingles are runs of `ngram` words (\\w+ of the normalised text; 5 by default) or characters (7);
                  a record shorter than one shingle is one shingle. MinHash with `num_perm` (128) seeded
                  multiply-add-shift hashes estimates Jaccard; LSH over bands of rows picks candidate pairs (the
                  band S-curve is placed 0.1 below the threshold so few true pairs are missed) and only pairs whose
                  estimated Jaccard reaches the threshold are kept. Within a band bucket each record is paired with
                  the bucket's first and with its predecessor, which keeps a bucket of m copies at O(m) pairs.
  chat            turns = messages (any role) per conversation; loss-token share = masked tokens / tokens of
                  the prepared records (the share of assistant tokens when the encoder masks prompts).

Everything after reading the texts is numpy over arrays (one Python step per record to cut shingles), so the
stdlib corpus (600 files, 10 MB) is analysed in seconds once prepared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxtrain.data import sources
from jaxtrain.data.prepare import Prepared

PERCENTILES = (5, 25, 50, 75, 95, 99)
SEQ_LEN_MULTIPLE = 128
NEAR_THRESHOLD = 0.8
NUM_PERM = 128
NGRAM = {'word': 5, 'char': 7}
BAR_WIDTH = 40
EXAMPLES = 3  # near-duplicate pairs named in the report
# Shingles hashed per numpy block ((block, num_perm) uint64: 2 MiB at the defaults, cache-sized) and per
# concatenated group of records.
_BLOCK = 1 << 11
_GROUP = 1 << 16
_M64 = (1 << 64) - 1
_EMPTY_SIG = np.uint32(0xFFFFFFFF)
_WORD_RE = re.compile(r'\w+')


# ----------------------------------------------------------------------------- lengths


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
  """{'p5': ..., 'p99': ..., 'max': ...} by nearest rank (see the module docstring); zeros when empty."""
  lengths = np.asarray(lengths)
  if len(lengths) == 0:
    return {**{f'p{q}': 0 for q in PERCENTILES}, 'max': 0}
  values = np.percentile(lengths, PERCENTILES, method='inverted_cdf')
  return {**{f'p{q}': int(v) for q, v in zip(PERCENTILES, values, strict=True)}, 'max': int(lengths.max())}


def suggest_seq_len(p95: int, multiple: int = SEQ_LEN_MULTIPLE) -> int:
  """`p95` rounded up to a multiple of `multiple`, at least one multiple."""
  return max(multiple, math.ceil(p95 / multiple) * multiple)


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
  """(lo, hi, count) for the power-of-two bins [lo, hi) from the shortest to the longest record."""
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) == 0:
    return []
  # floor(log2) exactly from the bit length, not from floating point.
  exps = np.frexp(np.maximum(lengths, 1).astype(np.float64))[1] - 1
  lo, hi = int(exps.min()), int(exps.max())
  counts = np.bincount(exps - lo, minlength=hi - lo + 1)
  return [(1 << (lo + k), 1 << (lo + k + 1), int(c)) for k, c in enumerate(counts)]


def text_bars(histogram: list[tuple[int, int, int]], width: int = BAR_WIDTH) -> list[str]:
  """One line per bin: range, count, share and a bar scaled to the fullest bin."""
  if not histogram:
    return ['  (no records)']
  total = sum(c for _, _, c in histogram)
  top = max(c for _, _, c in histogram)
  lines = []
  for lo, hi, c in histogram:
    bar = '#' * (round(width * c / top) if c else 0)
    lines.append(f'  [{lo:>8,d}, {hi:>8,d})  {c:>8,d}  {100 * c / total:5.1f}%  {bar}')
  return lines


def plot_lengths(lengths: np.ndarray, path: str, *, title: str, marks: dict[str, int]) -> str:
  """A PNG histogram of token lengths (log-spaced bins, log x axis) with vertical lines at `marks`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Deferred: only the report draws.
  from matplotlib.figure import Figure

  lengths = np.asarray(lengths)
  # A Figure without pyplot keeps no global state and never picks an interactive backend.
  fig = Figure(figsize=(7, 3.6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if len(lengths):
    low, top = max(1.0, float(lengths.min()) * 0.95), float(lengths.max()) * 1.05
    ax.hist(lengths, bins=np.geomspace(low, max(top, low * 1.1), 50), color='#4c72b0')
    ax.set_xscale('log')
    for (label, x), color in zip(marks.items(), ('#dd8452', '#c44e52', '#55a868', '#8172b3'), strict=False):
      ax.axvline(x, color=color, linestyle='--', linewidth=1.2, label=f'{label} {x:,d}')
    ax.legend(fontsize=8)
  ax.set_xlabel('tokens per record (EOS included)')
  ax.set_ylabel('records')
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path


# ----------------------------------------------------------------------------- texts


def messages_of(record: Any) -> list[dict] | None:
  """The messages of a chat record (a list of {'role', 'content'} dicts, or a dict holding 'messages');
  None for anything else."""
  if isinstance(record, dict) and isinstance(record.get('messages'), list):
    record = record['messages']
  if isinstance(record, list) and all(isinstance(m, dict) for m in record):
    return record
  return None


def normalise(record: Any) -> str:
  """The text compared for duplicates: NFKC, case-folded, whitespace runs as one space; chats as role lines."""
  msgs = messages_of(record)
  text = '\n'.join(f'{m.get("role", "")}: {m.get("content") or ""}' for m in msgs) if msgs is not None else str(record)
  return ' '.join(unicodedata.normalize('NFKC', text).casefold().split())


def _content(record: Any) -> str:
  """What near-duplicate shingles are cut from: the text, or a chat's message contents."""
  msgs = messages_of(record)
  if msgs is None:
    return str(record)
  return '\n'.join(str(m.get('content') or '') for m in msgs)


def exact_duplicates(normalised: Sequence[str]) -> tuple[int, list[tuple[int, int]]]:
  """(records equal to an earlier one, the first few (original, copy) index pairs)."""
  first: dict[bytes, int] = {}
  count, examples = 0, []
  for i, text in enumerate(normalised):
    key = hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=16).digest()
    j = first.setdefault(key, i)
    if j != i:
      count += 1
      if len(examples) < EXAMPLES:
        examples.append((j, i))
  return count, examples


# ----------------------------------------------------------------------------- MinHash + LSH


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser over uint64 arrays: spreads every input bit over the output."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class _Shingler:
  """Text -> uint64 hashes of its shingles. Word hashes are keyed blake2b digests (the same word hashes the
  same in every process, unlike Python's salted hash()); a shingle combines its items with per-position odd
  multipliers, so order matters."""

  def __init__(self, kind: str, ngram: int, seed: int):
    if kind not in NGRAM:
      raise ValueError(f'shingle={kind!r} is not valid; expected one of {tuple(NGRAM)}')
    if ngram < 1:
      raise ValueError(f'ngram={ngram} is not valid; expected a positive shingle length')
    self.kind, self.ngram = kind, ngram
    self._key = hashlib.sha256(f'jaxtrain-minhash-{seed}'.encode()).digest()[:16]
    rng = np.random.default_rng(seed)
    self._mult = rng.integers(0, 1 << 63, ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    self._word_ids: dict[str, int] = {}
    self._table = np.zeros(1024, np.uint64)  # word id -> hash; grows by doubling

  def _word_hash(self, word: str) -> int:
    digest = hashlib.blake2b(word.encode('utf-8', 'surrogatepass'), digest_size=8, key=self._key).digest()
    return int.from_bytes(digest, 'little')

  def _items(self, text: str) -> np.ndarray:
    norm = ' '.join(unicodedata.normalize('NFKC', text).casefold().split())
    if self.kind == 'char':
      return np.frombuffer(norm.encode('utf-32-le', 'surrogatepass'), '<u4').astype(np.uint64)
    words = _WORD_RE.findall(norm)
    ids = self._word_ids
    new = [w for w in dict.fromkeys(words) if w not in ids]
    if new:
      start = len(ids)
      for k, w in enumerate(new):
        ids[w] = start + k
      if len(ids) > len(self._table):
        self._table = np.concatenate([self._table, np.zeros(max(len(ids), len(self._table)), np.uint64)])
      self._table[start:len(ids)] = np.fromiter((self._word_hash(w) for w in new), np.uint64, len(new))
    return self._table[np.fromiter(map(ids.__getitem__, words), np.int64, len(words))]

  def __call__(self, text: str) -> np.ndarray:
    items = self._items(text)
    n = len(items)
    if n == 0:
      return items
    k = min(self.ngram, n)  # a record shorter than one shingle is one shingle
    h = np.zeros(n - k + 1, np.uint64)
    for j in range(k):
      h += items[j:n - k + 1 + j] * self._mult[j]
    return _mix64(h ^ np.uint64(k))


def minhash_signatures(texts: Sequence[str], *, shingle: str = 'word', ngram: int | None = None,
                       num_perm: int = NUM_PERM, seed: int = 0) -> np.ndarray:
  """(len(texts), num_perm) uint32 MinHash signatures; a text without shingles gets all 0xFFFFFFFF.

  Permutation k is the multiply-add-shift hash ((a_k * x + b_k) mod 2^64) >> 32 of the shingle hash's top 32
  bits x (a_k odd), a 2-universal family; the minimum over a record's shingles is its k-th value.
  """
  shingler = _Shingler(shingle, NGRAM[shingle] if ngram is None else ngram, seed)
  rng = np.random.default_rng([seed, 1])
  a = (rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1))[None, :]
  b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)[None, :]
  sig = np.full((len(texts), num_perm), _EMPTY_SIG, np.uint64)
  buf = np.empty((_BLOCK, num_perm), np.uint64)  # reused: in-place ufuncs on a cache-sized block are ~2x faster

  def reduce(hashes: np.ndarray, owners: np.ndarray) -> None:
    """Folds shingle hashes into the signatures of their (ascending) owners, _BLOCK rows at a time."""
    for s in range(0, len(hashes), _BLOCK):
      x, d = (hashes[s:s + _BLOCK] >> np.uint64(32))[:, None], owners[s:s + _BLOCK]
      v = buf[:len(d)]
      np.multiply(x, a, out=v)
      np.add(v, b, out=v)
      np.right_shift(v, np.uint64(32), out=v)
      if d[0] == d[-1]:  # the whole block is one record's (owners ascend): the common case for long records
        np.minimum(sig[d[0]], v.min(axis=0), out=sig[d[0]])
        continue
      starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])  # one run per record within the block
      rows = d[starts]
      sig[rows] = np.minimum(sig[rows], np.minimum.reduceat(v, starts, axis=0))

  pending: list[np.ndarray] = []
  owners: list[np.ndarray] = []
  size = 0
  for i, text in enumerate(texts):
    h = shingler(text)
    if len(h):
      pending.append(h)
      owners.append(np.full(len(h), i, np.int64))
      size += len(h)
    if size >= _GROUP:
      reduce(np.concatenate(pending), np.concatenate(owners))
      pending, owners, size = [], [], 0
  if pending:
    reduce(np.concatenate(pending), np.concatenate(owners))
  return sig.astype(np.uint32)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band) with bands * rows <= num_perm whose S-curve midpoint (1/bands)^(1/rows) is
  closest to threshold - 0.1: candidates are verified afterwards, so missing pairs costs more than extra ones."""
  target = max(0.05, threshold - 0.1)
  return min(((num_perm // r, r) for r in range(1, num_perm + 1)),
             key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - target))


def estimated_jaccard(sig: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
  """Share of equal MinHash values of the record pairs (i, j): an unbiased estimate of their Jaccard."""
  out = np.empty(len(i), np.float64)
  for s in range(0, len(i), 1 << 14):
    out[s:s + (1 << 14)] = (sig[i[s:s + (1 << 14)]] == sig[j[s:s + (1 << 14)]]).mean(axis=1)
  return out


@dataclasses.dataclass(frozen=True)
class NearDuplicates:
  count: int  # records minus components: what a near-dedup at `threshold` drops
  threshold: float
  bands: int
  rows: int
  pairs: int  # verified pairs (Jaccard estimate >= threshold)
  examples: tuple[tuple[int, int, float], ...]  # (record, record, estimated Jaccard)


def near_duplicates(sig: np.ndarray, *, threshold: float = NEAR_THRESHOLD, seed: int = 0) -> NearDuplicates:
  """Near-duplicate records from MinHash signatures (rows of `minhash_signatures`), by LSH banding."""
  from scipy.sparse import coo_matrix  # Deferred: a dependency of jax, needed only here.
  from scipy.sparse.csgraph import connected_components

  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'threshold={threshold} is not valid; expected 0 < threshold <= 1 (Jaccard similarity)')
  n, num_perm = sig.shape
  bands, rows = lsh_bands(threshold, num_perm)
  live = np.flatnonzero((sig != _EMPTY_SIG).any(axis=1))
  rng = np.random.default_rng([seed, 2])
  mult = rng.integers(0, 1 << 63, rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  firsts, seconds = [], []
  for band in range(bands):
    cols = sig[live, band * rows:(band + 1) * rows].astype(np.uint64)
    keys = _mix64((cols * mult).sum(axis=1, dtype=np.uint64) ^ np.uint64(band))
    order = np.argsort(keys, kind='stable')
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1]) + 1  # positions whose key equals the previous one
    if not len(same):
      continue
    group_start = np.maximum.accumulate(np.where(np.r_[True, sk[1:] != sk[:-1]], np.arange(len(sk)), 0))
    firsts += [live[order[same - 1]], live[order[group_start[same]]]]
    seconds += [live[order[same]], live[order[same]]]
  if firsts:
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    i, j = np.minimum(i, j), np.maximum(i, j)
    code = np.unique(i[i != j].astype(np.int64) * n + j[i != j])
    i, j = code // n, code % n
    est = estimated_jaccard(sig, i, j)
    keep = est >= threshold
    i, j, est = i[keep], j[keep], est[keep]
  else:
    i = j = np.zeros(0, np.int64)
    est = np.zeros(0)
  graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
  components = connected_components(graph, directed=False)[0] if n else 0
  examples = tuple((int(a), int(b), float(e)) for a, b, e in zip(i[:EXAMPLES], j[:EXAMPLES], est[:EXAMPLES],
                                                                  strict=True))
  return NearDuplicates(count=int(n - components), threshold=threshold, bands=bands, rows=rows, pairs=len(i),
                        examples=examples)


# ----------------------------------------------------------------------------- chat


@dataclasses.dataclass(frozen=True)
class ChatStats:
  conversations: int
  turns: dict[str, float]  # messages per conversation: mean, p50, p95, max
  roles: dict[str, int]  # messages by role
  assistant_turns_mean: float
  without_assistant: int  # conversations with no assistant message
  loss_token_share: float | None  # masked tokens / all tokens of the prepared records; None without them
  without_loss_tokens: int | None  # prepared conversations whose mask is all 0


def chat_stats(records: Sequence[Any], prepared: Prepared | None = None) -> ChatStats | None:
  """Turn statistics of the chat records among `records` (None when there are none)."""
  turns, roles, assistant, without = [], Counter(), [], 0
  for record in records:
    msgs = messages_of(record)
    if msgs is None:
      continue
    turns.append(len(msgs))
    counts = Counter(str(m.get('role', '')) for m in msgs)
    roles.update(counts)
    assistant.append(counts.get('assistant', 0))
    without += counts.get('assistant', 0) == 0
  if not turns:
    return None
  t = np.asarray(turns)
  p50, p95 = np.percentile(t, (50, 95), method='inverted_cdf')
  share = no_loss = None
  if prepared is not None and prepared.total_tokens:
    masks = np.asarray(prepared.masks)
    share = float(masks.sum(dtype=np.int64) / prepared.total_tokens)
    # Prepared records are never empty, so reduceat sees strictly increasing offsets.
    per_record = np.add.reduceat(masks, np.asarray(prepared.offsets[:-1]), dtype=np.int64)
    no_loss = int((per_record == 0).sum())
  return ChatStats(conversations=len(turns),
                   turns={'mean': float(t.mean()), 'p50': int(p50), 'p95': int(p95), 'max': int(t.max())},
                   roles=dict(sorted(roles.items())), assistant_turns_mean=float(np.mean(assistant)),
                   without_assistant=int(without), loss_token_share=share, without_loss_tokens=no_loss)


# ----------------------------------------------------------------------------- one source


@dataclasses.dataclass(frozen=True)
class SourceAnalysis:
  name: str  # the source's name (as `jaxtrain check`, sample ids and metrics name it)
  documents: int  # records of the source
  compared: int  # records compared for duplicates: readable (e.g. valid UTF-8) and not empty
  records: int  # prepared records (documents minus those the encoder skipped)
  skipped: int  # bad records skipped by indexing (`docs.bad`, of the files read) and by the encoder
  tokens: int
  percentiles: dict[str, int]
  histogram: list[tuple[int, int, int]]
  suggested_seq_len: int
  exact_duplicates: int
  exact_examples: tuple[tuple[int, int], ...]  # (original, copy) source indices
  near: NearDuplicates
  shingle: str
  ngram: int
  chat: ChatStats | None
  plot: str | None  # the PNG, when written
  names: dict[int, str]  # record index -> name, for the examples in the report
  split: str = ''  # train or eval; '' for a corpus analysed on its own

  @property
  def label(self) -> str:
    return sources.split_label(self.name, self.split) if self.split else repr(self.name)

  @property
  def exact_rate(self) -> float:
    return self.exact_duplicates / max(1, self.compared)

  @property
  def near_rate(self) -> float:
    return self.near.count / max(1, self.compared)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable figures (what analysis.json holds)."""
    out = dataclasses.asdict(self)
    out['exact_rate'], out['near_rate'] = self.exact_rate, self.near_rate
    out['names'] = {str(k): v for k, v in self.names.items()}
    return out


def _read(docs: Sequence) -> Iterator[tuple[int, Any]]:
  for i in range(len(docs)):
    try:
      yield i, docs[i]
    except ValueError:  # the prepare step counted it as skipped; nothing to compare here
      continue


def analyze_source(name: str, docs: Sequence, prepared: Prepared, *, out: str | None = None, shingle: str = 'word',
                   ngram: int | None = None, num_perm: int = NUM_PERM, threshold: float = NEAR_THRESHOLD,
                   seed: int = 0, split: str = '') -> SourceAnalysis:
  """The figures of one source (see the module docstring); writes `out/<name>[-<split>]_lengths.png` when `out`
  is set."""
  read = list(_read(docs))
  records = [r for _, r in read]
  # Empty records are skipped by the prepare step too; as duplicates of each other they would only add noise.
  compared = [(i, r, n) for i, r in read if (n := normalise(r))]
  exact, exact_examples = exact_duplicates([n for _, _, n in compared])
  ngram = NGRAM[shingle] if ngram is None and shingle in NGRAM else ngram
  sig = minhash_signatures([_content(r) for _, r, _ in compared], shingle=shingle, ngram=ngram, num_perm=num_perm,
                           seed=seed)
  near = near_duplicates(sig, threshold=threshold, seed=seed)
  # Examples are reported by source document index, not by position among the compared records.
  index = [i for i, _, _ in compared]
  near = dataclasses.replace(near, examples=tuple((index[a], index[b], e) for a, b, e in near.examples))
  lengths = prepared.lengths
  pct = length_percentiles(lengths)
  seq_len = suggest_seq_len(pct['p95'])
  plot = None
  if out is not None:
    stem = f'{name}-{split}' if split else name
    plot = plot_lengths(lengths, os.path.join(out, f'{stem}_lengths.png'),
                        title=f'{stem}: {len(prepared):,d} records, {prepared.total_tokens:,d} tokens',
                        marks={'p50': pct['p50'], 'p95': pct['p95'], 'seq_len': seq_len})
  namer = getattr(docs, 'name', None)
  bad = docs.bad if isinstance(docs, sources.Documents) else None  # what indexing skipped
  wanted = {index[j] for pair in exact_examples for j in pair} | {k for a, b, _ in near.examples for k in (a, b)}
  names = {k: namer(k) if callable(namer) else f'document {k}' for k in sorted(wanted)}
  return SourceAnalysis(
      name=name, documents=len(docs), compared=len(compared), records=len(prepared),
      skipped=prepared.skipped + (bad.total if bad is not None else 0), tokens=prepared.total_tokens,
      percentiles=pct, histogram=length_histogram(lengths),
      suggested_seq_len=seq_len, exact_duplicates=exact,
      exact_examples=tuple((index[i], index[j]) for i, j in exact_examples), near=near, shingle=shingle,
      ngram=int(ngram), chat=chat_stats(records, prepared), plot=plot, names=names, split=split)


def format_report(analysis: SourceAnalysis, *, skipped_reasons: Sequence[str] = ()) -> str:
  """The report of one source as text."""
  a = analysis
  pct = '  '.join(f'{k} {v:,d}' for k, v in a.percentiles.items())
  near = a.near
  lines = [f'source {a.label}: {a.documents:,d} documents, {a.records:,d} prepared records, {a.tokens:,d} tokens '
           f'({a.skipped:,d} skipped)']
  lines += [f'  skipped: {r}' for r in skipped_reasons]
  lines += [f'  tokens per record: {pct}',
            f'  suggested data.seq_len: {a.suggested_seq_len} (p95 {a.percentiles["p95"]:,d} rounded up to a multiple '
            f'of {SEQ_LEN_MULTIPLE})',
            '  length histogram (tokens per record, EOS included):']
  lines += text_bars(a.histogram)
  lines.append(f'  exact duplicates: {a.exact_duplicates:,d} ({100 * a.exact_rate:.2f}%; normalised text)')
  lines += [f'    {a.names.get(j, j)} = {a.names.get(i, i)}' for i, j in a.exact_examples]
  lines += [f'  near duplicates: {near.count:,d} ({100 * a.near_rate:.2f}%; Jaccard >= {near.threshold:g} over '
            f'{a.ngram}-{a.shingle} shingles, MinHash {near.bands * near.rows} of {near.bands} bands x {near.rows} '
            f'rows; includes exact duplicates)']
  for i, j, e in near.examples:
    lines.append(f'    {a.names.get(i, i)} ~ {a.names.get(j, j)} (estimated Jaccard {e:.2f})')
  if a.chat is not None:
    c = a.chat
    t = c.turns
    roles = ', '.join(f'{k} {v:,d}' for k, v in c.roles.items())
    lines += [f'  chat: {c.conversations:,d} conversations; turns per conversation mean {t["mean"]:.2f}, p50 '
              f'{t["p50"]}, p95 {t["p95"]}, max {t["max"]}; messages by role: {roles}',
              f'    assistant turns per conversation {c.assistant_turns_mean:.2f}; {c.without_assistant:,d} without '
              'an assistant message']
    if c.loss_token_share is not None:
      lines.append(f'    loss tokens {100 * c.loss_token_share:.1f}% of all tokens; {c.without_loss_tokens:,d} '
                   'conversations without any')
  if a.plot:
    lines.append(f'  histogram plot: {a.plot}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- every source of a config


def analyze_config(config: Any, out: str) -> tuple[list[str], list[SourceAnalysis]]:
  """Report lines and figures for the train and eval splits of every configured source (`data.sources`, or
  data.train alone), tokenized as training does (the prepare cache, chat templates); writes PNGs and
  analysis.json into `out`. Raises DataError on data that cannot be read."""
  from jaxtrain import data
  from jaxtrain.data import pipeline, prepare

  tokenizer = data.load_tokenizer(config.data)
  lines = [f'tokenizer: {tokenizer.path} (vocabulary {tokenizer.vocab_size}, EOS id {tokenizer.eos_id})']
  results = []
  for split in ('train', 'eval'):
    srcs = pipeline.load_sources(config.data, tokenizer, split, log=prepare.stderr_log)
    if split == 'train' and len(srcs) > 1:
      shares = pipeline.source_shares(config.data, srcs)
      lines.append('mixture token shares: ' + ', '.join(f'{n} {v:.1%}' for n, v in shares.items()))
    for src in srcs:
      result = analyze_source(src.name, src.docs, src.prepared, out=out, split=split)
      reasons = [f'{n} {why}' for why, n in src.docs.bad.counts.items()] + src.prepared.skipped_reasons
      lines.append(format_report(result, skipped_reasons=reasons))
      results.append(result)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'analysis.json'), 'w', encoding='utf-8') as fh:
    json.dump([r.to_dict() for r in results], fh, indent=1)
  lines.append(f'figures: {os.path.join(out, "analysis.json")}')
  return lines, results
