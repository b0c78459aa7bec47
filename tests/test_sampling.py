"""Sampling: token filters against hand-made distributions, cached generation against its no-cache twin,
iterative unmasking against its schedules, commit order and invariants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import sampling

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
# One compilation per setting instead of one per primitive in eager mode.
_static = ('temperature', 'top_k', 'top_p')
sample_token = jax.jit(sampling.sample_token, static_argnames=_static)
filter_logits = jax.jit(sampling.filter_logits, static_argnames=_static)


def _draws(logits, n, seed=0, **kw):
  """n draws from one row of logits, in a single batched call."""
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(sample_token(batch, jax.random.key(seed), **kw))


def _chi_square(draws, probs):
  keep = probs > 0
  counts = np.bincount(draws, minlength=len(probs))
  assert counts[~keep].sum() == 0, counts
  expected = probs[keep] * len(draws)
  return ((counts[keep] - expected) ** 2 / expected).sum()


# ---------------------------------------------------------------------------------------------------------
# sample_token / filter_logits


def test_greedy_and_top1_are_argmax():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  want = np.argmax(np.asarray(logits), axis=-1)
  rng = jax.random.key(1)
  np.testing.assert_array_equal(sample_token(logits, rng, temperature=0.0), want)
  np.testing.assert_array_equal(sample_token(logits, rng, temperature=1.5, top_k=1), want)
  np.testing.assert_array_equal(sample_token(logits, rng, top_p=1e-3), want)


def test_top_k_draws_exactly_the_k_largest():
  logits = np.array([0.1, 2.0, -1.0, 1.5, 1.8, 0.0, 1.7, -3.0], np.float32)
  seen = set(_draws(logits, 4000, top_k=3).tolist())
  assert seen == {1, 4, 6}


def test_top_k_keeps_exactly_k_under_ties_lowest_id_first():
  kept = np.isfinite(filter_logits(jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), top_k=2))
  np.testing.assert_array_equal(kept[0], [False, True, True, False, False])
  kept = np.isfinite(filter_logits(jnp.array([[2.0, 2.0, 2.0, 2.0]]), top_p=0.5))
  np.testing.assert_array_equal(kept[0], [True, True, False, False])


@pytest.mark.parametrize('p,kept', [(0.8, 2), (0.81, 3), (0.5, 1), (0.3, 1), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
  perm = np.array([2, 0, 3, 1])  # nucleus membership must follow probability, not token id
  logits = jnp.log(jnp.asarray(PROBS[perm]))[None]
  out = np.isfinite(filter_logits(logits, top_p=p))[0]
  assert out.sum() == kept
  np.testing.assert_array_equal(out[np.argsort(perm)], np.arange(4) < kept)


def test_empirical_frequencies_match_renormalised_probabilities():
  logits = np.log(PROBS)
  chi2_crit = 16.27  # df <= 3 at p = 0.001; the fixed seed makes the test deterministic
  assert _chi_square(_draws(logits, 20000, seed=1), PROBS) < chi2_crit
  nucleus = np.array([0.5, 0.3, 0, 0]) / 0.8
  assert _chi_square(_draws(logits, 20000, seed=2, top_p=0.8), nucleus) < chi2_crit
  top3 = np.array([0.5, 0.3, 0.15, 0]) / 0.95
  assert _chi_square(_draws(logits, 20000, seed=3, top_k=3), top3) < chi2_crit
  flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()  # temperature 2: p^(1/2), renormalised
  assert _chi_square(_draws(logits, 20000, seed=4, temperature=2.0), flat) < chi2_crit
  assert _chi_square(_draws(logits, 20000, seed=4, temperature=2.0), PROBS) > 100


@pytest.mark.parametrize('kw,word', [(dict(temperature=-0.5), 'temperature'), (dict(top_p=0.0), 'top_p'),
                                     (dict(top_p=1.5), 'top_p'), (dict(top_k=-1), 'top_k'),
                                     (dict(top_k=1.5), 'top_k')])
def test_invalid_sampling_arguments(kw, word):
  with pytest.raises(ValueError, match=word):
    sampling.sample_token(jnp.zeros((1, 4)), jax.random.key(0), **kw)


# ---------------------------------------------------------------------------------------------------------
# generate: a toy whose logits depend on the current token, a running sum of the sequence weighted by cache row
# (so a token written at the wrong row changes it) and the position. The cached version keeps the tokens in the
# cache and must read the prefix sum back from it.

V = 13


def _toy_logits(tok, csum, pos):
  favoured = (tok * 5 + csum * 3 + pos * 7) % V
  v = jnp.arange(V)
  return 2.5 * jnp.cos(2 * jnp.pi * (v - favoured[..., None]) / V) + 0.01 * v


def _weighted_cumsum(tokens):
  return jnp.cumsum(tokens * (jnp.arange(tokens.shape[1]) + 1), axis=1)


def toy_init_cache(batch, max_len):
  return jnp.zeros((batch, max_len), jnp.int32)


def toy_decode(tokens, positions, cache, index):
  cache = jax.lax.dynamic_update_slice(cache, tokens, (0, index))
  csum = jax.lax.dynamic_slice_in_dim(_weighted_cumsum(cache), index, tokens.shape[1], axis=1)
  return _toy_logits(tokens, csum, positions), cache


def toy_full(tokens, positions):
  return _toy_logits(tokens, _weighted_cumsum(tokens), positions)


N_NEW = 10
PROMPTS = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]], np.int32)


@functools.lru_cache(maxsize=None)
def _jitted(kind, **kw):
  if kind == 'cache':
    return jax.jit(lambda cache, prompt, rng, pos: sampling.generate(
        toy_decode, cache, prompt, N_NEW, rng, positions=pos, **kw))
  return jax.jit(lambda prompt, rng, pos: sampling.generate_no_cache(
      toy_full, prompt, N_NEW, rng, positions=pos, **kw))


def _both(prompt, rng, pos=None, **kw):
  cache = toy_init_cache(prompt.shape[0], prompt.shape[1] + N_NEW)
  return (np.asarray(_jitted('cache', **kw)(cache, prompt, rng, pos)),
          np.asarray(_jitted('full', **kw)(prompt, rng, pos)))


@pytest.mark.parametrize('kw', [dict(temperature=0.0), dict(temperature=1.0),
                                dict(temperature=0.7, top_k=4, top_p=0.8)])
def test_generate_with_cache_equals_no_cache(kw):
  cached, full = _both(PROMPTS, jax.random.key(7), **kw)
  assert cached.shape == (3, 5 + N_NEW) and cached.dtype == np.int32
  np.testing.assert_array_equal(cached[:, :5], PROMPTS)
  np.testing.assert_array_equal(cached, full)
  if kw['temperature'] == 0:
    # Greedy by hand in numpy: the favoured token wins (the 0.01 * v tilt only breaks exact symmetry).
    for row, seq in zip(cached, PROMPTS.tolist(), strict=True):
      for _ in range(N_NEW):
        wsum = sum((j + 1) * tok for j, tok in enumerate(seq))
        favoured = (seq[-1] * 5 + wsum * 3 + (len(seq) - 1) * 7) % V
        seq.append(favoured)
      np.testing.assert_array_equal(row, seq)
  else:
    again, _ = _both(PROMPTS, jax.random.key(7), **kw)
    other, _ = _both(PROMPTS, jax.random.key(8), **kw)
    np.testing.assert_array_equal(cached, again)
    assert (cached != other).any()


def test_generate_continues_from_given_positions():
  pos = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 3]], np.int32)  # left-padded prompts
  cached, full = _both(PROMPTS, jax.random.key(3), pos, temperature=1.0)
  np.testing.assert_array_equal(cached, full)
  plain, _ = _both(PROMPTS, jax.random.key(3), None, temperature=1.0)
  assert (cached[[0, 2]] != plain[[0, 2]]).any()
  np.testing.assert_array_equal(cached[1], plain[1])


def test_eos_then_only_pad():
  rng = jax.random.key(5)
  free, _ = _both(PROMPTS, rng, temperature=1.0)
  eos, pad = int(free[0, 5 + 2]), 12
  with_eos, full = _both(PROMPTS, rng, temperature=1.0, eos_id=eos, pad_id=pad)
  np.testing.assert_array_equal(with_eos, full)
  want = free.copy()
  for row in want:
    hits = np.flatnonzero(row[5:] == eos)
    if hits.size:
      row[5 + hits[0] + 1:] = pad
  np.testing.assert_array_equal(with_eos, want)
  assert (with_eos[0, 5 + 3:] == pad).all()


def test_generation_stops_early_when_every_row_is_done():
  calls = []

  def decode(tokens, positions, cache, index):
    jax.debug.callback(lambda i: calls.append(int(i)), index)
    return jax.nn.one_hot((positions + 1) % V, V) * 10.0, cache  # token p+1 follows position p: eos 8 at 8

  out = jax.jit(lambda p: sampling.generate(decode, None, p, 20, jax.random.key(0), temperature=0.0,
                                            eos_id=8, pad_id=0))(jnp.asarray(PROMPTS))
  jax.effects_barrier()
  np.testing.assert_array_equal(out[:, 5:], np.tile([5, 6, 7, 8] + [0] * 16, (3, 1)))
  assert calls == [0, 5, 6, 7]  # prefill, then three steps; 16 steps skipped


def test_generate_compiles_once_per_shape():
  traces = []

  def decode(*args):
    traces.append(1)
    return toy_decode(*args)

  gen = jax.jit(lambda cache, prompt, rng: sampling.generate(decode, cache, prompt, 6, rng, temperature=1.0))
  cache = toy_init_cache(3, 11)
  outs = [gen(cache, jnp.asarray(PROMPTS + k), jax.random.key(k)) for k in range(3)]
  assert len(traces) == 2  # prefill + loop body, traced once for all prompts and all steps
  assert not np.array_equal(outs[0], outs[1])
  assert sampling.generate(toy_decode, cache, jnp.asarray(PROMPTS), 0, jax.random.key(0)).shape == (3, 5)


def test_generate_right_padded_prompts_of_any_length_share_one_compilation():
  traces = []

  def decode(*args):
    traces.append(1)
    return toy_decode(*args)

  padded = jax.jit(lambda prompt, n, rng: sampling.generate(decode, toy_init_cache(3, 5 + N_NEW), prompt, N_NEW, rng,
                                                            temperature=1.0, eos_id=4, prompt_len=n))
  for n in (1, 3):
    junk = np.where(np.arange(5) < n, PROMPTS, 11).astype(np.int32)  # right padding the result must not see
    got = np.asarray(padded(jnp.asarray(junk), n, jax.random.key(n)))
    want, _ = _both(PROMPTS[:, :n], jax.random.key(n), temperature=1.0, eos_id=4)
    np.testing.assert_array_equal(got[:, :n + N_NEW], want)
  assert len(traces) == 2  # prefill + loop body, once for both prompt lengths


# ---------------------------------------------------------------------------------------------------------
# unmask / single_pass: a toy that favours token TARGET[j] at position j with confidence growing with SCORE[j],
# and puts a huge logit on MASK that must never be chosen.

MASK, T_LEN = 7, 12
TARGET = (np.arange(T_LEN) * 3 + 1) % MASK
SCORE = np.array([5, 11, 2, 8, 0, 9, 3, 10, 6, 1, 7, 4], np.float32)  # a permutation: distinct confidences


def toy_masked(tokens, t):
  logits = jax.nn.one_hot(TARGET, MASK + 1) * (1.0 + 0.5 * SCORE[:, None])
  logits = logits.at[:, MASK].set(100.0)
  return jnp.broadcast_to(logits, tokens.shape + (MASK + 1,))


def _start():
  """Rows with 8, 12, 3 and 0 masks behind prompts of 4, 0, 9 and 12 tokens."""
  x = np.full((4, T_LEN), MASK, np.int32)
  for r, n in enumerate([4, 0, 9, 12]):
    x[r, :n] = np.arange(n) % 5 + 2
  return x


def _expected_left(m, s, steps, schedule):
  frac = 1 - (s + 1) / steps if schedule == 'linear' else math.cos(math.pi / 2 * (s + 1) / steps)
  return max(0, math.ceil(round(m * frac, 6)))


def _run_recorded(steps, schedule, logits_fn=toy_masked, temperature=0.0, seed=0):
  seen = []

  def spy(tokens, t):
    jax.debug.callback(lambda x, tt: seen.append((np.asarray(x), np.asarray(tt))), tokens, t, ordered=True)
    return logits_fn(tokens, t)

  run = jax.jit(lambda x, rng: sampling.unmask(spy, x, MASK, steps, rng, schedule=schedule,
                                               temperature=temperature))
  out = np.asarray(run(jnp.asarray(_start()), jax.random.key(seed)))
  jax.effects_barrier()
  return seen, out


@pytest.mark.parametrize('schedule,steps', [('linear', 5), ('cosine', 5), ('cosine', 3), ('linear', 16),
                                            ('cosine', 1)])
def test_unmask_follows_schedule_and_invariants(schedule, steps):
  start = _start()
  seen, out = _run_recorded(steps, schedule)
  assert len(seen) == steps
  states = [x for x, _ in seen] + [out]
  m = (start == MASK).sum(1)
  for s in range(steps):
    np.testing.assert_array_equal((states[s + 1] == MASK).sum(1),
                                  [_expected_left(mi, s, steps, schedule) for mi in m])
    np.testing.assert_allclose(seen[s][1], np.where(m > 0, (states[s] == MASK).sum(1) / np.maximum(m, 1), 0))
  for prev, nxt in zip(states[:-1], states[1:], strict=True):
    done = prev != MASK
    np.testing.assert_array_equal(nxt[done], prev[done])  # prompt and committed tokens never change
    new = (prev == MASK) & (nxt != MASK)
    for r in range(len(start)):  # committed: the most confident of the masked positions
      if new[r].any() and (nxt[r] == MASK).any():
        assert SCORE[new[r]].min() > SCORE[nxt[r] == MASK].max()
  assert not (out == MASK).any()
  np.testing.assert_array_equal(out, np.where(start == MASK, TARGET, start))
  assert schedule != 'linear' or steps != 5 or (states[1] == MASK).sum(1).tolist() == [7, 10, 3, 0]


def test_unmask_commit_order_is_most_confident_first():
  seen, out = _run_recorded(T_LEN, 'linear')  # all-mask row 1: exactly one commit per step
  states = [x[1] for x, _ in seen] + [out[1]]
  order = [int(np.flatnonzero((a == MASK) & (b != MASK))[0]) for a, b in zip(states[:-1], states[1:], strict=True)]
  np.testing.assert_array_equal(order, np.argsort(-SCORE, kind='stable'))


def _random_masked(tokens, t):
  table = jax.random.normal(jax.random.key(42), (T_LEN, MASK + 1)) * 1.5
  bias = jax.nn.one_hot(tokens.sum(1) % MASK, MASK + 1) * 0.5  # logits depend on what is already filled
  return table[None] + bias[:, None] + 0 * t[:, None, None]


def test_unmask_sampled_is_deterministic_per_key():
  start = _start()
  run = jax.jit(lambda x, rng: sampling.unmask(_random_masked, x, MASK, 4, rng, schedule='cosine',
                                               temperature=1.0))
  a, b, c = (np.asarray(run(jnp.asarray(start), jax.random.key(k))) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert not (a == MASK).any()
  np.testing.assert_array_equal(a[start != MASK], start[start != MASK])


def test_unmask_and_single_pass_draw_within_top_k_and_top_p():
  # Sampled at a high temperature, but top_k=1 (or a tiny top_p) leaves only the most likely token: greedy.
  start = jnp.asarray(_start())

  @functools.partial(jax.jit, static_argnums=(1, 2, 3))
  def run(rng, temperature, top_k, top_p):
    return sampling.unmask(_random_masked, start, MASK, 4, rng, schedule='cosine', temperature=temperature,
                           top_k=top_k, top_p=top_p)
  greedy = np.asarray(run(jax.random.key(0), 0.0, 0, 1.0))
  np.testing.assert_array_equal(np.asarray(run(jax.random.key(3), 5.0, 1, 1.0)), greedy)
  np.testing.assert_array_equal(np.asarray(run(jax.random.key(3), 5.0, 0, 1e-4)), greedy)
  assert (np.asarray(run(jax.random.key(3), 5.0, 3, 1.0)) != greedy).any()  # three candidates: the draw moves
  one = sampling.single_pass(_random_masked, start, MASK, jax.random.key(3), 5.0, top_k=1)
  np.testing.assert_array_equal(one, sampling.single_pass(_random_masked, start, MASK, jax.random.key(0)))
  with pytest.raises(ValueError, match='top_p'):
    sampling.single_pass(_random_masked, start, MASK, jax.random.key(0), 1.0, top_p=0.0)


def test_unmask_leaves_fixed_positions():
  start = _start()
  fixed = np.zeros_like(start, bool)
  fixed[1, -2:] = True  # e.g. trailing slots the caller wants left empty
  run = jax.jit(lambda x, f: sampling.unmask(toy_masked, x, MASK, 3, jax.random.key(0), fixed=f))
  out = np.asarray(run(jnp.asarray(start), jnp.asarray(fixed)))
  np.testing.assert_array_equal(out[1, -2:], [MASK, MASK])
  assert not (out[~fixed] == MASK).any()


@pytest.mark.parametrize('kw,word', [(dict(steps=0), 'steps'), (dict(schedule='exp'), 'schedule'),
                                     (dict(temperature=-1.0), 'temperature')])
def test_unmask_invalid_arguments(kw, word):
  args = dict(steps=2) | kw
  with pytest.raises(ValueError, match=word):
    sampling.unmask(toy_masked, jnp.asarray(_start()), MASK, args.pop('steps'), jax.random.key(0), **args)


def test_single_pass_fills_every_mask_in_one_call():
  calls, ts = [], []

  def fn(tokens, t):
    calls.append(1)
    ts.append(np.asarray(t))
    return toy_masked(tokens, t)

  start = _start()
  out = np.asarray(sampling.single_pass(fn, jnp.asarray(start), MASK, jax.random.key(0)))
  assert len(calls) == 1
  np.testing.assert_array_equal(ts[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(out, np.where(start == MASK, TARGET, start))


def test_generate_rows_with_their_own_lengths_and_keys_equal_each_row_alone():
  # A (B,) prompt_len: each row continues from its own length at its own cache index (decode_fn gets a (B,)
  # index and writes row b at index[b]); a key per row: a row draws what it draws alone in a batch of one.
  def decode(tokens, positions, cache, index):
    if jnp.ndim(index) == 0:
      return toy_decode(tokens, positions, cache, index)
    return jax.vmap(lambda t, p, c, i: jax.tree.map(lambda x: x[0], toy_decode(t[None], p[None], c[None], i)))(
        tokens, positions, cache, index)

  lengths = np.array([1, 5, 3], np.int32)
  keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.key(11), k))(jnp.arange(3))
  junk = np.where(np.arange(5) < lengths[:, None], PROMPTS, 11).astype(np.int32)
  run = jax.jit(lambda prompt, n, rng: sampling.generate(decode, toy_init_cache(3, 5 + N_NEW), prompt, N_NEW, rng,
                                                         temperature=1.0, eos_id=4, prompt_len=n))
  got = np.asarray(run(jnp.asarray(junk), jnp.asarray(lengths), keys))
  for b, n in enumerate(lengths):
    alone, full = _both(PROMPTS[b:b + 1, :n], keys[b], temperature=1.0, eos_id=4)
    np.testing.assert_array_equal(alone, full)
    np.testing.assert_array_equal(got[b, :n + N_NEW], alone[0])
  assert len({tuple(row[n:n + 4]) for row, n in zip(got, lengths, strict=True)}) == 3
