"""Hugging Face model configs <-> jaxtrain's `config.model`: Llama, Mistral, Qwen2, Qwen3 and GPT-2.

  overrides = hf_config.model_overrides(hf_dir)   # config.model keys from the directory's config.json
  mc = hf_config.model_config(hf_dir)             # the ModelConfig of a checkpoint directory

An unsupported `model_type` or feature (rope scaling kind, sliding-window layout, ...) raises `HfError`, one
line naming the key and what jaxtrain supports. The weights themselves are `jaxtrain.hf.weights`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from jaxtrain.errors import UserError
from jaxtrain import models
from jaxtrain.config.defaults import base_config
from jaxtrain.models import ModelConfig


SUPPORTED = ('llama', 'mistral', 'qwen2', 'qwen3', 'gpt2')


ROPE_TYPES = ('default', 'linear', 'llama3')


_TIED_DEFAULT = {'llama': False, 'mistral': False, 'qwen2': False, 'qwen3': False, 'gpt2': True}


# Architecture keys of config.model that an import sets (runtime keys such as dtypes and remat stay the user's).
ARCH_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
             'rope_theta', 'norm_eps', 'tie_embeddings', 'qkv_bias', 'qk_norm', 'norm', 'positions',
             'max_positions', 'mlp', 'mlp_bias', 'attn_out_bias', 'rope_scaling', 'rope_factor',
             'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_positions', 'sliding_window')


class HfError(UserError):
  """A Hugging Face directory jaxtrain cannot read or a model it cannot write; the message is one line."""


def read_config(hf_dir: str) -> dict:
  """The parsed config.json of `hf_dir`. Raises HfError when it is missing or unreadable."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise HfError(f'{hf_dir}: no config.json; expected a Hugging Face model directory (config.json + '
                  '*.safetensors)')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise HfError(f'{path}: not readable JSON ({e})') from None


def _rope(c: dict, where: str) -> dict:
  """Rope keys from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4)."""
  params = c.get('rope_parameters') or c.get('rope_scaling') or {}
  if params and all(isinstance(v, dict) for v in params.values()):
    raise HfError(f'{where}: per-layer-type rope_parameters {sorted(params)} are not supported; expected one '
                  'set for all layers')
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise HfError(f'{where}: rope type {kind!r} is not supported; supported: {", ".join(ROPE_TYPES)}')
  if params.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0)) != 1.0:
    raise HfError(f'{where}: partial_rotary_factor={params.get("partial_rotary_factor")} is not supported; '
                  'expected 1.0 (rotary embedding on the whole head)')
  out = {'rope_theta': float(params.get('rope_theta', c.get('rope_theta', 10000.0))),
         'rope_scaling': 'none' if kind == 'default' else kind}
  if kind != 'default':
    out['rope_factor'] = float(params['factor'])
  if kind == 'llama3':
    out.update(rope_low_freq_factor=float(params['low_freq_factor']),
               rope_high_freq_factor=float(params['high_freq_factor']),
               rope_original_max_positions=int(params['original_max_position_embeddings']))
  return out


def _sliding_window(c: dict, kind: str, where: str) -> int:
  """Mistral: `sliding_window` (None = off). Qwen2/3: only when use_sliding_window and every layer slides."""
  if kind == 'mistral':
    return int(c.get('sliding_window') or 0)
  if kind not in ('qwen2', 'qwen3') or not c.get('use_sliding_window') or not c.get('sliding_window'):
    return 0
  n = c['num_hidden_layers']
  types = c.get('layer_types') or ['sliding_attention' if i >= c.get('max_window_layers', 28) else 'full_attention'
                                   for i in range(n)]
  if len(set(types)) > 1:
    raise HfError(f'{where}: layer_types mixing sliding and full attention ({types.count("sliding_attention")} of '
                  f'{n} sliding) are not supported; expected all layers alike')
  return int(c['sliding_window']) if types[0] == 'sliding_attention' else 0


def _llama_family(c: dict, kind: str, where: str) -> dict:
  act = c.get('hidden_act', 'silu')
  if act != 'silu':
    raise HfError(f'{where}: hidden_act={act!r} is not supported for {kind}; expected silu (SwiGLU MLP)')
  d, n = c['hidden_size'], c['num_attention_heads']
  attention_bias = bool(c.get('attention_bias', False))
  if kind in ('mistral', 'qwen2') and attention_bias:
    raise HfError(f'{where}: attention_bias=true is not part of {kind}; expected false or absent')
  if kind != 'llama' and c.get('mlp_bias'):
    raise HfError(f'{where}: mlp_bias=true is not part of {kind}; expected false or absent')
  out = {
      'vocab_size': c['vocab_size'], 'd_model': d, 'num_layers': c['num_hidden_layers'], 'num_heads': n,
      'num_kv_heads': c.get('num_key_value_heads') or n, 'head_dim': c.get('head_dim') or d // n,
      'mlp_dim': c['intermediate_size'], 'norm_eps': float(c.get('rms_norm_eps', 1e-6)),
      'tie_embeddings': bool(c.get('tie_word_embeddings', _TIED_DEFAULT[kind])),
      'qkv_bias': kind == 'qwen2' or attention_bias, 'attn_out_bias': attention_bias,
      'mlp_bias': bool(c.get('mlp_bias', False)), 'qk_norm': kind == 'qwen3',
      'norm': 'rmsnorm', 'positions': 'rope', 'mlp': 'swiglu',
      'max_positions': int(c.get('max_position_embeddings') or 0),
      'sliding_window': _sliding_window(c, kind, where)}
  out.update(_rope(c, where))
  return out


def _gpt2(c: dict, where: str) -> dict:
  act = c.get('activation_function', 'gelu_new')
  mlp = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}.get(act)
  if mlp is None:
    raise HfError(f'{where}: activation_function={act!r} is not supported; expected gelu_new, '
                  'gelu_pytorch_tanh or gelu')
  for key, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                  ('add_cross_attention', False)):
    if c.get(key, ok) != ok:
      raise HfError(f'{where}: {key}={c[key]} is not supported; expected {str(ok).lower()}')
  d, n = c['n_embd'], c['n_head']
  return {
      'vocab_size': c['vocab_size'], 'd_model': d, 'num_layers': c['n_layer'], 'num_heads': n,
      'num_kv_heads': n, 'head_dim': d // n, 'mlp_dim': c.get('n_inner') or 4 * d,
      'norm_eps': float(c.get('layer_norm_epsilon', 1e-5)),
      'tie_embeddings': bool(c.get('tie_word_embeddings', True)),
      'qkv_bias': True, 'attn_out_bias': True, 'mlp_bias': True, 'qk_norm': False,
      'norm': 'layernorm', 'positions': 'learned', 'mlp': mlp, 'max_positions': int(c['n_positions']),
      'sliding_window': 0, 'rope_theta': 10000.0, 'rope_scaling': 'none'}


def model_overrides(hf_dir: str) -> dict:
  """config.model keys (architecture only) that represent the model in `hf_dir` exactly. Raises HfError for
  an unsupported model_type or a feature jaxtrain does not implement."""
  c = read_config(hf_dir)
  kind = c.get('model_type')
  where = os.path.join(hf_dir, 'config.json')
  if kind not in SUPPORTED:
    raise HfError(f'{where}: model_type {kind!r} is not supported; supported: {", ".join(SUPPORTED)}')
  try:
    out = _gpt2(c, where) if kind == 'gpt2' else _llama_family(c, kind, where)
  except KeyError as e:
    raise HfError(f'{where}: {kind} config lacks {e.args[0]!r}') from None
  defaults = base_config().model
  return {k: out.get(k, defaults[k]) for k in ARCH_KEYS}


def apply_overrides(config: ml_collections.ConfigDict) -> dict:
  """Sets the architecture keys of `config.model` from `config.init.from_hf` (a no-op when it is empty) and,
  when `data.tokenizer` is '' and the directory holds a tokenizer.json, points `data.tokenizer` at it: a
  pretrained model only makes sense with its own token ids. Returns the overrides.
  (`jaxtrain.config.resolve.resolved` does the same on a copy, with ConfigErrors.)"""
  if not config.init.from_hf:
    return {}
  overrides = model_overrides(config.init.from_hf)
  for key, value in overrides.items():
    config.model[key] = value
  if not config.data.tokenizer and os.path.isfile(os.path.join(config.init.from_hf, 'tokenizer.json')):
    config.data.tokenizer = config.init.from_hf
  return overrides


def model_config(hf_dir: str, **fields: Any) -> ModelConfig:
  """The ModelConfig of `hf_dir` on top of the default config.model; `fields` override ModelConfig fields
  (e.g. remat='full'); how it runs is an `Execution` (`jaxtrain.models.execution`)."""
  model = base_config().model
  model.update(model_overrides(hf_dir))
  return dataclasses.replace(models.model_config(model, model.vocab_size), **fields)

