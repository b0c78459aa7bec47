"""Preflight: validate a config, preview its tokenization, count parameters and estimate memory per device.

  jaxtrain check --config=configs/llama.py:size=1b
  python -m jaxtrain.main --config=configs/tiny.py --preflight   # the same report, then training

  jaxtrain check --config=configs/lora_sft.py --preview_tokens=200         # more of each source's first record

Everything about the model works on shapes (`jax.eval_shape`): no parameter is allocated, nothing is compiled
and nothing is written to the workdir, so the report takes seconds for any model size. The data is read as
training reads it: tokenized into the prepare cache (which the run then reuses), with bad records skipped,
counted and refused over data.max_bad_fraction exactly as training does. The memory figures are an estimate;
the exact figure for one step is `jax.jit(step).lower(...).compile().memory_analysis()`, which needs a compile.
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
from jaxtrain.train import optim
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
class MemoryEstimate:
  """Bytes per device."""
  params: int
  grads: int
  opt_state: int
  activations: int
  micro_rows: int  # rows of one micro-batch on one device

  @property
  def total(self) -> int:
    return self.params + self.grads + self.opt_state + self.activations


def _shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (the largest shard where a dimension splits unevenly)."""
  return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def activation_bytes(mc: models.ModelConfig, rows: int, seq_len: int, tensor: int, fsdp: int = 1,
                     execution: models.Execution | None = None) -> int:
  """Analytic estimate of the activations one device keeps for the backward pass of one micro-batch.

  With c the compute dtype's bytes, tokens = rows * seq_len, and head / MLP / vocab dimensions split over
  the `tensor` axis (when it divides them), one block's backward reads, per token:
    6D                 the block input and mid-block residual, both norms' outputs and intermediates (six
                       D-wide stacks in XLA's buffer assignment of the remat none step)
    (N + 2K)H + NH     q, k, v and the attention output before the o projection
    6F                 gate, up, silu(gate) * up and the pieces of silu's derivative (six F-wide stacks)
  times c, plus 2 * N * seq_len float32 values per token: XLA's attention keeps the masked scores and the
  softmax (a fused kernel such as cuDNN's keeps none, so this term is an upper bound on GPU); with
  `execution.attention_impl='cpu_fused'` N float32 values per token instead (the kernel keeps the rows'
  log-sum-exp). c and the attention come from `execution` (default: this backend's, XLA attention).
  Across L layers:
    remat none:       L * block, plus with fsdp > 1 each layer's gathered weights, L * ((2N + 2K)HD + 3DF) * c
                      (the scan saves what the forward gathered rather than gathering again)
    remat full:       L * D * c (only layer inputs) + 1 block (recomputed one layer at a time)
    remat save_dots:  L * (3D + (N + 2K)H + 2F) * c (input and the outputs of weight matmuls) + 1 block
  plus the head: the final norm output D * c and float32 logits, their softmax and gradient, 3 * 4V per token.

  Checked by tests/test_memory.py against `memory_analysis()` of the compiled train step on CPU (float32,
  d_model 128-256, seq 128-256, meshes data 8 and 2x2x2, every remat mode): with the rest of
  `estimate_memory`, the total came within 15% of XLA's peak (arguments + outputs - aliased + temp).
  """
  d, n, k, h, f, v = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim, mc.vocab_size
  ex = models.execution.resolve(execution, mc)
  c = np.dtype(ex.compute_dtype).itemsize

  def split(dim: int) -> float:  # sharding.spec_for replicates a dimension the tensor axis does not divide
    return dim / tensor if dim % tensor == 0 else dim

  tokens = rows * seq_len
  nq, nkv = split(n), split(k)  # heads one device holds
  scores = nq * 4 if ex.attention_impl == 'cpu_fused' else nq * seq_len * 2 * 4
  block = tokens * c * (6 * d + (2 * nq + 2 * nkv) * h + 6 * split(f)) + tokens * scores
  gathered = 0
  if mc.remat == 'none':
    layers = mc.num_layers * block
    if fsdp > 1:  # the backward reads each layer's weights as gathered in the forward: the scan saves them
      gathered = mc.num_layers * c * d * ((2 * nq + 2 * nkv) * h + 3 * split(f))
  elif mc.remat == 'full':
    layers = mc.num_layers * tokens * d * c + block
  else:  # save_dots
    saved = 3 * d + (nq + 2 * nkv) * h + 2 * split(f)
    layers = mc.num_layers * tokens * c * saved + block
  head = tokens * (d * c + 3 * 4 * split(v))
  return int(layers + head + gathered)


def estimate_memory(config: ml_collections.ConfigDict, mc: models.ModelConfig,
                    mesh: jax.sharding.Mesh, execution: models.Execution | None = None) -> MemoryEstimate:
  """Per-device bytes of parameters, gradients and optimizer state (exact, from eval_shape and the
  shardings training uses) and of activations (an estimate: `activation_bytes` plus a weight-sized
  workspace). The total is checked against XLA's peak for the compiled step by tests/test_memory.py."""
  _, specs, shapes = models.describe(mc)  # one trace gives both the shapes and their logical axes
  param_sh = sharding.param_shardings(specs, shapes, mesh)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  opt_sh = sharding.shardings_like(opt_shapes, shapes, param_sh, mesh)
  params = _shard_bytes(shapes, param_sh)
  accum = config.train.accum_steps
  rows = config.data.batch_size // accum // sharding.data_parallel_size(mesh)
  return MemoryEstimate(
      params=params,
      # Accumulation keeps a running sum beside each micro-batch's gradient.
      grads=params * (2 if accum > 1 else 1),
      opt_state=_shard_bytes(opt_shapes, opt_sh),
      # Plus one weight-sized workspace: XLA's backward holds weight copies laid out for the transposed
      # matmuls and the embedding's scatter-add gradient, and Adam writes its new moments before they
      # replace the donated state (tests/test_memory.py misses by up to 17% on small models without it).
      activations=params + activation_bytes(mc, rows, config.data.seq_len, mesh.shape['tensor'],
                                            mesh.shape['fsdp'], execution),
      micro_rows=rows)


# ----------------------------------------------------------------------------- the report


def _gib(n: float) -> str:
  return f'{n / GIB:10.3f} GiB {n / 2 ** 20:14,.1f} MiB'


def _flops(n: float) -> str:
  for unit, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6), ('kFLOP', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} FLOP'


def report(config: ml_collections.ConfigDict, preview_tokens: int = 0) -> list[str]:
  """The preflight report as lines. Raises ConfigError or DataError on a config that cannot run.

  The data is read as training reads it (`data.pipeline.load_sources`: the prepare cache, built if missing and
  then reused by the run), so bad records are skipped, counted and refused exactly as training does."""
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
  # The config's compute dtype and block size on this backend; XLA attention: check never builds the kernel.
  ex = models.execution.from_model(config.model, mc)
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
  mem = estimate_memory(config, mc, mesh, ex)
  tokens_step = config.data.batch_size * config.data.seq_len
  per_token = flops.flops_per_token(mc, config.data.seq_len)
  lines += [f'memory per device: mesh {dict(mesh.shape)} over {jax.device_count()} device(s); micro-batch of '
            f'{mem.micro_rows} x {config.data.seq_len} tokens per device, accum_steps {config.train.accum_steps}',
            f'  parameters      {_gib(mem.params)}',
            f'  gradients       {_gib(mem.grads)}',
            f'  optimizer state {_gib(mem.opt_state)}',
            f'  activations     {_gib(mem.activations)}  (estimate, remat {mc.remat})',
            f'  total           {_gib(mem.total)}',
            f'FLOPs (training, flops.flops_per_token): {_flops(per_token)} per token, '
            f'{_flops(per_token * tokens_step)} per step of {tokens_step:,d} tokens']
  if config.stackwise.num_stacks:
    lines += stackwise_lines(config, tokenizer.vocab_size)
  return lines


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


def preflight(config: ml_collections.ConfigDict, preview_tokens: int = 0) -> None:
  """Prints the report (on the first process only). Raises ConfigError or DataError."""
  lines = report(config, preview_tokens)
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)


# ----------------------------------------------------------------------------- the command


def define(fv: flags.FlagValues) -> None:
  common.define_config(fv)
  common.define_workdir(fv)
  flags.DEFINE_integer('preview_tokens', 0, 'Tokens of each source\'s first record to show with their loss mask; 0: '
                       f'the whole record when short ({SHORT_RECORD} tokens at most), else {PREVIEW_TOKENS} tokens '
                       'reaching into its first assistant turn.', lower_bound=0, flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.config import validate as config_lib
  config, workdir = common.config_and_workdir(fv)
  preflight(config_lib.prepare(config, workdir), fv['preview_tokens'].value)
