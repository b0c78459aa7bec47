"""A run's model and one jitted function scoring a fixed-shape batch: per-token cross-entropy.

Two kinds of run, one interface (`make_scorer`):

  Scorer      a plain run (full, LoRA or QLoRA). The state is built as `jaxtrain.train.state.build` builds it
              for training, so the run's own param transform applies the adapters; a checkpoint's trainable
              params are restored (`train.export.restore_state`: the parameters only, host arrays) and placed
              in the run's shardings, and the frozen base is rebuilt once for every step. The score function
              is the run's eval step taken apart: the same `models.apply`, `losses.next_token_targets` weights
              and `losses.token_cross_entropy`, but returning each token's loss instead of their sum.
  RackScorer  a StackWise run: the rack saved after a stage (`stackwise.inference.load`), run through the
              stage's stacks as the stage's own eval step runs them (`stackwise.plan.make_loss_fn` without its
              training-only parts), corrupted as that eval corrupts (`objectives.prepare` with no rng: the
              same masks and times every time). A causal rack returns what a plain run's scorer returns; a
              masked-diffusion rack each token's cross-entropy, its ELBO weight (1/t where masked) and the
              maskable tokens that normalise the ELBO; an MLM rack weight 1 on the masked tokens.

Batches are the run's shape [data.batch_size, data.seq_len]: a plain run's score function compiles once for
every set and every step, a rack's once per stage (the stages differ in depth) for every set. A batch's keys
travel to the devices stacked in one int32 array [keys, rows, seq_len] and are taken apart inside the jitted
function: one host-to-device transfer per batch instead of one per key (each costs as much as the whole
forward pass of a tiny model's batch does in tenths: docs/benchmarks.md, "Eval throughput").
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtrain import data, models, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.evaluation import EvalError
from jaxtrain.evaluation.sets import KEYS, MASK_KEYS
from jaxtrain.models import rack
from jaxtrain.models.validate import check_vocab
from jaxtrain.stackwise import inference, objectives, plan
from jaxtrain.train import execution, export, losses, optim, state as state_lib, steps


def next_token_outputs(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """{'ce', 'weights', 'scored', 'targets'}, each (B, T): the cross-entropy of every position's next token, the
  training loss weights (loss-masked predictions within a document), the predictions of tokens marked `scored`
  (whatever their loss mask) and the target ids."""
  targets, loss_weights = losses.next_token_targets(batch)
  _, scored = losses.next_token_targets(dict(batch, loss_mask=batch['scored']))
  ce, _ = losses.token_cross_entropy(logits, targets)
  return {'ce': ce, 'weights': loss_weights, 'scored': scored, 'targets': targets}


def make_score_fn(graphdef: Any, transform: steps.ParamTransform | None) -> Any:
  """`score(weights, batch) -> next_token_outputs` of a plain run's model. `weights`: {'params', 'frozen'?} as
  the run's state holds them."""
  def score(weights: dict, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    params = weights['params']
    if transform is not None:  # rng None: evaluation, adapter dropout off (as the run's eval step)
      params = transform(params, weights.get('frozen'), None)
    return next_token_outputs(models.apply(graphdef, params, batch), batch)
  return score


def make_rack_score_fn(rd: rack.RackDef, obj: objectives.Objective, stages: list[plan.Stage]) -> Any:
  """`score({'params': rack}, batch)` of a rack: the stage is the one whose stacks `rack['stacks']` holds (a
  stage's rack holds exactly the stacks it runs), so each stage traces its own program. Causal racks:
  `next_token_outputs`; masked racks: {'ce', 'weights' (the objective's: 1/t or 1 where masked), 'count' (the
  tokens the loss is per: diffusion every maskable token, MLM the masked ones), 'targets' (the tokens)}."""
  by_stacks = {tuple(sorted(s.order)): s for s in stages}

  def score(weights: dict, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    params = weights['params']
    stage = by_stacks[tuple(sorted(int(i) for i in params['stacks']))]
    if obj.causal:
      return next_token_outputs(rack.forward(rd, params, batch, stage.order), batch)
    c = objectives.prepare(obj, batch, None, stage.ratio)  # no rng: the run's eval corruption
    ce, _ = losses.token_cross_entropy(rack.forward(rd, params, batch, stage.order, c.t, c.tokens), batch['tokens'])
    count = objectives.maskable(batch) if obj.kind == 'diffusion' else c.masked
    return {'ce': ce, 'weights': c.weights, 'count': count.astype(jnp.float32), 'targets': batch['tokens']}
  return score


def unpacking(score: Any, keys: tuple[str, ...]) -> Any:
  """`score(weights, batch dict)` as `fn(weights, packed)`, `packed` the batch's `keys` stacked (K, B, T)."""
  def fn(weights: dict, packed: jax.Array) -> dict[str, jax.Array]:
    return score(weights, {k: packed[i] for i, k in enumerate(keys)})
  return fn


def eval_mesh(mesh_cfg: Any, rows: int) -> jax.sharding.Mesh:
  """The run's mesh where it fits this machine's devices and the batch rows (then the run's own eval repeats
  to float rounding); else data parallelism over as many devices as divide the rows (a run trained elsewhere)."""
  devices = jax.devices()
  try:
    sharding.check(mesh_cfg, rows, 1, len(devices))
    return sharding.make_mesh(mesh_cfg)
  except ConfigError:
    n = max(k for k in range(1, len(devices) + 1) if rows % k == 0)
    return sharding.make_mesh({'data': n, 'fsdp': 1, 'tensor': 1}, devices[:n])


class _Scoring:
  """What both scorers share: the run, the batch shape [rows, seq_len] = [data.batch_size, data.seq_len], the
  mesh, the jitted score function `fn` and the batch keys it reads. Call under `with jax.set_mesh(mesh)`."""

  objective = 'clm'  # what the loss is (`stats.Tally`)
  unit = 'step'  # what `weights(at)` takes: a checkpoint step, or a StackWise stage
  keys: tuple[str, ...] = KEYS

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str):
    self.config, self.workdir = config, workdir
    self.run_name = os.path.basename(os.path.abspath(workdir))  # runs/<config> by default: the config's name
    check_vocab(config.model, tokenizer.vocab_size)
    self.rows, self.seq_len = int(config.data.batch_size), int(config.data.seq_len)
    self.mesh = eval_mesh(config.mesh, self.rows)
    self.batch_sh = sharding.batch_sharding(self.mesh)
    self.packed_sh = sharding.batch_sharding(self.mesh, stacked=True)  # rows split as a batch's are
    self.fn: Any = None
    self.compile_s = 0.0  # every compile so far, timed with the call that made it

  def __call__(self, weights: dict, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The per-token outputs of one host batch, left on device (fetch them with `jax.device_get`)."""
    rows = batch['tokens'].shape[0]
    if rows != self.rows:
      raise ValueError(f'a batch of {rows} rows; the score function takes {self.rows}')
    parts = [batch[k] for k in self.keys]
    if any(p.dtype != np.int32 for p in parts):  # the pipeline's are: one int32 stack holds them exactly
      raise ValueError(f'batch keys of dtypes {[str(p.dtype) for p in parts]}; the score function takes int32')
    packed = sharding.to_global({'packed': np.stack(parts)}, self.mesh, stacked=True)['packed']
    before, t = self.compiles, time.perf_counter()
    out = self.fn(weights, packed)
    if self.compiles > before:  # this call compiled: timed apart from scoring
      jax.block_until_ready(out)
      self.compile_s += time.perf_counter() - t
    return out

  @property
  def compiles(self) -> int:
    """Programs compiled so far: a plain run's 1 after the first call whatever the sets and steps; a rack's
    one per stage scored."""
    return self.fn._cache_size()  # pylint: disable=protected-access


class Scorer(_Scoring):
  """The model of the plain run in `workdir` (per its config.json) under its mesh, and the jitted score
  function for its batches."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str):
    super().__init__(config, tokenizer, workdir)
    self.mc = models.model_config(config.model, tokenizer.vocab_size)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)  # shapes only: its state is never made
    with jax.set_mesh(self.mesh):
      self.built = state_lib.build(config, self.mc, tx, self.mesh, execution.plan(config, self.mc))
    self._frozen: Any = None
    weights_sh = {k: v for k, v in self.built.shardings.items() if k in ('params', 'frozen')}
    self.fn = jax.jit(unpacking(make_score_fn(self.built.graphdef, self.built.transform), self.keys),
                      in_shardings=(weights_sh, self.packed_sh), out_shardings=self.batch_sh)

  def describe(self, step: int) -> str:
    del step  # every checkpoint of a run holds the same model
    return self.built.description

  def checkpoint(self, step: int) -> str:
    return f'{self.workdir}/checkpoints/{step}'

  def weights(self, step: int) -> dict:
    """{'params' (of checkpoint `step`), 'frozen' (a LoRA run's base)} on device, in the run's shardings."""
    params = export.restore_state(self.workdir, step)['params']
    want = self.built.abstract['params']
    got_shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    if got_shapes != jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), want):
      raise EvalError(f'checkpoint {self.workdir}/checkpoints/{step}', valid='does not hold the parameters its '
                      "run's config.json describes (another model or adapter layout was saved there)")
    out = {'params': jax.device_put(params, self.built.shardings['params'])}
    if 'frozen' in self.built.shardings:
      if self._frozen is None:  # rebuilt from the config (seed or init.from_hf) as the run did; the same for all steps
        self._frozen = self.built.complete({})['frozen']
      out['frozen'] = self._frozen
    return out


class RackScorer(_Scoring):
  """The racks of the StackWise run in `workdir`, one per saved stage, under the run's mesh, and the jitted
  score function for its batches (its objective's outputs, `make_rack_score_fn`)."""

  unit = 'stage'

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str):
    super().__init__(config, tokenizer, workdir)
    # The run's own execution (its attention kernel on CPU), as its stages evaluated.
    self.rd, self.obj = plan.rack_setup(config, tokenizer.vocab_size, execution.plan(config))
    self.stages = plan.plan(config)
    self.objective = self.obj.kind
    self.keys = KEYS if self.obj.causal else KEYS[:-1] + MASK_KEYS  # masks are keyed by sample id
    self._shared_sh = sharding.param_shardings(self.rd.shared_specs, self.rd.shared_shapes, self.mesh)
    self._stack_sh = sharding.param_shardings(self.rd.stack_specs, self.rd.stack_shapes, self.mesh)
    # Weights keep the shardings they are placed in (a pytree that differs by stage: no in_shardings).
    self.fn = jax.jit(unpacking(make_rack_score_fn(self.rd, self.obj, self.stages), self.keys),
                      out_shardings=self.batch_sh)

  def describe(self, stage: int) -> str:
    s = self.stages[stage]
    n = rack.count(self.rd.shared_shapes) + rack.count(self.rd.stack_shapes) * len(s.order)
    ratio = f', mask ratio {s.ratio:g}' if s.ratio is not None else ''
    return (f'the rack of stage {stage} of {len(self.stages)} (stacks {list(s.order)}), {n / 1e6:.2f}M params; '
            f'objective {self.obj.kind}{f" (time={self.obj.time})" if self.obj.kind == "diffusion" else ""}{ratio}')

  def checkpoint(self, stage: int) -> str:
    return f'{self.workdir}/rack/stage_{stage}.json'

  def weights(self, stage: int) -> dict:
    """{'params': the rack of `stage`, {'shared', 'stacks': its stacks}} on device, in the run's shardings."""
    loaded = inference.load(self.workdir, stage, self.config, EvalError)
    params = loaded.rack.params
    return {'params': {'shared': jax.device_put(params['shared'], self._shared_sh),
                       'stacks': {i: jax.device_put(v, self._stack_sh) for i, v in params['stacks'].items()}}}


def make_scorer(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str) -> _Scoring:
  """The scorer of the run in `workdir`: a RackScorer for a StackWise run, else a Scorer."""
  return (RackScorer if config.stackwise.num_stacks else Scorer)(config, tokenizer, workdir)
