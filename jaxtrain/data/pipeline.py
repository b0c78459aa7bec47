"""The grain pipeline: sources -> prepared token ids -> seq_len pieces -> per-source shuffle and best-fit
packed rows -> token-share mixture of rows -> batches.

  per source    documents (sources.py) tokenized once into the prepare cache (prepare.py; chat records through
                a template with an assistant-only loss mask, chat.py); an index stream, sharded by process,
                shuffled per epoch from the seed, endless or `epochs` passes long; each document cut into
                consecutive seq_len pieces (nothing is truncated); train only: a window shuffle of the pieces
                (data.shuffle_window), so a long file does not fill whole batches; best-fit packing over
                data.pack_buffer pieces (packing.py): no piece is split, rows ~99% full;
  mixture       the sources' rows interleaved so each source's share of (non-padding) tokens follows its weight,
                or n_i^(1/T) with data.temperature (mixing.py); a finite source ends by its `on_end` policy;
  batches       `batch_size` consecutive rows of the mixture, prefetched in a background thread.

Why the shuffle and the packer run per source, before the mixture: any reordering after the mixer reads ahead
over thousands of pieces, which spreads a source's tokens over hundreds of steps (a small finite source that the
mixer has already dropped keeps trickling in) and turns the mixer's exact shares into a random sample per batch.
With the mixer last, the batches trained so far are a prefix of its output, so its bound holds at every step:
each source's tokens are within (number of sources - 1) * seq_len of its share of all tokens (per process), and
a source's read-ahead (its shuffle window and packing window) only ever holds its own pieces. Rows are
single-source; each source keeps its own windows (memory: sources x the windows).

Every stage's iterator state is a small dict of ints, so `iter(ds).get_state()` is saved with a checkpoint
and `set_state` resumes exactly (same next batch, bit for bit). Eval data goes through the same stages
(unshuffled, endless), so the eval loss sees rows packed like training rows.

Batches are dicts of int32 arrays shaped (batch_size, seq_len):
  tokens       token ids (0 on padding);
  segment_ids  1, 2, 3, ... for the documents of a row, 0 on padding (all 1 with data.intra_doc_mask=False,
               so packed documents attend to each other: an ablation);
  positions    0, 1, ... restarting at every document, 0 on padding;
  loss_mask    1 on tokens to learn (every real token of a text source; assistant tokens of chat), else 0;
  doc_ids      the token's document: the source's offset + its index among the source's documents, the same
               in every process (-1 on padding);
  doc_chunks   K for the K-th (0-based) seq_len piece of a document longer than seq_len, -1 for a document
               that fits in one piece and on padding.
`sample_ids` names the documents of each row ('<source>:<file>:<index in file>[:chunkK]') from the last two.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import weakref
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxtrain.data import mixing, packing, prepare, sources
from jaxtrain.data.blocklist import load_blocklist
from jaxtrain.data.sources import DataError
from jaxtrain.data.tokenizer import Tokenizer

# 'documents': each process packs a disjoint share of the documents (no duplicated work; scales).
# 'rows': each process packs the global stream and keeps its rows (batches equal a one-process run's).
PROCESS_SPLITS = ('documents', 'rows')


# ----------------------------------------------------------------------------- prepared sources


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of a split, tokenized: its spec, documents, prepared tokens and the offset of its doc ids."""
  spec: sources.SourceSpec
  docs: sources.Documents
  prepared: prepare.Prepared
  offset: int

  @property
  def name(self) -> str:
    return self.spec.name


def encoder_for(spec: sources.SourceSpec, tokenizer: Tokenizer) -> tuple[prepare.Encoder, Any]:
  """The prepare step's encoder of a source - plain text + EOS, or a chat template with an assistant-only
  loss mask - and what identifies it in the cache key."""
  if spec.format in sources.CHAT_FORMATS:
    from jaxtrain.data import chat  # Deferred: transformers' templating costs an import only chat runs pay.
    encoder = chat.ChatEncoder(tokenizer, spec.template, key=f'data.sources.{spec.name}.template')
    return encoder, encoder.identity
  return prepare.text_encoder(tokenizer), 'none'


def load_sources(cfg: Any, tokenizer: Tokenizer, split: str, log: Any = None) -> list[Source]:
  """Every configured source of `split`, tokenized through the prepare cache (built on first use)."""
  sources.check_split(split)
  out, offset = [], 0
  for spec in sources.source_specs(cfg):
    encoder, identity = encoder_for(spec, tokenizer)
    docs, prepared = prepare.prepare_split(spec.view, tokenizer, split, encode=encoder, template=identity,
                                           name=f'{spec.name}-{split}', log=log)
    # Indexing already checked its own skips over the records of the files read (both splits of a held-out
    # source read the same files); records the encoder rejected count on top, as a share of this split.
    use_eval = split == 'eval' and bool(spec.view.eval) and spec.view.train != sources.STDLIB
    sources.check_bad_fraction(spec.view.config_keys[1 if use_eval else 0],
                               spec.view.eval if use_eval else spec.view.train, docs.bad.total, docs.bad.read,
                               (docs.bad.examples + prepared.skipped_reasons)[:3],
                               float(getattr(cfg, 'max_bad_fraction', 1.0)), rejected=prepared.skipped,
                               split_docs=prepared.source_documents, split=split)
    out.append(Source(spec, docs, prepared, offset))
    offset += len(docs)
  return out


def source_report(srcs: Sequence[Source], blocked: frozenset[str] = frozenset()) -> list[str]:
  """One line per source: documents, tokens, what was skipped and why, and how many documents the blocklist
  `blocked` (data.exclude: `blocklist(cfg)`) keeps out of training (for the run's log)."""
  lines = []
  for s in srcs:
    bad = s.docs.bad
    skipped = dict(bad.counts)
    if s.prepared.skipped:
      skipped['rejected by the tokenizer or template'] = s.prepared.skipped
    parts = [f'{s.name}: {len(s.prepared)} documents, {s.prepared.total_tokens:,} tokens']
    if bad.empty:
      parts.append(f'{bad.empty} empty skipped')
    if skipped:
      parts.append('skipped ' + ', '.join(f'{n} {why}' for why, n in skipped.items()))
      parts.append('first: ' + '; '.join((bad.examples + s.prepared.skipped_reasons)[:2]))
    if blocked:
      excluded = len(_excluded(s, blocked))
      parts.append(f'{excluded} excluded by data.exclude ({len(s.prepared) - excluded} left)')
    lines.append('; '.join(parts))
  return lines


def source_shares(cfg: Any, srcs: Sequence[Source]) -> dict[str, float]:
  """Target token shares of the mixture: the sources' weights, or n_i^(1/T) with data.temperature > 0."""
  counts = {s.name: s.prepared.total_tokens for s in srcs}
  if cfg.temperature:
    return mixing.mixture_weights(counts, None, float(cfg.temperature))
  return mixing.mixture_weights(counts, {s.name: s.spec.weight for s in srcs}, None)


# ----------------------------------------------------------------------------- per-source streams


class _Document:
  """Record index -> (global doc id, token ids, loss mask) of one prepared source."""

  def __init__(self, src: Source):
    self._prepared = src.prepared
    self._offset = src.offset

  def __call__(self, record: int) -> tuple[int, np.ndarray, np.ndarray]:
    ids, mask = self._prepared[int(record)]
    return self._offset + int(self._prepared.source_index[int(record)]), ids, mask


class _SplitPieces(grain.experimental.FlatMapTransform):
  """Cuts each document into consecutive seq_len pieces (the last may be shorter); drops nothing.

  Each piece carries its provenance per token as 'origin' (piece length, 2): (doc id, piece index K for a
  document of several pieces, else -1). Per token, so that the packer places it beside the tokens.
  """

  # grain's FlatMapIterDataset does not bound fan-out; the attribute is part of the transform interface.
  max_fan_out = 1 << 30

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, doc: tuple[int, np.ndarray, np.ndarray]) -> list[dict[str, np.ndarray]]:
    doc_id, ids, mask = doc
    n = self._seq_len
    chunked = len(ids) > n
    pieces = []
    for k, start in enumerate(range(0, len(ids), n)):
      tokens = ids[start:start + n].astype(np.int32)
      origin = np.empty((len(tokens), 2), np.int32)
      origin[:, 0] = doc_id
      origin[:, 1] = k if chunked else -1
      pieces.append({'tokens': tokens, 'loss_mask': mask[start:start + n].astype(np.int32), 'origin': origin})
    return pieces


def _source_seed(seed: int, name: str) -> int:
  # Each source shuffles on its own stream; crc32, not hash(): the same in every process.
  return _uint32(seed + zlib.crc32(name.encode()))


def _excluded(src: Source, blocked: frozenset[str]) -> np.ndarray:
  """Record indices of `src` whose sample id is in `blocked` (a blocklist of '<source>:<document>' ids)."""
  if not blocked:
    return np.zeros(0, np.int64)
  names = [f'{src.name}:{src.docs.name(int(i))}' for i in src.prepared.source_index]
  return np.asarray([r for r, n in enumerate(names) if n in blocked], np.int64)


def document_dataset(src: Source, *, split: str, seed: int, process_index: int = 0, process_count: int = 1,
                     blocked: frozenset[str] = frozenset()) -> grain.MapDataset:
  """This process's stream of one source's tokenized documents: (global doc id, ids, loss mask) each.

  Train documents are shuffled from `seed`, in a new order every epoch, for `spec.epochs` passes (0: endless);
  eval documents keep file order and repeat endlessly. Blocked documents are left out.
  """
  records = np.arange(len(src.prepared))
  if blocked:
    records = np.setdiff1d(records, _excluded(src, blocked))
  records = records[process_index::process_count]
  if len(records) == 0:
    raise DataError(src.spec.view.config_keys[0], src.spec.view.train,
                    f'has {len(records)} {split} documents for process {process_index} of {process_count}',
                    'expected at least one document per process (after data.exclude)')
  ds = grain.MapDataset.source(records.tolist())
  epochs = src.spec.epochs if split == 'train' and src.spec.epochs else None
  if split == 'train':
    # Shuffle before repeat: grain folds the epoch into the shuffle seed, so every epoch gets a new order.
    ds = ds.shuffle(seed=_source_seed(seed, src.name))
  return ds.repeat(epochs).map(_Document(src))


# ----------------------------------------------------------------------------- the batch stream


class _PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
  """grain's background-thread prefetch iterator, safe to close twice.

  grain's `close` reads module globals, which are gone when `__del__` runs during interpreter teardown and
  print an AttributeError traceback; iterators are therefore closed at exit, and the later close is a no-op.
  """

  def close(self) -> None:
    if not self._closed:
      super().close()


_OPEN_PREFETCHERS: weakref.WeakSet = weakref.WeakSet()


class _ThreadPrefetch(grain.IterDataset):
  """Prepares `buffer_size` batches ahead in a background thread. Resumes exactly: each buffered batch
  carries the upstream iterator state taken right after it was made."""

  def __init__(self, parent: grain.IterDataset, buffer_size: int):
    super().__init__(parent)
    self._buffer_size = buffer_size

  def __iter__(self) -> _PrefetchIterator:
    it = _PrefetchIterator(self._parent.__iter__(), self._buffer_size)
    _OPEN_PREFETCHERS.add(it)
    return it


@atexit.register
def _close_prefetchers() -> None:
  for it in list(_OPEN_PREFETCHERS):
    it.close()


def _to_batch_keys(row: dict[str, np.ndarray], intra_doc_mask: bool = True) -> dict[str, np.ndarray]:
  segment_ids = row['segment_ids'].astype(np.int32)
  if not intra_doc_mask:
    segment_ids = (segment_ids > 0).astype(np.int32)
  return {
      'tokens': row['tokens'].astype(np.int32),
      'segment_ids': segment_ids,
      'positions': row['positions'].astype(np.int32),
      'loss_mask': row['loss_mask'].astype(np.int32),
      'doc_ids': row['origin'][:, 0].astype(np.int32),
      'doc_chunks': row['origin'][:, 1].astype(np.int32),
  }


def _keep_rows(batch: dict[str, np.ndarray], *, start: int, stop: int) -> dict[str, np.ndarray]:
  return {k: v[start:stop] for k, v in batch.items()}


def _check_int(key: str, value: Any, lo: int, valid: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise DataError(key, value, 'is not valid', valid)
  return int(value)


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not valid for process_count={process_count}; '
                     'expected 0 <= process_index < process_count')


def _check_process_split(cfg: Any) -> str:
  if cfg.process_split not in PROCESS_SPLITS:
    raise DataError('data.process_split', cfg.process_split, 'is not valid',
                    f"expected one of {PROCESS_SPLITS} ('documents': each process reads a disjoint share; "
                    "'rows': each process keeps its rows of the global batches)")
  return cfg.process_split


def blocklist(cfg: Any) -> frozenset[str]:
  """Document sample ids that data.exclude's blocklist files name (see `jaxtrain blocklist`)."""
  paths = [p.strip() for p in str(getattr(cfg, 'exclude', '') or '').split(',') if p.strip()]
  if not paths:
    return frozenset()
  return frozenset(load_blocklist(paths))


def make_dataset(cfg: Any, tokenizer: Tokenizer, *, split: str, seed: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 srcs: Sequence[Source] | None = None) -> grain.IterDataset:
  """A grain IterDataset of packed batches of `split` for this process (`batch_size` rows per batch).

  Train is reshuffled every epoch from `seed` and ends only if a source's `on_end` says 'stop' (or every
  source was dropped); eval is unshuffled and endless, so any number of batches can be drawn and a re-created
  dataset yields the same batches. How processes share the data follows `cfg.process_split`:
    'documents'  each source's documents are sharded across processes (`process_index::process_count`)
                 before packing, so processes see disjoint data;
    'rows'       every process packs the same global stream of `batch_size * process_count` rows per batch
                 and keeps rows [process_index * batch_size, (process_index + 1) * batch_size): the processes'
                 batches, concatenated, equal a one-process run's, and the iterator state is the global
                 stream's (restorable by any process count with the same global batch).
  `srcs`: the split's `load_sources` result, when the caller already has it.

  `iter(ds).get_state()` is a small JSON-serialisable dict of ints; `set_state` on a fresh iterator of an
  identically built dataset continues with bitwise identical batches (grain.checkpoint.CheckpointSave/Restore).
  """
  seq_len = _check_int('data.seq_len', cfg.seq_len, 1, 'expected a positive number of tokens per row')
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} is not valid; expected a positive number of rows per process')
  prefetch = _check_int('data.prefetch', cfg.prefetch, 0, 'expected 0 (no prefetch) or a number of batches')
  _check_int('data.shuffle_window', cfg.shuffle_window, 0, 'expected 0 (off) or a number of pieces')
  _check_process(process_index, process_count)
  rows = None  # This process's rows of each packed batch; None = all of them.
  if _check_process_split(cfg) == 'rows' and process_count > 1:
    rows = (process_index * batch_size, (process_index + 1) * batch_size)
    batch_size *= process_count
    process_index, process_count = 0, 1  # Every process reads every document.
  srcs = list(srcs) if srcs is not None else load_sources(cfg, tokenizer, split)
  shares = source_shares(cfg, srcs)
  blocked = blocklist(cfg)
  parents = {}
  for src in srcs:
    docs = document_dataset(src, split=split, seed=seed, process_index=process_index, process_count=process_count,
                            blocked=blocked)
    pieces = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _SplitPieces(seq_len))
    parents[src.name] = _source_rows(pieces, cfg, src.name, split=split, seed=seed)
  on_end = {s.name: s.spec.on_end if split == 'train' else 'repeat' for s in srcs}
  it = mixing.Mix(parents, shares, on_end, length=_row_tokens)
  it = it.map(functools.partial(_to_batch_keys, intra_doc_mask=bool(cfg.intra_doc_mask)))
  it = it.batch(batch_size, drop_remainder=True)
  if rows is not None:
    it = it.map(functools.partial(_keep_rows, start=rows[0], stop=rows[1]))
  if prefetch:
    it = _ThreadPrefetch(it, prefetch)
  return it


def _source_rows(pieces: grain.IterDataset, cfg: Any, name: str, *, split: str, seed: int) -> grain.IterDataset:
  """One source's pieces, window-shuffled (train) and best-fit packed into rows of its own."""
  if split == 'train' and cfg.shuffle_window > 1:
    # Long files become dozens of consecutive pieces; without this they fill whole batches and the loss
    # swings with whichever file is being read. Restores re-read the window from its recorded start.
    pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=cfg.shuffle_window,
                                                         seed=_source_seed(seed + 1, name))
  # Rows leave a packing window in a seeded order: in creation order the longest pieces would come first, and
  # a short evaluation would score only long documents. Eval uses one fixed order whatever the run's seed.
  return packing.BestFitPack(pieces, seq_len=cfg.seq_len, features={'tokens': 0, 'loss_mask': 0, 'origin': -1},
                             buffer_docs=cfg.pack_buffer, seed=_source_seed(seed + 2, name) if split == 'train' else 0)


def _row_tokens(row: Mapping[str, np.ndarray]) -> int:
  """A packed row's non-padding tokens: what the mixer counts against its source's share (and what the run logs
  as tokens/<source>: loss-masked prompt tokens count, padding does not)."""
  return int(np.count_nonzero(row['segment_ids']))


def sample_ids(cfg: Any, split: str, batch: Mapping[str, np.ndarray]) -> list[list[str]]:
  """Per row of a `make_dataset(cfg, ..., split=split)` batch, its distinct documents in order of appearance.

  A document is named '<source>:<file>:<index in file>' (`sources.Documents.name`), plus ':chunk<K>' where the
  row holds the K-th (0-based) seq_len piece of a document longer than seq_len.
  """
  specs = sources.source_specs(cfg)
  docs = [sources.load_documents(spec.view, split) for spec in specs]
  starts = np.cumsum([0] + [len(d) for d in docs])
  doc_ids, chunks = np.asarray(batch['doc_ids']), np.asarray(batch['doc_chunks'])
  out = []
  for row_ids, row_chunks in zip(doc_ids, chunks, strict=True):
    # A segment starts wherever the (document, piece) pair changes; padding (-1) names nothing.
    first = np.r_[True, (row_ids[1:] != row_ids[:-1]) | (row_chunks[1:] != row_chunks[:-1])] & (row_ids >= 0)
    names = []
    for d, k in zip(row_ids[first].tolist(), row_chunks[first].tolist(), strict=True):
      s = int(np.searchsorted(starts, d, side='right')) - 1
      names.append(f'{specs[s].name}:{docs[s].name(d - int(starts[s]))}' + (f':chunk{k}' if k >= 0 else ''))
    out.append(list(dict.fromkeys(names)))
  return out


def _uint32(seed: int) -> int:
  return int(seed) % (1 << 32)  # grain seeds must fit in uint32.


class SourceTokens:
  """Tokens each source has contributed to the batches a run trained on, all processes together, and the
  epochs that makes.

  Each process counts the non-padding tokens of its own rows on the host (`add`: exact whatever the packing and
  prefetching did; `local()` is a copy of its counts since the run started or resumed). The run's counts
  (`run_counts`) are the restored ones plus the sum of every process's local counts, which the caller forms
  (e.g. an allgather that every process calls at the same steps): this module stays free of JAX. Epochs are
  run tokens / the source's train tokens (the processes read the whole source together, whatever
  data.process_split). `state()` is the run's counts, so `restore()` works with any process count.
  """

  def __init__(self, srcs: Sequence[Source]):
    self.names = [s.name for s in srcs]
    self._starts = np.cumsum([0] + [len(s.docs) for s in srcs])
    self._totals = np.asarray([max(1, s.prepared.total_tokens) for s in srcs], np.float64)
    self._restored = np.zeros(len(srcs), np.int64)  # the run's counts at the restored checkpoint
    self._local = np.zeros(len(srcs), np.int64)  # this process's counts since then

  def add(self, doc_ids: np.ndarray) -> None:
    ids = np.asarray(doc_ids).reshape(-1)
    ids = ids[ids >= 0]
    which = np.searchsorted(self._starts, ids, side='right') - 1
    self._local += np.bincount(which, minlength=len(self.names))[:len(self.names)]

  def local(self) -> np.ndarray:
    """This process's tokens per source since the start or the restore (int64, in `names` order)."""
    return self._local.copy()

  def run_counts(self, summed_local: np.ndarray) -> np.ndarray:
    """The run's tokens per source, from `local()` summed over every process (same shape, or stacked rows)."""
    return self._restored + np.asarray(summed_local, np.int64)

  def metrics(self, counts: np.ndarray) -> dict[str, float]:
    """{'tokens/<source>': tokens so far, 'epochs/<source>': passes over it so far} for run counts `counts`."""
    out = {}
    for name, n, total in zip(self.names, np.asarray(counts).tolist(), self._totals.tolist(), strict=True):
      out[f'tokens/{name}'] = float(n)
      out[f'epochs/{name}'] = n / total
    return out

  def state(self, counts: np.ndarray) -> dict[str, int]:
    """What `restore` takes: the run counts `counts` by source name."""
    return dict(zip(self.names, np.asarray(counts).tolist(), strict=True))

  def restore(self, state: Mapping[str, int]) -> None:
    self._restored = np.asarray([int(state.get(n, 0)) for n in self.names], np.int64)
    self._local[:] = 0
