"""Fill, truncation and speed of jaxtrain's best-fit packer against grain's first-fit and best-fit packers.

  .venv/bin/python benchmarks/packing.py                      # 8M tokens per stream, seq_len 2048 and 8192
  .venv/bin/python benchmarks/packing.py --tokens=1e6         # quick

Every packer drains the same in-memory stream of pieces (dicts of int32 'tokens' [n], 'loss_mask' [n] and
'origin' [n, 2], as the pipeline makes them), from a minimal list iterator so the parent costs well under
a microsecond per piece. Two length distributions, both cut into seq_len pieces as the pipeline does:
  stdlib     the embedded corpus: each train file of the standard library is one document of
             ceil(bytes / 3.5) + 1 tokens (bytes/3.5 approximates the built BPE; +1 is EOS), in a seeded
             random order, cycled until the stream holds --tokens;
  lognormal  document lengths ~ LogNormal(log 600, 1.5): median 600 tokens, mean ~1,850, 1% over ~20,000.
Grain's packers get the pipeline's settings (tokens segmented, loss_mask and origin as meta features,
shuffle_bins with seed 0) at two bin counts: 64 (the pipeline's MIN_PACKING_BINS) and the number of rows
one of our windows fills on average (a comparable look-ahead). They raise on over-long pieces instead of
truncating; truncation is measured anyway as input tokens minus real output tokens. Fill is real tokens /
(rows x seq_len); tokens/s counts input tokens over the wall time of draining the packer, the fastest of
--repeats interleaved passes; "vs grain" is our tokens/s over the fastest grain row of the same stream.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxtrain.data import list_files  # noqa: E402
from jaxtrain.data.packing import BestFitPack  # noqa: E402
from jaxtrain.config.defaults import base_config  # noqa: E402

PAD = {'tokens': 0, 'loss_mask': 0, 'origin': -1}
BYTES_PER_TOKEN = 3.5


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--tokens', type=float, default=8e6, help='tokens per stream')
  p.add_argument('--streams', default='stdlib,lognormal')
  p.add_argument('--seq_lens', default='2048,8192')
  p.add_argument('--buffer', type=int, default=1024, help='our look-ahead window, in pieces')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--repeats', type=int, default=3, help='passes per packer, interleaved; the fastest counts')
  return p.parse_args()


class _ListSource(grain.IterDataset):
  """The pieces of a list, in order; state {'next': index}."""

  def __init__(self, items: list[dict[str, np.ndarray]]):
    super().__init__()
    self._items = items

  def __iter__(self) -> _ListIterator:
    return _ListIterator(self._items)


class _ListIterator(grain.DatasetIterator):
  def __init__(self, items: list[dict[str, np.ndarray]]):
    super().__init__()
    self._items = items
    self._next = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self._next >= len(self._items):
      raise StopIteration
    self._next += 1
    return self._items[self._next - 1]

  def get_state(self) -> dict[str, int]:
    return {'next': self._next}

  def set_state(self, state: dict[str, int]) -> None:
    self._next = state['next']


def stdlib_lengths(rng: np.random.Generator, total: int) -> np.ndarray:
  """Document lengths (tokens, EOS included) of the stdlib train files, shuffled and cycled to `total`."""
  sizes = np.array([os.path.getsize(f) for f in list_files(base_config().data, 'train')], np.int64)
  sizes = sizes[sizes > 0]
  tokens = np.ceil(sizes / BYTES_PER_TOKEN).astype(np.int64) + 1
  out, have = [], 0
  while have < total:
    epoch = rng.permutation(tokens)
    out.append(epoch)
    have += int(epoch.sum())
  lengths = np.concatenate(out)
  return lengths[:int(np.searchsorted(np.cumsum(lengths), total)) + 1]


def lognormal_lengths(rng: np.random.Generator, total: int) -> np.ndarray:
  lengths = np.maximum(1, rng.lognormal(math.log(600), 1.5, int(total / 1500) + 1000)).astype(np.int64)
  return lengths[:int(np.searchsorted(np.cumsum(lengths), total)) + 1]


def make_pieces(lengths: np.ndarray, seq_len: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """Cuts each document into consecutive seq_len pieces (the last shorter), with pipeline-like features."""
  pieces = []
  for doc, n in enumerate(lengths.tolist()):
    ids = rng.integers(1, 4096, n, dtype=np.int32)
    chunked = n > seq_len
    for k, start in enumerate(range(0, n, seq_len)):
      tokens = ids[start:start + seq_len]
      origin = np.empty((len(tokens), 2), np.int32)
      origin[:, 0] = doc
      origin[:, 1] = k if chunked else -1
      pieces.append({'tokens': tokens, 'loss_mask': np.ones(len(tokens), np.int32), 'origin': origin})
  return pieces


def drain(ds: grain.IterDataset, segment_key: str) -> tuple[float, int, int]:
  """(seconds, rows, real tokens) of one full pass over `ds`."""
  rows = real = 0
  t = time.perf_counter()
  for row in ds:
    rows += 1
    real += int(np.count_nonzero(row[segment_key]))
  return time.perf_counter() - t, rows, real


def packers(source: grain.IterDataset, seq_len: int, buffer: int, window_rows: int,
            seed: int) -> list[tuple[str, Callable[[], grain.IterDataset], str]]:
  """(label, dataset factory, key of the segment ids) of every packer compared."""
  length = {k: seq_len for k in PAD}

  def grain_pack(cls, bins):
    return lambda: cls(source, length_struct=length, num_packing_bins=bins, seed=seed, shuffle_bins=True,
                       meta_features=('loss_mask', 'origin'), padding_struct=PAD)

  found = [(f'jaxtrain BestFitPack, buffer {buffer}',
            lambda: BestFitPack(source, seq_len=seq_len, features=PAD, buffer_docs=buffer, seed=seed), 'segment_ids')]
  for bins in sorted({64, window_rows}):
    found.append((f'grain FirstFit, {bins} bins', grain_pack(grain.experimental.FirstFitPackIterDataset, bins),
                  'tokens_segment_ids'))
    found.append((f'grain BestFit, {bins} bins', grain_pack(grain.experimental.BestFitPackIterDataset, bins),
                  'tokens_segment_ids'))
  return found


def main() -> None:
  args = parse_args()
  total = int(args.tokens)
  print(f'{total:,} tokens per stream, {os.cpu_count()} CPUs, grain {grain.__version__}\n')
  print('| stream | seq_len | packer | rows | fill | truncated | tokens/s | vs grain |')
  print('|---|---|---|---|---|---|---|---|')
  for dist in args.streams.split(','):
    for seq_len in (int(s) for s in args.seq_lens.split(',')):
      rng = np.random.default_rng(args.seed)
      lengths = stdlib_lengths(rng, total) if dist == 'stdlib' else lognormal_lengths(rng, total)
      pieces = make_pieces(lengths, seq_len, rng)
      source = _ListSource(pieces)
      given = sum(len(p['tokens']) for p in pieces)
      window_rows = max(1, round(args.buffer * given / len(pieces) / seq_len))
      compared = packers(source, seq_len, args.buffer, window_rows, args.seed)
      best = {}
      for _ in range(args.repeats):  # Interleaved, so a burst of load from elsewhere hits every packer alike.
        for label, make, key in compared:
          seconds, rows, real = drain(make(), key)
          best[label] = min(best.get(label, (np.inf,)), (seconds, rows, real))
      results = [(label, rows, real / (rows * seq_len), (given - real) / given, given / seconds)
                 for label, (seconds, rows, real) in best.items()]
      fastest_grain = max(r[4] for r in results if r[0].startswith('grain'))
      stream = f'{dist} ({len(pieces):,} pieces, mean {given / len(pieces):,.0f})'
      for label, rows, fill, truncated, speed in results:
        ratio = f'{speed / fastest_grain:.1f}x' if label.startswith('jaxtrain') else ''
        print(f'| {stream} | {seq_len} | {label} | {rows:,} | {100 * fill:.2f}% | {100 * truncated:.2f}% | '
              f'{speed / 1e6:.2f}M | {ratio} |')


if __name__ == '__main__':
  main()
