"""`ModelConfig`: the architecture of the decoder, independent of the backend that runs it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the decoder: what the parameter tree and the function it computes depend on. How it runs
  (attention implementation, layer scan, compute dtype) is an `Execution` (`jaxtrain.models.execution`).
  Built from `config.model` by `jaxtrain.models.model_config`."""

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
  remat: str = 'none'  # none | full | save_dots (what the backward pass recomputes; the same function)
  causal: bool = True
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
