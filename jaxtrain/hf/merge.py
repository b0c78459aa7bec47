"""Combine PEFT LoRA adapters into one adapter, or into the base model's weights.

  jaxtrain merge-adapters --adapters A B --weights 0.7 0.3 --method ties --density 0.5 --out OUT
  jaxtrain merge-adapters --adapters=A,B --weights=1,1 --method=linear --out=OUT --base=HF_DIR

The semantics are PEFT's `add_weighted_adapter(adapters, weights, name, combination_type=method)` (peft 0.21,
tuners/lora/model.py and utils/merge_utils.py). With c_i = weight_i * scale_i, adapter i's lora_A is weighted
by sign(c_i) sqrt|c_i| and its lora_B by sqrt|c_i|, and the A factors are combined with each other, the B factors
with each other (not their products, so only `linear` with one adapter reproduces a delta exactly):
  linear       sum of the weighted factors
  ties         each factor keeps its `density` fraction of largest magnitudes (per weight and layer); per
               element the sign of the larger sum (`total`) or count (`frequency`) of the pruned, unweighted
               values wins, and the weighted values of that sign are averaged
  dare_linear  each factor keeps a random `density` fraction of its values, rescaled by 1/density; then linear
  dare_ties    DARE's random pruning, then TIES' sign election and mean
All adapters must have one rank r; the result has rank r and alpha r (scale 1: the scales are in the factors).
An adapter without some weight adds zeros there, which every method ignores, as PEFT skips it; with one adapter
every method is linear, as in PEFT. DARE's masks come from numpy's generator seeded with --seed.

With --base the combined adapter is added to the base weights (W + a @ b) and the result is written as a
Hugging Face model directory; without, the output is a PEFT adapter dir (`PeftModel.from_pretrained` loads it).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from jaxtrain.errors import UserError
from jaxtrain.adapters import lora
from jaxtrain.hf import config as hf_config, peft as peft_io, weights as hf_weights

METHODS = ('linear', 'ties', 'dare_linear', 'dare_ties')
SIGN_METHODS = ('total', 'frequency')
Path = tuple[str, ...]


class MergeError(UserError):
  """Adapters or options that cannot be combined; the message is one line for the user."""


def check_options(n: int, weights: list[float], method: str, density: float | None, majority_sign_method: str) -> None:
  """One-line errors for what the CLI and `combine` share."""
  if method not in METHODS:
    raise MergeError(f'method={method!r}: must be one of {", ".join(METHODS)}')
  if len(weights) != n:
    raise MergeError(f'{len(weights)} weights for {n} adapters; give one weight per adapter')
  if n < 1:
    raise MergeError('no adapters to merge')
  if majority_sign_method not in SIGN_METHODS:
    raise MergeError(f'majority_sign_method={majority_sign_method!r}: must be one of {", ".join(SIGN_METHODS)}')
  if method != 'linear' and n > 1:
    if density is None:
      raise MergeError(f'method={method} needs a density in (0, 1] (the fraction of values kept)')
    if not 0 < density <= 1:
      raise MergeError(f'density={density}: must be in (0, 1] (the fraction of values kept)')


def _paths(adapters: list[dict]) -> list[Path]:
  seen: dict[Path, None] = {}
  for ad in adapters:
    seen.update(dict.fromkeys(lora.adapter_paths(ad)))
  return list(seen)


def _has(tree: dict, path: Path) -> bool:
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return False
    tree = tree[k]
  return True


def dare_masks(adapters: list[dict], density: float, seed: int) -> list[dict]:
  """Keep-masks (True: kept) shaped like each adapter tree, Bernoulli(density) from numpy's seeded generator.

  Drawn adapter by adapter, weight by weight in sorted path order, `a` before `b`, so a seed names one merge.
  """
  rng = np.random.default_rng(seed)
  out = []
  for ad in adapters:
    flat = {}
    for path in sorted(lora.adapter_paths(ad)):
      node = lora.lookup(ad, path)
      flat[path] = {k: rng.random(np.shape(node[k])) < density for k in ('a', 'b')}
    out.append(lora.unflatten(flat))
  return out


def _magnitude_prune(x: np.ndarray, density: float, stacked: bool) -> np.ndarray:
  """PEFT's magnitude_based_pruning per torch module: the top int(density * n) |values| of each layer survive."""
  rows = x.reshape(x.shape[0] if stacked else 1, -1)
  k = int(density * rows.shape[1])
  keep = np.zeros(rows.shape, bool)
  np.put_along_axis(keep, np.argsort(-np.abs(rows), axis=1, kind='stable')[:, :k], True, axis=1)
  return (rows * keep).reshape(x.shape)


def _combine_factor(tensors: np.ndarray, weights: np.ndarray, method: str, density: float | None,
                    majority_sign_method: str, keep: np.ndarray | None, stacked: bool) -> np.ndarray:
  """One factor (a or b) of one weight, merged over the leading adapter axis of `tensors` (float32)."""
  if method != 'linear' and density < 1:  # PEFT's prune() leaves tensors alone at density >= 1
    if method == 'ties':
      tensors = np.stack([_magnitude_prune(t, density, stacked) for t in tensors])
    else:
      tensors = tensors * keep.astype(np.float32) / np.float32(density)
  weighted = tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1))
  if method in ('linear', 'dare_linear'):
    return weighted.sum(axis=0)
  sign = np.sign(tensors)
  magnitude = tensors.sum(axis=0) if majority_sign_method == 'total' else sign.sum(axis=0)
  elected = sign == np.where(magnitude >= 0, 1.0, -1.0)
  return (weighted * elected).sum(axis=0) / np.maximum(elected.sum(axis=0), 1.0)


def combine(adapters: list[dict], scales: list[Any], weights: list[float], method: str,
            density: float | None = None, majority_sign_method: str = 'total', masks: list[dict] | None = None,
            seed: int = 0) -> dict:
  """The combined adapter tree (rank r, scale 1) of jaxtrain adapter trees, as PEFT's add_weighted_adapter.

  scales: per adapter one float or {'/'-joined path: scale} (`read_adapter_dir`'s info['scales']). masks:
  DARE keep-masks shaped like the adapters (default `dare_masks(adapters, density, seed)`).
  """
  check_options(len(adapters), weights, method, density, majority_sign_method)
  if len(adapters) == 1:
    method = 'linear'
  ranks = sorted({int(lora.lookup(ad, p)['a'].shape[-1]) for ad in adapters for p in lora.adapter_paths(ad)})
  if len(ranks) > 1:
    raise MergeError(f'the adapters have ranks {ranks}; {method} merging needs one rank (as PEFT\'s '
                     'add_weighted_adapter): retrain or pick adapters of the same rank')
  if method.startswith('dare') and masks is None:
    masks = dare_masks(adapters, density, seed)
  out: dict[Path, dict[str, np.ndarray]] = {}
  for path in _paths(adapters):
    present = [i for i, ad in enumerate(adapters) if _has(ad, path)]
    ref = lora.lookup(adapters[present[0]], path)
    for i in present:
      node = lora.lookup(adapters[i], path)
      if any(np.shape(node[k]) != np.shape(ref[k]) for k in ('a', 'b')):
        raise MergeError(f'{"/".join(path)}: adapter {i + 1} has factors {np.shape(node["a"])}, '
                         f'{np.shape(node["b"])} but adapter {present[0] + 1} has {np.shape(ref["a"])}, '
                         f'{np.shape(ref["b"])}; the adapters must be for one base model')
    c = [weights[i] * _scale(scales[i], path) if i in present else 0.0 for i in range(len(adapters))]
    w = {'a': np.array([math.copysign(math.sqrt(abs(x)), 1.0 if x >= 0 else -1.0) for x in c], np.float32),
         'b': np.array([math.sqrt(abs(x)) for x in c], np.float32)}
    merged = {}
    for k in ('a', 'b'):
      shape = np.shape(ref[k])
      zero = np.zeros(shape, np.float32)
      stack = np.stack([np.asarray(lora.lookup(ad, path)[k], np.float32) if i in present else zero
                        for i, ad in enumerate(adapters)])
      keep = None
      if method.startswith('dare'):
        keep = np.stack([np.asarray(lora.lookup(masks[i], path)[k]) if i in present else np.zeros(shape, bool)
                         for i in range(len(adapters))])
      value = _combine_factor(stack, w[k], method, density, majority_sign_method, keep, path[0] == lora.STACKED)
      merged[k] = value.astype(np.asarray(ref[k]).dtype)
    out[path] = merged
  return lora.unflatten(out)


def _scale(scales: Any, path: Path) -> float:
  return float(scales['/'.join(path)] if isinstance(scales, dict) else scales)


# ----------------------------------------------------------------------------- command line


def check_merge(n: int, weights: list[float], out: str, method: str = 'linear', density: float | None = None,
                majority_sign_method: str = 'total', base: str = '') -> None:
  """One-line errors for a merge of `n` adapter dirs into `out` (and with `base`), before anything is read."""
  check_options(n, weights, method, density, majority_sign_method)
  if method == 'linear' and density is not None:
    raise MergeError(f'--density={density} has no effect with --method=linear; use ties, dare_linear or '
                     'dare_ties, or drop --density')
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise MergeError(f'--out={out} exists and is not an empty dir; choose a new output dir')
  if base and not os.path.isfile(os.path.join(base, 'config.json')):
    raise MergeError(f'--base={base}: no config.json there; expected a Hugging Face model dir')


def _base_model(base: str) -> tuple[Any, dict, str]:
  """(ModelConfig, parameter shapes, model_type) of a Hugging Face model dir."""
  from jaxtrain import models
  mc = hf_config.model_config(base)
  return mc, models.describe(mc)[2], hf_config.read_config(base)['model_type']


def merge(adapter_dirs: list[str], weights: list[float], out: str, method: str = 'linear',
          density: float | None = None, majority_sign_method: str = 'total', seed: int = 0, base: str = '') -> str:
  """Combines the PEFT adapters in `adapter_dirs` (one weight each) into a PEFT adapter dir `out`, or with `base`
  (a Hugging Face model dir) into a merged model dir `out`; returns a one-line summary. Raises MergeError,
  PeftError or HfError on a user mistake."""
  check_merge(len(adapter_dirs), weights, out, method, density, majority_sign_method, base)
  mc = shapes = model_type = None
  if base:
    mc, shapes, model_type = _base_model(base)
  read = [peft_io.read_adapter_dir(d, shapes, model_type) for d in adapter_dirs]
  types = {info['model_type'] for _, info in read}
  if len(types) > 1:
    raise MergeError(f'the adapters are for different model families ({", ".join(sorted(types))}); merge adapters '
                     'of one base model')
  model_type = types.pop()
  adapters, infos = [a for a, _ in read], [i for _, i in read]
  if model_type == 'gpt2' and method != 'linear' and len(adapters) > 1 and any(
      _has(ad, p) for ad in adapters for p in peft_io.QKV):
    raise MergeError(f'--method={method}: GPT-2 q/k/v adapters are one fused c_attn LoRA in PEFT, whose '
                     'pruning jaxtrain\'s per-weight adapters cannot reproduce; use --method=linear')
  merged = combine(adapters, [i['scales'] for i in infos], weights, method, density,
                   majority_sign_method, seed=seed)
  rank = int(next(lora.lookup(merged, p) for p in lora.adapter_paths(merged))['a'].shape[-1])
  what = f'{len(adapter_dirs)} adapters ({method}) into'
  if not base:
    peft_io.save_adapter_dir(merged, out, rank=rank, alpha=rank, rslora=False, dropout=infos[0]['dropout'],
                             model_type=model_type, base_model=infos[0]['base_model'])
    return f'merged {what} a rank-{rank} PEFT adapter on {len(lora.adapter_paths(merged))} weights: {out}'
  params = lora.merge(hf_weights.load_params(base, mc), merged, 1.0)  # W + a @ b in float32
  config = hf_config.read_config(base)
  dtype = 'bfloat16' if 'bfloat16' in (config.get('dtype'), config.get('torch_dtype')) else 'float32'
  has_tokenizer = any(f.startswith('tokenizer') for f in os.listdir(base))
  hf_weights.save(params, mc, base if has_tokenizer else None, out, dtype=dtype)
  return f'merged {what} {base} ({dtype}): {out}'
