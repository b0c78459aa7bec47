"""Next-token targets and weights; cross-entropy and z-loss sums against a direct computation."""

import jax
import numpy as np

from jaxtrain.train import losses
from tests.helpers import packed_batch


def test_targets_never_cross_documents_or_enter_padding():
  batch = packed_batch([[3, 4]], 9)
  batch['loss_mask'][0, 5] = 0  # a masked target inside document 2
  targets, weights = losses.next_token_targets(batch)
  assert targets.shape == weights.shape == batch['tokens'].shape  # as long as the logits
  np.testing.assert_array_equal(targets[0, :-1], batch['tokens'][0, 1:])
  # position t predicts t+1: doc1 0->1, 1->2; 2->3 crosses into doc2; doc2 3->4, 4->5 (masked), 5->6; 6->7 is
  # doc2 -> doc2 end at index 6, 7->8 padding; the last position has no next token.
  np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 1, 0, 0, 0])


def test_cross_entropy_sums_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  out = jax.device_get(losses.cross_entropy_sums(logits, targets, weights, z_loss=1e-2))
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(out['loss_sum'], (ce * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(out['z_loss_sum'], 1e-2 * (lse ** 2 * weights).sum(), rtol=1e-5)
  assert out['tokens'] == weights.sum()
