"""Loss functions. Each returns *sums* over tokens plus the token count, so that callers can add them up
across micro-batches and devices and divide once (a mean of per-micro-batch means is biased when
micro-batches hold different numbers of loss tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_targets(batch: dict[str, Array]) -> tuple[Array, Array]:
  """Targets and weights for predicting token t+1 at position t.

  A prediction counts only when t+1 is a real token of the same document as t; its weight is loss_mask at
  t+1 (0/1 from the data pipeline; a float mask weights tokens). Nothing is learned across the boundary of
  two packed documents or into padding.

  Both are (B, T), as long as the logits: the last position has weight 0. Slicing the (B, T, V) logits to
  T-1 instead would cost a pad of their whole gradient in the backward pass.
  """
  tokens, seg, mask = batch['tokens'], batch['segment_ids'], batch['loss_mask']
  next_seg = _shift_left(seg)
  same_doc = (next_seg == seg) & (next_seg > 0)
  return _shift_left(tokens), jnp.where(same_doc, _shift_left(mask).astype(jnp.float32), 0.0)


def _shift_left(a: Array) -> Array:
  """a[:, t + 1] at t, and 0 at the last position."""
  return jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)


def token_cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
  """(cross-entropy of every position's target, log-partition), float32 (B, T): unweighted, so evaluation can
  score loss-masked and other tokens with the very numbers training sums."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def cross_entropy_sums(logits: Array, targets: Array, weights: Array, z_loss: float = 0.0) -> dict[str, Array]:
  """Summed token cross-entropy (float32) and optional z-loss: {'loss_sum', 'z_loss_sum', 'tokens'}."""
  ce, lse = token_cross_entropy(logits, targets)
  ce = ce * weights
  out = {'loss_sum': ce.sum(), 'z_loss_sum': jnp.zeros((), jnp.float32), 'tokens': weights.sum()}
  if z_loss:
    out['z_loss_sum'] = z_loss * (jnp.square(lse) * weights).sum()
  return out


def causal_lm_loss(logits: Array, batch: dict[str, Array], z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Next-token loss for logits (B,T,V) of `batch`: (objective sum to differentiate, sums for metrics)."""
  targets, weights = next_token_targets(batch)
  sums = cross_entropy_sums(logits, targets, weights, z_loss)
  return sums['loss_sum'] + sums['z_loss_sum'], sums
