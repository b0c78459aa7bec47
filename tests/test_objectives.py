"""Masked diffusion / MLM / CLM objectives: deterministic nested masks, per-document times, the ELBO weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.train import losses
from jaxtrain.stackwise import objectives
from tests.helpers import packed_batch

MASK = 63


def with_ids(batch: dict, doc_ids: list[list[int]]) -> dict:
  """Adds doc_ids/doc_chunks: document d of row r gets id doc_ids[r][d] (padding gets -1)."""
  out = {k: np.array(v) for k, v in batch.items()}
  out['doc_ids'] = np.full_like(out['tokens'], -1)
  out['doc_chunks'] = np.full_like(out['tokens'], -1)
  for r, ids in enumerate(doc_ids):
    for s, d in enumerate(ids, start=1):
      out['doc_ids'][r][out['segment_ids'][r] == s] = d
  return {k: jnp.asarray(v) for k, v in out.items()}


def test_masks_depend_only_on_sample_id_ratio_and_seed():
  # Document 7 sits first in row 0 of one batch and second in row 1 of another: same mask either way.
  a = with_ids(packed_batch([[20, 12], [32]], 32, seed=1), [[7, 3], [5]])
  b = with_ids(packed_batch([[9], [11, 20]], 32, seed=2), [[4], [2, 7]])
  _, ma = objectives.corrupt(a, 0.5, seed=0, mask_id=MASK)
  _, mb = objectives.corrupt(b, 0.5, seed=0, mask_id=MASK)
  doc7_a = np.asarray(ma)[0, :20]
  doc7_b = np.asarray(mb)[1, 11:31]
  np.testing.assert_array_equal(doc7_a, doc7_b)
  assert 0 < doc7_a.sum() < 20
  _, other_seed = objectives.corrupt(a, 0.5, seed=1, mask_id=MASK)
  assert not np.array_equal(np.asarray(other_seed)[0, :20], doc7_a)


def test_masks_are_nested_across_ratios_and_hit_the_ratio():
  batch = with_ids(packed_batch([[256]] * 16, 256), [[i] for i in range(16)])
  previous = np.zeros((16, 256), bool)
  for r in (0.1, 0.3, 0.55, 0.9):
    tokens, masked = objectives.corrupt(batch, r, seed=3, mask_id=MASK)
    masked = np.asarray(masked)
    assert np.all(masked[previous]), f'mask at ratio {r} does not contain the lower ratio mask'
    n = masked.size
    assert abs(masked.mean() - r) < 4 * np.sqrt(r * (1 - r) / n)
    np.testing.assert_array_equal(np.asarray(tokens)[masked], MASK)
    np.testing.assert_array_equal(np.asarray(tokens)[~masked], np.asarray(batch['tokens'])[~masked])
    previous = masked


def test_padding_and_unscored_tokens_are_never_masked():
  batch = with_ids(packed_batch([[10], [5, 5]], 16), [[1], [2, 3]])
  batch['loss_mask'] = batch['loss_mask'].at[0, :4].set(0)  # e.g. an SFT prompt
  _, masked = objectives.corrupt(batch, 1.0, seed=0, mask_id=MASK)
  masked = np.asarray(masked)
  assert not masked[0, :4].any() and masked[0, 4:10].all()
  assert not masked[np.asarray(batch['segment_ids']) == 0].any()


def test_document_times_are_per_document_and_in_range():
  batch = with_ids(packed_batch([[6, 6, 4], [16]], 16), [[1, 2, 3], [4]])
  t = np.asarray(objectives.document_times(batch, jax.random.PRNGKey(0), 0.01))
  seg = np.asarray(batch['segment_ids'])
  per_doc = [np.unique(t[r][seg[r] == s]) for r, s in ((0, 1), (0, 2), (0, 3), (1, 1))]
  assert all(len(u) == 1 for u in per_doc)
  assert len({float(u[0]) for u in per_doc}) == 4
  assert (t >= 0.01).all() and (t < 1).all()
  t2 = np.asarray(objectives.document_times(batch, jax.random.PRNGKey(1), 0.01))
  assert not np.allclose(t, t2)
  # Evaluation times are a function of the sample id only.
  e1 = objectives.eval_times(batch, 0, 0.01)
  e2 = objectives.eval_times(batch, 0, 0.01)
  np.testing.assert_array_equal(e1, e2)


def test_diffusion_loss_is_an_unbiased_estimate_of_the_nll_bound():
  """For a model whose prediction ignores the input (a fixed distribution q), the masked-diffusion ELBO
  equals the NLL of the tokens under q exactly in expectation: E[1{masked}/t] = 1 for every token. The
  1/t-weighted loss averaged over many draws of t must match it (an unweighted loss would not)."""
  rng = np.random.default_rng(0)
  vocab = 64
  logits_row = jnp.asarray(rng.normal(size=vocab), jnp.float32)
  obj = objectives.Objective(kind='diffusion', mask_id=MASK, t_min=1e-3)
  batch = with_ids(packed_batch([[32, 32]] * 8, 64, seed=4), [[2 * i, 2 * i + 1] for i in range(8)])
  logits = jnp.broadcast_to(logits_row, (8, 64, vocab))
  nll = -jax.nn.log_softmax(logits_row)[batch['tokens']]
  target = float(nll.mean())
  values, unweighted = [], []
  for k in range(300):
    c = objectives.prepare(obj, batch, jax.random.PRNGKey(k))
    _, sums = objectives.loss_sums(obj, logits, batch, c)
    values.append(float(sums['loss_sum'] / sums['tokens']))
    unweighted.append(float(sums['masked_ce_sum'] / sums['tokens']))
  assert abs(np.mean(values) - target) < 0.05 * target, (np.mean(values), target)
  assert np.mean(unweighted) < 0.7 * target  # without 1/t the bound is badly underestimated


def test_mlm_and_clm_losses():
  batch = with_ids(packed_batch([[24, 8]] * 4, 32, seed=5), [[i, 10 + i] for i in range(4)])
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 64))
  mlm = objectives.Objective(kind='mlm', mask_id=MASK, mlm_ratio=0.25)
  c = objectives.prepare(mlm, batch, jax.random.PRNGKey(0))
  _, sums = objectives.loss_sums(mlm, logits, batch, c)
  masked = np.asarray(c.masked)
  assert sums['tokens'] == masked.sum() > 0
  ce = -jax.nn.log_softmax(logits)
  expected = np.asarray(jnp.take_along_axis(ce, batch['tokens'][..., None], -1)[..., 0])[masked].sum()
  np.testing.assert_allclose(float(sums['loss_sum']), expected, rtol=1e-5)
  # MLM masks are the same every step (fixed ratio, keyed by sample id), unlike diffusion times.
  c2 = objectives.prepare(mlm, batch, jax.random.PRNGKey(9))
  np.testing.assert_array_equal(c.masked, c2.masked)
  clm = objectives.Objective(kind='clm')
  c = objectives.prepare(clm, batch, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(c.tokens, batch['tokens'])
  _, sums = objectives.loss_sums(clm, logits, batch, c)
  _, ref = losses.causal_lm_loss(logits, batch)
  np.testing.assert_allclose(float(sums['loss_sum']), float(ref['loss_sum']), rtol=1e-6)


def test_time_depth_ratio_is_fixed():
  batch = with_ids(packed_batch([[64]] * 8, 64), [[i] for i in range(8)])
  obj = objectives.Objective(kind='diffusion', mask_id=MASK, time='depth')
  c = objectives.prepare(obj, batch, jax.random.PRNGKey(0), ratio=0.4)
  assert c.t is None  # time-as-depth models take no time input
  assert abs(float(np.asarray(c.masked).mean()) - 0.4) < 0.08
  np.testing.assert_allclose(np.asarray(c.weights)[np.asarray(c.masked)], 1 / 0.4, rtol=1e-6)


def test_depth_schedules():
  assert objectives.default_depth_schedule(6) == pytest.approx((1.0, 0.77, 0.57, 0.40, 0.26, 0.15), abs=0.01)
  assert objectives.check_schedule([1.0, 0.5], 2) == (1.0, 0.5)
  with pytest.raises(ValueError, match='has 3 ratios for 2 stacks'):
    objectives.check_schedule([1.0, 0.5, 0.2], 2)
  with pytest.raises(ValueError, match='not increase'):
    objectives.check_schedule([0.5, 1.0], 2)
