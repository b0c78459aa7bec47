"""PEFT LoRA adapter directories <-> jaxtrain adapter trees (`jaxtrain.lora`), with no torch or peft import.

A PEFT LoRA directory holds adapter_config.json and adapter_model.safetensors with, for every adapted torch
module, `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the module computes
`W x + scale * B A x`. jaxtrain keeps one adapter per weight with the layers stacked: `a` (L, *in, r) and
`b` (L, r, *out). Layer i's lora_A is `a[i]` flattened to (in, r) and transposed, its lora_B is `b[i]`
flattened to (r, out) and transposed (Hugging Face flattens heads head-major, as jaxtrain's reshape does), so
values never change, only the layout.

Module names: Llama, Mistral, Qwen2 and Qwen3 use `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`model.layers.{i}.mlp.{gate,up,down}_proj` and `lm_head`. GPT-2 uses Conv1D modules (fan_in_fan_out; their
lora_A/lora_B have the Linear layout): `transformer.h.{i}.attn.c_proj` (o), `mlp.c_fc` (up), `mlp.c_proj`
(down), and one fused `attn.c_attn` for q, k and v. A c_attn LoRA of rank R is read as q/k/v adapters that
share `a`; q/k/v adapters of rank r are written as one c_attn LoRA of rank 3r with a block-diagonal lora_B
(exact; `alpha_pattern` keeps the scale), or of rank r when their `a`s are equal.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import numpy as np

from jaxtrain.errors import UserError
from jaxtrain.adapters import lora

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'

Path = tuple[str, ...]

_LLAMA = {
    ('blocks', 'attn', 'q'): 'model.layers.{i}.self_attn.q_proj',
    ('blocks', 'attn', 'k'): 'model.layers.{i}.self_attn.k_proj',
    ('blocks', 'attn', 'v'): 'model.layers.{i}.self_attn.v_proj',
    ('blocks', 'attn', 'o'): 'model.layers.{i}.self_attn.o_proj',
    ('blocks', 'mlp', 'gate'): 'model.layers.{i}.mlp.gate_proj',
    ('blocks', 'mlp', 'up'): 'model.layers.{i}.mlp.up_proj',
    ('blocks', 'mlp', 'down'): 'model.layers.{i}.mlp.down_proj',
    ('lm_head',): 'lm_head',
}
_GPT2 = {
    ('blocks', 'attn', 'o'): 'transformer.h.{i}.attn.c_proj',
    ('blocks', 'mlp', 'up'): 'transformer.h.{i}.mlp.c_fc',
    ('blocks', 'mlp', 'down'): 'transformer.h.{i}.mlp.c_proj',
    ('lm_head',): 'lm_head',
}
GPT2_QKV = 'transformer.h.{i}.attn.c_attn'
QKV: tuple[Path, ...] = (('blocks', 'attn', 'q'), ('blocks', 'attn', 'k'), ('blocks', 'attn', 'v'))
# Hugging Face model_type -> module names (the families jaxtrain.models covers).
FAMILIES = {'llama': _LLAMA, 'mistral': _LLAMA, 'qwen2': _LLAMA, 'qwen3': _LLAMA, 'gpt2': _GPT2}

# adapter_config.json settings whose non-default value changes what the adapter computes; jaxtrain's adapters
# are plain `W + scale * a @ b`, so these are refused rather than silently dropped.
_UNSUPPORTED = {
    'use_dora': 'DoRA (use_dora) adds a magnitude vector',
    'modules_to_save': 'modules_to_save stores fully trained copies of modules',
    'lora_bias': 'lora_bias adds a trained bias to lora_B',
    'target_parameters': 'target_parameters adapts raw nn.Parameters (MoE experts)',
    'layer_replication': 'layer_replication duplicates base layers',
    'trainable_token_indices': 'trainable_token_indices trains embedding rows',
    'use_qalora': 'QA-LoRA pools the adapter input',
    'alora_invocation_tokens': 'activated LoRA (alora_invocation_tokens) is token-conditional',
    'kasa_config': 'KaSA truncates the base and adds singular values between the factors',
    'use_bdlora': 'BD-LoRA stores block-diagonal factors',
    'monteclora_config': 'MonteCLoRA samples the adapters',
    'arrow_config': 'Arrow routes between adapters',
}
_KEY = re.compile(r'^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$')


class PeftError(UserError):
  """An adapter directory jaxtrain cannot read or write exactly; the message is one line for the user."""


def family(model_type: str) -> dict[Path, str]:
  """{jaxtrain path: Hugging Face module name template} for a model_type."""
  if model_type not in FAMILIES:
    raise PeftError(f'model_type={model_type!r} has no PEFT module mapping; supported: {", ".join(FAMILIES)}')
  return FAMILIES[model_type]


def _templates(model_type: str) -> dict[Path, str]:
  names = dict(family(model_type))
  if model_type == 'gpt2':
    names.update({p: GPT2_QKV for p in QKV})
  return names


def target_name(template: str, model_type: str) -> str:
  """The shortest dotted suffix naming this module alone (q_proj, attn.c_proj): PEFT's target_modules entry."""
  siblings = set(_templates(model_type).values()) - {template}
  parts = template.split('.')
  for n in range(1, len(parts) + 1):
    suffix = '.'.join(parts[-n:])
    if not any(s == suffix or s.endswith('.' + suffix) for s in siblings):
      return suffix
  return template


def _parse_module(module: str, model_type: str) -> tuple[list[Path], int | None] | None:
  """(jaxtrain paths, layer index or None) of a Hugging Face module name, or None if jaxtrain has none."""
  by_template: dict[str, list[Path]] = {}
  for path, template in _templates(model_type).items():
    by_template.setdefault(template, []).append(path)
  for template, paths in by_template.items():
    regex = re.escape(template).replace(re.escape('{i}'), r'(\d+)')
    m = re.fullmatch(regex, module)
    if m:
      return paths, (int(m.group(1)) if m.groups() else None)
  return None


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
  """PEFT's `get_pattern_key`: the first key k with `re.match(rf'(.*\\.)?({k})$', module)` wins."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def read_config(adapter_dir: str) -> dict:
  """adapter_config.json of a PEFT LoRA directory, checked for what jaxtrain can represent exactly."""
  if not os.path.isdir(adapter_dir):
    raise PeftError(f'adapter dir {adapter_dir!r} does not exist (expected a PEFT dir with {CONFIG_FILE} and '
                    f'{WEIGHTS_FILE})')
  path = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise PeftError(f'{adapter_dir!r} has no {CONFIG_FILE}: not a PEFT adapter dir')
  try:
    with open(path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise PeftError(f'{path}: not valid JSON ({e})') from None
  if cfg.get('peft_type') != 'LORA':
    raise PeftError(f'{path}: peft_type={cfg.get("peft_type")!r}; jaxtrain reads LORA adapters only')
  if cfg.get('bias', 'none') != 'none':
    raise PeftError(f'{path}: bias={cfg["bias"]!r} trains base biases; jaxtrain adapters support bias="none" only')
  for key, why in _UNSUPPORTED.items():
    if cfg.get(key):
      raise PeftError(f'{path}: {key}={cfg[key]!r} is not supported: {why}, which jaxtrain adapters cannot hold')
  for key in ('r', 'lora_alpha'):
    if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
      raise PeftError(f'{path}: {key}={cfg.get(key)!r}; must be a positive number')
  return cfg


def _load_tensors(adapter_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.isfile(path):
    bin_hint = ' (found adapter_model.bin: re-save it with safe_serialization=True)' if os.path.isfile(
        os.path.join(adapter_dir, 'adapter_model.bin')) else ''
    raise PeftError(f'{adapter_dir!r} has no {WEIGHTS_FILE}{bin_hint}')
  from safetensors import safe_open
  # The flax reader understands bfloat16, which safetensors' numpy reader does not.
  with safe_open(path, framework='flax') as f:
    return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def guess_model_type(names: Any) -> str:
  """'gpt2' for GPT-2 module names (transformer.h.N), else 'llama' (shared by Mistral and Qwen)."""
  return 'gpt2' if any('transformer.h.' in n for n in names) else 'llama'


def _base_shape(shapes: Any, path: Path, key: str, module: str) -> tuple[int, ...]:
  node = shapes
  for k in path:
    if not isinstance(node, dict) or k not in node:
      raise PeftError(f'{key}: module {module} maps to jaxtrain parameter {"/".join(path)}, which the base model '
                      'does not have (tied embeddings have no lm_head; GPT-2 has no gate)')
    node = node[k]
  return tuple(node.shape)


def _split(path: Path, shape: tuple[int, ...] | None) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
  """(stacked dims, input dims, output dims) of a base weight, or None without a base."""
  if shape is None:
    return None
  lead = 1 if path[0] == lora.STACKED else 0
  n_in = lora.INPUT_DIMS[path[-1]]
  return lead, shape[lead:lead + n_in], shape[lead + n_in:]


def read_adapter_dir(adapter_dir: str, params_or_shapes: Any = None, model_type: str | None = None
                     ) -> tuple[dict, dict]:
  """(adapters exactly as stored, info) from a PEFT LoRA dir.

  info: rank, alpha, rslora, dropout (adapter_config.json), scales ({'/'-joined path: scale}, which differ
  per weight under rank_pattern/alpha_pattern), targets (regex over jaxtrain paths), model_type, base_model.
  With `params_or_shapes` (a parameter tree of arrays or ShapeDtypeStructs) every tensor is checked against
  the base and shaped like it; without, inputs and outputs stay flat: a (L, in, r), b (L, r, out).
  Layers a PEFT adapter skips (layers_to_transform) get zero factors, which adapt nothing.
  """
  cfg = read_config(adapter_dir)
  tensors = _load_tensors(adapter_dir)
  model_type = model_type or guess_model_type(tensors)
  rslora = bool(cfg.get('use_rslora', False))
  pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key, value in tensors.items():
    if key.endswith('.base_layer.weight'):
      # PEFT saves a copy of a targeted lm_head/embedding (save_embedding_layers='auto'); the base has it.
      continue
    m = _KEY.match(key)
    if not m:
      raise PeftError(f'{key}: not a LoRA factor jaxtrain can read (expected <module>.lora_A.weight / .lora_B.weight)')
    pairs.setdefault(m['module'], {})[m['ab']] = (key, value)
  if not pairs:
    raise PeftError(f'{adapter_dir}/{WEIGHTS_FILE} holds no LoRA factors (lora_A / lora_B)')

  # path -> {layer: (a (*in, r), b (r, *out), scale, tensor key)}
  per_path: dict[Path, dict[int | None, tuple[np.ndarray, np.ndarray, float, str]]] = {}
  shapes: dict[Path, tuple[int, ...] | None] = {}
  fused: set[Path] = set()
  for module, ab in sorted(pairs.items()):
    if set(ab) != {'A', 'B'}:
      missing = ({'A', 'B'} - set(ab)).pop()
      raise PeftError(f'{adapter_dir}: module {module} has lora_{set(ab).pop()} but no lora_{missing}')
    (key_a, a), (key_b, b) = ab['A'], ab['B']
    parsed = _parse_module(module, model_type)
    if parsed is None:
      known = ', '.join(sorted({target_name(t, model_type) for t in _templates(model_type).values()}))
      raise PeftError(f'{key_a}: module {module} is not one jaxtrain can adapt for model_type={model_type!r} '
                      f'(adaptable: {known})')
    paths, layer = parsed
    r = int(_pattern_value(cfg.get('rank_pattern') or {}, module, cfg['r']))
    alpha = float(_pattern_value(cfg.get('alpha_pattern') or {}, module, cfg['lora_alpha']))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise PeftError(f'{key_a} {a.shape} and {key_b} {b.shape}: expected ({r}, in) and (out, {r}) for rank r={r}')
    ins_of, outs = {}, []
    for path in paths:
      shape = shapes[path] = _base_shape(params_or_shapes, path, key_a, module) if params_or_shapes else None
      split = _split(path, shape)
      if split and (layer is not None) != bool(split[0]):
        raise PeftError(f'{key_a}: module {module} does not match jaxtrain parameter {"/".join(path)} {shape}')
      if split and layer is not None and layer >= shape[0]:
        raise PeftError(f'{key_a}: layer {layer} does not exist; the base model has {shape[0]} layers')
      ins = ins_of[path] = split[1] if split else (a.shape[1],)
      outs.append(split[2] if split else (b.shape[0] // len(paths),))
      if math.prod(ins) != a.shape[1]:
        raise PeftError(f'{key_a} has shape {a.shape}, expected ({r}, {math.prod(ins)}) for {"/".join(path)} '
                        f'of shape {shape}')
    sizes = [math.prod(o) for o in outs]
    if sum(sizes) != b.shape[0]:
      where = ' + '.join(f'{"/".join(p)} {shapes[p]}' for p in paths) if params_or_shapes else 'three equal parts'
      raise PeftError(f'{key_b} has shape {b.shape}, expected ({sum(sizes)}, {r}) for {where}')
    b_parts = np.split(b, np.cumsum(sizes)[:-1], axis=0)
    for path, part, out in zip(paths, b_parts, outs, strict=True):
      per_path.setdefault(path, {})[layer] = (a.T.reshape(*ins_of[path], r), part.T.reshape(r, *out),
                                              lora.scaling(alpha, r, rslora), key_a)
      if len(paths) > 1:
        fused.add(path)

  adapters: dict[Path, dict[str, np.ndarray]] = {}
  scales: dict[str, float] = {}
  for path, layers in per_path.items():
    first = next(iter(layers.values()))
    for a_l, _, scale, key in layers.values():
      if a_l.shape != first[0].shape or scale != first[2]:
        raise PeftError(f'{key}: rank or alpha differs between the layers of {"/".join(path)} (from rank_pattern/'
                        'alpha_pattern); jaxtrain stacks layers and needs one rank and scale per weight')
    scales['/'.join(path)] = first[2]
    if None in layers:
      adapters[path] = {'a': first[0], 'b': first[1]}
      continue
    n = shapes[path][0] if shapes.get(path) else max(layers) + 1
    zero_a, zero_b = np.zeros_like(first[0]), np.zeros_like(first[1])
    adapters[path] = {'a': np.stack([layers[i][0] if i in layers else zero_a for i in range(n)]),
                      'b': np.stack([layers[i][1] if i in layers else zero_b for i in range(n)])}
  _compact_fused(adapters, fused)
  info = dict(rank=int(cfg['r']), alpha=float(cfg['lora_alpha']), rslora=rslora,
              dropout=float(cfg.get('lora_dropout') or 0.0), scales={k: v for k, v in scales.items()
                                                                      if tuple(k.split('/')) in adapters},
              targets=targets_regex(list(adapters)), model_type=model_type,
              base_model=cfg.get('base_model_name_or_path'))
  return lora.unflatten(adapters), info


def _compact_fused(adapters: dict[Path, dict], fused: set[Path]) -> None:
  """Drops the rank components of q/k/v read from one GPT-2 c_attn LoRA whose lora_B rows are zero for that
  weight (in every layer): a block-diagonal c_attn written by `save_adapter_dir` reads back at its original
  ranks, so a load/train/save cycle does not grow the rank. An all-zero c_attn (untrained) is kept whole."""
  if not fused or not any(np.any(adapters[p]['b']) for p in fused):
    return
  for path in sorted(fused):
    b = adapters[path]['b']
    used = np.any(b.reshape(b.shape[0], b.shape[1], -1) != 0, axis=(0, 2))  # (r,): stacked b is (L, r, *out)
    if not used.any():
      del adapters[path]
    elif not used.all():
      adapters[path] = {'a': adapters[path]['a'][..., used], 'b': b[:, used]}


def targets_regex(paths: list[Path]) -> str:
  """A `lora.targets` regex that selects exactly these parameter paths."""
  return '^(' + '|'.join(re.escape('/'.join(p)) for p in sorted(paths)) + ')$'


def load_adapters(adapter_dir: str, params_or_shapes: Any, model_type: str = 'llama') -> tuple[dict, dict]:
  """(adapters, settings) from a PEFT LoRA dir, checked against the base parameters' shapes.

  settings: rank, alpha, rslora, dropout and targets (a regex selecting exactly the adapted paths). The one
  scale `lora.scaling(alpha, rank, rslora)` is exact for every weight: where rank_pattern/alpha_pattern give a
  weight another scale, the ratio is folded into its `b` (its rank stays its own).
  """
  adapters, info = read_adapter_dir(adapter_dir, params_or_shapes, model_type)
  scale = lora.scaling(info['alpha'], info['rank'], info['rslora'])
  flat = {p + (k,): v for p in lora.adapter_paths(adapters) for k, v in lora.lookup(adapters, p).items()}
  for joined, s in info['scales'].items():
    if s != scale:
      path = tuple(joined.split('/'))
      b = flat[path + ('b',)]
      flat[path + ('b',)] = (b.astype(np.float32) * np.float32(s / scale)).astype(b.dtype)
  settings = {k: info[k] for k in ('rank', 'alpha', 'rslora', 'dropout', 'targets')}
  return lora.unflatten(flat), settings


def _host(x: Any) -> np.ndarray:
  """A numpy copy of an array, gathering it first if other processes hold parts of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _peft_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(lora_A (r, in), lora_B (out, r)) of one layer's a (*in, r), b (r, *out)."""
  r = a.shape[-1]
  return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def _fuse_qkv(ads: dict[Path, dict], layer: int, shared: bool) -> tuple[np.ndarray, np.ndarray]:
  """One layer's c_attn (lora_A, lora_B) from q/k/v adapters: their common lora_A if `shared` (their `a`s are
  equal), else the `a`s side by side and a block-diagonal lora_B (q, k, v rows; zeros for an unadapted one)."""
  present = [p for p in QKV if p in ads]
  factors = {p: _peft_factors(ads[p]['a'][layer], ads[p]['b'][layer]) for p in present}
  size = factors[present[0]][1].shape[0]  # GPT-2 is multi-head: q, k and v have the same width
  if shared:
    a = factors[present[0]][0]
    b = np.concatenate([factors[p][1] if p in factors else np.zeros((size, a.shape[0]), a.dtype) for p in QKV])
    return a, b
  a = np.concatenate([factors[p][0] for p in present])
  b = np.zeros((3 * size, a.shape[0]), a.dtype)
  col = 0
  for p in present:
    row, r = QKV.index(p) * size, factors[p][0].shape[0]
    b[row:row + size, col:col + r] = factors[p][1]
    col += r
  return a, b


def save_adapter_dir(adapters: dict, out_dir: str, *, rank: int, alpha: float, rslora: bool = False,
                     dropout: float = 0.0, model_type: str = 'llama', base_model: str | None = None) -> None:
  """Writes adapters (a jaxtrain adapter tree, numpy or jax arrays) as a PEFT LoRA dir `PeftModel` loads.

  rank/alpha/rslora give the scale every weight was trained with; a weight whose rank is not `rank` gets
  rank_pattern and alpha_pattern entries that keep that scale. Arrays keep their dtype.
  """
  names = family(model_type)
  flat = {p: {k: _host(v) for k, v in ad.items()} for p, ad in
          ((p, lora.lookup(adapters, p)) for p in lora.adapter_paths(adapters))}
  if not flat:
    raise PeftError('no adapters to save: the adapter tree is empty')
  scale = lora.scaling(alpha, rank, rslora)
  tensors: dict[str, np.ndarray] = {}
  targets: set[str] = set()
  rank_pattern: dict[str, int] = {}
  alpha_pattern: dict[str, float] = {}

  def add(template: str, layer: int | None, a: np.ndarray, b: np.ndarray) -> None:
    module = template.format(i=layer)
    tensors[f'{PREFIX}{module}.lora_A.weight'], tensors[f'{PREFIX}{module}.lora_B.weight'] = a, b
    name = target_name(template, model_type)
    targets.add(name)
    if a.shape[0] != rank:  # PEFT would build this module at `rank`: name its own rank and a matching alpha.
      rank_pattern[name] = int(a.shape[0])
      alpha_pattern[name] = scale * (math.sqrt(a.shape[0]) if rslora else a.shape[0])

  for path, ad in flat.items():
    if model_type == 'gpt2' and path in QKV:
      continue
    if path not in names:
      known = ', '.join('/'.join(p) for p in _templates(model_type))
      raise PeftError(f'adapter on {"/".join(path)} has no {model_type} module to map to; mappable: {known}')
    stacked = path[0] == lora.STACKED
    for layer in range(ad['a'].shape[0]) if stacked else [None]:
      a, b = (ad['a'][layer], ad['b'][layer]) if stacked else (ad['a'], ad['b'])
      add(names[path], layer, *_peft_factors(a, b))
  qkv = {p: flat[p] for p in QKV if p in flat} if model_type == 'gpt2' else {}
  if qkv:
    first = next(iter(qkv.values()))['a']
    shared = all(np.array_equal(ad['a'], first) for ad in qkv.values())
    for layer in range(first.shape[0]):
      add(GPT2_QKV, layer, *_fuse_qkv(qkv, layer, shared))

  conv1d = model_type == 'gpt2' and any(t != 'lm_head' for t in targets)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model, 'r': int(rank),
      'lora_alpha': float(alpha), 'use_rslora': bool(rslora), 'lora_dropout': float(dropout),
      'target_modules': sorted(targets), 'rank_pattern': rank_pattern, 'alpha_pattern': alpha_pattern,
      'fan_in_fan_out': conv1d, 'bias': 'none', 'use_dora': False, 'modules_to_save': None,
      'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None, 'inference_mode': True,
      'revision': None,
  }
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


def run_lora_settings(config: Any) -> tuple[int, float, bool]:
  """(rank, alpha, rslora) a run trained with: `config.lora`, or the adapter dir it started from
  (`init.lora_from`), whose settings win as in `jaxtrain.train.state.lora_settings`."""
  if config.init.lora_from:
    cfg = read_config(config.init.lora_from)
    return int(cfg['r']), float(cfg['lora_alpha']), bool(cfg.get('use_rslora', False))
  return int(config.lora.rank), float(config.lora.alpha), bool(config.lora.rslora)


def run_model_type(config: Any) -> str:
  """The Hugging Face model_type of a run's base: init.from_hf's config.json, or the class `hf_weights.save` would
  export a jaxtrain-initialised model as (GPT-2 for learned positions, else the Llama family)."""
  from jaxtrain import models
  from jaxtrain.hf import config as hf_config, weights as hf_weights
  if config.init.from_hf:
    return hf_config.read_config(config.init.from_hf).get('model_type', 'llama')
  # The family does not depend on the vocabulary size, which may wait for the tokenizer (vocab_size 0).
  return hf_weights.export_target(models.model_config(config.model, 128)).model_type


def save_adapters(config: Any, state: dict, out_dir: str, base_model: str | None = None) -> None:
  """Writes the adapters of a LoRA run (`state['params']`) as a PEFT dir for the base it was trained on.

  base_model_name_or_path is `base_model`, else `init.from_hf`, else null: a base that jaxtrain initialised
  or pretrained has no Hugging Face name until it is exported (pass that export's dir as `base_model`).
  Only process 0 writes; every process must call this (arrays split across processes are gathered).
  """
  rank, alpha, rslora = run_lora_settings(config)
  if not rank:
    raise PeftError('this run has no LoRA adapters (lora.rank=0 and no init.lora_from); export the full model')
  adapters = jax.tree.map(_host, state['params'])
  model_type = run_model_type(config)
  head = adapters.get('lm_head') if isinstance(adapters, dict) else None
  if head is not None and config.init.from_hf:
    from jaxtrain.hf import config as hf_config
    vocab = hf_config.read_config(config.init.from_hf).get('vocab_size')
    if vocab and head['b'].shape[-1] != vocab:
      raise PeftError(f'the lm_head adapter has {head["b"].shape[-1]} outputs but the base {config.init.from_hf} '
                      f'has vocab_size={vocab}; export the resized base and pass it as base_model')
  if jax.process_index() == 0:
    save_adapter_dir(adapters, out_dir, rank=rank, alpha=alpha, rslora=rslora, dropout=float(config.lora.dropout),
                     model_type=model_type, base_model=base_model or config.init.from_hf or None)
