"""Where each tensor of a Hugging Face checkpoint lives in jaxtrain's parameter tree, and how values move.

A torch Linear stores (out, in) and jaxtrain (in..., out...), so Linear weights are transposed and reshaped
into heads; GPT-2's Conv1D already stores (in, out) and its fused c_attn holds q, k and v side by side.
transformers applies RoPE in the half-split convention that `transformer.rope` uses, so q/k of HF-format
checkpoints need no permutation. Pure functions: reading and writing files is `jaxtrain.hf`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from jaxtrain.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the jaxtrain parameter slices it holds: `parts` are (path, layer or None). `kind` says
  how values move (see `fill`); `to_hf([array per part]) -> hf tensor` is the way back."""
  name: str
  shape: tuple[int, ...]
  parts: tuple[tuple[tuple[str, ...], int | None], ...]
  kind: str  # same | linear | fused
  to_hf: Callable[[list[np.ndarray]], np.ndarray]


def _linear(name: str, path: tuple[str, ...], layer: int | None, shape: tuple[int, ...], n_in: int) -> Tensor:
  """A torch Linear (out, in) <-> a jaxtrain weight (in dims..., out dims...)."""
  fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
  return Tensor(name, (fan_out, fan_in), ((path, layer),), 'linear', lambda a: a[0].reshape(fan_in, fan_out).T)


def _same(name: str, path: tuple[str, ...], layer: int | None, shape: tuple[int, ...],
          hf_shape: tuple[int, ...] | None = None) -> Tensor:
  """The same values in another shape (embeddings, norms, biases, GPT-2 Conv1D weights stored (in, out))."""
  hf_shape = shape if hf_shape is None else hf_shape
  return Tensor(name, hf_shape, ((path, layer),), 'same', lambda a: a[0].reshape(hf_shape))


def _fused(name: str, paths: list[tuple[str, ...]], layer: int, shape: tuple[int, ...], lead: int) -> Tensor:
  """GPT-2's c_attn: q, k and v concatenated along the output axis (the last one)."""
  width = math.prod(shape[lead:])
  return Tensor(name, shape[:lead] + (3 * width,), tuple((p, layer) for p in paths), 'fused',
                lambda a: np.concatenate([x.reshape(shape[:lead] + (width,)) for x in a], axis=-1))


def fill(t: Tensor, dsts: list[np.ndarray], rows: slice, chunk: np.ndarray) -> None:
  """Writes rows `rows` of HF tensor `t` (viewed 2-D as (shape[0], rest); 1-D as one row) into the parameter
  slices `dsts` (contiguous, so the reshapes below are views), casting to their dtype on the way."""
  if t.kind == 'linear':  # (out, in) rows become columns of the (in, out) weight
    dsts[0].reshape(-1, t.shape[0])[:, rows] = chunk.T
  elif t.kind == 'fused':
    width = chunk.shape[1] // len(dsts)
    for j, dst in enumerate(dsts):
      dst.reshape(-1, width)[rows] = chunk[:, j * width:(j + 1) * width]
  else:
    dsts[0].reshape(-1, chunk.shape[1])[rows] = chunk


def is_gpt2(mc: ModelConfig) -> bool:
  """GPT-2 naming (transformer.h.N.*) rather than Llama's (model.layers.N.*)."""
  return mc.positions == 'learned'


def layout(mc: ModelConfig) -> list[Tensor]:
  """Every HF tensor of a model with config `mc`, in checkpoint order, with its jaxtrain parameter slices."""
  d, n, k, h, f, v = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim, mc.vocab_size
  out = []
  if is_gpt2(mc):
    t = 'transformer.'
    out += [_same(f'{t}wte.weight', ('embed',), None, (v, d)),
            _same(f'{t}wpe.weight', ('pos_embed',), None, (mc.max_positions, d))]
    for i in range(mc.num_layers):
      p = f'{t}h.{i}.'
      for hf_norm, norm in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
        out += [_same(f'{p}{hf_norm}.weight', ('blocks', norm, 'scale'), i, (d,)),
                _same(f'{p}{hf_norm}.bias', ('blocks', norm, 'bias'), i, (d,))]
      qkv = [('blocks', 'attn', x) for x in ('q', 'k', 'v')]
      out += [_fused(f'{p}attn.c_attn.weight', qkv, i, (d, n, h), 1),
              _fused(f'{p}attn.c_attn.bias', [q[:-1] + (q[-1] + '_bias',) for q in qkv], i, (n, h), 0),
              _same(f'{p}attn.c_proj.weight', ('blocks', 'attn', 'o'), i, (n, h, d), (n * h, d)),
              _same(f'{p}attn.c_proj.bias', ('blocks', 'attn', 'o_bias'), i, (d,)),
              _same(f'{p}mlp.c_fc.weight', ('blocks', 'mlp', 'up'), i, (d, f)),
              _same(f'{p}mlp.c_fc.bias', ('blocks', 'mlp', 'up_bias'), i, (f,)),
              _same(f'{p}mlp.c_proj.weight', ('blocks', 'mlp', 'down'), i, (f, d)),
              _same(f'{p}mlp.c_proj.bias', ('blocks', 'mlp', 'down_bias'), i, (d,))]
    out.append(_same(f'{t}ln_f.weight', ('final_norm', 'scale'), None, (d,)))
    out.append(_same(f'{t}ln_f.bias', ('final_norm', 'bias'), None, (d,)))
  else:
    out.append(_same('model.embed_tokens.weight', ('embed',), None, (v, d)))
    for i in range(mc.num_layers):
      p = f'model.layers.{i}.'
      out.append(_same(f'{p}input_layernorm.weight', ('blocks', 'attn_norm', 'scale'), i, (d,)))
      for name, heads in (('q', n), ('k', k), ('v', k)):
        out.append(_linear(f'{p}self_attn.{name}_proj.weight', ('blocks', 'attn', name), i, (d, heads, h), 1))
        if mc.qkv_bias:
          out.append(_same(f'{p}self_attn.{name}_proj.bias', ('blocks', 'attn', f'{name}_bias'), i, (heads, h),
                           (heads * h,)))
      out.append(_linear(f'{p}self_attn.o_proj.weight', ('blocks', 'attn', 'o'), i, (n, h, d), 2))
      if mc.attn_out_bias:
        out.append(_same(f'{p}self_attn.o_proj.bias', ('blocks', 'attn', 'o_bias'), i, (d,)))
      if mc.qk_norm:
        out += [_same(f'{p}self_attn.q_norm.weight', ('blocks', 'attn', 'q_norm', 'scale'), i, (h,)),
                _same(f'{p}self_attn.k_norm.weight', ('blocks', 'attn', 'k_norm', 'scale'), i, (h,))]
      out.append(_same(f'{p}post_attention_layernorm.weight', ('blocks', 'mlp_norm', 'scale'), i, (d,)))
      for name, shape in (('gate', (d, f)), ('up', (d, f)), ('down', (f, d))):
        out.append(_linear(f'{p}mlp.{name}_proj.weight', ('blocks', 'mlp', name), i, shape, 1))
        if mc.mlp_bias:
          out.append(_same(f'{p}mlp.{name}_proj.bias', ('blocks', 'mlp', f'{name}_bias'), i, shape[1:]))
    out.append(_same('model.norm.weight', ('final_norm', 'scale'), None, (d,)))
  if not mc.tie_embeddings:
    out.append(_linear('lm_head.weight', ('lm_head',), None, (d, v), 1))
  return out
