"""Model construction as pure functions over parameter trees.

`graphdef, specs, shapes = describe(cfg, execution)` is the static half of an NNX model; `init_params(cfg, key)` the
arrays; `apply(graphdef, params, batch)` runs it. Training code sees only plain nested dicts of arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.models import execution as execution_lib, mla, transformer
from jaxtrain.models.config import ModelConfig
from jaxtrain.models.execution import Execution
from jaxtrain.models.transformer import Transformer

__all__ = ['ModelConfig', 'Execution', 'Transformer', 'model_config', 'describe', 'init_params', 'apply',
           'count_params', 'init_cache', 'decode', 'mla']


def model_config(model: Any, tokenizer_vocab: int) -> ModelConfig:
  """ModelConfig (the architecture) from the `model` config section, resolving vocab_size 0 and head_dim 0.
  The section's execution keys (attention_impl, attention_block, scan_layers, compute_dtype) are resolved
  where a job runs the model (`jaxtrain.train.execution.plan`), not here."""
  vocab = model.vocab_size or -(-tokenizer_vocab // 128) * 128
  return ModelConfig(
      vocab_size=vocab, d_model=model.d_model, num_layers=model.num_layers, num_heads=model.num_heads,
      num_kv_heads=model.num_kv_heads, head_dim=model.head_dim or model.d_model // model.num_heads,
      mlp_dim=model.mlp_dim, rope_theta=model.rope_theta, norm_eps=model.norm_eps,
      tie_embeddings=model.tie_embeddings, qkv_bias=model.qkv_bias, qk_norm=model.qk_norm,
      init_std=model.init_std, param_dtype=model.param_dtype, remat=model.remat, norm=model.norm,
      positions=model.positions, max_positions=model.max_positions, mlp=model.mlp, mlp_bias=model.mlp_bias,
      attn_out_bias=model.attn_out_bias, rope_scaling=model.rope_scaling, rope_factor=model.rope_factor,
      rope_low_freq_factor=model.rope_low_freq_factor, rope_high_freq_factor=model.rope_high_freq_factor,
      rope_original_max_positions=model.rope_original_max_positions, sliding_window=model.sliding_window,
      residual_gain=model.residual_gain, attention=model.attention, mla_q_rank=model.mla_q_rank,
      mla_kv_rank=model.mla_kv_rank, mla_nope_dim=model.mla_nope_dim, mla_rope_dim=model.mla_rope_dim,
      mla_v_dim=model.mla_v_dim)


def describe(cfg: ModelConfig, execution: Execution | None = None) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, logical PartitionSpec tree, ShapeDtypeStruct tree) without allocating parameters. The
  graphdef runs the model as `execution` says (default: `execution.default(cfg)`, which never builds the
  CPU kernel); specs and shapes do not depend on it."""
  # Built outside any mesh context: NNX would otherwise read the logical axis names as mesh axes.
  with jax.set_mesh(None):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), execution))
  graphdef, state = nnx.split(abstract)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return graphdef, specs, nnx.to_pure_dict(state)


def init_params(cfg: ModelConfig, key: jax.Array, execution: Execution | None = None) -> dict:
  """Freshly initialised parameters as a nested dict (call under `jax.jit` with out_shardings to shard);
  the values do not depend on `execution`."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(key), execution)))


def apply(graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
  """Logits (B,T,V) float32 for a batch with tokens, segment_ids and positions, run as the execution
  `describe` was given (the graphdef holds it)."""
  model = nnx.merge(graphdef, params)
  return model(batch['tokens'], batch['segment_ids'], batch['positions'])


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None,
               execution: Execution | None = None) -> dict:
  """Zeroed KV cache for `decode`: {name: (layers, batch, max_len, ...)} in `dtype` (default: the
  execution's compute dtype)."""
  if dtype is None:
    dtype = jnp.dtype(execution_lib.resolve(execution, cfg).compute_dtype)
  return transformer.init_cache(cfg, cfg.num_layers, batch, max_len, dtype)


def decode(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, positions: jax.Array, cache: dict,
           index: jax.Array) -> tuple[jax.Array, dict]:
  """(float32 logits (B,t,V), updated cache) for t new tokens (B,t) at `positions`, written at cache rows
  [index, index+t): prefill a prompt at index 0, then one token per call; jit it once, index traced."""
  model = nnx.merge(graphdef, params)
  return model.decode(tokens, positions, cache, jnp.asarray(index, jnp.int32))


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
