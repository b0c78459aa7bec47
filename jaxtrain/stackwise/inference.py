"""A run's model read back as a rack (a StackWise run's rack, or a plain run's decoder as a rack of one
stack), and text generated the way its objective trained it: `jaxtrain generate`.

  loaded = inference.load_run(workdir)     # StackWise: the rack of the last saved stage; plain: the newest step
  for s in inference.generate(loaded.rack, loaded.tokenizer, ['def '], inference.Settings(seed=0),
                              loaded.window):
    print(s.prompt, '->', s.text)

How a rack generates follows its objective (`objectives.Objective`):

  clm                     autoregressive decoding with a KV cache (`sampling.generate`), ending at EOS
  diffusion, time=input   iterative unmasking: MASKs after the prompt, filled most confident first in `steps`
                          model calls, each told the fraction still masked (`sampling.unmask`)
  mlm                     the same unmasking (an MLM rack takes no time input)
  diffusion, time=depth   one pass through the depth: stack k denoises at mask ratio schedule[k]
                          (`sampling.single_pass`)

A plain run's Transformer is a causal rack of one stack (`from_transformer`, `load_run`), so every job
samples through `generate`, the StackWise job's own end-of-run samples included. Prompt k of a list draws from
fold_in(PRNGKey(seed), k) and is generated on its own, right-padded to the run's window so that one
compilation serves every prompt: its text depends on the seed, the settings, the prompt and k, not on the
other prompts (the same prompt listed twice gives two samples). Only the tokenizer's ids are ever emitted
(MASK and the rows padding the vocabulary to a multiple of 128 are not).
A causal rack exports as a Hugging Face model through `transformer` (`jaxtrain export`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtrain import data, models, paths, sampling
from jaxtrain.errors import UserError
from jaxtrain.models import ModelConfig, execution as execution_lib, rack
from jaxtrain.stackwise import objectives, plan
from jaxtrain.stackwise.checkpoint import StackCheckpointer, saved_stages
from jaxtrain.train import rundir

Array = jax.Array


class SampleError(UserError):
  """A run that cannot be sampled (no finished stage, no checkpoint) or a setting that cannot work; one line."""


@dataclasses.dataclass(frozen=True)
class Rack:
  """What generates: the rack's description and objective, the stacks in forward order, their parameters
  ({'shared': ..., 'stacks': {str(i): ...}}, at least the stacks in `order`) and the time-as-depth schedule
  (None for other objectives)."""

  rd: rack.RackDef
  obj: objectives.Objective
  order: tuple[int, ...]
  params: dict
  schedule: tuple[float, ...] | None = None

  @property
  def objective(self) -> str:
    """The objective as the config names it, e.g. 'diffusion (time=depth)'."""
    return self.obj.kind + (f' (time={self.obj.time})' if self.obj.kind == 'diffusion' else '')

  @property
  def method(self) -> str:
    """How this rack generates (the module docstring's table)."""
    if self.obj.causal:
      return 'KV-cache decoding'
    return 'one pass through the depth' if self.schedule is not None else 'iterative unmasking'


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A run's model read back: the rack, the run's config and own tokenizer, and what was loaded (`what`, e.g.
  'the rack of stage 1 of 2'). `note` says when it is not the run's final model (None when it is)."""

  rack: Rack
  config: ml_collections.ConfigDict
  tokenizer: data.Tokenizer
  what: str
  note: str | None = None

  @property
  def window(self) -> int:
    """The tokens per row the model trained on: prompt and continuation together fit in it."""
    return int(self.config.data.seq_len)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to sample (`config.sample` plus a seed): tokens to generate, temperature (0: greedy), top_k / top_p,
  the unmasking steps and schedule (iterative unmasking only) and, for causal racks, whether a sample ends
  at the end of its document (EOS)."""

  max_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  steps: int = 16
  schedule: str = 'cosine'
  seed: int = 0
  stop_at_eos: bool = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    """The run's `sample` section with its `train.seed` (what the StackWise job's own samples use). Its
    max_tokens is capped to leave one prompt token in the run's rows (data.seq_len), so a run's own settings
    always sample; a larger value asked for explicitly is refused by `check`."""
    s = config.sample
    max_tokens = max(1, min(int(s.max_tokens), int(config.data.seq_len) - 1))
    return cls(max_tokens, float(s.temperature), int(s.top_k), float(s.top_p), int(s.steps), s.schedule,
               int(config.train.seed))

  def check(self, window: int, causal: bool, prefix: str = '--') -> None:
    """One-line SampleError for a setting that cannot work; `prefix` names the keys ('--' for flags)."""
    most = window - 1 if causal else window  # a causal continuation needs at least one token before it
    for key, ok, valid in (
        ('max_tokens', 1 <= self.max_tokens <= most,
         f'give 1..{most}: the model trained on {window}-token rows, which hold the prompt and the continuation'
         + (' (at least one prompt token)' if causal else '')),
        ('temperature', self.temperature >= 0, 'must be >= 0 (0: greedy)'),
        ('top_k', self.top_k >= 0, 'must be >= 0 (0: off)'),
        ('top_p', 0 < self.top_p <= 1, 'must be in (0, 1] (1: off)'),
        ('steps', self.steps >= 1, 'unmasking steps must be >= 1'),
        ('schedule', self.schedule in sampling.SCHEDULES, f'must be one of {", ".join(sampling.SCHEDULES)}')):
      if not ok:
        raise SampleError(f'{prefix}{key}', getattr(self, key), valid)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated sample: the prompt, the ids the model was given (its last ones when the prompt was cut
  to fit; [EOS] for an empty prompt to a causal rack), the generated ids and their text, and how many prompt
  tokens were cut from the front."""

  prompt: str
  prompt_ids: list[int]
  ids: list[int]
  text: str
  cut: int = 0


@dataclasses.dataclass(frozen=True)
class _Program:
  """Everything the compiled sampler depends on besides its arguments, hashable: equal programs share one
  jitted function, so one compilation serves every prompt of every `generate` call (and every load of the
  same run) in a process."""

  rc: rack.RackConfig
  execution: execution_lib.Execution
  obj: objectives.Objective
  order: tuple[int, ...]
  schedule: tuple[float, ...] | None
  settings: Settings  # its seed is not part of the program: the key is an argument
  vocab: int  # the tokenizer's ids; MASK and the rows padding the vocabulary are never emitted
  eos_id: int


def _allowed(logits: Array, vocab: int) -> Array:
  """Logits with every id the tokenizer lacks (MASK, vocabulary padding) at -inf."""
  return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)


@functools.lru_cache(maxsize=8)
def _sampler(p: _Program) -> Callable[[dict, Array, Array, Array], Array]:
  """The jitted (params, start (1,T) ids, prompt length, rng) -> the max_tokens new ids (1, max_tokens) for the
  program's objective. `start` is the prompt right-padded to window - max_tokens tokens (causal: the
  continuation overwrites the padding in the KV cache), or the prompt, max_tokens MASKs, then padding to the
  window (masked: a padding segment the canvas never attends to). One compilation serves prompts of every
  length; parameters are arguments, not constants baked in."""
  s = p.settings
  rd, obj, order = rack.describe(p.rc, p.execution), p.obj, p.order  # outside jit: describe cannot be traced
  options = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)

  @jax.jit
  def causal(params: dict, prompt: Array, length: Array, rng: Array) -> Array:
    cache = rack.init_cache(rd, order, prompt.shape[0], prompt.shape[1] + s.max_tokens)

    def decode_fn(tokens: Array, positions: Array, cache: Any, index: Array) -> tuple[Array, Any]:
      logits, cache = rack.decode(rd, params, order, tokens, positions, cache, index)
      return _allowed(logits, p.vocab), cache
    out = sampling.generate(decode_fn, cache, prompt, s.max_tokens, rng, eos_id=p.eos_id if s.stop_at_eos else None,
                            prompt_len=length, **options)
    return jax.lax.dynamic_slice_in_dim(out, length, s.max_tokens, axis=1)

  @jax.jit
  def masked(params: dict, start: Array, length: Array, rng: Array) -> Array:
    index = jnp.broadcast_to(jnp.arange(start.shape[1], dtype=jnp.int32), start.shape)
    batch = {'segment_ids': (index < length + s.max_tokens).astype(jnp.int32), 'positions': index}

    def logits_fn(tokens: Array, t: Array) -> Array:
      tt = jnp.broadcast_to(t.reshape(-1, 1), tokens.shape).astype(jnp.float32) if obj.time_input else None
      return _allowed(rack.forward(rd, params, batch, order, tt, tokens), p.vocab)
    if p.schedule is not None:  # time-as-depth: one pass through the depth runs the whole reverse process
      out = sampling.single_pass(logits_fn, start, obj.mask_id, rng, s.temperature, top_k=s.top_k, top_p=s.top_p)
    else:
      out = sampling.unmask(logits_fn, start, obj.mask_id, s.steps, rng, schedule=s.schedule, **options)
    return jax.lax.dynamic_slice_in_dim(out, length, s.max_tokens, axis=1)

  return causal if obj.causal else masked


def generate(r: Rack, tokenizer: data.Tokenizer, prompts: Sequence[str], settings: Settings, window: int,
             prefix: str = '--', stop_ids: Sequence[int] = ()) -> list[Sample]:
  """One sample per prompt, as the rack's objective generates (see the module docstring). A prompt longer
  than the window leaves keeps its last tokens. Raises SampleError for settings that cannot work (`prefix`
  names their keys in the message). `stop_ids`: further ids a causal sample ends at (with stop_at_eos), such
  as a chat template's end of turn."""
  s = settings
  s.check(window, r.obj.causal, prefix)
  params = jax.tree.map(jnp.asarray, {'shared': r.params['shared'],
                                      'stacks': {str(i): r.params['stacks'][str(i)] for i in r.order}})
  eos = tokenizer.eos_id
  program = _Program(r.rd.rc, r.rd.execution, r.obj, tuple(r.order), r.schedule, dataclasses.replace(s, seed=0),
                     tokenizer.vocab_size, eos)
  run = _sampler(program)
  room = window - s.max_tokens  # prompt tokens that fit beside the continuation
  out = []
  for k, prompt in enumerate(prompts):
    ids = list(tokenizer.encode(prompt))
    cut = max(len(ids) - room, 0)
    ids = ids[cut:]
    if r.obj.causal and not ids:
      ids = [eos]  # documents end with EOS: after it, the model starts a new one
    pad = [0] * (room - len(ids))
    start = ids + pad if r.obj.causal else ids + [r.obj.mask_id] * s.max_tokens + pad
    rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), k)
    new = [int(t) for t in np.asarray(run(params, jnp.asarray([start], jnp.int32), jnp.int32(len(ids)), rng))[0]]
    ends = [new.index(t) for t in (eos, *stop_ids) if t in new] if r.obj.causal and s.stop_at_eos else []
    if ends:
      new = new[:min(ends) + 1]  # the rest is padding after the row (or the turn) ended
    out.append(Sample(prompt, ids, new, tokenizer.decode(new), cut))
  return out


def from_transformer(params: dict, mc: ModelConfig, execution: execution_lib.Execution | None = None) -> Rack:
  """A plain decoder's parameters (`jaxtrain.models` tree) as a causal rack of one stack: the same function
  (`rack.to_transformer` is the way back)."""
  mc = dataclasses.replace(mc, causal=True)
  shared = {k: v for k, v in params.items() if k != 'blocks'}
  return Rack(rack.describe(rack.RackConfig(mc, 1), execution), objectives.Objective('clm'), (0,),
              {'shared': shared, 'stacks': {'0': {'blocks': params['blocks']}}})


def transformer_config(rd: rack.RackDef, order: Sequence[int]) -> ModelConfig:
  """The ModelConfig of the Transformer a causal rack running the stacks `order` computes."""
  return dataclasses.replace(rd.rc.block, num_layers=len(order) * rd.rc.blocks_per_stack)


def transformer(r: Rack) -> tuple[dict, ModelConfig]:
  """(parameters, ModelConfig) of the Transformer that computes what the causal rack `r` computes."""
  if not r.obj.causal:
    raise SampleError(f'a rack trained with objective {r.objective} is bidirectional: it has no causal '
                      'Transformer equivalent; only clm racks convert')
  return rack.to_transformer(r.params, r.order), transformer_config(r.rd, r.order)


def load(workdir: str, stage: int | None = None, config: ml_collections.ConfigDict | None = None,
         error: type[UserError] = SampleError) -> Loaded:
  """The rack saved after `stage` (default: the last saved one) of the StackWise run in `workdir`, with the
  run's config and its own tokenizer. Reads only; a run with no saved stage, or an unknown stage, raises
  `error` (one line). `config`: the run's config if already read (`rundir.load_config`)."""
  config = rundir.load_config(workdir, error) if config is None else config
  if not config.stackwise.num_stacks:
    raise error(f'--workdir={workdir} is not a StackWise run (its stackwise.num_stacks is 0)')
  stages = plan.plan(config)
  directory = paths.in_run(workdir, paths.RACK)
  saved = saved_stages(directory)
  if not saved:
    raise error(f'--workdir={workdir}: no stage of this StackWise run has finished ({directory} holds no '
                f'stage_<k>.json); stage 0 saves the rack after its {stages[0].steps} steps: rerun the training '
                'command to resume it')
  stage = saved[-1] if stage is None else stage
  if stage not in saved or stage >= len(stages):
    raise error(f'--stage={stage}: no rack of that stage in {directory}; saved stages: '
                f'{", ".join(map(str, saved))}')
  tokenizer = rundir.load_tokenizer(config, workdir)
  # The run's own compute dtype (float32 on CPU unless it said otherwise), XLA attention: no kernel build.
  rd, obj = plan.rack_setup(config, tokenizer.vocab_size, execution_lib.from_model(config.model))
  order = stages[stage].order
  store = StackCheckpointer(directory)
  abstract = {f'shared.{k}': v for k, v in rd.shared_shapes.items()}
  abstract.update({f'stack{i}': rd.stack_shapes for i in order})
  parts = store.restore(stage, abstract)
  params = {'shared': {k: parts[f'shared.{k}'] for k in rd.shared_shapes},
            'stacks': {str(i): parts[f'stack{i}'] for i in order}}
  last = len(stages) - 1
  what = f'the rack of stage {stage} of {len(stages)} (stacks {list(order)}) of {workdir}'
  note = None
  if stage != last:
    note = (f'note: {workdir} has saved {len(saved)} of its {len(stages)} stages; this is the rack of stage '
            f'{stage} (stacks {list(order)}), not the final one' if saved[-1] != last else
            f'note: the rack of stage {stage} (stacks {list(order)}), not the final one (stage {last})')
  return Loaded(Rack(rd, obj, order, params, plan.depth_schedule(config)), config, tokenizer, what, note)


def load_run(workdir: str, step: int | None = None, stage: int | None = None) -> Loaded:
  """The model of any run in `workdir`: the rack of `stage` of a StackWise run (default: the last saved; see
  `load`), or checkpoint `step` of a plain run (default: the newest) as a causal rack of one stack, a LoRA
  run's adapters merged into its base as for an export. Reads only; raises SampleError (one line) for a
  directory that is no run, a run with nothing saved yet, or a step/stage it does not have."""
  from jaxtrain.train import export  # plain runs' checkpoints

  config = rundir.load_config(workdir, SampleError)
  if config.stackwise.num_stacks:
    if step is not None:
      raise SampleError(f'--step={step}: a StackWise run saves its rack per stage, not per step; choose one with '
                        '--stage=K (default: the last saved)')
    return load(workdir, stage, config)
  if stage is not None:
    raise SampleError(f'--stage={stage}: {workdir} is a plain run, not a StackWise run; choose its checkpoint '
                      'with --step=N (default: the newest)')
  steps = export.checkpoint_steps(workdir)
  if not steps:
    raise SampleError(f'--workdir={workdir} holds no complete checkpoint yet ({workdir}/checkpoints); the run '
                      f'saves one every {config.checkpoint.every} steps and at its end')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise SampleError(f'--step={step}: no such checkpoint in {workdir}/checkpoints; available: '
                      f'{", ".join(map(str, steps))}')
  tokenizer = rundir.load_tokenizer(config, workdir)
  params = export.model_params_for_export(config, export.restore_state(workdir, step), tokenizer)
  rows = int(params['embed'].shape[0])
  mc = dataclasses.replace(models.model_config(config.model, rows), vocab_size=rows)
  r = from_transformer(params, mc, execution_lib.from_model(config.model, mc))
  final = int(config.train.steps)
  note = None if step == final else f"note: checkpoint step {step} of the run's {final} steps, not its final model"
  return Loaded(r, config, tokenizer, f'checkpoint step {step} of {workdir}', note)
