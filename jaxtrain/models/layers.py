"""Pieces the attention variants and the decoder share: parameters, projections, norms, rotary embedding,
masks and the attention cores (XLA's ops, in causal blocks, or the fused CPU kernel), and the KV-cache
helpers. `transformer` (GQA, blocks, the decoder) and `mla` build on this module; it imports neither.

Shapes: B batch, T queries, S keys, N query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtrain.kernels import cpu_attention
from jaxtrain.models.config import ModelConfig
from jaxtrain.models.ops import computed_once, linear, rotate, softmax

Array = jax.Array


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
           std: float | None = None) -> nnx.Param:
  """A parameter drawn from N(0, std^2) (or ones when std == 0), tagged with its logical axes."""
  dtype = jnp.dtype(cfg.param_dtype)
  std = cfg.init_std if std is None else std
  if std == 0:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  # eager_sharding=False: the axes are logical names, not mesh axes; sharding.py translates them.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def project(spec: str, x: Array, w: Any, out_dtype: Any = None) -> Array:
  """`einsum(spec, x, w)` in x's dtype (or `out_dtype`), for a weight that is an array or a structured weight.

  Structured weights (a frozen base with LoRA factors, a quantized base) are pytrees that compute the
  product themselves through `w.einsum(spec, x)`; `jaxtrain.adapters.lora` and `jaxtrain.adapters.quant` build
  them from the parameter tree, so the model never needs to know which one it was given.
  """
  if isinstance(w, jax.Array):
    w = w.astype(x.dtype)
    if out_dtype is None or jnp.dtype(out_dtype) == x.dtype:
      # Named so that remat's save_dots still saves it: a custom_vjp's output is not a dot to the policy.
      return checkpoint_name(linear(spec, x, w), 'linear')
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
  return w.einsum(spec, x, out_dtype)


def zeros(shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 whatever the compute dtype."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ('norm',), cfg, std=0.0)
    self.eps = cfg.norm_eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred norm with scale and bias (GPT-2), computed in float32 whatever the compute dtype."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ('norm',), cfg, std=0.0)
    self.bias = zeros((dim,), ('norm',), cfg)
    self.eps = cfg.norm_eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(dim: int, cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
  """The block / final norm that `cfg.norm` names."""
  return LayerNorm(dim, cfg, rngs) if cfg.norm == 'layernorm' else RMSNorm(dim, cfg, rngs)


def rope_frequencies(cfg: ModelConfig, dim: int | None = None) -> np.ndarray | None:
  """Scaled inverse frequencies (dim/2,) for `cfg.rope_scaling` (float64 math, as transformers' rope init);
  None for unscaled RoPE, which `rope` computes from theta itself. `dim` defaults to head_dim."""
  if cfg.rope_scaling == 'none':
    return None
  half = (cfg.head_dim if dim is None else dim) // 2
  inv = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half)
  if cfg.rope_scaling == 'linear':
    return inv / cfg.rope_factor
  # llama3 (Llama 3.1): long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
  factor, low, high, old = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                            cfg.rope_original_max_positions)
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(positions: Array, dim: int, theta: float, freqs: np.ndarray | None = None
                ) -> tuple[Array, Array]:
  """(cos, sin), each (B,T,1,dim/2), of the rotary angles at `positions` (B,T); `freqs` (dim/2,) overrides
  the inverse frequencies derived from `theta` (scaled RoPE, `rope_frequencies`)."""
  half = dim // 2
  if freqs is None:
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
  else:
    freqs = jnp.asarray(freqs, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (B,T,H/2)
  return computed_once(lambda a: (jnp.cos(a)[:, :, None, :], jnp.sin(a)[:, :, None, :]), angles)


def rope(x: Array, positions: Array, theta: float, freqs: np.ndarray | None = None,
         tables: tuple[Array, Array] | None = None) -> Array:
  """Rotary embedding in the half-split convention of Hugging Face Llama. x: (B,T,n,H), positions: (B,T).

  `tables` from `rope_tables` (computed once for q and k) replace the ones built from positions and theta.
  """
  cos, sin = rope_tables(positions, x.shape[-1], theta, freqs) if tables is None else tables
  return rotate(x.astype(jnp.float32), cos, sin).astype(x.dtype)


def attention_mask(segment_ids: Array, causal: bool, key_segment_ids: Array | None = None,
                   query_offset: int = 0, window: int = 0, key_offset: int = 0) -> Array:
  """(B,1,Tq,Tk) boolean mask: same document only (segment 0 = padding), no future tokens if causal, and
  with `window` > 0 only keys less than `window` tokens away (Mistral's sliding window: itself included).

  Queries may be a block of the row starting at `query_offset`, keys one starting at `key_offset`. Padding
  attends to padding so its rows stay finite; real tokens never see padding or other documents.
  """
  keys = segment_ids if key_segment_ids is None else key_segment_ids
  mask = segment_ids[:, :, None] == keys[:, None, :]
  q_index = jnp.arange(segment_ids.shape[1])[:, None] + query_offset
  k_index = jnp.arange(keys.shape[1])[None, :] + key_offset
  if causal:
    mask &= (q_index >= k_index)[None]
  if window:
    mask &= (jnp.abs(q_index - k_index) < window)[None]
  return mask[:, None]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, library: bool = True) -> Array:
  """Attention scaled by 1/sqrt(q's head dim). With `library` and equal q/k and v head dims (not MLA, which
  jax refuses), `jax.nn.dot_product_attention` (which may dispatch to cuDNN on GPU); otherwise `einsum_core`
  on head-major copies."""
  if library and k.shape[-1] == v.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  qh, kh, vh = head_major(q, k, v)
  return from_head_major(einsum_core(qh, kh, vh, mask))


def head_major(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
  """q (B,T,N,H) scaled by 1/sqrt(H) as (B,K,G,T,H) for K kv heads of G query heads each; k, v (B,S,K,H)
  as (B,K,S,H). Scaling q is T*H work, not T*S."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qh = (q * (1 / math.sqrt(h))).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def from_head_major(o: Array) -> Array:
  """(B,K,G,T,H) back to (B,T,K*G,H)."""
  b, kv, g, t, h = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def einsum_core(qh: Array, kh: Array, vh: Array, mask: Array) -> Array:
  """Masked softmax attention on `head_major` operands (mask (B,1,T,S)), scores and `softmax` in float32:
  on XLA CPU, in causal blocks, 0.75-0.9x the time of `jax.nn.dot_product_attention` (docs/benchmarks.md)."""
  scores = jnp.einsum('bkgth,bksh->bkgts', qh, kh, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, :, None], scores, -0.7 * jnp.finfo(jnp.float32).max)  # as jax's masking
  return jnp.einsum('bkgts,bksh->bkgth', softmax(scores).astype(vh.dtype), vh)


def attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool, block: int,
              window: int = 0, impl: str = 'xla') -> Array:
  """Masked attention: one `dot_product_attention` call over the row (the library's, which may dispatch to
  cuDNN on GPU), or with causal masking and `block` > 0 (XLA's CPU default) in query blocks of the einsum
  core that each see only the keys up to the block's end, skipping the fully masked upper triangle: about
  half the work on long rows, and on CPU twice as fast for T=512 (benchmarks/step_breakdown.py). The result
  is the same as one call over the whole row. With a sliding `window`, a block also skips the keys that fell
  out of the window of its first query. `impl` 'cpu_fused' runs the fused C++ kernel instead (any mask,
  equal q/k/v head dims; `cpu_attention.attention`).
  """
  if impl == 'cpu_fused':
    return cpu_attention.attention(q, k, v, segment_ids, causal, window)
  t = q.shape[1]
  if not causal or block <= 0 or block >= t:
    return dot_product_attention(q, k, v, attention_mask(segment_ids, causal, window=window))
  # Head-major once for all blocks: a block's products then read contiguous slices (0.94-0.96x the step time
  # of transposing each block's q, k and v slices; docs/benchmarks.md).
  qh, kh, vh = head_major(q, k, v)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    first = max(0, start - window + 1) if window else 0
    mask = attention_mask(segment_ids[:, start:end], causal, segment_ids[:, first:end], start, window, first)
    outs.append(einsum_core(qh[:, :, :, start:end], kh[:, :, first:end], vh[:, :, first:end], mask))
  return from_head_major(jnp.concatenate(outs, axis=3))


def write_cache(cache: dict[str, Array], new: dict[str, Array], index: Array) -> dict[str, Array]:
  """`cache` (one layer: each entry (B,S,...)) with the entries of t new tokens (B,t,...) written at rows
  [index, index+t)."""
  return {name: jax.lax.dynamic_update_slice(c, new[name].astype(c.dtype), (0, index) + (0,) * (c.ndim - 2))
          for name, c in cache.items()}


def cached_attention(q: Array, k: Array, v: Array, index: Array, cfg: ModelConfig) -> Array:
  """Attention of t queries at cache rows [index, index+t) over the whole cache k (B,S,K,Hk), v (B,S,K,Hv).

  The mask is `attention_mask`'s: rows not written yet are padding (segment 0) to the queries (segment 1),
  and causality and the sliding window compare cache rows, so rows must hold the tokens in order.
  """
  b, t = q.shape[:2]
  written = (jnp.arange(k.shape[1]) < index + t).astype(jnp.int32)
  mask = attention_mask(jnp.ones((b, t), jnp.int32), cfg.causal, jnp.broadcast_to(written, (b, k.shape[1])),
                        query_offset=index, window=cfg.sliding_window)
  return dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
