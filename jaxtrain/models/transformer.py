"""Decoder-only transformer in Flax NNX covering the Llama family and GPT-2 with one class and config switches.

Llama / Mistral / Qwen2 / Qwen3 (the default): RMSNorm, RoPE (optionally llama3- or linearly scaled), GQA
attention (optional q/k/v bias, q/k RMSNorm, sliding window), SwiGLU MLP, tied or untied head. GPT-2:
LayerNorm with bias, learned absolute positions, biased projections, GELU (tanh) MLP. `jaxtrain.hf` maps
Hugging Face checkpoints of these families onto this one parameter tree and back.

Shapes use B batch, T sequence, D d_model, N query heads, K kv heads, H head_dim, F mlp_dim, V vocab,
L layers. Parameters name logical axes only (`out_sharding` metadata); `jaxtrain.sharding` maps them to mesh
axes. Block parameters are stacked along a leading `layers` axis so the forward pass can `lax.scan` over
them (compile time flat in depth) or unroll them, from the same parameter tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import sharding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the decoder. Built from `config.model` by `model_config`."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  init_std: float = 0.02
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  remat: str = 'none'  # none | full | save_dots
  scan_layers: bool = True
  causal: bool = True
  attention_block: int = 0  # causal attention in query blocks of this size (0: one call over the row)
  norm: str = 'rmsnorm'  # rmsnorm | layernorm (with bias)
  positions: str = 'rope'  # rope | learned (absolute, a max_positions x D table)
  max_positions: int = 0  # rows of the learned position table; informational for rope
  mlp: str = 'swiglu'  # swiglu | gelu (exact) | gelu_tanh (GPT-2's gelu_new)
  mlp_bias: bool = False
  attn_out_bias: bool = False
  rope_scaling: str = 'none'  # none | linear | llama3
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  sliding_window: int = 0  # a query sees only the last this many tokens (itself included); 0: off


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
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
  product themselves through `w.einsum(spec, x)`; `jaxtrain.lora` and `jaxtrain.quant` build them from the
  parameter tree, so the model never needs to know which one it was given.
  """
  if isinstance(w, jax.Array):
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=out_dtype)
  return w.einsum(spec, x, out_dtype)


def _zeros(shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 whatever the compute dtype."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ('norm',), cfg, std=0.0)
    self.eps = cfg.norm_eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred norm with scale and bias (GPT-2), computed in float32 whatever the compute dtype."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ('norm',), cfg, std=0.0)
    self.bias = _zeros((dim,), ('norm',), cfg)
    self.eps = cfg.norm_eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(dim: int, cfg: ModelConfig, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
  """The block / final norm that `cfg.norm` names."""
  return LayerNorm(dim, cfg, rngs) if cfg.norm == 'layernorm' else RMSNorm(dim, cfg, rngs)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray | None:
  """Scaled inverse frequencies (H/2,) for `cfg.rope_scaling` (float64 math, as transformers' rope init);
  None for unscaled RoPE, which `rope` computes from theta itself."""
  if cfg.rope_scaling == 'none':
    return None
  half = cfg.head_dim // 2
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


def rope(x: Array, positions: Array, theta: float, freqs: np.ndarray | None = None) -> Array:
  """Rotary embedding in the half-split convention of Hugging Face Llama. x: (B,T,n,H), positions: (B,T).

  `freqs` (H/2,) overrides the inverse frequencies derived from `theta` (scaled RoPE, `rope_frequencies`).
  """
  half = x.shape[-1] // 2
  if freqs is None:
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
  else:
    freqs = jnp.asarray(freqs, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (B,T,H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


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


def attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool, block: int,
              window: int = 0) -> Array:
  """Masked attention through `jax.nn.dot_product_attention` (which may dispatch to cuDNN on GPU).

  With causal masking and `block` > 0, queries go in blocks that each see only the keys up to the block's
  end, skipping the fully masked upper triangle: about half the work on long rows, and on CPU twice as fast
  for T=512 (benchmarks/step_breakdown.py). The result is the same as one call over the whole row. With a
  sliding `window`, a block also skips the keys that fell out of the window of its first query.
  """
  t = q.shape[1]
  if not causal or block <= 0 or block >= t:
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(segment_ids, causal, window=window))
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    first = max(0, start - window + 1) if window else 0
    mask = attention_mask(segment_ids[:, start:end], causal, segment_ids[:, first:end], start, window, first)
    outs.append(jax.nn.dot_product_attention(q[:, start:end], k[:, first:end], v[:, first:end], mask=mask))
  return jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
  """Grouped-query attention (MHA when K == N, MQA when K == 1) with optional q/k/v and output bias, q/k
  norm, rotary positions (scaled or not) and a sliding window."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.q = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), cfg)
    self.k = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.v = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.o = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), cfg)
    if cfg.qkv_bias:
      self.q_bias = _zeros((n, h), ('heads', 'head_dim'), cfg)
      self.k_bias = _zeros((k, h), ('kv_heads', 'head_dim'), cfg)
      self.v_bias = _zeros((k, h), ('kv_heads', 'head_dim'), cfg)
    if cfg.attn_out_bias:
      self.o_bias = _zeros((d,), ('embed',), cfg)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg, rngs)
      self.k_norm = RMSNorm(h, cfg, rngs)

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    cfg, dt = self.cfg, x.dtype
    q = project('btd,dnh->btnh', x, self.q.get_value())
    k = project('btd,dkh->btkh', x, self.k.get_value())
    v = project('btd,dkh->btkh', x, self.v.get_value())
    if cfg.qkv_bias:
      q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == 'rope':
      freqs = rope_frequencies(cfg)
      q, k = rope(q, positions, cfg.rope_theta, freqs), rope(k, positions, cfg.rope_theta, freqs)
    # dot_product_attention handles K < N (GQA) itself.
    out = attention(q, k, v, segment_ids, cfg.causal, cfg.attention_block, cfg.sliding_window)  # (B,T,N,H)
    out = project('btnh,nhd->btd', out, self.o.get_value())
    if cfg.attn_out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out


class Mlp(nnx.Module):
  """SwiGLU, down(silu(x @ gate) * (x @ up)), or GELU, down(gelu(x @ up)); biases optional (GPT-2 has them)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.mlp_dim
    if cfg.mlp == 'swiglu':
      self.gate = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.up = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.down = _param(rngs, (f, d), ('mlp', 'embed'), cfg)
    if cfg.mlp_bias:
      if cfg.mlp == 'swiglu':
        self.gate_bias = _zeros((f,), ('mlp',), cfg)
      self.up_bias = _zeros((f,), ('mlp',), cfg)
      self.down_bias = _zeros((d,), ('embed',), cfg)

  def _in(self, name: str, x: Array) -> Array:
    y = project('btd,df->btf', x, getattr(self, name).get_value())
    return y + getattr(self, f'{name}_bias')[...].astype(x.dtype) if self.cfg.mlp_bias else y

  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    if cfg.mlp == 'swiglu':
      h = jax.nn.silu(self._in('gate', x)) * self._in('up', x)
    else:
      h = jax.nn.gelu(self._in('up', x), approximate=cfg.mlp == 'gelu_tanh')
    out = project('btf,fd->btd', h, self.down.get_value())
    return out + self.down_bias[...].astype(x.dtype) if cfg.mlp_bias else out


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg.d_model, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = make_norm(cfg.d_model, cfg, rngs)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    x = x + self.attn(self.attn_norm(x), segment_ids, positions)
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ('batch', 'seq', 'act_embed'))


_REMAT_POLICIES: dict[str, Any] = {
    'full': None,  # save nothing: recompute the whole block in the backward pass.
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
  """Decoder-only language model. `__call__(tokens, segment_ids, positions) -> float32 logits (B,T,V)`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = make_norm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg)
    if cfg.positions == 'learned':  # drawn last so the other parameters match a rope model of the same seed
      self.pos_embed = _param(rngs, (cfg.max_positions, cfg.d_model), ('positions', 'embed'), cfg)

  def __call__(self, tokens: Array, segment_ids: Array, positions: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    # Gather the (fsdp/tensor-sharded) table whole before the lookup: a gather from a sharded table with a
    # batch-sharded index makes XLA replicate and re-partition the output, which costs more.
    table = sharding.constrain(self.embed[...].astype(dt), (None, None))
    x = table[tokens]  # (B,T,D)
    if cfg.positions == 'learned':
      x = x + sharding.constrain(self.pos_embed[...].astype(dt), (None, None))[positions]
    x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))
    graphdef, stacked = nnx.split(self.blocks)

    def layer(x: Array, params: Any) -> tuple[Array, None]:
      return nnx.merge(graphdef, params)(x, segment_ids, positions), None

    if cfg.remat != 'none':
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      x, _ = jax.lax.scan(layer, x, stacked)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x, self.embed[...].astype(dt), preferred_element_type=jnp.float32)
    else:
      logits = project('btd,dv->btv', x, self.lm_head.get_value(), jnp.float32)
    return sharding.constrain(logits, ('batch', 'seq', 'act_vocab'))
