"""StackWise: progressive, stack-by-stack training of a rack (`jaxtrain.models.rack`).

Training runs in stages. Stage k trains one new stack; the rest of the rack (the trunk) is frozen, or adapted
through LoRA / QLoRA adapters of a smaller rank than the new stack's own optional adapters (dual LoRA).

- `append` (left to right): stage k trains stack k on top of stacks 0..k-1. With a frozen trunk, the
  embedding and trunk form a frozen prefix that runs without gradients (its output is a constant of the
  step), so it keeps no activations for backward; memory grows with the trained stack, not the depth.
  The head trains every stage.
- `prepend` (right to left, a reverse-diffusion curriculum): stage 0 trains the last stack with the head;
  from then on the suffix and head are a frozen anchor and each new stack goes in front of it. With the
  time-as-depth objective the new stack sees heavier noise than the suffix it feeds.
- `joint`: one stage that trains every stack: the end-to-end baseline of the same architecture.

A stage is a `train.Job` run by `train.fit`, so resuming, logging, evaluation and checkpoints work as in
any run; between stages the rack is held on the host and saved per stack (`jaxtrain.stackwise.checkpoint`),
writing only the stacks whose contents changed.

Train state of a stage: `params` = {'shared': the shared parameters this stage trains, 'stack': the new
stack (or its adapters with stack LoRA), 'trunk': {i: adapters} (LoRA trunks)}; `frozen` = {'shared': the
rest, 'trunk': {i: stack params, quantized for QLoRA}, 'stack': the new stack's base with stack LoRA}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.adapters import lora, quant
from jaxtrain import models, sharding
from jaxtrain.stackwise import objectives
from jaxtrain.train import steps
from jaxtrain.models import flops
from jaxtrain.errors import ConfigError, UserError
from jaxtrain.models import ModelConfig, rack
from jaxtrain.train.state import Built, QUANTIZED, trainable, with_frozen

DIRECTIONS = ('append', 'prepend', 'joint')
TRUNKS = ('frozen', 'lora', 'qlora')
RANK_SCHEDULES = ('constant', 'increasing', 'list')
QUANTIZERS = ('none', 'nf4', 'int8')
NEW_STACK_INITS = ('identity', 'random', 'copy')
TIMES = ('input', 'depth')
TIME_EMBEDDINGS = ('none', 'sinusoidal', 'learned')
INPUT_SIDE = ('pos_embed', 'time_proj', 'time_table')  # besides an untied embedding
OUTPUT_SIDE = ('final_norm', 'lm_head')


class StackwiseError(ConfigError):
  """A StackWise setting that cannot work; the message names the key, the value and what is valid."""

  def __init__(self, message: str):  # pylint: disable=super-init-not-called
    UserError.__init__(self, message)  # the whole line is the message (it names the key and value itself)
    self.key = None

  def __reduce__(self):
    return type(self), (self.what,)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: which stacks run (in forward order), which one is new, its mask ratio and adapter ranks."""

  index: int
  order: tuple[int, ...]
  new: tuple[int, ...]  # the stacks trained in full or through stack LoRA (all of them when joint)
  steps: int
  ratio: float | None  # time-as-depth / MLM mask ratio; None: t drawn per document
  trunk_ranks: dict[int, int]  # LoRA rank per trunk stack ({} for a frozen trunk)
  stack_rank: int  # 0: the new stack trains every weight

  @property
  def trunk(self) -> tuple[int, ...]:
    return tuple(i for i in self.order if i not in self.new)

  @property
  def name(self) -> str:
    return f'stage {self.index}'


def ranks(w: ml_collections.ConfigDict, which: str) -> tuple[int, ...]:
  """Per-stack adapter ranks for `which` in ('trunk', 'stack') from `stackwise.rank_schedule`:
  constant (the base rank everywhere), increasing (base * (1 + stack index)) or list (`{which}_ranks`)."""
  base, n = int(w[f'{which}_rank']), int(w.num_stacks)
  if w.rank_schedule == 'constant':
    return (base,) * n
  if w.rank_schedule == 'increasing':
    return tuple(base * (1 + i) for i in range(n))
  listed = tuple(int(r) for r in w[f'{which}_ranks'])
  if len(listed) != n:
    raise StackwiseError(f'config.stackwise.{which}_ranks={listed}: rank_schedule=list needs one rank per stack '
                         f'({n})')
  return listed


def stage_steps(w: ml_collections.ConfigDict, total: int, stages: int) -> tuple[int, ...]:
  if len(w.stage_steps):
    out = tuple(int(s) for s in w.stage_steps)
    if len(out) != stages or min(out) < 1:
      raise StackwiseError(f'config.stackwise.stage_steps={out}: give {stages} positive step counts, one per '
                           'stage, or () to split train.steps evenly')
    return out
  if total < stages:
    raise StackwiseError(f'config.train.steps={total} cannot be split over {stages} stages: give at least one '
                         'step per stage')
  return tuple(total // stages + (1 if i < total % stages else 0) for i in range(stages))


def check(config: ml_collections.ConfigDict) -> None:
  """The `objective` and `stackwise` sections: choices and ranges of their keys; masked objectives need a rack;
  a rack starts from a random init; and the rack's stages must be possible (`plan`). Raises ConfigError."""
  o, w = config.objective, config.stackwise
  for section, key, options in (('objective', 'kind', objectives.KINDS), ('objective', 'time', TIMES),
                                ('objective', 'time_embedding', TIME_EMBEDDINGS),
                                ('stackwise', 'direction', DIRECTIONS), ('stackwise', 'trunk', TRUNKS),
                                ('stackwise', 'quantize', QUANTIZERS), ('stackwise', 'rank_schedule', RANK_SCHEDULES),
                                ('stackwise', 'new_stack_init', NEW_STACK_INITS)):
    if config[section][key] not in options:
      raise ConfigError(f'{section}.{key}', config[section][key], f'must be one of {", ".join(options)}')
  if not 0 < o.mlm_ratio < 1:
    raise ConfigError('objective.mlm_ratio', o.mlm_ratio, 'must be in (0, 1)')
  if not 0 < o.t_min < 1:
    raise ConfigError('objective.t_min', o.t_min, 'must be in (0, 1)')
  if w.num_stacks < 0:
    raise ConfigError('stackwise.num_stacks', w.num_stacks, 'must be >= 0 (0: not a StackWise run)')
  if not w.num_stacks:
    if o.kind != 'clm':
      raise ConfigError('objective.kind', o.kind, 'masked objectives train StackWise racks: set stackwise.num_stacks '
                        '> 0 (e.g. configs/stackwise.py), or use clm')
    return
  if config.init.from_hf or config.init.lora_from or config.lora.rank:
    raise ConfigError('stackwise.num_stacks', w.num_stacks, 'a StackWise rack starts from a random init and takes '
                      'its adapters from the stackwise section: leave init.from_hf, init.lora_from and lora.rank unset')
  plan(config)  # directions against the objective, ranks, schedules and step counts: StackwiseError, a ConfigError


def plan(config: ml_collections.ConfigDict) -> list[Stage]:
  """The stages of a run whose config passed `check` (one-line StackwiseError for settings that cannot work)."""
  w, obj = config.stackwise, config.objective
  n = int(w.num_stacks)
  if config.model.num_layers % n:
    raise StackwiseError(f'config.model.num_layers={config.model.num_layers} is the rack depth and must be a '
                         f'multiple of stackwise.num_stacks={n}')
  joint = w.direction == 'joint'
  stages = 1 if joint else (int(w.stages) or n)
  if stages > n:
    raise StackwiseError(f'config.stackwise.stages={stages} is more than the {n} stacks: each stage adds one stack')
  if w.direction == 'prepend' and obj.kind == 'clm':
    raise StackwiseError('config.stackwise.direction=prepend with objective.kind=clm is undefined: the anchor '
                         'suffix is trained as a denoiser; use append, or a masked objective (diffusion, mlm)')
  if w.trunk == 'qlora' and w.quantize not in ('nf4', 'int8'):
    raise StackwiseError(f'config.stackwise.trunk=qlora needs a quantizer: stackwise.quantize={w.quantize!r}, '
                         'valid are nf4, int8')
  if w.consistency and w.direction != 'prepend':
    raise StackwiseError(f'config.stackwise.consistency={w.consistency} needs direction=prepend (it pulls a new '
                         'front stack toward the input its frozen suffix expects)')
  schedule = None
  if obj.kind == 'diffusion' and obj.time == 'depth':
    try:
      schedule = objectives.check_schedule(obj.depth_schedule or objectives.default_depth_schedule(n), n)
    except ValueError as e:
      raise StackwiseError(f'config.{e}') from None
  trunk_r, stack_r = ranks(w, 'trunk'), ranks(w, 'stack')
  counts = stage_steps(w, config.train.steps, stages)
  out = []
  for k in range(stages):
    if joint:
      order, new = tuple(range(n)), tuple(range(n))
    elif w.direction == 'append':
      order, new = tuple(range(k + 1)), (k,)
    else:
      order, new = tuple(range(n - 1 - k, n)), (n - 1 - k,)
    trunk = [i for i in order if i not in new]
    lora_ranks = {i: trunk_r[i] for i in trunk} if w.trunk != 'frozen' else {}
    stack_rank = 0 if joint else stack_r[new[0]]
    if any(r < 1 for r in lora_ranks.values()) or (w.stack_rank and stack_rank < 1):
      raise StackwiseError(f'config.stackwise: adapter ranks must be >= 1 (trunk {trunk_r}, stack {stack_r})')
    if stack_rank and lora_ranks and max(lora_ranks.values()) >= stack_rank:
      raise StackwiseError(f'config.stackwise: dual LoRA needs trunk ranks below the new stack\'s: stage {k} has '
                           f'trunk ranks {sorted(set(lora_ranks.values()))} and stack rank {stack_rank}')
    ratio = None
    if schedule is not None:
      ratio = schedule[new[0]] if not joint else None
    elif obj.kind == 'mlm':
      ratio = obj.mlm_ratio
    out.append(Stage(k, order, new, counts[k], ratio, lora_ranks, stack_rank))
  if joint and schedule is not None:
    raise StackwiseError('config.objective.time=depth ties each stack to a mask ratio and needs stage-wise '
                         'training (append or prepend), not direction=joint')
  return out


def trained_shared(config: ml_collections.ConfigDict, stage: Stage, shared_keys: Sequence[str]) -> tuple[str, ...]:
  """Which shared parameters the stage trains: all in the first stage (and joint); then the head side when
  appending onto a frozen trunk, everything when a LoRA trunk passes gradients to the input, and the
  input side (never the anchor head) when prepending. A tied embedding is both input and head: once a
  frozen trunk depends on it, it stays frozen (training it as the head would change the trunk's input),
  which is why the StackWise configs untie the head."""
  w = config.stackwise
  tied = config.model.tie_embeddings
  if w.direction == 'joint' or stage.index == 0:
    keys = set(shared_keys)
  elif w.direction == 'append':
    keys = set(shared_keys) if w.trunk != 'frozen' else set(OUTPUT_SIDE)
  else:
    keys = set(INPUT_SIDE) | (set() if tied else {'embed'})
  return tuple(k for k in shared_keys if k in keys)


def stops_after_prefix(config: ml_collections.ConfigDict, stage: Stage) -> bool:
  """Appending onto a frozen trunk: the prefix output is a constant of the step (no activations kept)."""
  return config.stackwise.direction == 'append' and config.stackwise.trunk == 'frozen' and stage.index > 0


def identity_init(stack: dict) -> dict:
  """The stack with its residual-branch output projections (attention `o`, MLP `down` and their biases)
  zeroed: it starts as the identity map, so inserting it leaves the rack's function unchanged and the new
  stage starts from the previous stage's loss. Gradients reach `o`/`down` at once and the rest from the
  second step."""
  def zero(path: tuple, x: Any) -> Any:
    names = [str(getattr(k, 'key', k)) for k in path]
    hit = names[-2:] in (['attn', 'o'], ['mlp', 'down'], ['attn', 'o_bias'], ['mlp', 'down_bias'])
    return np.zeros_like(x) if hit else x
  return jax.tree_util.tree_map_with_path(zero, stack)


def alpha_for(config: ml_collections.ConfigDict, rank: int) -> float:
  return config.stackwise.alpha_over_rank * rank


def make_loss_fn(config: ml_collections.ConfigDict, rd: rack.RackDef, obj: objectives.Objective,
                 stage: Stage, schedule: tuple[float, ...] | None) -> steps.LossFn:
  """The stage's loss over the model view {'shared', 'stacks'} that `Built.transform` produces."""
  stop = stops_after_prefix(config, stage)
  weight = float(config.stackwise.consistency)
  z_loss = config.train.z_loss
  first_new = stage.order.index(stage.new[0])

  def loss_fn(view: dict, batch: steps.Batch, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    c = objectives.prepare(obj, batch, rng, stage.ratio)
    seg, pos = batch['segment_ids'], batch['positions']
    x = rack.embed(rd, view['shared'], c.tokens, pos, c.t)
    consistency = None
    for j, i in enumerate(stage.order):
      if stop and j == first_new:
        x = jax.lax.stop_gradient(x)
      x = rack.run_stack(rd, view['stacks'][str(i)], x, seg, pos)
      if weight and j == first_new and stage.index > 0:
        consistency = _consistency(rd, view, obj, batch, stage, schedule, x, c)
    logits = rack.head(rd, view['shared'], x)
    total, sums = objectives.loss_sums(obj, logits, batch, c, z_loss)
    if consistency is not None:
      sums['consistency_sum'] = consistency
      total = total + weight * consistency
    return total, sums

  return loss_fn


def _consistency(rd: rack.RackDef, view: dict, obj: objectives.Objective, batch: steps.Batch, stage: Stage,
                 schedule: tuple[float, ...] | None, out: jax.Array, c: objectives.Corrupted) -> jax.Array:
  """Sum over scored tokens of the mean squared distance between the new front stack's output and the input
  the frozen suffix was trained on: the embedding of the same sample at the suffix's (lighter) mask ratio
  under time-as-depth (masks are nested, so it is the same sample with fewer masks), else at the same
  corruption."""
  tokens, t = c.tokens, c.t
  if schedule is not None:
    tokens, _ = objectives.corrupt(batch, schedule[stage.trunk[0]], obj.seed, obj.mask_id)
  target = jax.lax.stop_gradient(rack.embed(rd, view['shared'], tokens, batch['positions'], t))
  err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return jnp.sum(err * objectives.maskable(batch))


def stage_flops(mc: ModelConfig, seq_len: int, stage: Stage, trains_head: bool,
                input_grads_from: int) -> tuple[float, float]:
  """(train, eval) model FLOPs per token of a stage: a forward pass through the active stacks and head; input
  gradients through everything after the earliest trained parameter (`input_grads_from`: index in the
  forward order, -1 for the embedding); weight gradients of the trained stacks and head. Adapters and
  norms are negligible and left out."""
  n = mc.num_layers

  def fwd(layers: int, head: bool) -> float:
    with_head = flops.flops_per_token(dataclasses.replace(mc, num_layers=max(layers, 0)), seq_len, False)
    no_blocks = flops.flops_per_token(dataclasses.replace(mc, num_layers=0), seq_len, False)
    return with_head if head else with_head - no_blocks

  active = len(stage.order) * n
  forward = fwd(active, True)
  downstream = len(stage.order) - max(input_grads_from, 0)
  input_grads = fwd(downstream * n, True)
  weight_grads = fwd(len(stage.new) * n, trains_head) if not stage.stack_rank else (fwd(0, True) if trains_head else 0)
  return forward + input_grads + weight_grads, forward


def build_stage(config: ml_collections.ConfigDict, rd: rack.RackDef, stage: Stage, host_rack: dict, tx: Any,
                mesh: jax.sharding.Mesh) -> Built:
  """The stage's state on the mesh: trainable parameters + optimizer state, and the frozen rest built from
  `host_rack` (the rack as it stands after the previous stages, as host arrays)."""
  w = config.stackwise
  shared_keys = tuple(rd.shared_shapes)
  train_keys = trained_shared(config, stage, shared_keys)
  replicated = NamedSharding(mesh, P())
  shared_sh = sharding.param_shardings(rd.shared_specs, rd.shared_shapes, mesh)
  stack_sh = sharding.param_shardings(rd.stack_specs, rd.stack_shapes, mesh)
  targets = config.lora.targets
  key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1000 + stage.index)

  def pick(tree: dict, keys: Sequence[str]) -> dict:
    return {k: tree[k] for k in keys}

  frozen_keys = tuple(k for k in shared_keys if k not in train_keys)
  new = stage.new
  # Shapes and shardings of what trains.
  p_shapes: dict[str, Any] = {'shared': pick(rd.shared_shapes, train_keys)}
  p_sh: dict[str, Any] = {'shared': pick(shared_sh, train_keys)}
  p_specs: dict[str, Any] = {'shared': pick(rd.shared_specs, train_keys)}
  if stage.stack_rank:
    ad = jax.eval_shape(lambda: lora.init(rd.stack_shapes, targets, stage.stack_rank, key))
    p_shapes['stack'], p_specs['stack'] = ad, lora.specs(rd.stack_specs, ad)
  else:
    p_shapes['stack'] = {str(i): rd.stack_shapes for i in new}
    p_specs['stack'] = {str(i): rd.stack_specs for i in new}
  if stage.trunk_ranks:
    trunk_ad = {str(i): jax.eval_shape(lambda r=r: lora.init(rd.stack_shapes, targets, r, key))
                for i, r in stage.trunk_ranks.items()}
    p_shapes['trunk'] = trunk_ad
    p_specs['trunk'] = {i: lora.specs(rd.stack_specs, a) for i, a in trunk_ad.items()}
  p_sh = sharding.param_shardings(p_specs, p_shapes, mesh)
  saved = trainable(p_shapes, p_sh, tx, key, mesh)

  quantize = None
  if w.trunk == 'qlora':
    quantize = lambda p: quant.quantize_tree(p, QUANTIZED, w.quantize, config.lora.quant_block,  # noqa: E731
                                             config.lora.double_quant)
  trunk_ids = [str(i) for i in stage.trunk]
  f_sh: dict[str, Any] = {'shared': pick(shared_sh, frozen_keys),
                          'trunk': {i: stack_sh for i in trunk_ids}}
  if quantize is not None:
    q_shapes = jax.eval_shape(quantize, rd.stack_shapes)
    f_sh['trunk'] = {i: jax.tree.map(lambda _: replicated, q_shapes) for i in trunk_ids}
  if stage.stack_rank:
    f_sh['stack'] = stack_sh

  def put(tree: Any, sh: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, sh)

  def make_frozen() -> dict:
    frozen = {'shared': put(pick(host_rack['shared'], frozen_keys), f_sh['shared']), 'trunk': {}}
    for i in trunk_ids:
      stack = host_rack['stacks'][i]
      if quantize is not None:
        frozen['trunk'][i] = jax.jit(quantize, out_shardings=f_sh['trunk'][i])(put(stack, stack_sh))
      else:
        frozen['trunk'][i] = put(stack, stack_sh)
    if stage.stack_rank:
      frozen['stack'] = put(host_rack['stacks'][str(new[0])], stack_sh)
    return frozen

  def initial_params() -> dict:
    params: dict[str, Any] = {'shared': put(pick(host_rack['shared'], train_keys), p_sh['shared'])}
    if stage.stack_rank:
      params['stack'] = put(lora.init(rd.stack_shapes, targets, stage.stack_rank, key), p_sh['stack'])
    else:
      params['stack'] = {str(i): put(host_rack['stacks'][str(i)], p_sh['stack'][str(i)]) for i in new}
    if stage.trunk_ranks:
      params['trunk'] = {str(i): put(lora.init(rd.stack_shapes, targets, r, jax.random.fold_in(key, 1 + i)),
                                     p_sh['trunk'][str(i)])
                         for i, r in stage.trunk_ranks.items()}
    return params

  transform = make_transform(config, stage)
  n_train = rack.count(p_shapes)
  n_frozen = rack.count(rd.shared_shapes) + rack.count(rd.stack_shapes) * len(stage.order) - n_train
  what = {'frozen': 'frozen', 'lora': 'LoRA', 'qlora': f'QLoRA-{w.quantize}'}[w.trunk]
  trunk_text = f'trunk {list(stage.trunk)} {what}' if stage.trunk else 'no trunk'
  stack_lora = f', stack LoRA r{stage.stack_rank}' if stage.stack_rank else ''
  description = (f'stacks {list(stage.order)} (new {list(new)}{stack_lora}), '
                 f'{trunk_text}; {n_train / 1e6:.3f}M trained / {n_frozen / 1e6:.3f}M frozen params'
                 f'{f", mask ratio {stage.ratio:g}" if stage.ratio is not None else ""}')
  return with_frozen(None, saved, initial_params, f_sh, make_frozen, transform, description)


def make_transform(config: ml_collections.ConfigDict, stage: Stage) -> steps.ParamTransform:
  """(params, frozen, rng) -> model view {'shared', 'stacks'}: adapters applied as factored products."""
  dropout = config.lora.dropout

  def transform(params: dict, frozen: dict, rng: jax.Array | None) -> dict:
    shared = dict(frozen['shared'], **params['shared'])
    stacks = {}
    if stage.stack_rank:
      scale = lora.scaling(alpha_for(config, stage.stack_rank), stage.stack_rank)
      key = None if rng is None else jax.random.fold_in(rng, 0)
      stacks[str(stage.new[0])] = lora.apply(frozen['stack'], params['stack'], scale, 'factored', dropout, key)
    else:
      stacks.update(params['stack'])
    for i in stage.trunk:
      base = frozen['trunk'][str(i)]
      if stage.trunk_ranks:
        r = stage.trunk_ranks[i]
        key = None if rng is None else jax.random.fold_in(rng, 1 + i)
        base = lora.apply(base, params['trunk'][str(i)], lora.scaling(alpha_for(config, r), r), 'factored',
                          dropout, key)
      stacks[str(i)] = base
    return {'shared': shared, 'stacks': stacks}

  return transform


def merge_stage(config: ml_collections.ConfigDict, stage: Stage, host_rack: dict,
                params: dict) -> tuple[dict, list[int]]:
  """The rack after a stage (host arrays): trained shared parameters and stacks written back, adapters merged
  into full-precision weights (QLoRA adapters into the unquantized trunk). Also returns the stacks changed."""
  get = lambda t: jax.tree.map(lambda x: jax.device_get(x), t)  # noqa: E731
  out = {'shared': dict(host_rack['shared'], **get(params['shared'])), 'stacks': dict(host_rack['stacks'])}
  changed = list(stage.new)
  if stage.stack_rank:
    i = str(stage.new[0])
    scale = lora.scaling(alpha_for(config, stage.stack_rank), stage.stack_rank)
    out['stacks'][i] = get(lora.merge(host_rack['stacks'][i], get(params['stack']), scale))
  else:
    out['stacks'].update(get(params['stack']))
  for i, r in stage.trunk_ranks.items():
    s = str(i)
    out['stacks'][s] = get(lora.merge(host_rack['stacks'][s], get(params['trunk'][s]),
                                      lora.scaling(alpha_for(config, r), r)))
    changed.append(i)
  return out, sorted(changed)


def mask_id_and_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> tuple[int, int]:
  """(MASK id, model vocabulary). MASK is the first id after the tokenizer's (masked objectives only: -1
  for clm); the vocabulary, when derived, is rounded up to a multiple of 128 around it."""
  masked = config.objective.kind != 'clm'
  needed = tokenizer_vocab + (1 if masked else 0)
  vocab = config.model.vocab_size or -(-needed // 128) * 128
  if vocab < needed:
    raise ConfigError('model.vocab_size', vocab, f'must be >= {needed} (the tokenizer\'s {tokenizer_vocab} ids'
                      f'{" plus MASK" if masked else ""}) or 0 to derive it')
  return (tokenizer_vocab if masked else -1), vocab


def rack_setup(config: ml_collections.ConfigDict, tokenizer_vocab: int, execution: models.Execution | None = None
               ) -> tuple[rack.RackDef, objectives.Objective]:
  """The rack description and objective of a StackWise config; the rack runs as `execution` says (a run's
  `jaxtrain.train.execution.plan`; default: `models.execution.default`, which never builds the kernel)."""
  mask_id, vocab = mask_id_and_vocab(config, tokenizer_vocab)
  obj_cfg, w = config.objective, config.stackwise
  obj = objectives.Objective(kind=obj_cfg.kind, mask_id=mask_id, mlm_ratio=obj_cfg.mlm_ratio, time=obj_cfg.time,
                             depth_schedule=tuple(obj_cfg.depth_schedule), t_min=obj_cfg.t_min,
                             seed=config.train.seed)
  mc = models.model_config(config.model, vocab)
  mc = dataclasses.replace(mc, vocab_size=vocab, num_layers=config.model.num_layers // w.num_stacks,
                           causal=obj.causal)
  time_embedding = obj_cfg.time_embedding if obj.time_input else 'none'
  return rack.describe(rack.RackConfig(mc, w.num_stacks, time_embedding), execution), obj


def depth_schedule(config: ml_collections.ConfigDict) -> tuple[float, ...] | None:
  o = config.objective
  if o.kind != 'diffusion' or o.time != 'depth':
    return None
  n = config.stackwise.num_stacks
  return objectives.check_schedule(o.depth_schedule or objectives.default_depth_schedule(n), n)


def host(tree: Any) -> Any:
  """Host (numpy) copies of a tree's arrays."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def initial_rack(rd: rack.RackDef, seed: int, tokenizer_vocab: int | None = None) -> dict:
  """The freshly initialised rack as host arrays. With `tokenizer_vocab`, the rows past the tokenizer's ids
  (MASK and the padding up to a multiple of 128) start as the mean token embedding (`rack.resize_vocab`)."""
  params = host(jax.jit(rack.init_params, static_argnums=0)(rd.rc, jax.random.PRNGKey(seed)))
  vocab = rd.rc.block.vocab_size
  if tokenizer_vocab is not None and tokenizer_vocab < vocab:
    shared = dict(params['shared'], embed=params['shared']['embed'][:tokenizer_vocab])
    if 'lm_head' in shared:
      shared['lm_head'] = shared['lm_head'][:, :tokenizer_vocab]
    params['shared'] = host(rack.resize_vocab(shared, vocab))
  return params
