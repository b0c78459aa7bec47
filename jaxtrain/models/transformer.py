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

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain import sharding
from jaxtrain.models import mla
from jaxtrain.models.config import ModelConfig
from jaxtrain.models.execution import Execution, resolve
# The shared pieces live in layers.py (mla builds on them too); re-exported here for existing callers.
from jaxtrain.models.layers import (LayerNorm, RMSNorm, attention, attention_mask, cached_attention,  # noqa: F401
                                    dot_product_attention, einsum_core, from_head_major, head_major, make_norm,
                                    param, project, rope, rope_frequencies, rope_tables, write_cache, zeros)
from jaxtrain.models.ops import swiglu

Array = jax.Array


class Attention(nnx.Module):
  """Grouped-query attention (MHA when K == N, MQA when K == 1) with optional q/k/v and output bias, q/k
  norm, rotary positions (scaled or not) and a sliding window."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg, self.execution = cfg, resolve(execution, cfg)
    self.q = param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), cfg)
    self.k = param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.v = param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.o = param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), cfg)
    if cfg.qkv_bias:
      self.q_bias = zeros((n, h), ('heads', 'head_dim'), cfg)
      self.k_bias = zeros((k, h), ('kv_heads', 'head_dim'), cfg)
      self.v_bias = zeros((k, h), ('kv_heads', 'head_dim'), cfg)
    if cfg.attn_out_bias:
      self.o_bias = zeros((d,), ('embed',), cfg)
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
    cfg, ex = self.cfg, self.execution
    q, k, v = self._qkv(x, positions)
    # dot_product_attention handles K < N (GQA) itself.
    out = attention(q, k, v, segment_ids, cfg.causal, ex.attention_block, cfg.sliding_window,
                    ex.attention_impl)  # (B,T,N,H)
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
      self.gate = param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.up = param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.down = param(rngs, (f, d), ('mlp', 'embed'), cfg)
    if cfg.mlp_bias:
      if cfg.mlp == 'swiglu':
        self.gate_bias = zeros((f,), ('mlp',), cfg)
      self.up_bias = zeros((f,), ('mlp',), cfg)
      self.down_bias = zeros((d,), ('embed',), cfg)

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

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    self.attn_norm = make_norm(cfg.d_model, cfg, rngs)
    self.attn = attention_class(cfg)(cfg, rngs, execution)
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


def run_blocks(blocks: Block, x: Array, segment_ids: Array, positions: Array, cfg: ModelConfig,
               execution: Execution) -> Array:
  """x (B,T,D) through stacked blocks (the `nnx.vmap`-built module, parameters with a leading layers axis),
  scanned or unrolled per `execution.scan_layers`, each block rematerialised per `cfg.remat`."""
  graphdef, stacked = nnx.split(blocks)

  def layer(x: Array, params: Any) -> tuple[Array, None]:
    return nnx.merge(graphdef, params)(x, segment_ids, positions), None

  if cfg.remat != 'none':
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])
  if execution.scan_layers:
    x, _ = jax.lax.scan(layer, x, stacked)
  else:
    for i in range(_num_layers(stacked)):
      x, _ = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
  return x


def decode_blocks(blocks: Block, x: Array, positions: Array, cache: dict[str, Array], index: Array,
                  execution: Execution) -> tuple[Array, dict[str, Array]]:
  """New tokens x (B,t,D) at cache rows [index, index+t) through stacked blocks, each with its slice of
  `cache` (leading layers axis, from `init_cache`); returns the output and the updated cache."""
  graphdef, stacked = nnx.split(blocks)

  def layer(x: Array, params_cache: Any) -> tuple[Array, dict[str, Array]]:
    params, layer_cache = params_cache
    return nnx.merge(graphdef, params).decode(x, positions, layer_cache, index)

  if execution.scan_layers:
    return jax.lax.scan(layer, x, (stacked, cache))
  for i in range(_num_layers(stacked)):
    x, layer_cache = layer(x, jax.tree.map(lambda p, i=i: p[i], (stacked, cache)))
    cache = jax.tree.map(lambda c, new, i=i: c.at[i].set(new), cache, layer_cache)
  return x, cache


class Transformer(nnx.Module):
  """Decoder-only language model. `__call__(tokens, segment_ids, positions) -> float32 logits (B,T,V)`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    self.cfg = cfg
    self.execution = execution = resolve(execution, cfg)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs, execution)

    self.blocks = make_blocks(rngs)
    self.final_norm = make_norm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg)
    if cfg.positions == 'learned':  # drawn last so the other parameters match a rope model of the same seed
      self.pos_embed = param(rngs, (cfg.max_positions, cfg.d_model), ('positions', 'embed'), cfg)

  def _embed(self, tokens: Array, positions: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(self.execution.compute_dtype)
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
    x = run_blocks(self.blocks, self._embed(tokens, positions), segment_ids, positions, self.cfg, self.execution)
    return self._logits(x)

  def decode(self, tokens: Array, positions: Array, cache: dict[str, Array], index: Array
             ) -> tuple[Array, dict[str, Array]]:
    """Float32 logits (B,t,V) of t new tokens written at cache rows [index, index+t), and the new cache.

    Prefill with the prompt (t = its length, index 0), then step one token at a time; `index` may be traced,
    so one compiled step serves every position.
    """
    x, cache = decode_blocks(self.blocks, self._embed(tokens, positions), positions, cache, index, self.execution)
    return self._logits(x), cache
