"""Multi-head latent attention (DeepSeek-V2): keys and values expanded from a small per-token latent, and
rotary positions on a separate (decoupled) part of each query and key.

Per token, x (D) is compressed to a latent c_kv = RMSNorm(x @ kv_down) of width R (`mla_kv_rank`), from which
every head's key part k_nope (P) and value (V) are expanded: k_nope = c_kv @ k_up, v = c_kv @ v_up.
Positions enter only through a rotary part: per-head q_rope (E) and one k_rope (E) shared by all heads,
computed from x. A head scores q_nope.k_nope + q_rope.k_rope over sqrt(P + E). Because RoPE never touches the
latent, decoding caches c_kv and the rotated k_rope, R + E numbers per token and layer instead of GQA's 2KH,
and recomputes k_nope and v from them. Queries may be compressed the same way (`mla_q_rank` > 0).

Rank 0 turns a compression off: `mla_kv_rank` 0 projects k_nope and v per head straight from x (and decoding
caches them), `mla_q_rank` 0 projects the queries straight from x. Models with learned positions have no
rotary part (`mla_rope_dim` 0). Shapes: B batch, T queries, S keys, D d_model, N heads, R a latent rank.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.models.config import ModelConfig
from jaxtrain.models.execution import Execution, resolve
from jaxtrain.models.layers import (RMSNorm, attention, cached_attention, param, project, rope, rope_frequencies,
                                    write_cache, zeros)

Array = jax.Array

_DIMS = ('mla_q_rank', 'mla_kv_rank', 'mla_nope_dim', 'mla_rope_dim', 'mla_v_dim')


def config_error(cfg: ModelConfig) -> tuple[str, Any, str] | None:
  """(field, value, what would be valid) of the first MLA setting of `cfg` that cannot work, or None."""
  for name in _DIMS:
    if getattr(cfg, name) < 0:
      return name, getattr(cfg, name), 'must be >= 0'
  nope, rope_dim = cfg.mla_nope_dim, cfg.mla_rope_dim
  if nope + rope_dim == 0:
    return 'mla_nope_dim', nope, 'mla_nope_dim + mla_rope_dim (the query/key head width) must be > 0'
  if rope_dim % 2:
    return 'mla_rope_dim', rope_dim, 'must be even (rotary embedding)'
  if cfg.positions == 'learned' and rope_dim:
    return 'mla_rope_dim', rope_dim, "must be 0 with positions='learned' (no rotary part)"
  if cfg.qkv_bias or cfg.qk_norm:
    what = 'qkv_bias' if cfg.qkv_bias else 'qk_norm'
    return what, True, "must be False with attention='mla' (MLA has no q/k/v bias or q/k norm)"
  return None


def v_dim(cfg: ModelConfig) -> int:
  """Per-head value width: `mla_v_dim`, or head_dim when 0."""
  return cfg.mla_v_dim or cfg.head_dim


class MLA(nnx.Module):
  """Multi-head latent attention with `Attention`'s interface: `__call__(x, segment_ids, positions)`,
  `decode(x, positions, cache, index)` and `cache_shapes(cfg)`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    problem = config_error(cfg)
    if problem:
      raise ValueError(f'ModelConfig.{problem[0]}={problem[1]!r}: {problem[2]}')
    d, n, nope, rd, vd = cfg.d_model, cfg.num_heads, cfg.mla_nope_dim, cfg.mla_rope_dim, v_dim(cfg)
    self.cfg, self.execution = cfg, resolve(execution, cfg)
    if cfg.mla_q_rank:
      self.q_down = param(rngs, (d, cfg.mla_q_rank), ('embed', 'latent'), cfg)
      self.q_norm = RMSNorm(cfg.mla_q_rank, cfg, rngs)
      self.q_up = param(rngs, (cfg.mla_q_rank, n, nope + rd), ('latent', 'heads', 'head_dim'), cfg)
    else:
      self.q = param(rngs, (d, n, nope + rd), ('embed', 'heads', 'head_dim'), cfg)
    # Zero-width parts (nope 0, rope 0) get no parameter at all rather than an empty one.
    if cfg.mla_kv_rank:
      self.kv_down = param(rngs, (d, cfg.mla_kv_rank), ('embed', 'latent'), cfg)
      self.kv_norm = RMSNorm(cfg.mla_kv_rank, cfg, rngs)
      if nope:
        self.k_up = param(rngs, (cfg.mla_kv_rank, n, nope), ('latent', 'heads', 'head_dim'), cfg)
      self.v_up = param(rngs, (cfg.mla_kv_rank, n, vd), ('latent', 'heads', 'head_dim'), cfg)
    else:
      if nope:
        self.k = param(rngs, (d, n, nope), ('embed', 'heads', 'head_dim'), cfg)
      self.v = param(rngs, (d, n, vd), ('embed', 'heads', 'head_dim'), cfg)
    if rd:
      self.k_rope = param(rngs, (d, rd), ('embed', 'head_dim'), cfg)
    self.o = param(rngs, (n, vd, d), ('heads', 'head_dim', 'embed'), cfg)
    if cfg.attn_out_bias:
      self.o_bias = zeros((d,), ('embed',), cfg)

  @staticmethod
  def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-token shapes of what decoding caches: the latent (or, uncompressed, k_nope and v) and k_rope."""
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.mla_kv_rank:
      shapes['c_kv'] = (cfg.mla_kv_rank,)
    else:
      if cfg.mla_nope_dim:
        shapes['k'] = (cfg.num_heads, cfg.mla_nope_dim)
      shapes['v'] = (cfg.num_heads, v_dim(cfg))
    if cfg.mla_rope_dim:
      shapes['k_rope'] = (cfg.mla_rope_dim,)
    return shapes

  def _rope(self, x: Array, positions: Array) -> Array:
    cfg = self.cfg
    return rope(x, positions, cfg.rope_theta, rope_frequencies(cfg, cfg.mla_rope_dim))

  def _queries(self, x: Array, positions: Array) -> Array:
    """(B,T,N,P+E): the nope part, then the rotated rope part."""
    cfg = self.cfg
    if cfg.mla_q_rank:
      c_q = self.q_norm(project('btd,dr->btr', x, self.q_down.get_value()))
      q = project('btr,rnh->btnh', c_q, self.q_up.get_value())
    else:
      q = project('btd,dnh->btnh', x, self.q.get_value())
    if not cfg.mla_rope_dim:
      return q
    nope = cfg.mla_nope_dim
    return jnp.concatenate([q[..., :nope], self._rope(q[..., nope:], positions)], axis=-1)

  def _per_token(self, x: Array, positions: Array) -> dict[str, Array]:
    """What a token contributes to keys and values, in `cache_shapes` layout (k_rope already rotated)."""
    cfg = self.cfg
    out = {}
    if cfg.mla_kv_rank:
      out['c_kv'] = self.kv_norm(project('btd,dr->btr', x, self.kv_down.get_value()))
    else:
      if cfg.mla_nope_dim:
        out['k'] = project('btd,dnh->btnh', x, self.k.get_value())
      out['v'] = project('btd,dnh->btnh', x, self.v.get_value())
    if cfg.mla_rope_dim:
      k_rope = project('btd,de->bte', x, self.k_rope.get_value())
      out['k_rope'] = self._rope(k_rope[:, :, None], positions)[:, :, 0]
    return out

  def _keys_values(self, per_token: dict[str, Array], dt: Any) -> tuple[Array, Array]:
    """Keys (B,S,N,P+E) and values (B,S,N,V) from `_per_token`'s entries (or the cache's)."""
    cfg = self.cfg
    per_token = {name: a.astype(dt) for name, a in per_token.items()}
    if cfg.mla_kv_rank:
      c_kv = per_token['c_kv']
      k = project('bsr,rnh->bsnh', c_kv, self.k_up.get_value()) if cfg.mla_nope_dim else None
      v = project('bsr,rnh->bsnh', c_kv, self.v_up.get_value())
    else:
      k, v = per_token.get('k'), per_token['v']
    if cfg.mla_rope_dim:
      b, s, n = v.shape[:3]
      k_rope = jnp.broadcast_to(per_token['k_rope'][:, :, None], (b, s, n, cfg.mla_rope_dim))
      k = k_rope if k is None else jnp.concatenate([k, k_rope], axis=-1)
    return k, v

  def _out(self, out: Array) -> Array:
    out = project('btnh,nhd->btd', out, self.o.get_value())
    if self.cfg.attn_out_bias:
      out = out + self.o_bias[...].astype(out.dtype)
    return out

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    cfg = self.cfg
    q = self._queries(x, positions)
    k, v = self._keys_values(self._per_token(x, positions), x.dtype)
    # Concatenated parts make q.k the sum of both scores; the default scale 1/sqrt(P+E) is MLA's.
    out = attention(q, k, v, segment_ids, cfg.causal, self.execution.attention_block, cfg.sliding_window)  # (B,T,N,V)
    return self._out(out)

  def decode(self, x: Array, positions: Array, cache: dict[str, Array], index: Array
             ) -> tuple[Array, dict[str, Array]]:
    """x (B,t,D) of new tokens at cache rows [index, index+t) -> (output (B,t,D), updated cache)."""
    q = self._queries(x, positions)
    cache = write_cache(cache, self._per_token(x, positions), index)
    k, v = self._keys_values(cache, x.dtype)
    return self._out(cached_attention(q, k, v, index, self.cfg)), cache


def head_dims(cfg: ModelConfig) -> tuple[int, int]:
  """(query/key width, value width) per head of the attention `cfg` names (GQA: head_dim for both)."""
  if cfg.attention == 'mla':
    return cfg.mla_nope_dim + cfg.mla_rope_dim, v_dim(cfg)
  return cfg.head_dim, cfg.head_dim

