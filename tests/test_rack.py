"""The StackWise rack: equivalence with the plain Transformer, encoder vs decoder, time embeddings, vocab
resize, per-stack init and KV-cache decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models
from jaxtrain.models import rack
from tests.helpers import packed_batch, tiny


def batch_of(docs, seq=16, seed=0):
  return {k: jnp.asarray(v) for k, v in packed_batch(docs, seq, seed=seed).items()}


@pytest.mark.parametrize('causal', [True, False])
def test_rack_equals_transformer_of_the_same_depth(causal):
  mc = tiny(num_layers=2, causal=causal, tie_embeddings=False)
  rc = rack.RackConfig(mc, 3)
  rd = rack.describe(rc)
  params = rack.init_params(rc, jax.random.PRNGKey(0))
  b = batch_of([[10, 6], [16]])
  gd, _, _ = models.describe(dataclasses.replace(mc, num_layers=6))
  want = models.apply(gd, rack.to_transformer(params, [0, 1, 2]), b)
  np.testing.assert_array_equal(rack.forward(rd, params, b), want)
  # A sub-rack in another order is the transformer of those stacks in that order.
  gd2, _, _ = models.describe(dataclasses.replace(mc, num_layers=4))
  np.testing.assert_array_equal(rack.forward(rd, params, b, order=[2, 0]),
                                models.apply(gd2, rack.to_transformer(params, [2, 0]), b))


def test_stack_init_does_not_depend_on_rack_size():
  mc = tiny(num_layers=1)
  small = rack.init_params(rack.RackConfig(mc, 2), jax.random.PRNGKey(3))
  big = rack.init_params(rack.RackConfig(mc, 5), jax.random.PRNGKey(3))
  for i in ('0', '1'):
    jax.tree.map(np.testing.assert_array_equal, small['stacks'][i], big['stacks'][i])
  jax.tree.map(np.testing.assert_array_equal, small['shared'], big['shared'])
  assert not np.array_equal(big['stacks']['0']['blocks']['attn']['q'], big['stacks']['1']['blocks']['attn']['q'])


def test_encoder_sees_both_sides_decoder_only_the_past():
  b = batch_of([[16]])
  changed = dict(b, tokens=b['tokens'].at[0, 12].set((b['tokens'][0, 12] + 1) % 64))
  for causal in (True, False):
    rc = rack.RackConfig(tiny(num_layers=1, causal=causal), 2)
    rd = rack.describe(rc)
    p = rack.init_params(rc, jax.random.PRNGKey(0))
    before, after = rack.forward(rd, p, b), rack.forward(rd, p, changed)
    earlier_moved = not np.allclose(before[0, :12], after[0, :12])
    assert earlier_moved == (not causal)


@pytest.mark.parametrize('kind', ['sinusoidal', 'learned'])
def test_time_embedding_conditions_the_model(kind):
  rc = rack.RackConfig(tiny(num_layers=1, causal=False), 2, time_embedding=kind, time_bins=16)
  rd = rack.describe(rc)
  p = rack.init_params(rc, jax.random.PRNGKey(0))
  assert ('time_proj' if kind == 'sinusoidal' else 'time_table') in p['shared']
  b = batch_of([[16], [8, 8]])
  t1, t2 = jnp.full((2, 16), 0.2), jnp.full((2, 16), 0.9)
  assert not np.allclose(rack.forward(rd, p, b, t=t1), rack.forward(rd, p, b, t=t2))
  np.testing.assert_array_equal(rack.forward(rd, p, b, t=t1), rack.forward(rd, p, b, t=t1 + 0.0))
  with pytest.raises(ValueError, match='no Transformer equivalent'):
    rack.to_transformer(p, [0, 1])


@pytest.mark.parametrize('tied', [True, False])
def test_vocab_resize_adds_mean_rows_and_keeps_old_logits(tied):
  mc = tiny(num_layers=1, tie_embeddings=tied)
  rc = rack.RackConfig(mc, 1)
  p = rack.init_params(rc, jax.random.PRNGKey(0))
  grown = rack.resize_vocab(p['shared'], 70)
  assert grown['embed'].shape == (70, 32)
  np.testing.assert_array_equal(grown['embed'][:64], p['shared']['embed'])
  np.testing.assert_allclose(grown['embed'][64:], np.broadcast_to(np.mean(p['shared']['embed'], 0), (6, 32)),
                             rtol=1e-6)
  rd_old = rack.describe(rc)
  rd_new = rack.describe(dataclasses.replace(rc, block=dataclasses.replace(mc, vocab_size=70)))
  b = batch_of([[16]])
  old = rack.forward(rd_old, p, b)
  new = rack.forward(rd_new, dict(p, shared=grown), b)
  np.testing.assert_allclose(new[..., :64], old, atol=1e-6)
  if not tied:
    np.testing.assert_allclose(grown['lm_head'][:, 64:], np.broadcast_to(
        np.mean(p['shared']['lm_head'], 1, keepdims=True), (32, 6)), rtol=1e-6)
  assert p['shared']['embed'].shape == (64, 32)  # the input tree is untouched
  with pytest.raises(ValueError, match='would drop tokens'):
    rack.resize_vocab(p['shared'], 10)


def test_kv_cache_decoding_matches_the_full_forward():
  mc = tiny(num_layers=1)
  rc = rack.RackConfig(mc, 3)
  rd = rack.describe(rc)
  p = rack.init_params(rc, jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 1, 64)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  b = {'tokens': tokens, 'positions': pos, 'segment_ids': jnp.ones_like(tokens)}
  order = [0, 2, 1]
  full = rack.forward(rd, p, b, order=order)
  cache = rack.init_cache(rd, order, 2, 12)
  logits, cache = rack.decode(rd, p, order, tokens[:, :5], pos[:, :5], cache, jnp.int32(0))
  steps = [logits]
  for i in range(5, 12):
    logits, cache = rack.decode(rd, p, order, tokens[:, i:i + 1], pos[:, i:i + 1], cache, jnp.int32(i))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4)
  enc = rack.describe(rack.RackConfig(tiny(num_layers=1, causal=False), 3))
  with pytest.raises(ValueError, match='causal'):
    rack.decode(enc, p, order, tokens, pos, cache, jnp.int32(0))
