"""Best-fit packing of seq_len pieces into rows: a resumable grain IterDataset.

Algorithm (window best-fit-decreasing). The packer reads a window of `buffer_docs` pieces from its parent,
sorts them by length, longest first (ties keep arrival order), and places each into the open bin with the
least remaining room that still holds it, opening a new bin when none does. A Fenwick tree counts open
bins per remaining room 1..seq_len, so "smallest room >= n" is two O(log seq_len) walks instead of a scan
over the bins; a bin whose room reaches 0 leaves the tree. When the window is placed, every bin becomes a
row: they are all emitted, and the next window starts with no open bin. Pieces are never split, so every
input token lands in exactly one row; inside a row the pieces keep their arrival order.

Why a closed window rather than a rolling set of open bins: the packing of a window is a pure function of
its pieces, so the iterator state is just (parent state at the window start, window index, rows of it
already emitted). A restore re-reads the window from the parent, re-packs it (deterministically) and skips
the emitted rows, which makes resumed output bitwise identical. The cost is the room best-fit cannot fill
inside one window, mostly in its last, partly filled bins: with 1,024 pieces it is under 1% of the tokens
for realistic length mixes (benchmarks/packing.py measures it).

Decreasing order puts the rows with the longest pieces first; with a `seed`, the rows of each window are
emitted in a random order drawn from (seed, window index), so batches do not drift from long to short
documents inside a window. `seed=None` keeps creation order, longest pieces first. A finite parent flushes
its last, partial window, then the iterator raises StopIteration.

Rows are assembled with numpy, a block of BLOCK_TOKENS at a time as they are consumed: offsets and segment
ids come from vectorized cumulative sums over the window's pieces, then each piece is one slice copy per
feature into uninitialised (rows * seq_len, ...) arrays and each row's tail one fill with its padding value.
Python loops run per piece or row, never per token.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxtrain.data.sources import DataError

# Names the packer adds to every row; input features must not use them.
ROW_KEYS = ('segment_ids', 'positions')

# Rows are assembled in blocks of about this many tokens, not a whole window at once: a window of 1,024
# pieces at seq_len 8192 would be ~100 MB of rows, where a block of a few MB stays in cache and its memory
# is recycled by the allocator instead of being page-faulted in afresh.
BLOCK_TOKENS = 1 << 18


class _RoomTree:
  """Fenwick tree over remaining room 1..size: counts open bins per room, finds the tightest fit."""

  def __init__(self, size: int):
    self._size = size
    self._tree = [0] * (size + 1)
    self._top = 1 << (size.bit_length() - 1)  # Largest power of two <= size: the first step of the descent.
    self._open = 0

  def add(self, room: int, delta: int) -> None:
    self._open += delta
    tree, size = self._tree, self._size
    while room <= size:
      tree[room] += delta
      room += room & -room

  def tightest(self, n: int) -> int:
    """The smallest room >= n that some open bin has, or 0 when no open bin holds n."""
    tree = self._tree
    below, i = 0, n - 1  # Open bins with room < n.
    while i > 0:
      below += tree[i]
      i -= i & -i
    if below == self._open:
      return 0
    # Descend to the last index whose prefix count is still `below`; the next room is the answer.
    pos, step, size = 0, self._top, self._size
    while step:
      nxt = pos + step
      if nxt <= size and tree[nxt] <= below:
        pos = nxt
        below -= tree[nxt]
      step >>= 1
    return pos + 1


def best_fit_bins(lengths: Sequence[int] | np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
  """Best-fit-decreasing placement: (bin index of each piece, number of bins).

  Bins are numbered in the order they are opened. Among open bins with the same room the most recently
  filled one is taken (a stack per room: O(1), and deterministic). Every length must be in 1..seq_len.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 1 or lengths.max() > seq_len):
    raise ValueError(f'piece lengths must be in 1..{seq_len}; got {lengths.min()}..{lengths.max()}')
  order = np.argsort(-lengths, kind='stable')
  bin_of = np.empty(len(lengths), np.int64)
  tree = _RoomTree(seq_len)
  by_room: dict[int, list[int]] = {}
  num_bins = 0
  for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
    room = tree.tightest(n) if n < seq_len else 0
    if room:
      b = by_room[room].pop()
      tree.add(room, -1)
    else:
      b, room = num_bins, seq_len
      num_bins += 1
    left = room - n
    if left:
      by_room.setdefault(left, []).append(b)
      tree.add(left, 1)
    bin_of[i] = b
  return bin_of, num_bins


class PackedWindow:
  """A window's pieces placed into rows; assembles any range of rows on demand, with numpy.

  `lengths[i]` is the length of `pieces[i]` and `row_of_piece[i]` its row (every row holds at least one
  piece and at most seq_len tokens, as `best_fit_bins` guarantees; not checked here). The pieces of a row
  keep their order in `pieces`; each feature is padded with its value in `features`; dtypes and trailing
  shapes come from the first piece.
  """

  def __init__(self, pieces: Sequence[Mapping[str, Any]], lengths: np.ndarray, row_of_piece: np.ndarray,
               num_rows: int, seq_len: int, features: Mapping[str, Any]):
    self.num_rows = num_rows
    self._pieces = pieces
    self._seq_len = seq_len
    self._features = dict(features)
    order = np.lexsort((np.arange(len(pieces)), row_of_piece))  # By row, then arrival.
    row, length = row_of_piece[order], lengths[order]
    # Offset and segment id (1 + rank) of each piece within its row, from where each row's run begins.
    idx = np.arange(len(order))
    first = np.maximum.accumulate(np.where(np.r_[True, row[1:] != row[:-1]], idx, 0))
    starts = np.cumsum(length) - length
    self._order, self._row, self._length = order, row, length
    self._offset = starts - starts[first]
    self._segment = idx - first + 1
    self._fill = np.bincount(row_of_piece, weights=lengths, minlength=num_rows).astype(np.int64)
    self._bounds = np.searchsorted(row, np.arange(num_rows + 1))  # Sorted pieces [b[r], b[r + 1]) are row r's.

  def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop): each feature (stop - start, seq_len, ...), 'segment_ids' and 'positions'."""
    n_rows, seq_len = stop - start, self._seq_len
    lo, hi = int(self._bounds[start]), int(self._bounds[stop])
    begin = (self._row[lo:hi] - start) * seq_len + self._offset[lo:hi]  # Flat index of each piece's first token.
    # Arrays are left uninitialised and written exactly once: pieces, then each row's padded tail. Flat
    # (rows * seq_len, ...) views make every write a single 1-D slice.
    flat = {}
    for name in self._features:
      like = np.asarray(self._pieces[0][name])
      flat[name] = np.empty((n_rows * seq_len, *like.shape[1:]), like.dtype)
    seg = flat['segment_ids'] = np.empty(n_rows * seq_len, np.int32)
    pos = flat['positions'] = np.empty(n_rows * seq_len, np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    targets = [(name, flat[name]) for name in self._features]
    # One slice copy per piece and feature: Python runs per piece, numpy moves the tokens. This beats a
    # concatenate + index scatter, which pays a second pass and an index per token.
    for i, b, n, k in zip(self._order[lo:hi].tolist(), begin.tolist(), self._length[lo:hi].tolist(),
                          self._segment[lo:hi].tolist(), strict=True):
      piece, e = self._pieces[i], b + n
      for name, out in targets:
        out[b:e] = piece[name]
      seg[b:e] = k
      pos[b:e] = ramp[:n]
    pads = [(out, self._features[name]) for name, out in targets] + [(seg, 0), (pos, 0)]
    row_starts = np.arange(n_rows) * seq_len
    for b, e in zip((row_starts + self._fill[start:stop]).tolist(), (row_starts + seq_len).tolist(), strict=True):
      for out, pad in pads:
        out[b:e] = pad
    return {name: out.reshape(n_rows, seq_len, *out.shape[1:]) for name, out in flat.items()}


def _check_count(key: str, value: Any, valid: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise DataError(key, value, 'is not valid', valid)
  return int(value)


class BestFitPack(grain.IterDataset):
  """Packs pieces (dicts of arrays with leading length n, 1 <= n <= seq_len) into rows of seq_len tokens.

  `features` maps each packed feature to its padding value and must hold 'tokens', whose length is the
  piece length; other keys of a piece are dropped. Rows hold every feature padded to seq_len, plus
  'segment_ids' (1, 2, ... per piece, 0 on padding) and 'positions' (0, 1, ... per piece, 0 on padding),
  int32. See the module docstring for the algorithm, ordering and resume.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, features: Mapping[str, Any],
               buffer_docs: int = 1024, seed: int | None = None):
    super().__init__(parent)
    self._seq_len = _check_count('data.seq_len', seq_len, 'expected a positive number of tokens per row')
    self._buffer_docs = _check_count('data.pack_buffer', buffer_docs,
                                     'expected a positive number of pieces per packing window (1024 is typical)')
    if not isinstance(features, Mapping) or 'tokens' not in features:
      raise ValueError(f"features={features!r} must map feature names, 'tokens' among them, to padding values")
    clash = sorted(set(features) & set(ROW_KEYS))
    if clash:
      raise ValueError(f'features {clash} clash with the keys the packer adds to each row {ROW_KEYS}')
    self._features = dict(features)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
      raise DataError('train.seed', seed, 'is not valid', 'expected an integer seed (or None: rows in packing order)')
    self._seed = None if seed is None else int(seed)

  def __iter__(self) -> BestFitPackIterator:
    return BestFitPackIterator(self._parent.__iter__(), seq_len=self._seq_len, features=self._features,
                               buffer_docs=self._buffer_docs, seed=self._seed)

  def __str__(self) -> str:
    return f'BestFitPack(seq_len={self._seq_len}, buffer_docs={self._buffer_docs}, seed={self._seed})'


class BestFitPackIterator(grain.DatasetIterator):
  """Iterator of `BestFitPack`. State: {'parent': parent state at the window start, 'window': window index,
  'emitted': rows of that window already returned}."""

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, features: dict[str, Any], buffer_docs: int,
               seed: int | None):
    super().__init__(parent)
    self._seq_len = seq_len
    self._features = features
    self._buffer_docs = buffer_docs
    self._seed = seed
    self._start = copy.deepcopy(self._parent.get_state())
    self._window = 0
    self._emitted = 0
    self._packed: PackedWindow | None = None
    self._block: dict[str, np.ndarray] = {}  # Assembled rows [_block_start, _block_stop) of the window.
    self._block_start = self._block_stop = 0
    self._block_rows = max(1, BLOCK_TOKENS // seq_len)
    self._exhausted = False  # The parent raised StopIteration; never call it again until set_state.

  def get_state(self) -> dict[str, Any]:
    return {'parent': copy.deepcopy(self._start), 'window': self._window, 'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._start = copy.deepcopy(state['parent'])
    self._window = int(state['window'])
    self._emitted = int(state['emitted'])
    self._packed = None
    self._block, self._block_start, self._block_stop = {}, 0, 0
    self._exhausted = False

  def __next__(self) -> dict[str, np.ndarray]:
    if self._packed is None:
      self._load_window()
    if not self._block_start <= self._emitted < self._block_stop:
      self._block_start = self._emitted
      self._block_stop = min(self._packed.num_rows, self._emitted + self._block_rows)
      self._block = self._packed.rows(self._block_start, self._block_stop)
    i = self._emitted - self._block_start
    row = {name: rows[i] for name, rows in self._block.items()}
    self._emitted += 1
    if self._emitted == self._packed.num_rows:
      # The next window starts where the parent is now; recording it here keeps get_state() small.
      self._start = copy.deepcopy(self._parent.get_state())
      self._window += 1
      self._emitted = 0
      self._packed = None
      self._block, self._block_start, self._block_stop = {}, 0, 0
    return row

  def _load_window(self) -> None:
    pieces = []
    while not self._exhausted and len(pieces) < self._buffer_docs:
      try:
        pieces.append(next(self._parent))
      except StopIteration:
        self._exhausted = True
    if not pieces:
      raise StopIteration
    lengths = self._check_pieces(pieces)
    bin_of, num_bins = best_fit_bins(lengths, self._seq_len)
    if self._seed is not None:
      # SeedSequence takes non-negative entropy words; the modulus keeps negative seeds valid and distinct.
      rng = np.random.default_rng([self._seed % (1 << 64), self._window])
      bin_of = rng.permutation(num_bins)[bin_of]
    if not 0 <= self._emitted < num_bins:
      raise ValueError(f'iterator state emitted={self._emitted} does not match window {self._window}, which packs '
                       f'into {num_bins} rows; was the state saved from a differently built dataset?')
    self._packed = PackedWindow(pieces, lengths, bin_of, num_bins, self._seq_len, self._features)
    self._block, self._block_start, self._block_stop = {}, 0, 0

  def _check_pieces(self, pieces: list[Any]) -> np.ndarray:
    try:
      per_feature = {name: np.array([len(p[name]) for p in pieces], np.int64) for name in self._features}
    except (KeyError, TypeError) as e:
      raise ValueError(f'every piece must be a dict holding the packed features {sorted(self._features)} as '
                       f'arrays; one lacks {e}') from None
    lengths = per_feature['tokens']
    if lengths.max() > self._seq_len:
      raise DataError('data.seq_len', self._seq_len, f'is shorter than a piece of {int(lengths.max())} tokens',
                      'expected pieces of 1..seq_len tokens: cut documents into seq_len pieces before packing')
    if lengths.min() < 1:
      raise ValueError('pieces must hold at least one token; got an empty one')
    for name, n in per_feature.items():
      if not np.array_equal(n, lengths):
        bad = int(np.flatnonzero(n != lengths)[0])
        raise ValueError(f"feature {name!r} has {int(n[bad])} entries where 'tokens' has {int(lengths[bad])}; "
                         'every packed feature needs one entry per token')
    return lengths
