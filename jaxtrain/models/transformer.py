"""Decoder-only transformer in Flax NNX covering the Llama family and GPT-2 with one class and config switches.

Llama / Mistral / Qwen2 / Qwen3 (the default): RMSNorm, RoPE (optionally llama3- or linearly scaled), GQA
attention (optional q/k/v bias, q/k RMSNorm, sliding window), SwiGLU MLP, tied or untied head. GPT-2:
LayerNorm with bias, learned absolute positions, biased projections, GELU (tanh) MLP. `jaxtrain.hf` maps
Hugging Face checkpoints of these families onto this one parameter tree and back.

Attention is grouped-query (`Attention`) or DeepSeek-V2's multi-head latent attention (`mla.MLA`), each with
a KV-cache `decode` for autoregressive sampling (`init_cache`, `decode_blocks`, `Transformer.decode`).
With `residual_gain` > 0 each block scales its two residual branches by learnable scalars.

Shapes use B batch, T sequence, D d_model, N query heads, K kv heads, H head_dim, F mlp_dim, V vocab,
L layers, S cache rows. Parameters name logical axes only (`out_sharding` metadata); `jaxtrain.sharding` maps
them to mesh axes. Block parameters are stacked along a leading `layers` axis so the forward pass can
`lax.scan` over them (compile time flat in depth) or unroll them, from the same parameter tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtrain import sharding
from jaxtrain.kernels import cpu_attention
from jaxtrain.models.ops import computed_once, linear, rotate, softmax, swiglu

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
  attention_impl: str = 'xla'  # xla: XLA's ops (per attention_block); cpu_fused: the C++ kernel (cpu_attention)
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
  residual_gain: float = 0.0  # > 0: learnable per-block scalars on the attention and MLP branches, from this
  attention: str = 'gqa'  # gqa | mla (multi-head latent attention, jaxtrain.models.mla)
  mla_q_rank: int = 0  # query latent width; 0: queries projected directly from x
  mla_kv_rank: int = 0  # key/value latent width (what decoding caches); 0: no compression
  mla_nope_dim: int = 0  # per-head query/key width without rotary positions
  mla_rope_dim: int = 0  # per-head query width (and shared key width) with rotary positions
  mla_v_dim: int = 0  # per-head value width; 0: head_dim


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
  product themselves through `w.einsum(spec, x)`; `jaxtrain.adapters.lora` and `jaxtrain.adapters.quant` build them from the
  parameter tree, so the model never needs to know which one it was given.
  """
  if isinstance(w, jax.Array):
    w = w.astype(x.dtype)
    if out_dtype is None or jnp.dtype(out_dtype) == x.dtype:
      # Named so that remat's save_dots still saves it: a custom_vjp's output is not a dot to the policy.
      return checkpoint_name(linear(spec, x, w), 'linear')
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
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

  @staticmethod
  def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token shapes of what decoding caches: the rotated keys and the values."""
    return {'k': (cfg.num_kv_heads, cfg.head_dim), 'v': (cfg.num_kv_heads, cfg.head_dim)}

  def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
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
      tables = rope_tables(positions, cfg.head_dim, cfg.rope_theta, freqs)  # q and k share one computation
      q, k = rope(q, positions, cfg.rope_theta, tables=tables), rope(k, positions, cfg.rope_theta, tables=tables)
    return q, k, v

  def _out(self, out: Array) -> Array:
    out = project('btnh,nhd->btd', out, self.o.get_value())
    if self.cfg.attn_out_bias:
      out = out + self.o_bias[...].astype(out.dtype)
    return out

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    cfg = self.cfg
    q, k, v = self._qkv(x, positions)
    # dot_product_attention handles K < N (GQA) itself.
    out = attention(q, k, v, segment_ids, cfg.causal, cfg.attention_block, cfg.sliding_window,
                    cfg.attention_impl)  # (B,T,N,H)
    return self._out(out)

  def decode(self, x: Array, positions: Array, cache: dict[str, Array], index: Array
             ) -> tuple[Array, dict[str, Array]]:
    """x (B,t,D) of new tokens at cache rows [index, index+t) -> (output (B,t,D), updated cache)."""
    q, k, v = self._qkv(x, positions)
    cache = write_cache(cache, {'k': k, 'v': v}, index)
    return self._out(cached_attention(q, cache['k'], cache['v'], index, self.cfg)), cache


def attention_class(cfg: ModelConfig) -> type[nnx.Module]:
  """`Attention` or `mla.MLA`, as `cfg.attention` says."""
  if cfg.attention == 'mla':
    from jaxtrain.models import mla  # imported here: mla builds on this module's helpers
    return mla.MLA
  if cfg.attention != 'gqa':
    raise ValueError(f"ModelConfig.attention={cfg.attention!r}: must be 'gqa' or 'mla'")
  return Attention


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
    weights = [getattr(self, n).get_value() for n in ('gate', 'up', 'down')] if cfg.mlp == 'swiglu' else []
    if weights and not cfg.mlp_bias and all(isinstance(w, jax.Array) for w in weights):
      return swiglu(x, *(w.astype(x.dtype) for w in weights))  # structured (LoRA, quantized) weights: autodiff
    if cfg.mlp == 'swiglu':
      h = jax.nn.silu(self._in('gate', x)) * self._in('up', x)
    else:
      h = jax.nn.gelu(self._in('up', x), approximate=cfg.mlp == 'gelu_tanh')
    out = project('btf,fd->btd', h, self.down.get_value())
    return out + self.down_bias[...].astype(x.dtype) if cfg.mlp_bias else out


class Gain(nnx.Param):
  """A learnable scalar (residual gain) that names its stacking axis itself: `nnx.vmap` extends only a
  non-empty out_sharding, so a stacked scalar's () would otherwise describe an (L,) array."""

  def add_axis(self, axis_index: int, axis_name: str | None) -> None:
    if not self.get_metadata().get('out_sharding'):
      self.set_metadata(out_sharding=(axis_name,))
    super().add_axis(axis_index, axis_name)


class Block(nnx.Module):
  """Pre-norm transformer block; with `residual_gain` > 0 each branch is scaled by a learnable scalar."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg.d_model, cfg, rngs)
    self.attn = attention_class(cfg)(cfg, rngs)
    self.mlp_norm = make_norm(cfg.d_model, cfg, rngs)
    self.mlp = Mlp(cfg, rngs)
    if cfg.residual_gain > 0:  # off adds nothing, so the parameter tree stays that of a plain block
      gain = jnp.full((), cfg.residual_gain, jnp.dtype(cfg.param_dtype))
      self.attn_gain = Gain(gain, out_sharding=(), eager_sharding=False)
      self.mlp_gain = Gain(gain, out_sharding=(), eager_sharding=False)

  def _add(self, x: Array, branch: Array, gain: str) -> Array:
    if hasattr(self, gain):
      branch = getattr(self, gain)[...].astype(branch.dtype) * branch
    return x + branch

  def _mlp(self, x: Array) -> Array:
    x = self._add(x, self.mlp(self.mlp_norm(x)), 'mlp_gain')
    return sharding.constrain(x, ('batch', 'seq', 'act_embed'))

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    return self._mlp(self._add(x, self.attn(self.attn_norm(x), segment_ids, positions), 'attn_gain'))

  def decode(self, x: Array, positions: Array, cache: dict[str, Array], index: Array
             ) -> tuple[Array, dict[str, Array]]:
    """The block on new tokens x (B,t,D) at cache rows [index, index+t) of this layer's cache."""
    out, cache = self.attn.decode(self.attn_norm(x), positions, cache, index)
    return self._mlp(self._add(x, out, 'attn_gain')), cache


def init_cache(cfg: ModelConfig, num_layers: int, batch: int, max_len: int, dtype: Any = jnp.float32
               ) -> dict[str, Array]:
  """Zeroed KV cache for `num_layers` stacked blocks: {name: (L,B,max_len,...)}; GQA caches k and v,
  MLA its latent and shared rotary key (`cache_shapes` of the attention class)."""
  shapes = attention_class(cfg).cache_shapes(cfg)
  return {name: jnp.zeros((num_layers, batch, max_len, *shape), dtype) for name, shape in shapes.items()}


_REMAT_POLICIES: dict[str, Any] = {
    'full': None,  # save nothing: recompute the whole block in the backward pass.
    'save_dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('linear')),
}


def _num_layers(stacked: Any) -> int:
  return jax.tree.leaves(stacked)[0].shape[0]


def run_blocks(blocks: Block, x: Array, segment_ids: Array, positions: Array, cfg: ModelConfig) -> Array:
  """x (B,T,D) through stacked blocks (the `nnx.vmap`-built module, parameters with a leading layers axis),
  scanned or unrolled per `cfg.scan_layers`, each block rematerialised per `cfg.remat`."""
  graphdef, stacked = nnx.split(blocks)

  def layer(x: Array, params: Any) -> tuple[Array, None]:
    return nnx.merge(graphdef, params)(x, segment_ids, positions), None

  if cfg.remat != 'none':
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])
  if cfg.scan_layers:
    x, _ = jax.lax.scan(layer, x, stacked)
  else:
    for i in range(_num_layers(stacked)):
      x, _ = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
  return x


def decode_blocks(blocks: Block, x: Array, positions: Array, cache: dict[str, Array], index: Array,
                  cfg: ModelConfig) -> tuple[Array, dict[str, Array]]:
  """New tokens x (B,t,D) at cache rows [index, index+t) through stacked blocks, each with its slice of
  `cache` (leading layers axis, from `init_cache`); returns the output and the updated cache."""
  graphdef, stacked = nnx.split(blocks)

  def layer(x: Array, params_cache: Any) -> tuple[Array, dict[str, Array]]:
    params, layer_cache = params_cache
    return nnx.merge(graphdef, params).decode(x, positions, layer_cache, index)

  if cfg.scan_layers:
    return jax.lax.scan(layer, x, (stacked, cache))
  for i in range(_num_layers(stacked)):
    x, layer_cache = layer(x, jax.tree.map(lambda p, i=i: p[i], (stacked, cache)))
    cache = jax.tree.map(lambda c, new, i=i: c.at[i].set(new), cache, layer_cache)
  return x, cache


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

  def _embed(self, tokens: Array, positions: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    # Gather the (fsdp/tensor-sharded) table whole before the lookup: a gather from a sharded table with a
    # batch-sharded index makes XLA replicate and re-partition the output, which costs more.
    table = sharding.constrain(self.embed[...].astype(dt), (None, None))
    x = table[tokens]  # (B,T,D)
    if cfg.positions == 'learned':
      x = x + sharding.constrain(self.pos_embed[...].astype(dt), (None, None))[positions]
    return sharding.constrain(x, ('batch', 'seq', 'act_embed'))

  def _logits(self, x: Array) -> Array:
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = project('btd,vd->btv', x, self.embed[...], jnp.float32)
    else:
      logits = project('btd,dv->btv', x, self.lm_head.get_value(), jnp.float32)
    return sharding.constrain(logits, ('batch', 'seq', 'act_vocab'))

  def __call__(self, tokens: Array, segment_ids: Array, positions: Array) -> Array:
    x = run_blocks(self.blocks, self._embed(tokens, positions), segment_ids, positions, self.cfg)
    return self._logits(x)

  def decode(self, tokens: Array, positions: Array, cache: dict[str, Array], index: Array
             ) -> tuple[Array, dict[str, Array]]:
    """Float32 logits (B,t,V) of t new tokens written at cache rows [index, index+t), and the new cache.

    Prefill with the prompt (t = its length, index 0), then step one token at a time; `index` may be traced,
    so one compiled step serves every position.
    """
    x, cache = decode_blocks(self.blocks, self._embed(tokens, positions), positions, cache, index, self.cfg)
    return self._logits(x), cache
