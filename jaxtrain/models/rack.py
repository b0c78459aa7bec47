"""The StackWise rack: a shared embedding and head around a list of stacks of transformer blocks.

A stack is `cfg.num_layers` blocks of `jaxtrain.models.transformer` stacked on a leading `layers` axis, so the
same block code (GQA or MLA attention, causal for a decoder or bidirectional for an encoder) runs in both
models and a rack of S stacks of n blocks computes what a Transformer of S*n layers computes
(`to_transformer`). Parameters are plain nested dicts:

  {'shared': {'embed', 'final_norm', ['lm_head'], ['pos_embed'], ['time_proj' | 'time_table']},
   'stacks': {'0': {'blocks': ...}, '1': ...}}

Stack i is initialised from `fold_in(key, 1 + i)` whatever the number of stacks, so a progressive run and an
end-to-end run of the same rack start from the same weights. The forward pass is split into `embed`,
`run_stack` and `head`, which the StackWise stage step composes (with gradients stopped after a frozen prefix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain import sharding
from jaxtrain.models import layers, transformer as tf
from jaxtrain.models.config import ModelConfig
from jaxtrain.models.execution import Execution, resolve

Array = jax.Array
TIME_EMBEDDINGS = ('none', 'sinusoidal', 'learned')


@dataclasses.dataclass(frozen=True)
class RackConfig:
  """A rack of `num_stacks` stacks of `block.num_layers` blocks each; `time_embedding` gives the model the
  diffusion time t (time-as-input objectives)."""

  block: ModelConfig
  num_stacks: int
  time_embedding: str = 'none'  # none | sinusoidal | learned
  time_bins: int = 128  # rows of the learned time table (t is rounded to the nearest bin)

  @property
  def blocks_per_stack(self) -> int:
    return self.block.num_layers

  @property
  def num_blocks(self) -> int:
    return self.num_stacks * self.block.num_layers


def time_features(t: Array, dim: int) -> Array:
  """Sinusoidal features (..., dim) of t in [0, 1] (t scaled by 1000, as diffusion models usually do)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  out = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, dim - 2 * half)])


class Shared(nnx.Module):
  """Embedding (with learned positions and the time embedding, when used), final norm and head."""

  def __init__(self, rc: RackConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    cfg = rc.block
    self.rc, self.execution = rc, resolve(execution, cfg)
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg)
    self.final_norm = layers.make_norm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg)
    if cfg.positions == 'learned':
      self.pos_embed = layers.param(rngs, (cfg.max_positions, cfg.d_model), ('positions', 'embed'), cfg)
    if rc.time_embedding == 'sinusoidal':
      self.time_proj = layers.param(rngs, (cfg.d_model, cfg.d_model), ('norm', 'embed'), cfg)
    elif rc.time_embedding == 'learned':
      self.time_table = layers.param(rngs, (rc.time_bins, cfg.d_model), ('positions', 'embed'), cfg)

  def inputs(self, tokens: Array, positions: Array, t: Array | None = None) -> Array:
    """(B,T,D) block input: token (+ position) (+ time) embeddings."""
    cfg = self.rc.block
    dt = jnp.dtype(self.execution.compute_dtype)
    x = sharding.constrain(self.embed[...].astype(dt), (None, None))[tokens]
    if cfg.positions == 'learned':
      x = x + sharding.constrain(self.pos_embed[...].astype(dt), (None, None))[positions]
    if t is not None and self.rc.time_embedding == 'sinusoidal':
      x = x + layers.project('btf,fd->btd', time_features(t, cfg.d_model).astype(dt), self.time_proj.get_value())
    elif t is not None and self.rc.time_embedding == 'learned':
      bins = jnp.clip(jnp.round(t * (self.rc.time_bins - 1)), 0, self.rc.time_bins - 1).astype(jnp.int32)
      x = x + self.time_table[...].astype(dt)[bins]
    return sharding.constrain(x, ('batch', 'seq', 'act_embed'))

  def head(self, x: Array) -> Array:
    """Float32 logits (B,T,V) of the last stack's output."""
    cfg = self.rc.block
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x, self.embed[...].astype(x.dtype), preferred_element_type=jnp.float32)
    else:
      logits = layers.project('btd,dv->btv', x, self.lm_head.get_value(), jnp.float32)
    return sharding.constrain(logits, ('batch', 'seq', 'act_vocab'))


class Stack(nnx.Module):
  """`cfg.num_layers` blocks with parameters stacked on a leading `layers` axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution | None = None):
    self.cfg = cfg
    self.execution = execution = resolve(execution, cfg)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs: nnx.Rngs) -> tf.Block:
      return tf.Block(cfg, rngs, execution)

    self.blocks = make_blocks(rngs)

  def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
    return tf.run_blocks(self.blocks, x, segment_ids, positions, self.cfg, self.execution)

  def decode(self, x: Array, positions: Array, cache: Any, index: Array) -> tuple[Array, Any]:
    return tf.decode_blocks(self.blocks, x, positions, cache, index, self.execution)


@dataclasses.dataclass(frozen=True)
class RackDef:
  """Static halves of the rack: graphdefs, logical PartitionSpecs and shapes of `shared` and of one stack,
  and the execution the graphdefs run with."""

  rc: RackConfig
  shared_graphdef: Any
  stack_graphdef: Any
  shared_specs: Any
  stack_specs: Any
  shared_shapes: Any
  stack_shapes: Any
  execution: Execution = Execution()

  def specs(self, stacks: Sequence[int] | None = None) -> dict:
    """Logical specs of a rack tree holding `stacks` (default: all)."""
    ids = range(self.rc.num_stacks) if stacks is None else stacks
    return {'shared': self.shared_specs, 'stacks': {str(i): self.stack_specs for i in ids}}

  def shapes(self, stacks: Sequence[int] | None = None) -> dict:
    ids = range(self.rc.num_stacks) if stacks is None else stacks
    return {'shared': self.shared_shapes, 'stacks': {str(i): self.stack_shapes for i in ids}}


def _split(module_fn: Any) -> tuple[Any, Any, Any]:
  with jax.set_mesh(None):  # logical axis names must not be read as mesh axes
    abstract = nnx.eval_shape(module_fn)
  graphdef, state = nnx.split(abstract)
  return graphdef, nnx.to_pure_dict(nnx.get_partition_spec(state)), nnx.to_pure_dict(state)


def describe(rc: RackConfig, execution: Execution | None = None) -> RackDef:
  """The rack's static description, without allocating parameters, run as `execution` says (default:
  `execution.default(rc.block)`, no kernel)."""
  if rc.time_embedding not in TIME_EMBEDDINGS:
    raise ValueError(f'time_embedding={rc.time_embedding!r}: valid are {", ".join(TIME_EMBEDDINGS)}')
  execution = resolve(execution, rc.block)
  sg, ss, sh = _split(lambda: Shared(rc, nnx.Rngs(0), execution))
  kg, ks, kh = _split(lambda: Stack(rc.block, nnx.Rngs(0), execution))
  return RackDef(rc, sg, kg, ss, ks, sh, kh, execution)


def init_shared(rc: RackConfig, key: Array) -> dict:
  return nnx.to_pure_dict(nnx.state(Shared(rc, nnx.Rngs(jax.random.fold_in(key, 0)))))


def init_stack(rc: RackConfig, key: Array, index: int) -> dict:
  """Stack `index`'s fresh parameters (independent of how many stacks the rack has)."""
  return nnx.to_pure_dict(nnx.state(Stack(rc.block, nnx.Rngs(jax.random.fold_in(key, 1 + index)))))


def init_params(rc: RackConfig, key: Array) -> dict:
  return {'shared': init_shared(rc, key),
          'stacks': {str(i): init_stack(rc, key, i) for i in range(rc.num_stacks)}}


def embed(rd: RackDef, shared: dict, tokens: Array, positions: Array, t: Array | None = None) -> Array:
  return nnx.merge(rd.shared_graphdef, shared).inputs(tokens, positions, t)


def run_stack(rd: RackDef, stack: dict, x: Array, segment_ids: Array, positions: Array) -> Array:
  return nnx.merge(rd.stack_graphdef, stack)(x, segment_ids, positions)


def head(rd: RackDef, shared: dict, x: Array) -> Array:
  return nnx.merge(rd.shared_graphdef, shared).head(x)


def forward(rd: RackDef, params: dict, batch: dict[str, Array], order: Sequence[int] | None = None,
            t: Array | None = None, tokens: Array | None = None) -> Array:
  """Logits (B,T,V) through the stacks in `order` (default: all, first to last). `tokens` overrides
  batch['tokens'] (e.g. corrupted inputs)."""
  order = range(rd.rc.num_stacks) if order is None else order
  tokens = batch['tokens'] if tokens is None else tokens
  x = embed(rd, params['shared'], tokens, batch['positions'], t)
  for i in order:
    x = run_stack(rd, params['stacks'][str(i)], x, batch['segment_ids'], batch['positions'])
  return head(rd, params['shared'], x)


def init_cache(rd: RackDef, order: Sequence[int], batch: int, max_len: int) -> dict:
  """KV cache for autoregressive decoding through the stacks in `order` (causal racks only)."""
  cfg = rd.rc.block
  dtype = jnp.dtype(rd.execution.compute_dtype)
  return {str(i): tf.init_cache(cfg, cfg.num_layers, batch, max_len, dtype) for i in order}


def decode(rd: RackDef, params: dict, order: Sequence[int], tokens: Array, positions: Array, cache: dict,
           index: Array) -> tuple[Array, dict]:
  """(logits (B,t,V), cache) for new tokens written at cache rows [index, index+t)."""
  if not rd.rc.block.causal:
    raise ValueError('KV-cache decoding needs a causal (decoder) rack; masked objectives sample by unmasking')
  shared = nnx.merge(rd.shared_graphdef, params['shared'])
  x = shared.inputs(tokens, positions)
  new_cache = {}
  for i in order:
    stack = nnx.merge(rd.stack_graphdef, params['stacks'][str(i)])
    x, new_cache[str(i)] = stack.decode(x, positions, cache[str(i)], index)
  return shared.head(x), new_cache


def to_transformer(params: dict, order: Sequence[int]) -> dict:
  """The parameters of the equivalent `Transformer` (stacks in `order` concatenated along layers); the rack
  must have no time embedding."""
  shared = params['shared']
  extra = {'time_proj', 'time_table'} & set(shared)
  if extra:
    raise ValueError(f'a rack with a time embedding ({", ".join(sorted(extra))}) has no Transformer equivalent')
  stacks = [params['stacks'][str(i)]['blocks'] for i in order]
  out = dict(shared)
  out['blocks'] = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *stacks)
  return out


def resize_vocab(shared: dict, new_vocab: int, used: int | None = None) -> dict:
  """`shared` with the vocabulary grown to `new_vocab` rows: new embedding rows (and head columns) are the
  mean of the first `used` (default: all old) ones, so a new token such as MASK starts as an average token.
  Old tokens' embeddings and logits are unchanged. Shrinking is refused (it would drop trained tokens)."""
  old = shared['embed'].shape[0]
  if new_vocab < old:
    raise ValueError(f'vocabulary resize from {old} to {new_vocab} rows would drop tokens; only growth is supported')
  used = old if used is None else used
  out = dict(shared)

  def grow(w: Any, axis: int) -> Array:
    w = jnp.asarray(w)
    mean = jnp.mean(jax.lax.slice_in_dim(w.astype(jnp.float32), 0, used, axis=axis), axis=axis, keepdims=True)
    reps = [1] * w.ndim
    reps[axis] = new_vocab - old
    return jnp.concatenate([w, jnp.tile(mean, reps).astype(w.dtype)], axis=axis)

  out['embed'] = grow(shared['embed'], 0)
  if 'lm_head' in shared:
    out['lm_head'] = grow(shared['lm_head'], 1)
  return out


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
