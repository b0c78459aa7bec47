"""LoRA as pure functions of the parameter tree.

Adapters live in their own tree, shaped like the parameters they adapt: for a target weight W with input
dims I and output dims O (jaxtrain orders every projection inputs-then-outputs, with a leading `layers` axis
for stacked blocks), `adapters[...path...] = {'a': (layers?, *I, r), 'b': (layers?, r, *O)}` and the adapted
weight is `W + scale * a @ b` with scale = alpha / r (rsLoRA: alpha / sqrt(r)), as in PEFT. `a` starts
Kaiming-uniform and `b` at zero, so training starts from the base model's function.

`apply` turns (base, adapters) into what the model reads, either by merging (`W + s·a·b`, one dense
weight per target) or as `LowRank` weights whose product with activations is `x@W + s·((x@a)@b)`; the model's
`project` helper asks a structured weight for its own product, so no model code knows about LoRA.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtrain.errors import ConfigError, UserError
from jaxtrain.models.flops import LoraFlops
from jaxtrain.models.transformer import project

Array = jax.Array


class LoraError(UserError):
  """A LoRA setting that cannot apply to this model (targets, rank, mode); the message names it."""

# Number of leading input dims of each projection weight that LoRA can adapt (after the layers axis).
INPUT_DIMS = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1, 'lm_head': 1,
              # multi-head latent attention (jaxtrain.models.mla)
              'q_down': 1, 'q_up': 1, 'kv_down': 1, 'k_up': 1, 'v_up': 1, 'k_rope': 1}
STACKED = 'blocks'  # parameters under this top-level key carry a leading layers axis.


def check(c: Any, from_adapter: bool) -> None:
  """The `lora` section's rules across keys (single-key ranges: `jaxtrain.config.schema`): `targets` compiles,
  and the keys that only make sense together; `from_adapter`: init.lora_from is set. Raises ConfigError."""
  try:
    re.compile(c.targets)
  except re.error as e:
    raise ConfigError('lora.targets', c.targets, f'is not a valid regular expression ({e})') from None
  on = c.rank > 0 or from_adapter
  if c.quantize != 'none' and not on:
    raise ConfigError('lora.quantize', c.quantize, 'needs LoRA: set lora.rank > 0 (or init.lora_from)')
  if c.quantize != 'none' and c.mode == 'merged':
    raise ConfigError('lora.mode', c.mode, 'cannot merge into a quantized base every step; use factored or auto')
  if c.dropout > 0 and c.mode == 'merged':
    raise ConfigError('lora.dropout', c.dropout, 'needs lora.mode=factored or auto (merged weights have no '
                      'adapter input to drop)')


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  """A nested dict from {path tuple: leaf}."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def _is_adapter(x: Any) -> bool:
  return isinstance(x, dict) and set(x) == {'a', 'b'}


def adapter_paths(adapters: dict) -> list[tuple[str, ...]]:
  """Paths (tuples of keys) of the adapted weights."""
  out = []

  def walk(node: Any, prefix: tuple[str, ...]) -> None:
    if _is_adapter(node):
      out.append(prefix)
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (k,))
  walk(adapters, ())
  return out


def lookup(tree: dict, path: tuple[str, ...]) -> Any:
  """The subtree at `path`."""
  for k in path:
    tree = tree[k]
  return tree


def target_paths(params: Any, pattern: str) -> list[tuple[str, ...]]:
  """Paths of the weights whose '/'-joined path matches `pattern` (re.search); all must be projections."""
  regex = re.compile(pattern)
  flat = _flatten(params)
  matched = [p for p in flat if regex.search('/'.join(p))]
  if not matched:
    raise LoraError(f'lora.targets={pattern!r} matches no parameter; paths are e.g. '
                     f'{", ".join("/".join(p) for p in list(flat)[:8])}')
  for p in matched:
    if p[-1] not in INPUT_DIMS:
      raise LoraError(f'lora.targets={pattern!r} matches {"/".join(p)}, which LoRA cannot adapt; adaptable '
                       f'weights are named {", ".join(INPUT_DIMS)}')
  return matched


def _layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int]:
  """(number of leading stacked dims, number of input dims) of a target weight."""
  lead = 1 if path[0] == STACKED else 0
  n_in = INPUT_DIMS[path[-1]]
  if len(shape) <= lead + n_in:
    raise LoraError(f'parameter {"/".join(path)} has shape {shape}: too few dims for a LoRA target')
  return lead, n_in


def init(params: Any, pattern: str, rank: int, key: Array, dtype: Any = jnp.float32) -> dict:
  """Adapters for the weights matching `pattern` (arrays or ShapeDtypeStructs): a ~ U(±1/sqrt(fan_in)), b = 0."""
  if rank < 1:
    raise LoraError(f'lora.rank={rank}: must be >= 1')
  flat = _flatten(params)
  out = {}
  for i, path in enumerate(target_paths(params, pattern)):
    shape = tuple(flat[path].shape)
    lead, n_in = _layout(path, shape)
    ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
    fan_in = 1
    for d in ins:
      fan_in *= d
    bound = fan_in ** -0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), shape[:lead] + ins + (rank,), dtype, -bound, bound)
    out[path] = {'a': a, 'b': jnp.zeros(shape[:lead] + (rank,) + outs, dtype)}
  return unflatten(out)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
  """PEFT's LoRA scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
  return alpha / (rank ** 0.5 if rslora else rank)


def rank_of(adapter: dict) -> int:
  return int(adapter['a'].shape[-1])


def delta(adapter: dict, lead: int, scale: float) -> Array:
  """scale * a @ b with the shape of the adapted weight (float32)."""
  a, b = adapter['a'].astype(jnp.float32), adapter['b'].astype(jnp.float32)
  letters = iter(string.ascii_letters)
  lead_s = ''.join(next(letters) for _ in range(lead))
  in_s = ''.join(next(letters) for _ in range(a.ndim - lead - 1))
  out_s = ''.join(next(letters) for _ in range(b.ndim - lead - 1))
  r = next(letters)
  return scale * jnp.einsum(f'{lead_s}{in_s}{r},{lead_s}{r}{out_s}->{lead_s}{in_s}{out_s}', a, b)


def _dense(w: Any) -> Array:
  return w.dequantize() if hasattr(w, 'dequantize') else w


def _scale_for(scales: float | dict, path: tuple[str, ...]) -> float:
  return scales['/'.join(path)] if isinstance(scales, dict) else scales


def merge(base: dict, adapters: dict, scales: float | dict) -> dict:
  """New weights `W + scale * a @ b` for every adapted W (a quantized W is dequantized first).

  `base` is not modified: untouched leaves are shared, so dropping the adapters gives back the base exactly.
  `scales` is one float or {'/'-joined path: float}.
  """
  flat = dict(_flatten(base))
  for path in adapter_paths(adapters):
    w = _dense(flat[path])
    lead, _ = _layout(path, tuple(w.shape))
    flat[path] = (w.astype(jnp.float32) + delta(lookup(adapters, path), lead, _scale_for(scales, path))).astype(w.dtype)
  return unflatten(flat)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
  """A frozen weight plus LoRA factors, multiplied factor by factor: x@W + scale * dropout(x)@a@b.

  Array fields may carry leading stacked dims (sliced by `lax.scan` like any parameter). `dropout_key` is one
  raw PRNG key per stacked slice, or None for no dropout.
  """

  w: Any
  a: Array
  b: Array
  dropout_key: Array | None
  scale: float = dataclasses.field(metadata={'static': True})
  dropout: float = dataclasses.field(metadata={'static': True}, default=0.0)

  def einsum(self, spec: str, x: Array, out_dtype: Any = None) -> Array:
    inputs, out = spec.split('->')
    xs, ws = inputs.split(',')
    contracted = ''.join(c for c in ws if c in xs)
    kept = ''.join(c for c in ws if c not in xs)
    r = next(c for c in string.ascii_letters if c not in spec)
    hs = ''.join(c for c in xs if c not in contracted) + r
    y = project(spec, x, self.w, out_dtype)
    if self.dropout > 0 and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    h = jnp.einsum(f'{xs},{contracted}{r}->{hs}', x, self.a.astype(x.dtype))
    low = jnp.einsum(f'{hs},{r}{kept}->{out}', h, (self.scale * self.b).astype(x.dtype),
                     preferred_element_type=out_dtype)
    return y + low.astype(y.dtype)


def apply(base: dict, adapters: dict, scales: float | dict, mode: str = 'factored', dropout: float = 0.0,
          rng: Array | None = None) -> dict:
  """The parameters the model reads: merged dense weights (`mode='merged'`) or `LowRank` weights.

  Dropout on the adapter input needs the factored mode and an `rng` (None, e.g. in evaluation, turns it off).
  """
  if mode == 'merged':
    if dropout > 0 and rng is not None:
      raise LoraError(f'lora.dropout={dropout} needs lora.mode=factored (merged weights have no adapter input)')
    return merge(base, adapters, scales)
  if mode != 'factored':
    raise LoraError(f'lora.mode={mode!r}: must be merged or factored')
  flat = dict(_flatten(base))
  for i, path in enumerate(adapter_paths(adapters)):
    ad = lookup(adapters, path)
    lead = 1 if path[0] == STACKED else 0
    key = None
    if dropout > 0 and rng is not None:
      key = jax.random.fold_in(rng, i)
      if lead:
        key = jax.random.split(key, ad['a'].shape[0])
    flat[path] = LowRank(flat[path], ad['a'], ad['b'], key, _scale_for(scales, path), dropout)
  return unflatten(flat)


def specs(base_specs: dict, adapters: Any) -> dict:
  """Logical PartitionSpecs of the adapters: `a` keeps the weight's input axes, `b` its output axes."""
  out = {}
  for path in adapter_paths(adapters):
    spec = tuple(lookup(base_specs, path))
    ad = lookup(adapters, path)
    lead = 1 if path[0] == STACKED else 0
    n_in = ad['a'].ndim - lead - 1
    out[path] = {'a': P(*spec[:lead + n_in], None), 'b': P(*spec[:lead], None, *spec[lead + n_in:])}
  return unflatten(out)


def count(adapters: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(adapters))


def flops_of(adapters: Any) -> LoraFlops:
  """What an adapter tree (arrays or ShapeDtypeStructs, e.g. the `params` of a LoRA state) trains, for
  `jaxtrain.models.flops.flops_per_token`: its rank and the '/'-joined paths of the adapted weights."""
  paths = adapter_paths(adapters)
  return LoraFlops(rank_of(lookup(adapters, paths[0])), tuple('/'.join(p) for p in paths))
