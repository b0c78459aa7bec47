"""Preflight: validate a config as training does, preview its tokenization, count parameters, predict memory.

  jaxtrain check --config=configs/llama.py:size=1b
  jaxtrain check --config=configs/lora_sft.py:quantize=nf4 --memory-budget=8GB   # a fits / does-not-fit verdict
  python -m jaxtrain.main --config=configs/tiny.py --preflight   # the same report, then training

  jaxtrain check --config=configs/lora_sft.py --preview_tokens=200         # more of each source's first record

Everything about the model works on shapes (`jax.eval_shape`): no parameter is allocated, nothing is compiled
and nothing is written to the workdir, so the report takes seconds for any model size. It refuses what training
refuses, in one line: the config (`validate.prepare`), the data, read as training reads it (tokenized into the
prepare cache, which the run then reuses, with bad records skipped, counted and refused over
data.max_bad_fraction), and the state, built as training builds it (LoRA targets and rank). The memory is the
predicted peak of the compiled train step (`jaxtrain.train.memory`: the state exactly, LoRA adapters, a quantized
frozen base and optimizer state for what trains included; the temporaries from a formula), for this backend and
its compute dtype; `jaxtrain estimate` compiles the step for the exact figure. With a memory budget
(--memory-budget, estimate.memory_budget, or the device's own limit) it says whether the prediction fits.
Exit status: 0, 1 when the prediction does not fit the budget, 2 for a mistake (one line).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from jaxtrain import data, models, sharding
from jaxtrain.train import budget as budget_lib, execution, memory
from jaxtrain.models import flops
from jaxtrain.models.validate import check_vocab
from jaxtrain.data import sources
from jaxtrain.cli import common

PREVIEW_TOKENS = 24  # tokens shown of a long record (from its first assistant token, in a chat record)
SHORT_RECORD = 64  # a record of at most this many tokens is shown whole
PREVIEW_CHARS = 200
GIB = 2 ** 30


# ----------------------------------------------------------------------------- tokenization preview


@dataclasses.dataclass(frozen=True)
class Source:
  """One stream of documents a run reads: a configured source's split, named as `jaxtrain analyze` and the run's
  log name it (the source's config name: 'stdlib' or 'train' for data.train alone, else the data.sources key)."""
  name: str
  split: str
  spec: str  # what the config names, for the report
  source: sources.SourceSpec | None = None

  @property
  def label(self) -> str:
    return sources.split_label(self.name, self.split)


@dataclasses.dataclass(frozen=True)
class TokenPreview:
  """The first record of a source as the model will see it: its prepared tokens and loss mask."""
  source: Source
  files: int
  documents: int
  raw: str
  templated: str | None  # None: no template, the model reads the raw text
  ids: list[int]
  pieces: list[str]
  loss_mask: list[int]
  length: int  # tokens of the whole record (EOS included)
  report: str  # the run's log line of this source: documents, tokens, bad records skipped and why


def data_sources(data_cfg: ml_collections.ConfigDict) -> list[Source]:
  """The sources of a run (each configured source's train and eval split), in the order the report shows them."""
  out = []
  for spec in sources.source_specs(data_cfg):
    held_out = f'held-out {data_cfg.eval_fraction:g} of {spec.view.train}'
    out += [Source(spec.name, 'train', spec.view.train, spec),
            Source(spec.name, 'eval', spec.view.eval or held_out, spec)]
  return out


def preview_length(mask: Any, requested: int = 0) -> int:
  """How many tokens of a record with loss mask `mask` the preview shows: `requested` when > 0; else the whole
  record when it is short (SHORT_RECORD tokens at most), else PREVIEW_TOKENS tokens, through PREVIEW_TOKENS
  tokens of the first loss-masked turn (a chat's first assistant turn) when that starts later."""
  mask = np.asarray(mask)
  n = len(mask)
  if requested > 0:
    return min(int(requested), n)
  if n <= SHORT_RECORD:
    return n
  ones = np.flatnonzero(mask)
  if not len(ones) or ones[0] < PREVIEW_TOKENS:
    return PREVIEW_TOKENS
  start = int(ones[0])
  after = np.flatnonzero(mask[start:] == 0)
  end = start + int(after[0]) if len(after) else n
  return min(end, start + PREVIEW_TOKENS)


def preview_source(data_cfg: ml_collections.ConfigDict, tokenizer: data.Tokenizer, source: Source,
                   n_tokens: int = 0, src: Any = None) -> TokenPreview:
  """The first record of `source` as the prepare step tokenized it (EOS; a chat template and its loss mask),
  `preview_length(mask, n_tokens)` tokens of it. `src`: its `data.pipeline.Source`, else it is loaded (through
  the prepare cache, counting bad records as training does). Raises DataError as training would."""
  from jaxtrain.data import pipeline

  spec = source.source or sources.source_specs(data_cfg)[0]
  if src is None:
    src = next(s for s in pipeline.load_sources(data_cfg, tokenizer, source.split) if s.name == spec.name)
  files = data.list_files(spec.view, source.split)
  ids, mask = src.prepared[0]
  doc = src.docs[int(src.prepared.source_index[0])]
  if spec.format in sources.CHAT_FORMATS:
    encode, _ = pipeline.encoder_for(spec, tokenizer)
    raw, templated = json.dumps(doc, ensure_ascii=False), encode.render(doc)
  else:
    raw, templated = doc, None
  n = preview_length(mask, n_tokens)
  ids, mask = [int(i) for i in ids[:n]], [int(m) for m in mask[:n]]
  return TokenPreview(source=source, files=len(files), documents=len(src.docs), raw=raw, templated=templated, ids=ids,
                      pieces=[tokenizer.decode([i]) for i in ids], loss_mask=mask, length=len(src.prepared[0][0]),
                      report=pipeline.source_report([src])[0])


def _escape(text: str, limit: int = PREVIEW_CHARS) -> str:
  cut = text[:limit].replace('\\', '\\\\').replace('\n', '\\n').replace('\r', '\\r').replace('\t', '\\t')
  return cut + ('...' if len(text) > limit else '')


def format_preview(p: TokenPreview) -> list[str]:
  shown = 'the whole record' if len(p.ids) == p.length else f'{len(p.ids)} of its {p.length} tokens'
  lines = [f'data source {p.source.label}: {p.source.spec} ({p.documents} documents in {p.files} files; '
           f'the first one, {shown})',
           f'  data       {p.report}',
           f'  raw        {_escape(p.raw)}',
           f'  templated  {_escape(p.templated) if p.templated is not None else "(no template)"}',
           f'  {"pos":>5} {"token id":>9}  {"piece":<24} loss mask']
  for pos, (i, piece, m) in enumerate(zip(p.ids, p.pieces, p.loss_mask, strict=True)):
    lines.append(f'  {pos:5d} {i:9d}  {repr(piece):<24} {m}')
  return lines


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  embedding: int  # the input table (the LM head too when tied)
  lm_head: int  # untied head only
  per_block: int
  num_blocks: int
  non_embedding: int  # total - embedding (the usual scaling-law N)


def _size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(mc: models.ModelConfig) -> Any:
  """ShapeDtypeStructs of the parameter tree training creates, without allocating it."""
  return models.describe(mc)[2]


def param_counts(shapes: Any, num_layers: int) -> ParamCounts:
  """Counts from a parameter tree of shapes (blocks are stacked along a leading layers axis)."""
  total, embedding = _size(shapes), _size(shapes['embed'])
  return ParamCounts(total=total, embedding=embedding, lm_head=_size(shapes.get('lm_head', {})),
                     per_block=_size(shapes['blocks']) // num_layers, num_blocks=num_layers,
                     non_embedding=total - embedding)


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Memory:
  """The memory part of the report: the prediction, its lines, and the verdict (None: no budget known)."""
  prediction: memory.Prediction
  lines: list[str]
  fits: bool | None
  lora: flops.LoraFlops | None  # what trains, for the FLOPs line


def memory_report(config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh,
                  ex: models.Execution) -> Memory:
  """The predicted peak per device of the run's train step (`memory.predict`: the state exactly as `state.build`
  builds it, LoRA adapters, a quantized base and optimizer state for what trains included; the temporaries from
  the formula), what backend the figures are for, and the fits / does-not-fit verdict when a budget is known
  (estimate.memory_budget, --memory-budget, or the device's own limit). Raises LoraError as training would."""
  ss = memory.StepState(config, mc, mesh, ex)
  accum, seq_len = config.train.accum_steps, config.data.seq_len
  rows = config.data.batch_size // accum // sharding.data_parallel_size(mesh)
  p = memory.predict(ss, rows, seq_len, accum)
  b = p.state
  only = ' only' if b.lora else ''
  base = (f'frozen base, {b.quantize}-quantized (codes and scales; {memory.format_bytes(b.dense_weights)} unquantized)'
          if b.quantize != 'none' else 'frozen base') if b.lora else 'every parameter trains'
  lines = [f'memory per device: mesh {dict(mesh.shape)} over {jax.device_count()} device(s); micro-batch of '
           f'{rows} x {seq_len} tokens per device, accum_steps {accum}',
           f'  trained params  {b.trained_params:>15,d}  ({ss.description})',
           f'  weights         {_gib(b.weights)}  {base}',
           f'  adapters        {_gib(b.adapters)}  {"LoRA, trained" if b.lora else "no LoRA"}',
           f'  optimizer state {_gib(b.optimizer)}  of the trained parameters{only}',
           f'  batch, step, rng{_gib(b.other + p.batch)}',
           f'  gradients       {_gib(p.gradients)}  of the trained parameters{only}'
           + (' (and their running sum: accum_steps > 1)' if accum > 1 else ''),
           f'  activations     {_gib(p.activations)}  estimate, remat {mc.remat}, '
           + _attention(config, mc, mesh, ex, p),
           f'  workspace       {_gib(p.workspace)}  estimate: XLA\'s copies of the weights for the backward'
           + (' (dequantized)' if b.quantize != 'none' else ''),
           f'  total           {_gib(p.total)}  predicted peak of the compiled step ({memory.DEFINITION}); '
           '`jaxtrain estimate` compiles it']
  lines.append('  ' + backend_note(config, mc, mesh, ex, p))
  found = budget_lib.resolve(config.estimate.memory_budget)
  if found is None:
    lines.append(f'  budget: {jax.devices()[0].device_kind} reports no memory limit; give --memory-budget=16GB (or '
                 'estimate.memory_budget) for a fits / does-not-fit verdict')
    return Memory(p, lines, None, ss.lora_flops())
  budget, source = found
  fits = p.total <= budget
  lines.append(f'  budget          {_gib(budget)}  from {source}: the prediction {memory.verdict(p.total, budget)}'
               + ('' if fits else '; try ' + ', '.join(_shrink(config, mc, b))))
  return Memory(p, lines, fits, ss.lora_flops())


def _attention(config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh,
               ex: models.Execution, p: memory.Prediction) -> str:
  """The attention the activations assume; with the fused CPU kernel, what XLA's would add where it does not build
  (training then falls back to XLA's, with a warning)."""
  if ex.attention_impl != 'cpu_fused':
    return f'{ex.attention_impl} attention'
  xla = dataclasses.replace(ex, attention_impl='xla')
  more = memory.activation_bytes(mc, p.rows, config.data.seq_len, mesh.shape['tensor'], mesh.shape['fsdp'], xla)
  return f'fused CPU attention (where the kernel does not build, XLA\'s: +{memory.format_bytes(more - p.activations)})'


def backend_note(config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh,
                 ex: models.Execution, p: memory.Prediction) -> str:
  """Which backend the figures are for, and the activations on an accelerator where they differ (bf16 compute)."""
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind
  where = f'{backend}{"" if kind == backend else " (" + kind + ")"}, {ex.compute_dtype} compute'
  if backend != 'cpu':
    return f'figures for {where}'
  accel = models.execution.from_model(config.model, mc, backend='gpu')
  if accel.compute_dtype == ex.compute_dtype:
    return f'figures for {where}, the same compute dtype on a GPU or TPU'
  act = memory.activation_bytes(mc, p.rows, config.data.seq_len, mesh.shape['tensor'], mesh.shape['fsdp'], accel)
  return (f'figures for {where}; on a GPU or TPU with {accel.compute_dtype} compute (compute_dtype auto) the '
          f'activations are about {memory.format_bytes(act)} (with XLA\'s attention; a fused one keeps less) and the '
          f'total about {memory.format_bytes(p.total - p.activations + act)}')


def _shrink(config: ml_collections.ConfigDict, mc: models.ModelConfig, b: memory.StateBytes) -> list[str]:
  """What would shrink the step, leaving out what the config already does."""
  out = ['a smaller data.batch_size (`jaxtrain estimate --memory-budget=...` finds the largest)']
  if mc.remat != 'full':
    out.append('--config.model.remat=full')
  if not b.lora:
    out.append('LoRA (--config.lora.rank=16)')
  elif b.quantize == 'none':
    out.append('QLoRA (--config.lora.quantize=nf4)')
  return out


# ----------------------------------------------------------------------------- the report


def _gib(n: float) -> str:
  return f'{n / GIB:10.3f} GiB {n / 2 ** 20:14,.1f} MiB'


def _flops(n: float) -> str:
  for unit, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6), ('kFLOP', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} FLOP'


def report(config: ml_collections.ConfigDict, preview_tokens: int = 0) -> list[str]:
  """The preflight report as lines (`verdict_report` without the verdict)."""
  return verdict_report(config, preview_tokens)[0]


def verdict_report(config: ml_collections.ConfigDict, preview_tokens: int = 0) -> tuple[list[str], bool | None]:
  """(the preflight report as lines, whether the predicted peak fits the memory budget: None where none is
  known). Raises ConfigError, DataError or LoraError where training would, before anything is written.

  Training's checks in training's order: the prepared config (the caller's `validate.prepare`), the vocabulary,
  the data read as training reads it (`data.pipeline.load_sources`: the prepare cache, built if missing and then
  reused by the run, so bad records are skipped, counted and refused exactly as training does), and the state
  built as training builds it (`state.build`: LoRA targets, rank, an adapter to start from)."""
  from jaxtrain.data import pipeline

  tokenizer = data.load_tokenizer(config.data)
  check_vocab(config.model, tokenizer.vocab_size)
  lines = [f'tokenizer: {tokenizer.path} (vocabulary {tokenizer.vocab_size}, EOS id {tokenizer.eos_id})']
  loaded = {split: {s.name: s for s in pipeline.load_sources(config.data, tokenizer, split)}
            for split in sources.SPLITS}
  for source in data_sources(config.data):
    lines += format_preview(preview_source(config.data, tokenizer, source, preview_tokens,
                                           loaded[source.split][source.name]))

  mc = models.model_config(config.model, tokenizer.vocab_size)
  # The execution training plans here, assuming the fused CPU attention kernel builds: check never builds it.
  ex = execution.plan(config, mc, probe=False)
  counts = param_counts(abstract_params(mc), mc.num_layers)
  lines += [f'model: vocab {mc.vocab_size}, d_model {mc.d_model}, {mc.num_layers} layers, {mc.num_heads} heads '
            f'({mc.num_kv_heads} kv) of {mc.head_dim}, mlp {mc.mlp_dim}, params {mc.param_dtype}, '
            f'compute {ex.compute_dtype}, remat {mc.remat}',
            f'  parameters      {counts.total:>15,d}',
            f'  embedding       {counts.embedding:>15,d}' + ('' if counts.lm_head else '  (tied with the LM head)')]
  if counts.lm_head:
    lines.append(f'  lm head         {counts.lm_head:>15,d}')
  lines += [f'  per block       {counts.per_block:>15,d}  x {counts.num_blocks} blocks',
            f'  non-embedding   {counts.non_embedding:>15,d}']

  mesh = sharding.make_mesh(config.mesh)
  mem = memory_report(config, mc, mesh, ex)
  tokens_step = config.data.batch_size * config.data.seq_len
  per_token = flops.flops_per_token(mc, config.data.seq_len, lora=mem.lora)
  lines += mem.lines
  lines.append(f'FLOPs (training, flops.flops_per_token): {_flops(per_token)} per token, '
               f'{_flops(per_token * tokens_step)} per step of {tokens_step:,d} tokens')
  if config.stackwise.num_stacks:  # the figures are the whole rack's; a stage holds less: no verdict
    return lines + stackwise_lines(config, tokenizer.vocab_size), None
  return lines, mem.fits


def stackwise_lines(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> list[str]:
  """The stage plan of a StackWise config: the model above is the rack trained end to end; each stage trains
  only its new stack (plus shared parameters / adapters), so its memory is far below that figure."""
  from jaxtrain.stackwise import plan as stackwise  # only StackWise configs pay for it
  rd, obj = stackwise.rack_setup(config, tokenizer_vocab)
  lines = [f'stackwise: {config.stackwise.num_stacks} stacks of {rd.rc.blocks_per_stack} block(s), objective '
           f'{obj.kind}, direction {config.stackwise.direction}, trunk {config.stackwise.trunk}; the figures above '
           'are for training the whole rack at once']
  for st in stackwise.plan(config):
    ratio = f', mask ratio {st.ratio:g}' if st.ratio is not None else ''
    lines.append(f'  stage {st.index}: stacks {list(st.order)}, new {list(st.new)}, {st.steps} steps{ratio}')
  return lines


def preflight(config: ml_collections.ConfigDict, preview_tokens: int = 0) -> bool | None:
  """Prints the report (on the first process only); returns its verdict (None: no budget known). Raises
  ConfigError, DataError or LoraError."""
  lines, fits = verdict_report(config, preview_tokens)
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  return fits


# ----------------------------------------------------------------------------- the command


def define(fv: flags.FlagValues) -> None:
  common.define_config(fv)
  common.define_workdir(fv)
  common.define_memory_budget(fv)
  flags.DEFINE_integer('preview_tokens', 0, 'Tokens of each source\'s first record to show with their loss mask; 0: '
                       f'the whole record when short ({SHORT_RECORD} tokens at most), else {PREVIEW_TOKENS} tokens '
                       'reaching into its first assistant turn.', lower_bound=0, flag_values=fv)


def main(fv: flags.FlagValues) -> int:
  """Exit status 0, or 1 when the predicted peak does not fit the memory budget."""
  from jaxtrain.config import validate as config_lib
  config, workdir = common.config_and_workdir(fv)
  if common.memory_budget(fv) is not None:
    config.estimate.memory_budget = fv['memory-budget'].value
  fits = preflight(config_lib.prepare(config, workdir), fv['preview_tokens'].value)
  return 1 if fits is False else 0
