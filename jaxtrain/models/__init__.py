"""Model construction as pure functions over parameter trees.

`graphdef, specs = describe(cfg)` is the static half of an NNX model; `init_params(cfg, key)` the
arrays; `apply(graphdef, params, batch)` runs it. Training code sees only plain nested dicts of arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.errors import ConfigError
from jaxtrain.kernels import cpu_attention
from jaxtrain.models import mla, transformer
from jaxtrain.models.transformer import ModelConfig, Transformer

__all__ = ['ModelConfig', 'Transformer', 'model_config', 'describe', 'init_params', 'apply', 'count_params',
           'init_cache', 'decode', 'mla']


def model_config(model: Any, tokenizer_vocab: int) -> ModelConfig:
  """ModelConfig from the `model` config section, resolving vocab_size 0, head_dim 0 and compute_dtype auto."""
  vocab = model.vocab_size or -(-tokenizer_vocab // 128) * 128
  cpu = jax.default_backend() == 'cpu'
  compute = model.compute_dtype
  if compute == 'auto':
    compute = 'float32' if cpu else 'bfloat16'
  # Blocked causal attention halves XLA CPU's attention time; on accelerators one call lets cuDNN fuse it.
  block = model.attention_block if model.attention_block >= 0 else (128 if cpu else 0)
  impl = _attention_impl(model, cpu)
  # Unrolled layers are faster on CPU; with remat (asked for to save memory) the scan keeps its bound.
  scan = (not cpu or model.remat != 'none') if model.scan_layers is None else model.scan_layers
  return ModelConfig(
      vocab_size=vocab, d_model=model.d_model, num_layers=model.num_layers, num_heads=model.num_heads,
      num_kv_heads=model.num_kv_heads, head_dim=model.head_dim or model.d_model // model.num_heads,
      mlp_dim=model.mlp_dim, rope_theta=model.rope_theta, norm_eps=model.norm_eps,
      tie_embeddings=model.tie_embeddings, qkv_bias=model.qkv_bias, qk_norm=model.qk_norm,
      init_std=model.init_std, param_dtype=model.param_dtype, compute_dtype=compute, remat=model.remat,
      scan_layers=scan, attention_block=block, attention_impl=impl, norm=model.norm, positions=model.positions,
      max_positions=model.max_positions, mlp=model.mlp, mlp_bias=model.mlp_bias, attn_out_bias=model.attn_out_bias,
      rope_scaling=model.rope_scaling, rope_factor=model.rope_factor, rope_low_freq_factor=model.rope_low_freq_factor,
      rope_high_freq_factor=model.rope_high_freq_factor,
      rope_original_max_positions=model.rope_original_max_positions, sliding_window=model.sliding_window,
      residual_gain=model.residual_gain, attention=model.attention, mla_q_rank=model.mla_q_rank,
      mla_kv_rank=model.mla_kv_rank, mla_nope_dim=model.mla_nope_dim, mla_rope_dim=model.mla_rope_dim,
      mla_v_dim=model.mla_v_dim)


def _attention_impl(model: Any, cpu: bool) -> str:
  """`model.attention_impl` resolved: auto takes the fused CPU kernel on CPU for GQA attention where it
  builds (2x faster than XLA's ops forward + backward: docs/benchmarks.md), else XLA's ops (with a warning
  saying why)."""
  want, fits = model.attention_impl, cpu and model.attention == 'gqa'
  if want == 'xla' or (want == 'auto' and not fits):
    return 'xla'
  if not fits:
    raise ConfigError('model.attention_impl', want, f'needs the CPU backend and GQA attention; this run has '
                      f'backend {jax.default_backend()!r}, model.attention={model.attention!r} (use auto or xla)')
  why = cpu_attention.unavailable()
  if want == 'cpu_fused' and why:
    raise ConfigError('model.attention_impl', want, f'the kernel does not build here ({why}); use auto or xla')
  if why:
    warnings.warn(f'model.attention_impl=auto: XLA attention, the fused CPU kernel does not build here: {why}',
                  stacklevel=2)
  return 'xla' if why else 'cpu_fused'


def describe(cfg: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, logical PartitionSpec tree, ShapeDtypeStruct tree) without allocating parameters."""
  # Built outside any mesh context: NNX would otherwise read the logical axis names as mesh axes.
  with jax.set_mesh(None):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return graphdef, specs, nnx.to_pure_dict(state)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Freshly initialised parameters as a nested dict (call under `jax.jit` with out_shardings to shard)."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(key))))


def apply(graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
  """Logits (B,T,V) float32 for a batch with tokens, segment_ids and positions."""
  model = nnx.merge(graphdef, params)
  return model(batch['tokens'], batch['segment_ids'], batch['positions'])


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """Zeroed KV cache for `decode`: {name: (layers, batch, max_len, ...)} in `dtype` (default: compute dtype)."""
  return transformer.init_cache(cfg, cfg.num_layers, batch, max_len,
                                jnp.dtype(cfg.compute_dtype) if dtype is None else dtype)


def decode(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, positions: jax.Array, cache: dict,
           index: jax.Array) -> tuple[jax.Array, dict]:
  """(float32 logits (B,t,V), updated cache) for t new tokens (B,t) at `positions`, written at cache rows
  [index, index+t): prefill a prompt at index 0, then one token per call; jit it once, index traced."""
  model = nnx.merge(graphdef, params)
  return model.decode(tokens, positions, cache, jnp.asarray(index, jnp.int32))


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
