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
samples through `generate`, the StackWise job's own end-of-run samples included. Sample j of prompt k draws
from key_k = fold_in(PRNGKey(seed), k) (j = 0) or fold_in(key_k, j) (j >= 1), so the first of several samples
is the one a single sample would be. Prompts are right-padded to one width (a causal rack: the longest prompt
of the call rounded up to a power of two; a masked one: the run's window) and up to `BATCH` rows (prompt,
sample) generate together in one call of one compiled function, each row with its own prompt length, cache
index and key (the last batch is padded with a copy of a row): one compilation per call serves every prompt
length, and a row's text depends on the seed, the settings, its prompt, k and j, not on the other rows (the
same prompt listed twice gives two samples). Only the tokenizer's ids are ever emitted
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
  'the rack of stage 1 of 2'). `note` says when it is not the run's final model (None when it is). `base`:
  for a LoRA run loaded with base=True, the model its adapters were trained on (the same rack without them)."""

  rack: Rack
  config: ml_collections.ConfigDict
  tokenizer: data.Tokenizer
  what: str
  note: str | None = None
  base: Rack | None = None

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
  to fit; [EOS] for an empty prompt to a causal rack), the generated ids and their text, how many prompt
  tokens were cut from the front, and which of the prompt's samples it is."""

  prompt: str
  prompt_ids: list[int]
  ids: list[int]
  text: str
  cut: int = 0
  sample: int = 0  # j: which of the prompt's samples (0 .. num_samples - 1)


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


# Rows (prompt, sample) one compiled call generates together: a batch reads the weights once per token for
# all its rows (what makes batched decoding faster than one row at a time), and a fixed cap keeps the KV
# cache of a call small.
BATCH = 8


@functools.lru_cache(maxsize=8)
def _sampler(p: _Program) -> Callable[[dict, Array, Array, Array], Array]:
  """The jitted (params, starts (B,T) ids, prompt lengths (B,), keys (B,2)) -> the max_tokens new ids
  (B, max_tokens) for the program's objective, each row as it would be generated alone. A start
  is the prompt right-padded to a common width of at most window - max_tokens tokens (causal: the
  continuation overwrites the padding in the KV cache), or the prompt, max_tokens MASKs, then padding to the
  window (masked: a padding segment the canvas never attends to). One compilation per batch shape serves
  prompts of every length; parameters are arguments, not constants baked in."""
  s = p.settings
  rd, obj, order = rack.describe(p.rc, p.execution), p.obj, p.order  # outside jit: describe cannot be traced
  options = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)

  def causal(params: dict, prompt: Array, length: Array, rng: Array) -> Array:
    cache = rack.init_cache(rd, order, prompt.shape[0], prompt.shape[1] + s.max_tokens)  # leaves (L,B,S,...)

    def one_row(tokens: Array, positions: Array, cache: Any, index: Array) -> tuple[Array, Any]:
      cache = jax.tree.map(lambda c: c[:, None], cache)
      logits, cache = rack.decode(rd, params, order, tokens[None], positions[None], cache, index)
      return logits[0], jax.tree.map(lambda c: c[:, 0], cache)
    # A step writes each row's token at that row's own cache index: the decode vmapped over rows (the cache
    # update becomes one scatter); the loop itself stays unbatched, so it copies nothing per step.
    by_row = jax.vmap(one_row, in_axes=(0, 0, 1, 0), out_axes=(0, 1))

    def decode_fn(tokens: Array, positions: Array, cache: Any, index: Array) -> tuple[Array, Any]:
      if jnp.ndim(index) == 0:  # the prefill: every row's padded prompt at rows [0, T)
        logits, cache = rack.decode(rd, params, order, tokens, positions, cache, index)
      else:
        logits, cache = by_row(tokens, positions, cache, index)
      return _allowed(logits, p.vocab), cache
    out = sampling.generate(decode_fn, cache, prompt, s.max_tokens, rng, eos_id=p.eos_id if s.stop_at_eos else None,
                            prompt_len=length, **options)
    return jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, s.max_tokens))(out, length)

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

  if obj.causal:  # the batch through one KV-cache loop, each row with its own length and key
    return jax.jit(causal)
  # Masked: each row runs the one-row program with its own length and key (fixed trip counts: nothing to wait for).
  return jax.jit(jax.vmap(lambda params, start, length, rng: masked(params, start[None], length, rng)[0],
                          in_axes=(None, 0, 0, 0)))


def generate(r: Rack, tokenizer: data.Tokenizer, prompts: Sequence[str], settings: Settings, window: int,
             prefix: str = '--', stop_ids: Sequence[int] = (), num_samples: int = 1) -> list[Sample]:
  """`num_samples` samples per prompt (prompt-major: prompt 0's samples first), as the rack's objective
  generates (see the module docstring). A prompt longer than the window leaves keeps its last tokens. Raises
  SampleError for settings that cannot work (`prefix` names their keys in the message), including several
  samples of a greedy draw (they would be identical). `stop_ids`: further ids a causal sample ends at (with
  stop_at_eos), such as a chat template's end of turn."""
  s = settings
  s.check(window, r.obj.causal, prefix)
  if num_samples < 1:
    raise SampleError(f'{prefix}num_samples', num_samples, 'must be >= 1')
  if num_samples > 1 and s.temperature == 0:
    raise SampleError(f'{prefix}num_samples={num_samples}: greedy decoding ({prefix}temperature=0) gives '
                      f'{num_samples} identical samples; set {prefix}temperature above 0 to draw different ones')
  params = jax.tree.map(jnp.asarray, {'shared': r.params['shared'],
                                      'stacks': {str(i): r.params['stacks'][str(i)] for i in r.order}})
  eos = tokenizer.eos_id
  # Settings that change nothing for this rack are left out of the program, so they share its compilation: the
  # seed (the keys are arguments), top_k/top_p of a greedy draw, the unmasking steps of other methods.
  same = dict(seed=0, **(dict(top_k=0, top_p=1.0) if s.temperature == 0 else {}),
              **({} if r.method == 'iterative unmasking' else dict(steps=1, schedule=sampling.SCHEDULES[0])),
              **({} if r.obj.causal else dict(stop_at_eos=False)))
  program = _Program(r.rd.rc, r.rd.execution, r.obj, tuple(r.order), r.schedule, dataclasses.replace(s, **same),
                     tokenizer.vocab_size, eos)
  run = _sampler(program)
  room = window - s.max_tokens  # prompt tokens that fit beside the continuation
  encoded = []
  for prompt in prompts:
    ids = list(tokenizer.encode(prompt))
    cut = max(len(ids) - room, 0)
    ids = ids[cut:]
    if r.obj.causal and not ids:
      ids = [eos]  # documents end with EOS: after it, the model starts a new one
    encoded.append((ids, cut))
  if not encoded:
    return []
  # A causal batch prefills (and its cache holds) only the longest prompt of the call rounded up to a power of
  # two, not the whole window: short prompts cost what they need, and one width serves the whole call.
  width = min(room, _bucket(max(len(ids) for ids, _ in encoded))) if r.obj.causal else room
  rows = []  # (prompt k, sample j, prompt ids, tokens cut, start, key)
  for k, (ids, cut) in enumerate(encoded):
    pad = [0] * (width - len(ids))
    start = ids + pad if r.obj.causal else ids + [r.obj.mask_id] * s.max_tokens + pad
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), k)
    rows += [(k, j, ids, cut, start, key if j == 0 else jax.random.fold_in(key, j)) for j in range(num_samples)]
  size = -(-len(rows) // -(-len(rows) // BATCH))  # batches of equal size, at most BATCH: one compilation
  new = []
  for at in range(0, len(rows), size):
    part = rows[at:at + size]
    part += [part[0]] * (size - len(part))  # the last batch: copies of a row, their results dropped
    out = run(params, jnp.asarray([p[4] for p in part], jnp.int32), jnp.asarray([len(p[2]) for p in part], jnp.int32),
              jnp.stack([p[5] for p in part]))
    new += np.asarray(out).tolist()[:len(rows) - at]
  samples = []
  for (k, j, ids, cut, _, _), ids_new in zip(rows, new, strict=True):
    ends = [ids_new.index(t) for t in (eos, *stop_ids) if t in ids_new] if r.obj.causal and s.stop_at_eos else []
    if ends:
      ids_new = ids_new[:min(ends) + 1]  # the rest is padding after the row (or the turn) ended
    samples.append(Sample(prompts[k], ids, ids_new, tokenizer.decode(ids_new), cut, j))
  return samples


def _bucket(n: int, least: int = 16) -> int:
  """The smallest power of two >= n (and >= least): few prefill widths, so few compilations across calls."""
  return max(least, 1 << (max(n, 1) - 1).bit_length())


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


def load_run(workdir: str, step: int | None = None, stage: int | None = None, base: bool = False) -> Loaded:
  """The model of any run in `workdir`: the rack of `stage` of a StackWise run (default: the last saved; see
  `load`), or checkpoint `step` of a plain run (default: the newest) as a causal rack of one stack, a LoRA
  run's adapters merged into its base as for an export. `base`: also the model without the adapters
  (`Loaded.base`: the unquantized base the LoRA or QLoRA run started from, init.from_hf's or its seed's).
  Reads only; raises SampleError (one line) for a directory that is no run, a run with nothing saved yet, a
  step/stage it does not have, or base=True for a run without adapters."""
  from jaxtrain.train import export, state as state_lib  # plain runs' checkpoints

  config = rundir.load_config(workdir, SampleError)
  if base and config.stackwise.num_stacks:
    raise SampleError(f'--compare_base: {workdir} is a StackWise run; only a LoRA or QLoRA run has a base model '
                      'beside its adapters to compare with')
  if base and not (config.lora.rank or config.init.lora_from):
    raise SampleError(f'--compare_base: {workdir} is a full-parameter run (lora.rank=0, no init.lora_from); '
                      'only a LoRA or QLoRA run has a base model beside its adapters to compare with')
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
  state = export.restore_state(workdir, step)
  base_params = None
  if base:  # built once: the merged model adds the adapters to this same base
    mc = models.model_config(config.model, config.model.vocab_size or tokenizer.vocab_size)  # as the export's
    base_params = state_lib.lora_base(config, mc)
    params = state_lib.merged_params(config, mc, state, base_params)
  else:
    params = export.model_params_for_export(config, state, tokenizer)
  rows = int(params['embed'].shape[0])
  mc = dataclasses.replace(models.model_config(config.model, rows), vocab_size=rows)
  execution = execution_lib.from_model(config.model, mc)
  r = from_transformer(params, mc, execution)
  final = int(config.train.steps)
  note = None if step == final else f"note: checkpoint step {step} of the run's {final} steps, not its final model"
  return Loaded(r, config, tokenizer, f'checkpoint step {step} of {workdir}', note,
                None if base_params is None else from_transformer(base_params, mc, execution))
