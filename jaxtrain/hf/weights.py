"""Hugging Face weights in and out, with logit parity: streamed safetensors into jaxtrain's parameter tree,
and a jaxtrain model written as a transformers checkpoint.

  params = hf_weights.load_params(hf_dir, mc, shardings)  # the tree of jaxtrain.models.init_params, on device
  hf_weights.save(params, mc, tokenizer, out_dir)         # config.json + sharded safetensors + tokenizer files

Loading streams the safetensors files tensor by tensor into one host buffer per (layer-stacked) parameter
and puts each parameter on its devices as soon as it is complete, so peak host memory stays near one copy
of the model (benchmarks/hf_load_memory.py). Every name, shape and dtype is checked from the file headers
before any weight is read, so a wrong checkpoint fails in one line before training starts.

Which HF tensor goes where (transposes, head reshapes, GPT-2's fused c_attn) is `jaxtrain.hf.layout`; the
config mapping is `jaxtrain.hf.config`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from jaxtrain import models
from jaxtrain.config.defaults import base_config
from jaxtrain.hf.layout import Tensor, fill, is_gpt2, layout
from jaxtrain.hf.config import HfError
from jaxtrain.models import ModelConfig


INDEX = 'model.safetensors.index.json'


# safetensors dtype names -> numpy (little-endian, as the format stores them). BF16 comes from ml_dtypes:
# safetensors' own numpy reader rejects it and torch is not a runtime dependency, so tensors are read from
# the byte offsets in the header instead.
_DTYPES = {'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
           'BF16': np.dtype(jax.numpy.bfloat16)}


_CHUNK_BYTES = 16 * 2 ** 20  # tensors are read in row blocks of this size, never whole


# Buffers some checkpoints carry that are not parameters (rotary tables, GPT-2's causal-mask buffers).
_IGNORED = re.compile(r'(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$')


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: str
  shape: tuple[int, ...]
  start: int  # absolute byte offset of the data in the file
  nbytes: int


def _header(path: str) -> dict[str, _Entry]:
  """Tensor entries of one safetensors file from its header (8-byte length, JSON, then the data)."""
  try:
    with open(path, 'rb') as f:
      size = int.from_bytes(f.read(8), 'little')
      if size > 2 ** 27:  # a header is kilobytes; this is some other file
        raise ValueError(f'header length {size}')
      header = json.loads(f.read(size))
  except (OSError, ValueError) as e:
    raise HfError(f'{path}: not a readable safetensors file ({e})') from None
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    begin, end = info['data_offsets']
    out[name] = _Entry(path, info['dtype'], tuple(info['shape']), 8 + size + begin, end - begin)
  return out


def safetensors_files(hf_dir: str) -> list[str]:
  """The weight files of `hf_dir`: those the index names (sharded checkpoints), else model.safetensors, else
  every *.safetensors. Raises HfError when there are none."""
  index = os.path.join(hf_dir, INDEX)
  if os.path.isfile(index):
    with open(index, encoding='utf-8') as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
    if missing:
      raise HfError(f'{index} names {len(missing)} missing file(s), e.g. {missing[0]}; copy the whole checkpoint')
    return [os.path.join(hf_dir, n) for n in names]
  single = os.path.join(hf_dir, 'model.safetensors')
  files = [single] if os.path.isfile(single) else sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    raise HfError(f'{hf_dir}: no *.safetensors weights (pytorch_model.bin is not read; convert it with '
                  'transformers: from_pretrained(...).save_pretrained(dir))')
  return files


def _check(entries: Mapping[str, _Entry], tensors: list[Tensor], hf_dir: str, tied: bool) -> None:
  """Every expected tensor present with its shape and a float dtype; no unknown tensor. One-line HfError."""
  by_name = {t.name: t for t in tensors}
  for name, e in entries.items():
    t = by_name.get(name)
    if t is None:
      if _IGNORED.search(name) or (tied and name == 'lm_head.weight'):
        continue
      raise HfError(f'{e.file}: unknown tensor {name} {list(e.shape)}; the model config.json describes has '
                    f'{len(tensors)} tensors such as {tensors[1].name} (is config.json from the same model?)')
    if e.shape != t.shape:
      raise HfError(f'{e.file}: tensor {name} has shape {list(e.shape)}, expected {list(t.shape)} from config.json')
    if e.dtype not in _DTYPES:
      raise HfError(f'{e.file}: tensor {name} has dtype {e.dtype}; supported: {", ".join(_DTYPES)}')
    if e.nbytes != math.prod(e.shape) * _DTYPES[e.dtype].itemsize:
      raise HfError(f'{e.file}: tensor {name} {list(e.shape)} {e.dtype} spans {e.nbytes} bytes in the header, '
                    f'expected {math.prod(e.shape) * _DTYPES[e.dtype].itemsize}; the file is damaged')
  missing = [t for t in tensors if t.name not in entries]
  if missing:
    extra = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    hint = '; config.json says tie_word_embeddings=false' if missing[0].name == 'lm_head.weight' else ''
    raise HfError(f'{hf_dir}: missing tensor {missing[0].name}, expected shape {list(missing[0].shape)}{extra}{hint}')


def _chunks(f: Any, e: _Entry, name: str) -> Iterator[tuple[slice, np.ndarray]]:
  """Row blocks of about `_CHUNK_BYTES` of one tensor, read in order: the only temporary host memory a load
  needs besides the parameter buffers."""
  dtype = _DTYPES[e.dtype]
  rows = e.shape[0] if len(e.shape) > 1 else 1
  cols = math.prod(e.shape) // max(rows, 1)
  step = max(1, _CHUNK_BYTES // max(1, cols * dtype.itemsize))
  f.seek(e.start)
  for start in range(0, rows, step):
    n = min(step, rows - start)
    chunk = np.fromfile(f, dtype=dtype, count=n * cols)
    if chunk.size != n * cols:
      raise HfError(f'{e.file}: tensor {name} is truncated (the file ends inside its data); re-download or re-save')
    yield slice(start, start + n), chunk.reshape(n, cols)


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array whose data is 64-byte aligned: jax.device_put on CPU then adopts the memory
  instead of copying it, so a CPU load holds one copy of each parameter, not two."""
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _entries(hf_dir: str, mc: ModelConfig) -> tuple[list[str], dict[str, _Entry], list[Tensor]]:
  """(weight files, header entries by name, expected tensors), checked against each other (HfError)."""
  tensors = layout(mc)
  files = safetensors_files(hf_dir)
  entries: dict[str, _Entry] = {}
  for path in files:
    for name, e in _header(path).items():
      if is_gpt2(mc) and not name.startswith(('transformer.', 'lm_head.')):
        name = 'transformer.' + name  # checkpoints saved from GPT2Model lack the prefix
      entries[name] = e
  _check(entries, tensors, hf_dir, mc.tie_embeddings)
  return files, entries, tensors


def check_weights(hf_dir: str, mc: ModelConfig) -> None:
  """Reads only the safetensors headers of `hf_dir`: every tensor `mc` needs is there with its shape and no
  unknown one is. Raises HfError naming the tensor, its shape and the expected shape."""
  _entries(hf_dir, mc)


def load_params(hf_dir: str, mc: ModelConfig, shardings: Any = None) -> dict:
  """The parameters of `hf_dir` as the tree of `jaxtrain.models.init_params(mc)`, cast to mc.param_dtype.

  `shardings` (a matching tree of NamedShardings) places each parameter on its devices; without it each
  goes to the default device. Checks every tensor header first (HfError), then streams file by file.
  """
  files, entries, tensors = _entries(hf_dir, mc)
  _, _, shapes = models.describe(mc)
  expected = dict(_flat(shapes))
  covered = {p for t in tensors for p, _ in t.parts}
  if covered != set(expected):  # a layout bug, not a user error
    raise AssertionError(f'hf.layout and the model disagree: {sorted(covered ^ set(expected))}')
  dtype = np.dtype(jax.numpy.dtype(mc.param_dtype))
  pending = {p: (mc.num_layers if p[0] == 'blocks' else 1) for p in expected}
  buffers: dict[tuple[str, ...], np.ndarray] = {}
  params: dict = {}

  def place(path: tuple[str, ...]) -> None:
    host = buffers.pop(path)
    sharding = _get(shardings, path) if shardings is not None else None
    if sharding is None:
      value = jax.device_put(host)
    else:
      value = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    _set(params, path, value)

  by_file: dict[str, list[tuple[_Entry, Tensor]]] = {}
  for t in tensors:
    by_file.setdefault(entries[t.name].file, []).append((entries[t.name], t))
  for path in files:
    with open(path, 'rb') as f:
      for e, t in sorted(by_file.get(path, []), key=lambda et: et[0].start):  # sequential reads
        dsts = []
        for p, layer in t.parts:
          if p not in buffers:
            buffers[p] = _host_buffer(expected[p].shape, dtype)
          dsts.append(buffers[p] if layer is None else buffers[p][layer])
        for rows, chunk in _chunks(f, e, t.name):
          fill(t, dsts, rows, chunk)
        del dsts
        for p, _ in t.parts:
          pending[p] -= 1
          if not pending[p]:
            place(p)
  return params


@dataclasses.dataclass(frozen=True)
class Target:
  """What a jaxtrain model becomes in transformers: the model_type, the class, and the ModelConfig whose
  layout is written (biases the model lacks but the class has are written as zeros: the same function)."""
  model_type: str
  architecture: str
  mc: ModelConfig


def export_target(mc: ModelConfig) -> Target:
  """The transformers class that represents `mc` exactly. Raises HfError for combinations none does."""
  def need(ok: bool, what: str, kind: str) -> None:
    if not ok:
      raise HfError(f'this model cannot be written as {kind}: {what}')

  need(mc.attention == 'gqa' and not mc.residual_gain, f'attention={mc.attention!r}, residual_gain={mc.residual_gain}; '
       "expected attention='gqa' and residual_gain=0 (no transformers class has MLA or residual gains)", 'Hugging Face')

  if mc.positions == 'learned' or mc.norm == 'layernorm' or mc.mlp != 'swiglu':
    kind = 'GPT-2 (the only exported family with learned positions, LayerNorm or a GELU MLP)'
    need(mc.positions == 'learned', f"positions={mc.positions!r}, expected 'learned'", kind)
    need(mc.norm == 'layernorm', f"norm={mc.norm!r}, expected 'layernorm'", kind)
    need(mc.mlp in ('gelu', 'gelu_tanh'), f"mlp={mc.mlp!r}, expected 'gelu_tanh' or 'gelu'", kind)
    need(mc.num_kv_heads == mc.num_heads, f'num_kv_heads={mc.num_kv_heads}, expected num_heads={mc.num_heads}',
         kind)
    need(mc.num_heads * mc.head_dim == mc.d_model,
         f'num_heads*head_dim={mc.num_heads * mc.head_dim}, expected d_model={mc.d_model}', kind)
    need(not mc.qk_norm and not mc.sliding_window, 'qk_norm / sliding_window are not part of GPT-2', kind)
    full = dataclasses.replace(mc, qkv_bias=True, attn_out_bias=True, mlp_bias=True)
    return Target('gpt2', 'GPT2LMHeadModel', full)
  if mc.qk_norm:
    need(not mc.mlp_bias, 'mlp_bias is not part of Qwen3', 'Qwen3 (q/k norm)')
    bias = mc.qkv_bias or mc.attn_out_bias
    return Target('qwen3', 'Qwen3ForCausalLM', dataclasses.replace(mc, qkv_bias=bias, attn_out_bias=bias))
  if mc.qkv_bias and not mc.attn_out_bias and not mc.mlp_bias:
    return Target('qwen2', 'Qwen2ForCausalLM', mc)
  if mc.sliding_window:
    need(not (mc.qkv_bias or mc.attn_out_bias or mc.mlp_bias), 'Mistral has no biases', 'Mistral (sliding window)')
    return Target('mistral', 'MistralForCausalLM', mc)
  bias = mc.qkv_bias or mc.attn_out_bias
  return Target('llama', 'LlamaForCausalLM', dataclasses.replace(mc, qkv_bias=bias, attn_out_bias=bias))


def _max_positions(mc: ModelConfig) -> int:
  if mc.max_positions:
    return mc.max_positions
  if mc.rope_scaling == 'llama3':
    return int(mc.rope_original_max_positions * mc.rope_factor)
  return 2048


def hf_config(target: Target, special: Mapping[str, int | None], dtype: str) -> dict:
  """config.json for `target` (special: bos/eos/pad token ids)."""
  mc = target.mc
  common = {'architectures': [target.architecture], 'model_type': target.model_type, 'vocab_size': mc.vocab_size,
            'tie_word_embeddings': mc.tie_embeddings, 'initializer_range': mc.init_std, 'dtype': dtype,
            'use_cache': True, **special}
  if target.model_type == 'gpt2':
    return {**common, 'n_embd': mc.d_model, 'n_layer': mc.num_layers, 'n_head': mc.num_heads,
            'n_inner': mc.mlp_dim, 'n_positions': mc.max_positions,
            'activation_function': 'gelu_new' if mc.mlp == 'gelu_tanh' else 'gelu',
            'layer_norm_epsilon': mc.norm_eps, 'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0}
  rope: dict[str, Any] = {'rope_type': 'default' if mc.rope_scaling == 'none' else mc.rope_scaling,
                          'rope_theta': mc.rope_theta}
  if mc.rope_scaling != 'none':
    rope['factor'] = mc.rope_factor
  if mc.rope_scaling == 'llama3':
    rope.update(low_freq_factor=mc.rope_low_freq_factor, high_freq_factor=mc.rope_high_freq_factor,
                original_max_position_embeddings=mc.rope_original_max_positions)
  out = {**common, 'hidden_size': mc.d_model, 'intermediate_size': mc.mlp_dim,
         'num_hidden_layers': mc.num_layers, 'num_attention_heads': mc.num_heads,
         'num_key_value_heads': mc.num_kv_heads, 'head_dim': mc.head_dim, 'hidden_act': 'silu',
         'max_position_embeddings': _max_positions(mc), 'rms_norm_eps': mc.norm_eps, 'rope_parameters': rope,
         'attention_dropout': 0.0}
  if target.model_type == 'llama':
    out.update(attention_bias=mc.qkv_bias, mlp_bias=mc.mlp_bias)
  elif target.model_type == 'qwen3':
    out['attention_bias'] = mc.qkv_bias
  if target.model_type == 'mistral':
    out['sliding_window'] = mc.sliding_window
  elif target.model_type in ('qwen2', 'qwen3'):
    window = bool(mc.sliding_window)
    out.update(use_sliding_window=window, sliding_window=mc.sliding_window or None,
               max_window_layers=0 if window else mc.num_layers,
               layer_types=[('sliding_attention' if window else 'full_attention')] * mc.num_layers)
  return out


def save_tokenizer(tokenizer: Any, out_dir: str, vocab_size: int | None = None) -> dict[str, Any]:
  """Writes tokenizer.json + tokenizer_config.json (with the chat template, if any) so AutoTokenizer.from_pretrained
  (out_dir) gives the same ids; returns the bos/eos/pad ids for config.json and `end_of_turn`: the id of the token
  ending an assistant turn of the chat template (None without one, or when it is EOS). `tokenizer`: a jaxtrain
  Tokenizer, a transformers tokenizer, a tokenizers.Tokenizer, a tokenizer.json path or a tokenizer directory."""
  import tokenizers
  import transformers  # Deferred: seconds to import, and only writing needs it.

  from jaxtrain.data import chat, tokenizer as tokenizer_lib

  if isinstance(tokenizer, str):
    tokenizer = tokenizer_lib.load_tokenizer(ml_collections.ConfigDict({'tokenizer': tokenizer}))
  if isinstance(tokenizer, tokenizers.Tokenizer):
    backend = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
  elif isinstance(tokenizer, tokenizer_lib.Tokenizer):
    backend = tokenizer_lib.as_transformers(tokenizer)  # its EOS and chat template kept
  else:
    backend = tokenizer
  if not isinstance(backend, transformers.PreTrainedTokenizerBase):
    raise HfError(f'tokenizer {tokenizer!r} is not one jaxtrain can write; give a jaxtrain Tokenizer, a '
                  'transformers tokenizer, a tokenizers.Tokenizer, a tokenizer.json path or a tokenizer directory')
  if vocab_size is not None and len(backend) > vocab_size:
    raise HfError(f'the tokenizer has {len(backend)} tokens but the model only {vocab_size} embedding rows')
  backend.save_pretrained(out_dir, save_jinja_files=False)  # the chat template inside tokenizer_config.json
  eos_id = backend.eos_token_id
  bos_id = backend.bos_token_id if backend.bos_token_id is not None else eos_id
  turn = chat.end_of_turn_token(backend) if backend.chat_template else None
  turn_id = backend.convert_tokens_to_ids(turn) if turn else None
  return {'bos_token_id': bos_id, 'eos_token_id': eos_id, 'pad_token_id': backend.pad_token_id,
          'end_of_turn': turn_id if turn_id != eos_id else None}


def _as_model_config(model: Any, params: Mapping) -> ModelConfig:
  if isinstance(model, ModelConfig):
    return model
  cfg = base_config().model
  cfg.update(dict(model))
  rows = int(_get(params, ('embed',)).shape[0])
  return dataclasses.replace(models.model_config(cfg, rows), vocab_size=rows)


def save(params: Mapping, model: ModelConfig | Mapping, tokenizer: Any, out_dir: str,
         max_shard_bytes: int = 2 * 2 ** 30, dtype: str = 'float32') -> list[str]:
  """Writes `params` as a transformers checkpoint in `out_dir` (absent or empty): config.json,
  generation_config.json, model.safetensors or model-0000i-of-0000n.safetensors + index (shards of at most
  `max_shard_bytes`, unless one tensor is bigger), and the tokenizer files (`tokenizer` None: none).

  `model` is a ModelConfig or the `config.model` section; `dtype` float32 or bfloat16. Returns the weight
  files written. Parameters are converted one shard at a time, so host memory holds at most one shard.
  """
  if dtype not in ('float32', 'bfloat16'):
    raise HfError(f"dtype={dtype!r} is not supported for export; expected 'float32' or 'bfloat16'")
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise HfError(f'{out_dir} exists and is not an empty directory; choose a new output directory')
  mc = _as_model_config(model, params)
  target = export_target(mc)
  os.makedirs(out_dir, exist_ok=True)
  special = (save_tokenizer(tokenizer, out_dir, mc.vocab_size) if tokenizer is not None
             else {'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None})
  end_of_turn = special.pop('end_of_turn', None)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  _, _, shapes = models.describe(target.mc)

  def value(path: tuple[str, ...], layer: int | None) -> np.ndarray:
    try:
      x = _get(params, path)
    except KeyError:  # a bias the model does not have: zero is the same function
      shape = _get(shapes, path).shape
      return np.zeros(shape[1:] if layer is not None else shape, np_dtype)
    return np.asarray(x if layer is None else x[layer]).astype(np_dtype)

  tensors = layout(target.mc)
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    nbytes = math.prod(t.shape) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards, strict=True):
    arrays = {}
    for t in shard:
      parts = [value(p, layer) for p, layer in t.parts]
      arrays[t.name] = np.ascontiguousarray(t.to_hf(parts))
      weight_map[t.name] = name
      total += arrays[t.name].nbytes
    safetensors.numpy.save_file(arrays, os.path.join(out_dir, name), metadata={'format': 'pt'})
    del arrays
  if len(names) > 1:
    with open(os.path.join(out_dir, INDEX), 'w', encoding='utf-8') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  import transformers  # the version goes into the configs, as save_pretrained writes it

  config = hf_config(target, special, dtype)
  config['transformers_version'] = transformers.__version__
  with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2)
  if special['eos_token_id'] is not None:
    generation = {'_from_model_config': True, 'transformers_version': transformers.__version__,
                  **{k: v for k, v in special.items() if v is not None}}
    if end_of_turn is not None:  # generate() stops at the end of the assistant's turn, as at the end of a document
      generation['eos_token_id'] = [special['eos_token_id'], end_of_turn]
    with open(os.path.join(out_dir, 'generation_config.json'), 'w', encoding='utf-8') as f:
      json.dump(generation, f, indent=2)
  return [os.path.join(out_dir, n) for n in names]

