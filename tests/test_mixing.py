"""Tests of jaxtrain.data.mixing: target shares, the deficit rule's token shares, end policies, resume, stats."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import pytest

from jaxtrain.data.mixing import Mix, mixture_weights
from jaxtrain.data.packing import BestFitPack
from jaxtrain.data.sources import DataError
from jaxtrain.errors import UserError

# Synchronous reads: the tests re-create many small iterators, and thread pools would dominate their runtime.
SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
TAGS = {'a': 1, 'b': 2, 'c': 3}


def _doc(tag: int, base_len: int, i: int) -> dict[str, np.ndarray]:
  # Token values encode (source, document index), so every element says where it came from; 'feat' rides along.
  n = base_len + (i * 7) % 5
  tokens = np.full(n, tag * 100_000 + i, np.int32)
  return {'tokens': tokens, 'feat': np.arange(n, dtype=np.int32) * tag}


def _source(name: str, n_docs: int, base_len: int, *, repeat: bool = False, threads: bool = False,
            seed: int | None = None) -> grain.IterDataset:
  ds = grain.MapDataset.range(n_docs)
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(lambda i, tag=TAGS[name], b=base_len: _doc(tag, b, int(i)))
  return ds.to_iter_dataset() if threads else ds.to_iter_dataset(SYNC)


def _origin(element: dict[str, np.ndarray]) -> tuple[str, int]:
  value = int(element['tokens'][0])
  name = {v: k for k, v in TAGS.items()}[value // 100_000]
  return name, value % 100_000


def _same(xs: list, ys: list) -> bool:
  return len(xs) == len(ys) and all(
      x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(xs, ys, strict=True))


def _take(it, n: int) -> list:
  out = []
  for _ in range(n):
    try:
      out.append(next(it))
    except StopIteration:
      break
  return out


# ----------------------------------------------------------------------------- mixture_weights


def test_explicit_weights_are_normalised_exactly():
  assert mixture_weights({'a': 10, 'b': 20}, {'a': 1, 'b': 3}, None) == {'a': 0.25, 'b': 0.75}
  # A zero weight leaves the source out; the order follows token_counts.
  assert list(mixture_weights({'b': 5, 'a': 1}, {'a': 0.0, 'b': 2.0}, None).items()) == [('b', 1.0), ('a', 0.0)]


@pytest.mark.parametrize('temperature, expected', [
    (1.0, {'a': 100 / 1400, 'b': 400 / 1400, 'c': 900 / 1400}),  # proportional to tokens
    (2.0, {'a': 10 / 60, 'b': 20 / 60, 'c': 30 / 60}),  # square roots: 10, 20, 30
    (0.5, {'a': 1e4 / 98e4, 'b': 16e4 / 98e4, 'c': 81e4 / 98e4}),  # squares
])
def test_temperature_formula_on_hand_computed_counts(temperature, expected):
  got = mixture_weights({'a': 100, 'b': 400, 'c': 900}, None, temperature)
  assert list(got) == ['a', 'b', 'c']
  assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_temperature_limits_and_no_overflow():
  flat = mixture_weights({'a': 100, 'b': 400, 'c': 900}, None, 1e6)
  assert max(abs(v - 1 / 3) for v in flat.values()) < 1e-5  # T -> inf: uniform
  # 1e12 ** 20 overflows a float; the ratio form does not: b gets (1e11 / 1e12) ** 20 of a's weight.
  sharp = mixture_weights({'a': 10**12, 'b': 10**11, 'z': 0}, None, 0.05)
  assert sharp['b'] == pytest.approx(1e-20 / (1 + 1e-20), rel=1e-9)
  assert sharp['a'] == pytest.approx(1.0, rel=1e-15) and sharp['z'] == 0.0


@pytest.mark.parametrize('counts, weights, temperature, message', [
    ({'a': 1, 'b': 2}, {'a': 1.0}, None,
     "data.sources.b.weight=None is missing; expected a weight for every source (data.sources.<name>.weight) or "
     "data.temperature, not both; sources: ['a', 'b'], weights given for ['a']"),
    ({'a': 1}, {'a': 1.0, 'x': 2.0}, None,
     "data.sources.x.weight=2.0 names no source; expected weights only for the sources ['a']"),
    ({'a': 1, 'b': 2}, {'a': 1.0, 'b': -0.5}, None,
     'data.sources.b.weight=-0.5 is negative; expected a finite weight >= 0 (0 leaves the source out)'),
    ({'a': 1, 'b': 2}, {'a': 0, 'b': 0.0}, None,
     "data.sources.*.weight={'a': 0.0, 'b': 0.0} are all zero; expected at least one positive weight"),
    ({'a': 1}, {'a': float('nan')}, None, 'data.sources.a.weight=nan is not finite; expected a finite weight >= 0'),
    ({'a': 1}, {'a': float('inf')}, None, 'data.sources.a.weight=inf is not finite; expected a finite weight >= 0'),
    ({'a': 1}, {'a': '1'}, None, "data.sources.a.weight='1' is not a number; expected a finite weight >= 0"),
    ({'a': 1}, None, 0.0,
     'data.temperature=0.0 is not valid; expected a finite temperature > 0 (1: proportional to tokens, larger: '
     'flatter; equal weights for uniform)'),
    ({'a': 1}, None, -1.0, 'data.temperature=-1.0 is not valid; expected a finite temperature > 0 (1: proportional '
     'to tokens, larger: flatter; equal weights for uniform)'),
    ({'a': 1}, None, float('nan'), 'data.temperature=nan is not valid; expected a finite temperature > 0 (1: '
     'proportional to tokens, larger: flatter; equal weights for uniform)'),
    ({'a': 1}, None, float('inf'), 'data.temperature=inf is not valid; expected a finite temperature > 0 (1: '
     'proportional to tokens, larger: flatter; equal weights for uniform)'),
    ({'a': 1}, {'a': 1.0}, 1.0, 'data.temperature=1.0 is set together with per-source weights; expected a weight '
     'for every source (data.sources.<name>.weight) or data.temperature, not both'),
    ({'a': 1}, None, None, 'data.temperature=None is unset and no source has a weight; expected a weight for every '
     'source (data.sources.<name>.weight) or data.temperature, not both'),
    ({'a': 0, 'b': 0}, None, 1.0,
     "data.sources={'a': 0, 'b': 0} hold no tokens; expected at least one source with tokens"),
    ({'a': -3}, None, 1.0, 'data.sources.a=-3 has an invalid token count; expected an integer count >= 0'),
    ({}, None, 1.0, 'data.sources={} names no source; expected at least one named source'),
])
def test_mixture_weights_errors(counts, weights, temperature, message):
  with pytest.raises(DataError) as e:
    mixture_weights(counts, weights, temperature)
  assert str(e.value) == message and '\n' not in message


def test_mix_config_errors():
  a, b = _source('a', 3, 4), _source('b', 3, 4)
  with pytest.raises(DataError, match=r"^data\.sources\.b\.on_end='loop' is not valid; expected one of \('repeat'"):
    Mix({'a': a, 'b': b}, {'a': 1, 'b': 1}, {'a': 'drop', 'b': 'loop'})
  with pytest.raises(DataError, match=r'^data\.sources\.b\.on_end=None is missing; '):
    Mix({'a': a, 'b': b}, {'a': 1, 'b': 1}, {'a': 'drop'})
  with pytest.raises(DataError, match=r"^data\.sources\.x\.on_end='stop' names no source; "):
    Mix({'a': a}, {'a': 1}, {'a': 'drop', 'x': 'stop'})
  with pytest.raises(DataError, match=r'^data\.sources\.a\.weight=-1\.0 is negative; '):
    Mix({'a': a, 'b': b}, {'a': -1.0, 'b': 1})
  with pytest.raises(TypeError, match=r"parents\['a'\] is a RangeMapDataset; expected a grain\.IterDataset"):
    Mix({'a': grain.MapDataset.range(3)}, {'a': 1})


# ----------------------------------------------------------------------------- shares and determinism


def test_first_picks_follow_the_deficit_rule():
  # Equal shares, every element of a 10 tokens long, of b 30.
  def fixed(name: str, length: int) -> grain.IterDataset:
    tag = TAGS[name]
    return grain.MapDataset.range(100).map(lambda i: {'tokens': np.full(length, tag * 100_000 + i, np.int32)}
                                           ).to_iter_dataset(SYNC)
  parents = {'a': fixed('a', 10), 'b': fixed('b', 30)}
  it = iter(Mix(parents, {'a': 0.5, 'b': 0.5}))
  # By hand: tie at 0 -> a (10, 0); b (10, 30); a, a -> (30, 30) tie -> a (40, 30); b (40, 60); a a a; b ...
  assert [_origin(next(it))[0] for _ in range(10)] == ['a', 'b', 'a', 'a', 'a', 'b', 'a', 'a', 'a', 'b']


def _check_bounds(mix: Mix, n: int, longest: int) -> dict:
  """Draws n elements, checking the deficit rule's bounds after each; returns the final stats."""
  it = iter(mix)
  k = len(mix.names)
  counted = collections.Counter()
  for _ in range(n):
    element = next(it)
    counted[_origin(element)[0]] += len(element['tokens'])
    total = sum(counted.values())
    for name, share in mix.shares.items():
      gap = share * total - counted[name]  # > 0: behind its target
      assert -longest - 1e-9 <= gap <= (k - 1) * longest + 1e-9, (name, gap)
  stats = it.stats()
  assert {name: s['tokens'] for name, s in stats.items()} == dict(counted)
  return stats


def test_token_shares_follow_explicit_weights():
  # Elements of 4..8, 50..54 and 200..204 tokens: per element, c is rare, per token it holds its 20%.
  mix = Mix({'a': _source('a', 7, 4), 'b': _source('b', 11, 50), 'c': _source('c', 5, 200, repeat=True)},
            {'a': 0.5, 'b': 0.3, 'c': 0.2})
  stats = _check_bounds(mix, 3000, longest=204)
  total = sum(s['tokens'] for s in stats.values())
  assert total > 25_000
  for name, target in {'a': 0.5, 'b': 0.3, 'c': 0.2}.items():
    assert stats[name]['share'] == stats[name]['tokens'] / total
    assert abs(stats[name]['share'] - target) < 204 / total * 2
  elements = {n: s['elements'] for n, s in stats.items()}
  assert elements['a'] > 20 * elements['c']  # element counts are nowhere near the token shares


def test_token_shares_follow_temperature():
  lengths, docs = {'a': 4, 'b': 50, 'c': 200}, {'a': 30, 'b': 12, 'c': 3}
  counts = {n: sum(_doc(TAGS[n], lengths[n], i)['tokens'].size for i in range(docs[n])) for n in lengths}
  shares = mixture_weights(counts, None, 2.0)
  root = {n: c ** 0.5 for n, c in counts.items()}
  assert shares == pytest.approx({n: r / sum(root.values()) for n, r in root.items()}, rel=1e-12)
  mix = Mix({n: _source(n, docs[n], lengths[n]) for n in lengths}, shares)
  stats = _check_bounds(mix, 2000, longest=204)
  total = sum(s['tokens'] for s in stats.values())
  for name in lengths:
    assert abs(stats[name]['share'] - shares[name]) < 2 * 204 / total


def test_output_is_deterministic_and_elements_pass_through():
  def build():
    return Mix({'a': _source('a', 5, 3, seed=7, repeat=True), 'b': _source('b', 4, 9, threads=True)},
               {'a': 2.0, 'b': 1.0})
  first, second = _take(iter(build()), 200), _take(iter(build()), 200)
  assert _same(first, second)
  for element in first:
    name, i = _origin(element)
    assert _same([element], [_doc(TAGS[name], 3 if name == 'a' else 9, i)])


# ----------------------------------------------------------------------------- end policies


def test_repeat_restarts_a_finite_parent_and_counts_epochs():
  it = iter(Mix({'a': _source('a', 3, 5), 'b': _source('b', 4, 5, repeat=True)}, {'a': 1, 'b': 1}, 'repeat'))
  seen = [_origin(e) for e in _take(it, 40)]
  a_docs = [i for name, i in seen if name == 'a']
  assert len(a_docs) >= 10 and a_docs == [j % 3 for j in range(len(a_docs))]
  stats = it.stats()
  # An epoch counts when the parent's end is seen, i.e. when its next element is asked for.
  assert stats['a']['elements'] == len(a_docs) and stats['a']['epochs'] == (len(a_docs) - 1) // 3
  assert stats['b']['epochs'] == 0 and not stats['a']['dropped']


def test_drop_removes_a_source_and_renormalises():
  it = iter(Mix({'a': _source('a', 4, 5), 'b': _source('b', 3, 5, repeat=True), 'c': _source('c', 3, 5, repeat=True)},
                {'a': 0.5, 'b': 0.25, 'c': 0.25}, {'a': 'drop', 'b': 'repeat', 'c': 'repeat'}))
  seen = [_origin(e)[0] for e in _take(it, 60)]
  assert seen.count('a') == 4 and len(seen) == 60
  after = seen[max(i for i, n in enumerate(seen) if n == 'a') + 1:]
  stats = it.stats()
  # a's documents hold 5 + (i * 7) % 5 tokens: 5, 7, 9, 6.
  assert stats['a'] == {'tokens': 27, 'elements': 4, 'epochs': 1, 'dropped': True,
                        'share': 27 / sum(s['tokens'] for s in stats.values()), 'target': 0.0}
  assert stats['b']['target'] == stats['c']['target'] == 0.5
  # b and c alternate with equal token counts after the drop (equal shares, equal-length documents on average).
  assert abs(after.count('b') - after.count('c')) <= 1
  assert abs(stats['b']['tokens'] - stats['c']['tokens']) <= 9


def test_after_a_drop_the_others_keep_their_relative_shares():
  # a holds ~1,000 tokens at share 0.6; after it is dropped, b and c split their own tokens 3:1, within one
  # element, as if a had never been there (its tokens must not count in the renormalised deficits).
  it = iter(Mix({'a': _source('a', 10, 100), 'b': _source('b', 3, 5, repeat=True), 'c': _source('c', 3, 5,
                                                                                                 repeat=True)},
                {'a': 0.6, 'b': 0.3, 'c': 0.1}, {'a': 'drop', 'b': 'repeat', 'c': 'repeat'}))
  _take(it, 600)
  stats = it.stats()
  assert stats['a']['dropped'] and stats['a']['tokens'] == 1020
  assert (stats['b']['target'], stats['c']['target']) == pytest.approx((0.75, 0.25), rel=1e-15)
  remaining = stats['b']['tokens'] + stats['c']['tokens']
  assert remaining > 2000
  for name in 'bc':
    assert -9 <= stats[name]['target'] * remaining - stats[name]['tokens'] <= 9


def test_mixture_ends_when_every_source_is_dropped():
  mix = Mix({'a': _source('a', 5, 2), 'b': _source('b', 3, 20)}, {'a': 0.9, 'b': 0.1}, 'drop')
  it = iter(mix)
  seen = sorted(_origin(e) for e in it)
  assert seen == [('a', i) for i in range(5)] + [('b', i) for i in range(3)]
  with pytest.raises(StopIteration):
    next(it)
  assert it.get_state()['ended'] and all(s['dropped'] for s in it.stats().values())


def test_stop_ends_the_mixture_cleanly_through_a_map():
  mix = Mix({'a': _source('a', 3, 5), 'b': _source('b', 2, 5, repeat=True)}, {'a': 0.5, 'b': 0.5},
            {'a': 'stop', 'b': 'repeat'})
  out = list(mix.map(lambda e: _origin(e)))  # a StopIteration leaking from a parent would break the map
  assert [n for n, _ in out].count('a') == 3 and out[-1][0] == 'b'  # ends when a's 4th element is asked for
  it = iter(mix)
  for _ in range(len(out)):
    next(it)
  for _ in range(2):
    with pytest.raises(StopIteration):
      next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state['ended'] and state['epochs'] == {'a': 1, 'b': 0}
  fresh = iter(mix)
  fresh.set_state(state)
  with pytest.raises(StopIteration):
    next(fresh)


def test_zero_share_source_is_never_read():
  def boom(i):
    raise AssertionError('read a source of share 0')
  silent = grain.MapDataset.range(3).map(boom).to_iter_dataset(SYNC)
  it = iter(Mix({'a': _source('a', 4, 3), 'z': silent}, {'a': 1.0, 'z': 0.0}, 'drop'))
  assert [_origin(e) for e in it] == [('a', i) for i in range(4)]
  assert it.stats()['z'] == {'tokens': 0, 'elements': 0, 'epochs': 0, 'dropped': False, 'share': 0.0, 'target': 0.0}


def test_repeat_of_an_empty_source_is_a_config_error():
  empty = grain.MapDataset.range(0).to_iter_dataset(SYNC)
  it = iter(Mix({'a': empty, 'b': _source('b', 3, 3)}, {'a': 1, 'b': 1}, 'repeat'))
  with pytest.raises(DataError, match=r"^data\.sources\.a\.on_end='repeat' is set for a source that yields no "):
    next(it)


# ----------------------------------------------------------------------------- resume


def _resume_cases():
  def repeat_mix():
    return Mix({'a': _source('a', 3, 4), 'b': _source('b', 6, 30, seed=3, repeat=True),
                'c': _source('c', 5, 11, threads=True)}, {'a': 0.3, 'b': 0.5, 'c': 0.2}, 'repeat')

  def drop_mix():
    return Mix({'a': _source('a', 4, 6), 'b': _source('b', 9, 6), 'c': _source('c', 8, 8)},
               {'a': 0.4, 'b': 0.4, 'c': 0.2}, {'a': 'drop', 'b': 'drop', 'c': 'stop'})

  def filtered_mix():
    # An IterDataset chain after to_iter_dataset (filter + map) as a parent.
    b = grain.MapDataset.range(20).to_iter_dataset(SYNC).filter(lambda i: i % 3 != 0).map(
        lambda i: _doc(TAGS['b'], 7, int(i)))
    return Mix({'a': _source('a', 5, 5), 'b': b}, {'a': 0.5, 'b': 0.5}, {'a': 'repeat', 'b': 'drop'})

  return {'repeat': (repeat_mix, 120), 'drop_then_stop': (drop_mix, 40), 'filtered': (filtered_mix, 60)}


@pytest.mark.parametrize('case', ['repeat', 'drop_then_stop', 'filtered'])
def test_resume_is_bitwise_identical(case):
  build, n = _resume_cases()[case]
  reference_it = iter(build())
  reference = _take(reference_it, n)
  if case == 'drop_then_stop':
    assert len(reference) < n  # the mixture ended: resume points below cover a drop, a stop and the end
  points = sorted({0, 1, 5, len(reference) // 2, len(reference) - 1, len(reference)})
  restarts = []
  for k in points:
    it = iter(build())
    _take(it, k)
    state = it.get_state()
    restored = iter(build())
    restored.set_state(json.loads(json.dumps(state)))
    assert restored.get_state() == state and restored.stats() == it.stats()
    assert _same(_take(restored, n - k), reference[k:])
    restarts.append((sum(state['epochs'].values()), sum(state['dropped'].values())))
  if case == 'repeat':
    assert restarts[2][0] == 0 and restarts[-1][0] > 0  # points before and after restarts of finite parents
  if case == 'drop_then_stop':
    assert restarts[0][1] == 0 and restarts[-2][1] >= 1  # points before and after a drop


def test_rewinding_to_before_a_drop_on_the_same_iterator():
  build, n = _resume_cases()['drop_then_stop']
  reference = _take(iter(build()), n)
  it = iter(build())
  _take(it, 3)
  early = it.get_state()
  _take(it, n)  # past both drops and the stop
  assert it.get_state()['ended']
  it.set_state(early)
  assert _same(_take(it, n), reference[3:])


def test_resume_through_a_packer():
  def build():
    mix = Mix({'a': _source('a', 6, 3), 'b': _source('b', 4, 13, repeat=True)}, {'a': 0.5, 'b': 0.5})
    return grain.experimental.FirstFitPackIterDataset(mix, length_struct={'tokens': 32, 'feat': 32},
                                                      num_packing_bins=4, shuffle_bins=False)
  reference = _take(iter(build()), 30)
  it = iter(build())
  _take(it, 11)
  restored = iter(build())
  restored.set_state(json.loads(json.dumps(it.get_state())))
  assert _same(_take(restored, 19), reference[11:])


def test_state_of_other_sources_is_rejected():
  state = iter(Mix({'a': _source('a', 3, 3), 'b': _source('b', 3, 3)}, {'a': 1, 'b': 1})).get_state()
  it = iter(Mix({'a': _source('a', 3, 3), 'c': _source('c', 3, 3)}, {'a': 1, 'c': 1}))
  with pytest.raises(DataError, match=r"^data\.sources=\['a', 'c'\] differ from the restored data-iterator "
                                      r"state's sources \['a', 'b'\]; "):
    it.set_state(state)


def _real_tokens(row: dict[str, np.ndarray]) -> int:
  return int(np.count_nonzero(row['segment_ids']))


def test_packed_rows_of_each_source_mix_by_their_real_tokens_and_resume():
  """The pipeline's order: each source packed into rows of its own, the rows mixed by their non-padding tokens.
  Every prefix of the stream keeps the deficit rule's bound with one row (<= seq_len real tokens) as the
  element, padding does not count, and a resume through the per-source packers is bitwise."""
  def build():
    def rows(name, n_docs, base_len, seed):
      return BestFitPack(_source(name, n_docs, base_len, repeat=True), seq_len=64, features={'tokens': 0, 'feat': 0},
                         buffer_docs=16, seed=seed)
    return Mix({'a': rows('a', 9, 5, 1), 'b': rows('b', 7, 40, 2), 'c': rows('c', 5, 60, 3)},
               {'a': 0.6, 'b': 0.2, 'c': 0.2}, length=_real_tokens)
  out = _take(iter(build()), 120)
  counted = collections.Counter()
  for row in out:
    counted[_origin(row)[0]] += _real_tokens(row)
    total = sum(counted.values())
    for name, share in build().shares.items():
      assert -64 <= share * total - counted[name] <= 2 * 64, (name, counted)
  assert min(_real_tokens(r) for r in out) < 64 and counted['c'] > 0  # rows with padding, every source read
  it = iter(build())
  _take(it, 37)
  restored = iter(build())
  restored.set_state(json.loads(json.dumps(it.get_state())))
  assert _same(_take(restored, 83), out[37:])
  with pytest.raises(UserError, match=r'^the data-iterator state being restored: was written by a different '):
    restored.set_state({'parent': {}, 'window': 0, 'emitted': 0})
