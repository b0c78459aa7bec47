"""How the train state is built: fresh, from a Hugging Face checkpoint, or as LoRA/QLoRA adapters over a
frozen base.

The state is `{'params', 'opt_state', 'step', 'rng'}`; with LoRA, `params` are the adapters only (so the
optimizer state exists only for them) and `frozen` holds the base, optionally quantized. The frozen base is
never checkpointed: it is rebuilt from the config (the same seed or the same Hugging Face directory), which
keeps fine-tuning checkpoints adapter-sized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.adapters import lora, quant
from jaxtrain import models, sharding
from jaxtrain.hf import peft as peft_io, weights as hf_weights
from jaxtrain.train import steps
from jaxtrain.train.checkpoint import abstract_with_shardings

# QLoRA quantizes the block projections; embeddings, norms, biases and the head stay in full precision.
QUANTIZED = r'^blocks/(attn/(q|k|v|o)|mlp/(gate|up|down))$'


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The checkpointed state `{'params', 'opt_state', 'step', 'rng'}` over trainable parameters: `abstract` (with
  shardings: what a checkpoint restores into), `shardings`, and `start(params)`: the step-0 state with fresh
  optimizer state, jitted into those shardings."""

  abstract: dict
  shardings: dict
  start: Callable[[Any], dict]


def trainable(shapes: Any, param_sh: Any, tx: Any, key: jax.Array, mesh: jax.sharding.Mesh) -> Trainable:
  """`Trainable` for parameters of `shapes` sharded by `param_sh`, optimized by `tx`, with rng `key`: shared by
  full training, LoRA and StackWise stages, so every checkpoint holds the same structure."""
  replicated = NamedSharding(mesh, P())
  opt_shapes = jax.eval_shape(tx.init, shapes)
  sh = {'params': param_sh, 'opt_state': sharding.shardings_like(opt_shapes, shapes, param_sh, mesh),
        'step': replicated, 'rng': replicated}
  abstract = {'params': shapes, 'opt_state': opt_shapes, 'step': jax.ShapeDtypeStruct((), jnp.int32),
              'rng': jax.eval_shape(lambda: key)}
  start = jax.jit(lambda p: {'params': p, 'opt_state': tx.init(p), 'step': jnp.zeros((), jnp.int32), 'rng': key},
                  out_shardings=sh)
  return Trainable(abstract_with_shardings(abstract, sh), sh, start)


def state_factory(mc: models.ModelConfig, tx: Any, seed: int, mesh: jax.sharding.Mesh,
                  load_params: Callable[[Any], dict] | None = None, execution: models.Execution | None = None
                  ) -> tuple[Any, dict, dict, Callable[[], dict]]:
  """(graphdef, abstract state, state shardings, create) for training every parameter.

  Nothing is allocated until `create()` runs, which builds parameters (random, or `load_params(shardings)`)
  and optimizer state already sharded. A resume restores into the abstract state instead, so the model
  never exists twice in memory. The graphdef runs as `execution` says (`jaxtrain.train.execution.plan`).
  """
  graphdef, specs, shapes = models.describe(mc, execution)
  param_sh = sharding.param_shardings(specs, shapes, mesh)

  def create_fn(key: jax.Array) -> dict:
    params = models.init_params(mc, key)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32), 'rng': key}

  key = jax.random.PRNGKey(seed)
  replicated = NamedSharding(mesh, P())
  t = trainable(shapes, param_sh, tx, key, mesh)  # its `start` is not used: parameters are made inside the jit
  state_sh = t.shardings
  if load_params is None:
    create = jax.jit(create_fn, out_shardings=state_sh)
    return graphdef, t.abstract, state_sh, lambda: create(key)

  init_opt = jax.jit(tx.init, out_shardings=state_sh['opt_state'])

  def create_loaded() -> dict:
    params = load_params(param_sh)
    return {'params': params, 'opt_state': init_opt(params), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.device_put(key, replicated)}
  return graphdef, t.abstract, state_sh, create_loaded


def init_state(mc: models.ModelConfig, tx: Any, seed: int, mesh: jax.sharding.Mesh,
               execution: models.Execution | None = None) -> tuple[Any, dict, dict]:
  """(graphdef, freshly initialised sharded state, state shardings); the graphdef runs as `execution` says."""
  graphdef, _, state_sh, create = state_factory(mc, tx, seed, mesh, execution=execution)
  return graphdef, create(), state_sh


@dataclasses.dataclass(frozen=True)
class Built:
  """Everything the loop needs about the state.

  `abstract` describes what is checkpointed (no frozen base); `create()` makes a fresh full state and
  `complete(restored)` adds the frozen base to a restored one. `transform` is the step's param_transform.
  """

  graphdef: Any
  abstract: dict
  shardings: dict
  create: Callable[[], dict]
  complete: Callable[[dict], dict]
  transform: steps.ParamTransform | None
  description: str


def with_frozen(graphdef: Any, saved: Trainable, initial_params: Callable[[], Any], frozen_sh: Any,
                make_frozen: Callable[[], Any], transform: steps.ParamTransform, description: str) -> Built:
  """A `Built` whose trainable part is `saved` starting from `initial_params()`, plus a `frozen` part (sharded
  by `frozen_sh`) that is never checkpointed: `make_frozen()` rebuilds it for a fresh and a restored state
  alike (LoRA's base, a StackWise stage's trunk)."""
  return Built(graphdef, saved.abstract, dict(saved.shardings, frozen=frozen_sh),
               lambda: dict(saved.start(initial_params()), frozen=make_frozen()),
               lambda restored: dict(restored, frozen=make_frozen()), transform, description)


def load_base(config: ml_collections.ConfigDict, mc: models.ModelConfig) -> Callable[[Any], dict] | None:
  """A `load(shardings) -> params` for `init.from_hf`, or None for a random init."""
  if not config.init.from_hf:
    return None
  return lambda shardings: hf_weights.load_params(config.init.from_hf, mc, shardings)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  rank: int
  alpha: float
  rslora: bool
  targets: str
  initial: dict | None  # adapters loaded from init.lora_from (host arrays), else None

  @property
  def scale(self) -> float:
    return lora.scaling(self.alpha, self.rank, self.rslora)


def lora_settings(config: ml_collections.ConfigDict, mc: models.ModelConfig, shapes: Any) -> LoraSettings:
  """Rank/alpha/targets from `config.lora`, or from the PEFT adapter dir in `init.lora_from`."""
  c = config.lora
  if not config.init.lora_from:
    return LoraSettings(c.rank, c.alpha, c.rslora, c.targets, None)
  adapters, s = peft_io.load_adapters(config.init.lora_from, shapes, model_type=model_type(config, mc))
  if c.rank and c.rank != s['rank']:
    raise lora.LoraError(f"lora.rank={c.rank} differs from r={s['rank']} of the adapter in init.lora_from="
                     f'{config.init.lora_from}; set lora.rank=0 (take the adapter\'s) or {s["rank"]}')
  return LoraSettings(s['rank'], s['alpha'], s['rslora'], s['targets'], adapters)


def model_type(config: ml_collections.ConfigDict, mc: models.ModelConfig) -> str:
  """The Hugging Face model_type the base corresponds to (what PEFT module names follow)."""
  return hf_weights.export_target(mc).model_type


def build(config: ml_collections.ConfigDict, mc: models.ModelConfig, tx: Any, mesh: jax.sharding.Mesh,
          execution: models.Execution | None = None) -> Built:
  """The state for `config`: full training, or LoRA/QLoRA when `lora.rank` or `init.lora_from` is set; the
  graphdef runs as `execution` says (the run's `jaxtrain.train.execution.plan`; default: no kernel)."""
  if not (config.lora.rank or config.init.lora_from):
    graphdef, abstract, state_sh, create = state_factory(mc, tx, config.train.seed, mesh, load_base(config, mc),
                                                         execution)
    n = models.count_params(abstract['params'])
    return Built(graphdef, abstract, state_sh, create, lambda s: s, None, f'{n / 1e6:.2f}M params, all trained')
  return _build_lora(config, mc, tx, mesh, execution)


def _build_lora(config: ml_collections.ConfigDict, mc: models.ModelConfig, tx: Any, mesh: jax.sharding.Mesh,
                execution: models.Execution | None) -> Built:
  graphdef, specs, shapes = models.describe(mc, execution)
  param_sh = sharding.param_shardings(specs, shapes, mesh)
  settings = lora_settings(config, mc, shapes)
  key = jax.random.PRNGKey(config.train.seed)
  replicated = NamedSharding(mesh, P())

  def init_adapters() -> dict:
    if settings.initial is not None:
      return jax.tree.map(jnp.asarray, settings.initial)
    return lora.init(shapes, settings.targets, settings.rank, jax.random.fold_in(key, 1))

  ad_shapes = jax.eval_shape(init_adapters)
  saved = trainable(ad_shapes, sharding.param_shardings(lora.specs(specs, ad_shapes), ad_shapes, mesh), tx, key, mesh)

  c = config.lora
  quantize = None
  if c.quantize != 'none':
    quantize = lambda p: quant.quantize_tree(p, QUANTIZED, c.quantize, c.quant_block, c.double_quant)  # noqa: E731
    frozen_shapes = jax.eval_shape(quantize, shapes)
    # Quantized codes are small; they are replicated rather than split by the parameters' logical axes.
    frozen_sh = jax.tree.map(lambda _: replicated, frozen_shapes)
  else:
    frozen_sh = param_sh
  load = load_base(config, mc)

  def make_frozen() -> dict:
    base = load(param_sh) if load else jax.jit(models.init_params, static_argnums=0, out_shardings=param_sh)(mc, key)
    if quantize is not None:
      base = jax.jit(quantize, out_shardings=frozen_sh)(base)
    return base

  mode = resolve_mode(c.mode)
  scale = settings.scale

  def transform(params: Any, frozen: Any, rng: jax.Array | None) -> Any:
    return lora.apply(frozen, params, scale, mode, c.dropout, rng)

  n_base, n_ad = models.count_params(shapes), lora.count(ad_shapes)
  matrices = sum(lora.lookup(ad_shapes, p)['a'].shape[0] if p[0] == lora.STACKED else 1
                 for p in lora.adapter_paths(ad_shapes))
  what = f'{c.quantize}-quantized ' if quantize else ''
  description = (f'{n_base / 1e6:.2f}M {what}frozen params + {n_ad / 1e6:.3f}M LoRA params (rank {settings.rank}, '
                 f'scale {scale:g}, {mode}) on {matrices} weight matrices')
  return with_frozen(graphdef, saved, init_adapters, frozen_sh, make_frozen, transform, description)


def resolve_mode(mode: str) -> str:
  """`lora.mode=auto` is the factored product: 7% faster than merging and 145 MiB fewer temporaries on the
  31.5M Llama of benchmarks/lora_modes.py, and the only mode for adapter dropout and quantized bases."""
  return 'factored' if mode == 'auto' else mode


def checkpointed(state: dict) -> dict:
  """The part of the state that goes into checkpoints (everything but the frozen base)."""
  return {k: v for k, v in state.items() if k != 'frozen'}


def lora_base(config: ml_collections.ConfigDict, mc: models.ModelConfig) -> dict:
  """The unquantized base a LoRA run started from: `init.from_hf`'s weights, or the init of its seed."""
  load = load_base(config, mc)
  return load(None) if load else models.init_params(mc, jax.random.PRNGKey(config.train.seed))


def merged_params(config: ml_collections.ConfigDict, mc: models.ModelConfig, restored: dict,
                  base: dict | None = None) -> dict:
  """Full-precision model parameters of a restored state: the params themselves, or with LoRA the base
  rebuilt unquantized (`lora_base`, or `base` when the caller has it already) with the adapters merged in. A
  QLoRA run merges into the original base, not the quantized one, so export does not bake in quantisation
  error."""
  if not (config.lora.rank or config.init.lora_from):
    return restored['params']
  _, _, shapes = models.describe(mc)
  settings = lora_settings(config, mc, shapes)
  base = lora_base(config, mc) if base is None else base
  return lora.merge(base, restored['params'], settings.scale)
