"""Training objectives over token corruption: masked diffusion, masked LM and causal LM.

Masked diffusion (MDLM / LLaDA): each document gets a mask ratio t, each of its tokens is replaced by MASK
with probability t, and the model (bidirectional) predicts the original tokens at masked positions. With the
linear schedule alpha_t = 1 - t, the loss E_t[(1/t) * sum over masked positions of -log p(x_i)] is an upper
bound on the negative log-likelihood of the document (Sahoo et al. 2024, eq. 10; Nie et al. 2025), so the
per-token value reported here is a bound on nats per token and exp of it bounds perplexity.

Masks are a pure function of (sample id, position, seed): a token is masked when its uniform draw
u(seed, document, chunk, position) is below the ratio. So the same sample is corrupted the same way at the
same ratio on any host or batch layout, and masks at a lower ratio are subsets of those at a higher one.

Mask scheduler: `time='input'` draws t ~ U(t_min, 1) per document from the step's key and gives it to the
model (a time embedding); `time='depth'` ties stack k of a StackWise rack to the ratio `depth_schedule[k]`,
so one pass through the depth runs the whole reverse process and no time input is needed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.train import losses

Array = jax.Array
KINDS = ('diffusion', 'mlm', 'clm')
TIME_MODES = ('input', 'depth')

# Salts keep the draws for different purposes independent.
_SALT_MASK, _SALT_TIME_EVAL = 0x5EED, 0xE7A1


@dataclasses.dataclass(frozen=True)
class Objective:
  """What to corrupt and predict. Built from `config.objective` by `from_config`."""

  kind: str = 'clm'  # diffusion | mlm | clm
  mask_id: int = -1  # MASK token id (diffusion, mlm)
  mlm_ratio: float = 0.15
  time: str = 'input'  # input | depth (diffusion)
  depth_schedule: tuple[float, ...] = ()
  t_min: float = 1e-3  # t ~ U(t_min, 1): 1/t stays finite
  seed: int = 0

  @property
  def causal(self) -> bool:
    """CLM needs causal attention; the masked objectives see both sides."""
    return self.kind == 'clm'

  @property
  def time_input(self) -> bool:
    """Whether the model is given t (time-as-input diffusion)."""
    return self.kind == 'diffusion' and self.time == 'input'


def _mix32(x: Array) -> Array:
  """A 32-bit integer finaliser (murmur3 fmix32): every input bit flips about half the output bits."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_uniform(*keys: Array | int) -> Array:
  """Uniform floats in [0, 1) that are a pure function of the (broadcast) integer keys."""
  h = jnp.uint32(0x9E3779B9)
  for k in keys:
    h = _mix32(h ^ _mix32(jnp.asarray(k).astype(jnp.uint32) + jnp.uint32(0x7F4A7C15)))
  return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32


def token_uniforms(batch: dict[str, Array], seed: int) -> Array:
  """(B,T) draws keyed by (seed, document, chunk, position within the document)."""
  return hash_uniform(seed, _SALT_MASK, batch['doc_ids'], batch['doc_chunks'], batch['positions'])


def maskable(batch: dict[str, Array]) -> Array:
  """Tokens that may be corrupted and scored: real (segment > 0) with a non-zero loss mask."""
  return (batch['segment_ids'] > 0) & (batch['loss_mask'] > 0)


def corrupt(batch: dict[str, Array], ratio: Array | float, seed: int, mask_id: int) -> tuple[Array, Array]:
  """(corrupted tokens, masked (B,T) bool) for a ratio that is a scalar or per token (B,T)."""
  masked = (token_uniforms(batch, seed) < ratio) & maskable(batch)
  return jnp.where(masked, mask_id, batch['tokens']), masked


def document_times(batch: dict[str, Array], rng: Array, t_min: float) -> Array:
  """t ~ U(t_min, 1) per (row, document) from the step's key, broadcast to its tokens: (B,T).

  Low-discrepancy (as MDLM does): one uniform offset per step, rows evenly spaced from it and the documents
  of a row spread by the golden ratio, so every batch covers the whole range of t. Each t is still uniform
  (the estimate stays unbiased) but the 1/t-weighted loss varies far less from step to step.
  """
  u0 = jax.random.uniform(rng, ())
  rows = jnp.arange(batch['tokens'].shape[0])[:, None]
  u = jnp.mod(u0 + rows / batch['tokens'].shape[0] + batch['segment_ids'] * 0.6180339887, 1.0)
  return t_min + (1.0 - t_min) * u


def eval_times(batch: dict[str, Array], seed: int, t_min: float) -> Array:
  """t per sample from a hash of its id: evaluation sees the same ratios every time, unbiased over samples."""
  u = hash_uniform(seed, _SALT_TIME_EVAL, batch['doc_ids'], batch['doc_chunks'])
  return t_min + (1.0 - t_min) * u


@dataclasses.dataclass(frozen=True)
class Corrupted:
  """Model inputs for one objective: tokens (corrupted), masked positions, t per token (or None) and the
  per-token loss weights."""

  tokens: Array
  masked: Array
  t: Array | None
  weights: Array


def prepare(obj: Objective, batch: dict[str, Array], rng: Array | None, ratio: float | None = None) -> Corrupted:
  """Corrupts `batch` for `obj`. `rng` None means evaluation (deterministic times); `ratio` fixes the mask
  ratio (time-as-depth stages, MLM), else diffusion draws t per document.

  Weights: diffusion 1/t on masked tokens (the ELBO), MLM 1 on masked tokens, CLM none (see `loss_sums`).
  """
  if obj.kind == 'clm':
    return Corrupted(batch['tokens'], jnp.zeros_like(batch['tokens'], bool), None,
                     jnp.zeros(batch['tokens'].shape, jnp.float32))
  if obj.kind == 'mlm':
    ratio = obj.mlm_ratio if ratio is None else ratio
  if ratio is not None:
    t = jnp.full(batch['tokens'].shape, ratio, jnp.float32)
  elif rng is None:
    t = eval_times(batch, obj.seed, obj.t_min)
  else:
    t = document_times(batch, rng, obj.t_min)
  tokens, masked = corrupt(batch, t, obj.seed, obj.mask_id)
  scale = 1.0 / t if obj.kind == 'diffusion' else jnp.ones_like(t)
  return Corrupted(tokens, masked, t if obj.time_input else None, jnp.where(masked, scale, 0.0))


def loss_sums(obj: Objective, logits: Array, batch: dict[str, Array], c: Corrupted,
              z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """(objective sum to differentiate, sums for metrics) in the `steps.LossFn` convention.

  'tokens' normalises the loss: diffusion divides by all scored tokens (so loss is the ELBO per token),
  MLM by the masked tokens (mean masked cross-entropy), CLM by the next-token predictions.
  'masked_sum' counts corrupted tokens, 'masked_ce_sum' their unweighted cross-entropy (the train step logs
  both per loss token: the masked fraction, and the cross-entropy without the ELBO weights).
  """
  if obj.kind == 'clm':
    return losses.causal_lm_loss(logits, batch, z_loss)
  sums = losses.cross_entropy_sums(logits, batch['tokens'], c.weights, z_loss)
  ce = losses.cross_entropy_sums(logits, batch['tokens'], c.masked.astype(jnp.float32))
  if obj.kind == 'diffusion':
    sums['tokens'] = maskable(batch).astype(jnp.float32).sum()
  sums['masked_sum'] = ce['tokens']
  sums['masked_ce_sum'] = ce['loss_sum']
  return sums['loss_sum'] + sums['z_loss_sum'], sums


def check_schedule(schedule: tuple[float, ...] | list[float], num_stacks: int) -> tuple[float, ...]:
  """A time-as-depth schedule: one ratio in (0, 1] per stack, non-increasing with depth."""
  s = tuple(float(r) for r in schedule)
  if len(s) != num_stacks:
    raise ValueError(f'objective.depth_schedule={s} has {len(s)} ratios for {num_stacks} stacks: give one per '
                     'stack, heaviest noise first (e.g. 1.0, 0.75, 0.55, 0.40, 0.25, 0.15 for 6 stacks)')
  if any(not 0 < r <= 1 for r in s) or any(b > a for a, b in zip(s, s[1:], strict=False)):
    raise ValueError(f'objective.depth_schedule={s}: ratios must lie in (0, 1] and not increase with depth')
  return s


def default_depth_schedule(num_stacks: int) -> tuple[float, ...]:
  """Ratios from 1.0 at the first stack to 0.15 at the last, evenly spaced in sqrt (heavier noise lasts
  longer, as in the StackWise design's [1.0, 0.75, 0.55, 0.40, 0.25, 0.15])."""
  if num_stacks == 1:
    return (1.0,)
  x = np.linspace(1.0, np.sqrt(0.15), num_stacks) ** 2
  return tuple(round(float(v), 4) for v in x)
