"""Tests of jaxtrain.data.packing: exact rows, best-fit placement, no token lost, fill, determinism, resume."""

from __future__ import annotations

import itertools
import json

import grain
import numpy as np
import pytest

from jaxtrain.data import DataError
from jaxtrain.data import packing
from jaxtrain.data.packing import BestFitPack, PackedWindow, _RoomTree, best_fit_bins

PAD = {'tokens': 0, 'loss_mask': 0, 'origin': -1}


def _pieces(lengths, start_id: int = 1) -> list[dict[str, np.ndarray]]:
  """Pieces whose token ids are consecutive and unique across the list, so every token can be traced."""
  out, next_id = [], start_id
  for i, n in enumerate(lengths):
    origin = np.stack([np.full(n, i, np.int32), np.arange(n, dtype=np.int32)], axis=1)
    out.append({'tokens': np.arange(next_id, next_id + n, dtype=np.int32),
                'loss_mask': (np.arange(n) % 2).astype(np.int32), 'origin': origin})
    next_id += n
  return out


def _source(pieces) -> grain.IterDataset:
  # grain's own iterator, so resume goes through a real grain parent state.
  return grain.MapDataset.source(pieces).to_iter_dataset(
      read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _pack(pieces, **kw) -> BestFitPack:
  kw.setdefault('features', PAD)
  return BestFitPack(_source(pieces), **kw)


def _segments(row):
  """(tokens, loss_mask, origin, positions) of each segment of a row, in order."""
  out = []
  for s in range(1, int(row['segment_ids'].max()) + 1):
    at = np.flatnonzero(row['segment_ids'] == s)
    assert np.array_equal(at, np.arange(at[0], at[-1] + 1)), 'a segment is not contiguous'
    out.append((row['tokens'][at], row['loss_mask'][at], row['origin'][at], row['positions'][at]))
  return out


def _random_lengths(rng, count, seq_len):
  return np.minimum(seq_len, np.maximum(1, rng.lognormal(np.log(seq_len / 5), 1.0, count))).astype(int).tolist()


def test_hand_made_rows_are_exact():
  # Arrival order 3, 8, 1, 6 tokens into rows of 10. Decreasing order places 8 (row 0), 6 (row 1), then 3 into
  # the tightest bin that holds it (row 1: room 4, not row 0: room 2), then 1 into row 1 (room 1), which fills
  # it. Row 1 lists its pieces in arrival order: 3, 1, 6.
  rows = list(_pack(_pieces([3, 8, 1, 6]), seq_len=10))
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]['tokens'], [4, 5, 6, 7, 8, 9, 10, 11, 0, 0])
  np.testing.assert_array_equal(rows[0]['segment_ids'], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows[0]['positions'], [0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
  np.testing.assert_array_equal(rows[0]['loss_mask'], [0, 1, 0, 1, 0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(rows[0]['origin'][:, 0], [1] * 8 + [-1, -1])
  np.testing.assert_array_equal(rows[0]['origin'][:, 1], list(range(8)) + [-1, -1])
  np.testing.assert_array_equal(rows[1]['tokens'], [1, 2, 3, 12, 13, 14, 15, 16, 17, 18])
  np.testing.assert_array_equal(rows[1]['segment_ids'], [1, 1, 1, 2, 3, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(rows[1]['positions'], [0, 1, 2, 0, 0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(rows[1]['origin'][:, 0], [0, 0, 0, 2, 3, 3, 3, 3, 3, 3])
  for row in rows:
    assert set(row) == {'tokens', 'loss_mask', 'origin', 'segment_ids', 'positions'}
    assert all(v.dtype == np.int32 for v in row.values())
    assert row['origin'].shape == (10, 2)


def test_padding_values_are_honoured():
  rows = list(_pack(_pieces([2, 3]), seq_len=8, features={'tokens': 7, 'loss_mask': 5, 'origin': -9}))
  assert len(rows) == 1
  # Arrival order within the row (not the decreasing placement order), then padding.
  np.testing.assert_array_equal(rows[0]['tokens'], [1, 2, 3, 4, 5, 7, 7, 7])
  np.testing.assert_array_equal(rows[0]['loss_mask'], [0, 1, 0, 1, 0, 5, 5, 5])
  np.testing.assert_array_equal(rows[0]['origin'][5:], np.full((3, 2), -9))
  np.testing.assert_array_equal(rows[0]['segment_ids'], [1, 1, 2, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]['positions'], [0, 1, 0, 1, 2, 0, 0, 0])


def test_features_not_named_are_dropped():
  rows = list(_pack(_pieces([2, 3]), seq_len=8, features={'tokens': 0}))
  assert set(rows[0]) == {'tokens', 'segment_ids', 'positions'}


def test_best_fit_where_first_fit_differs():
  # Sizes 8, 6, 3, 1 into bins of 10 (already decreasing). First-fit puts the 1 into the first bin with room
  # (the 8's, room 2): bins [8, 1], [6, 3]. Best-fit puts it where it leaves the least room: [8], [6, 3, 1].
  bins, count = best_fit_bins([8, 6, 3, 1], 10)
  assert count == 2
  np.testing.assert_array_equal(bins, [0, 1, 1, 1])
  # And 7, 4, 4, 2: first-fit gives [7, 2], [4, 4]; best-fit [7], [4, 4, 2] (room 2 beats room 3).
  np.testing.assert_array_equal(best_fit_bins([7, 4, 4, 2], 10)[0], [0, 1, 1, 1])


def test_room_tree_finds_the_tightest_room():
  rng = np.random.default_rng(0)
  for size in (1, 2, 7, 16, 100):
    tree, rooms = _RoomTree(size), []
    for _ in range(300):
      if rooms and rng.random() < 0.4:
        room = rooms.pop(int(rng.integers(len(rooms))))
        tree.add(room, -1)
      else:
        room = int(rng.integers(1, size + 1))
        rooms.append(room)
        tree.add(room, 1)
      n = int(rng.integers(1, size + 1))
      assert tree.tightest(n) == min((r for r in rooms if r >= n), default=0)


def _best_fit_decreasing_by_scan(lengths, seq_len):
  """Reference: the same algorithm with a linear scan (ties: any bin; bins of equal room are interchangeable)."""
  rooms = []
  for n in sorted(lengths, reverse=True):
    fits = [b for b, r in enumerate(rooms) if r >= n]
    if fits:
      b = min(fits, key=lambda b: rooms[b])
      rooms[b] -= n
    else:
      rooms.append(seq_len - n)
  return sorted(seq_len - r for r in rooms)


@pytest.mark.parametrize('seq_len', [16, 100, 2048])
def test_best_fit_bins_match_a_linear_scan(seq_len):
  rng = np.random.default_rng(seq_len)
  lengths = _random_lengths(rng, 500, seq_len)
  bins, count = best_fit_bins(lengths, seq_len)
  fills = np.bincount(bins, weights=lengths, minlength=count)
  assert fills.max() <= seq_len and fills.min() > 0
  np.testing.assert_array_equal(np.sort(fills), _best_fit_decreasing_by_scan(lengths, seq_len))


@pytest.mark.parametrize('seed', [None, 3])
def test_every_token_once_pieces_whole_and_in_order(seed):
  rng = np.random.default_rng(1)
  seq_len, buffer = 32, 25
  lengths = _random_lengths(rng, 130, seq_len)
  pieces = _pieces(lengths)
  rows = list(_pack(pieces, seq_len=seq_len, buffer_docs=buffer, seed=seed))
  by_first = {int(p['tokens'][0]): (i, p) for i, p in enumerate(pieces)}
  seen = []
  for r, row in enumerate(rows):
    segments = _segments(row)
    assert int(np.count_nonzero(row['segment_ids'])) == sum(len(s[0]) for s in segments)
    assert (row['segment_ids'][sum(len(s[0]) for s in segments):] == 0).all(), 'padding is not at the end'
    windows = set()
    for tokens, mask, origin, positions in segments:
      i, piece = by_first[int(tokens[0])]
      # The segment is the whole piece, in order, with its features beside its tokens.
      np.testing.assert_array_equal(tokens, piece['tokens'])
      np.testing.assert_array_equal(mask, piece['loss_mask'])
      np.testing.assert_array_equal(origin, piece['origin'])
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))
      seen.append(i)
      windows.add(i // buffer)
    assert len(windows) == 1, f'row {r} mixes windows {windows}'
  assert sorted(seen) == list(range(len(pieces)))
  all_tokens = np.concatenate([row['tokens'][row['segment_ids'] > 0] for row in rows])
  np.testing.assert_array_equal(np.sort(all_tokens), np.arange(1, sum(lengths) + 1))


def test_fill_on_a_log_normal_stream():
  rng = np.random.default_rng(2)
  seq_len = 2048
  docs = np.maximum(1, rng.lognormal(np.log(600), 1.5, 3000)).astype(int)
  lengths = [min(seq_len, n - s) for n in docs for s in range(0, n, seq_len)]
  pieces = [{'tokens': np.ones(n, np.int32)} for n in lengths]
  real = rows = 0
  for row in _pack(pieces, seq_len=seq_len, buffer_docs=1024, seed=0, features={'tokens': 0}):
    rows += 1
    real += int(np.count_nonzero(row['segment_ids']))
  assert real == sum(lengths)
  assert len(pieces) > 4 * 1024  # Several windows, the last one partial.
  assert real / (rows * seq_len) >= 0.99


def test_output_is_deterministic_given_the_seed():
  rng = np.random.default_rng(4)
  pieces = _pieces(_random_lengths(rng, 90, 24))

  def run(seed):
    return [row['tokens'].tolist() for row in _pack(pieces, seq_len=24, buffer_docs=30, seed=seed)]

  first = run(5)
  assert run(5) == first
  other, unshuffled = run(6), run(None)
  assert other != first and unshuffled != first
  assert sorted(map(tuple, other)) == sorted(map(tuple, first)) == sorted(map(tuple, unshuffled))
  assert run(None) == unshuffled
  # The seed shuffles rows only within a window: the first window's rows stay first.
  n = len(list(_pack(pieces[:30], seq_len=24, buffer_docs=30)))
  assert sorted(map(tuple, first[:n])) == sorted(map(tuple, unshuffled[:n])) != sorted(map(tuple, first[n:2 * n]))


def test_any_block_of_rows_equals_the_same_rows_of_the_whole_window(monkeypatch):
  rng = np.random.default_rng(6)
  lengths = np.array(_random_lengths(rng, 40, 16))
  pieces = _pieces(lengths)
  bins, count = best_fit_bins(lengths, 16)
  window = PackedWindow(pieces, lengths, bins, count, 16, PAD)
  whole = window.rows(0, count)
  assert whole['tokens'].shape == (count, 16) and whole['origin'].shape == (count, 16, 2)
  for start, stop in [(0, 1), (3, 7), (count - 2, count), (5, 6)]:
    block = window.rows(start, stop)
    for key in whole:
      np.testing.assert_array_equal(block[key], whole[key][start:stop])
  # The iterator, one row per block, yields the whole window's rows in order.
  monkeypatch.setattr(packing, 'BLOCK_TOKENS', 1)
  rows = list(_pack(pieces, seq_len=16, buffer_docs=len(pieces)))
  for key in whole:
    np.testing.assert_array_equal(np.stack([r[key] for r in rows]), whole[key])


@pytest.mark.parametrize('seed', [None, 11])
@pytest.mark.parametrize('block_tokens', [packing.BLOCK_TOKENS, 60])
def test_resume_continues_bitwise_identically(seed, block_tokens, monkeypatch):
  # 60 tokens = blocks of 3 rows, so restores land inside, at the start of and at the end of blocks.
  monkeypatch.setattr(packing, 'BLOCK_TOKENS', block_tokens)
  rng = np.random.default_rng(5)
  pieces = _pieces(_random_lengths(rng, 60, 20))
  ds = _pack(pieces, seq_len=20, buffer_docs=9, seed=seed)
  reference = list(ds)
  it = iter(ds)
  states = []
  for _ in range(len(reference)):
    states.append(json.loads(json.dumps(it.get_state())))
    next(it)
  states.append(json.loads(json.dumps(it.get_state())))
  # Mid-window and window-boundary states both occur; every state restores the exact remaining stream.
  assert {s['emitted'] > 0 for s in states} == {True, False}
  assert states[-1]['window'] >= 6
  for k, state in enumerate(states):
    assert len(json.dumps(state)) < 200
    resumed = iter(_pack(pieces, seq_len=20, buffer_docs=9, seed=seed))
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - k
    for a, b in zip(rest, reference[k:], strict=True):
      assert a.keys() == b.keys()
      for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (k, key)


def test_finite_parent_flushes_partial_bins_then_stops():
  lengths = [5, 9, 2, 7, 1, 4, 6]
  it = iter(_pack(_pieces(lengths), seq_len=10, buffer_docs=4))
  rows = list(itertools.islice(it, 100))
  # Window 1 (5, 9, 2, 7) -> [9], [7, 2], [5]; window 2 (1, 4, 6) -> [6, 4], [1]: partial bins come out once.
  assert [int(np.count_nonzero(r['segment_ids'])) for r in rows] == [9, 9, 5, 10, 1]
  with pytest.raises(StopIteration):
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  ended = iter(_pack(_pieces(lengths), seq_len=10, buffer_docs=4))
  ended.set_state(it.get_state())
  with pytest.raises(StopIteration):
    next(ended)


def test_user_errors_name_the_key():
  with pytest.raises(DataError, match=r"data.seq_len=4 is shorter than a piece of 5 tokens"):
    list(_pack(_pieces([3, 5]), seq_len=4))
  with pytest.raises(DataError, match=r'data.pack_buffer=0 is not valid'):
    _pack(_pieces([3]), seq_len=4, buffer_docs=0)
  with pytest.raises(DataError, match=r'data.seq_len=True is not valid'):
    _pack(_pieces([3]), seq_len=True)
  with pytest.raises(ValueError, match=r"'tokens' among them"):
    _pack(_pieces([3]), seq_len=4, features={'loss_mask': 0})
  with pytest.raises(ValueError, match=r'clash'):
    _pack(_pieces([3]), seq_len=4, features={'tokens': 0, 'positions': 0})
  bad = _pieces([3])
  bad[0]['loss_mask'] = bad[0]['loss_mask'][:2]
  with pytest.raises(ValueError, match=r"feature 'loss_mask' has 2 entries where 'tokens' has 3"):
    list(_pack(bad, seq_len=4))
  with pytest.raises(ValueError, match=r'lacks'):
    list(_pack([{'tokens': np.ones(2, np.int32)}], seq_len=4))
