"""The grain pipeline: documents -> token ids + EOS -> seq_len pieces -> packed rows -> batches.

Every stage is a grain dataset whose iterator state is a small dict of ints, so `iter(ds).get_state()` can be
saved with a checkpoint and `set_state` resumes the stream exactly (same next batch, bit for bit).

Batches are dicts of int32 arrays shaped (batch_size, seq_len):
  tokens       token ids (0 on padding);
  segment_ids  1, 2, 3, ... for the documents of a row, 0 on padding;
  positions    0, 1, ... restarting at every document, 0 on padding;
  loss_mask    1 on real tokens, 0 on padding;
  doc_ids      index of the token's document in the split's `sources.Documents`, the same in every process
               (-1 on padding);
  doc_chunks   K for the K-th (0-based) seq_len piece of a document longer than seq_len, -1 for a document
               that fits in one piece and on padding.
`sample_ids` names the documents of each row from the last two.
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from jaxtrain.data import sources
from jaxtrain.data.sources import DataError
from jaxtrain.data.tokenizer import Tokenizer

# Rows packed together per first-fit pass. More bins waste less space (a piece that fits nowhere closes the
# pass), at the cost of mixing documents from a slightly longer window of the shuffled stream.
MIN_PACKING_BINS = 64

# 'documents': each process packs a disjoint share of the documents (no duplicated work; scales).
# 'rows': each process packs the global stream and keeps its rows (batches equal a one-process run's).
PROCESS_SPLITS = ('documents', 'rows')

# Documents tokenized per call. `encode_batch` runs in Rust threads without the GIL, where one `encode` per
# document holds it; a group is also the unit re-tokenized when an iterator is restored.
DOCS_PER_ENCODE = 16


class _EncodeGroup:
  """A group of document indices -> (index, int32 token ids ending in EOS) per document."""

  def __init__(self, docs: sources.Documents, tokenizer: Tokenizer):
    self._docs = docs
    self._tokenizer = tokenizer

  def __call__(self, indices: list[int]) -> list[tuple[int, np.ndarray]]:
    eos = self._tokenizer.eos_id
    encoded = self._tokenizer.encode_batch([self._docs[int(i)] for i in indices])
    return [(int(i), np.asarray(ids + [eos], dtype=np.int32)) for i, ids in zip(indices, encoded, strict=True)]


class _SplitPieces(grain.experimental.FlatMapTransform):
  """Cuts each document of a group into consecutive seq_len pieces (the last may be shorter); drops nothing.

  Each piece carries its provenance per token as 'origin' (piece length, 2): (document index, piece index K
  for a document of several pieces, else -1). Per token, so that the packer places it beside the tokens.
  """

  # grain's FlatMapIterDataset does not bound fan-out; the attribute is part of the transform interface.
  max_fan_out = 1 << 30

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, docs: list[tuple[int, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    n = self._seq_len
    pieces = []
    for doc_id, ids in docs:
      chunked = len(ids) > n
      for k, start in enumerate(range(0, len(ids), n)):
        tokens = ids[start:start + n]
        origin = np.empty((len(tokens), 2), np.int32)
        origin[:, 0] = doc_id
        origin[:, 1] = k if chunked else -1
        pieces.append({'tokens': tokens, 'origin': origin})
    return pieces


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


def _to_batch_keys(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # grain names packing outputs '<feature>_segment_ids' / '<feature>_positions'; 'origin' is padded with -1.
  segment_ids = row['tokens_segment_ids'].astype(np.int32)
  return {
      'tokens': row['tokens'].astype(np.int32),
      'segment_ids': segment_ids,
      'positions': row['tokens_positions'].astype(np.int32),
      'loss_mask': (segment_ids > 0).astype(np.int32),
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


def make_dataset(cfg: Any, tokenizer: Tokenizer, *, split: str, seed: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """A grain IterDataset of packed batches of `split` for this process (`batch_size` rows per batch).

  Train is an infinite stream, reshuffled every epoch from `seed`. Eval is unshuffled and repeats, so any
  number of batches can be drawn and a re-created dataset yields the same batches. How processes share the
  data follows `cfg.process_split`, for train and eval alike:
    'documents'  documents are sharded across processes (`process_index::process_count`) before packing, so
                 processes see disjoint data;
    'rows'       every process packs the same global stream of `batch_size * process_count` rows per batch
                 and keeps rows [process_index * batch_size, (process_index + 1) * batch_size): the processes'
                 batches, concatenated, equal a one-process run's, and the iterator state is the global
                 stream's (the same in every process; restorable by any process count with the same global batch).

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
  ds = document_dataset(cfg, tokenizer, split=split, seed=seed, process_index=process_index,
                        process_count=process_count)
  # Tokenization runs in these threads; their iterator state is just the next group index. A few groups of
  # read-ahead keep the packer fed (encode_batch is parallel itself) and keep restores cheap.
  read = grain.ReadOptions(num_threads=min(2, os.cpu_count() or 1), prefetch_buffer_size=4)
  it = ds.to_iter_dataset(read_options=read)
  it = grain.experimental.FlatMapIterDataset(it, _SplitPieces(seq_len))
  if split == 'train' and cfg.shuffle_window > 1:
    # Long files become dozens of consecutive pieces; without this they fill whole batches and the loss
    # swings with whichever file is being read. Restores re-read the window from its recorded start.
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=cfg.shuffle_window, seed=_uint32(seed + 1))
  # 'origin' is packed beside the tokens without segment ids of its own, and padded with -1.
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={'tokens': seq_len, 'origin': seq_len}, meta_features=('origin',),
      padding_struct={'tokens': 0, 'origin': -1}, num_packing_bins=max(batch_size, MIN_PACKING_BINS),
      seed=_uint32(seed), shuffle_bins=split == 'train')
  it = it.map(_to_batch_keys).batch(batch_size, drop_remainder=True)
  if rows is not None:
    it = it.map(functools.partial(_keep_rows, start=rows[0], stop=rows[1]))
  if prefetch:
    it = _ThreadPrefetch(it, prefetch)
  return it


def document_dataset(cfg: Any, tokenizer: Tokenizer, *, split: str, seed: int, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
  """The endless stream of this process's tokenized documents, in groups of DOCS_PER_ENCODE, before packing.

  Elements are lists of (document index in `sources.load_documents(cfg, split)`, int32 token ids ending in
  EOS), one per document.

  Train documents are shuffled from `seed`, in a new order every epoch; eval documents keep file order.
  """
  sources.check_split(split)
  _check_process(process_index, process_count)
  docs = sources.load_documents(cfg, split)
  if len(docs) < process_count:
    key = 'data.eval' if split == 'eval' and cfg.eval else 'data.train'
    raise DataError(key, cfg[key[len('data.'):]], f'has {len(docs)} {split} documents for {process_count} processes',
                    'expected at least one document per process')
  # Indices rather than texts flow through sharding and shuffling, so each document keeps its global index.
  ds = grain.MapDataset.range(len(docs))[process_index::process_count]
  if split == 'train':
    # Shuffle before repeat: grain folds the epoch into the shuffle seed, so every epoch gets a new order.
    ds = ds.shuffle(seed=_uint32(seed))
  return ds.repeat().batch(DOCS_PER_ENCODE, batch_fn=list).map(_EncodeGroup(docs, tokenizer))


def sample_ids(cfg: Any, split: str, batch: Mapping[str, np.ndarray]) -> list[list[str]]:
  """Per row of a `make_dataset(cfg, ..., split=split)` batch, its distinct documents in order of appearance.

  A document is named '<file>:<index in file>' (`sources.Documents.name`), plus ':chunk<K>' where the row holds
  the K-th (0-based) seq_len piece of a document longer than seq_len.
  """
  docs = sources.load_documents(cfg, split)
  doc_ids, chunks = np.asarray(batch['doc_ids']), np.asarray(batch['doc_chunks'])
  out = []
  for row_ids, row_chunks in zip(doc_ids, chunks, strict=True):
    # A segment starts wherever the (document, piece) pair changes; padding (-1) names nothing.
    starts = np.r_[True, (row_ids[1:] != row_ids[:-1]) | (row_chunks[1:] != row_chunks[:-1])] & (row_ids >= 0)
    names = [docs.name(d) + (f':chunk{k}' if k >= 0 else '')
             for d, k in zip(row_ids[starts].tolist(), row_chunks[starts].tolist(), strict=True)]
    out.append(list(dict.fromkeys(names)))
  return out


def _uint32(seed: int) -> int:
  return int(seed) % (1 << 32)  # grain seeds must fit in uint32.
