"""How big a micro-batch fits, and what a token budget costs: compile-only, no training step runs.

  jaxtrain estimate --config=configs/llama.py:size=1b --memory-budget=80GB --tokens=2e9 --gpu=h100
  jaxtrain estimate --config=configs/tiny.py --memory-budget=512MiB

The train step is built as `train.run` builds it (state from `state.build`, so LoRA and QLoRA are
measured as they train; same shardings, donated state), lowered on ShapeDtypeStructs and compiled; XLA's
`memory_analysis()` of each compiled step gives the bytes one device needs. The micro-batch (rows per
data-parallel device, data.seq_len fixed) doubles until it no longer fits the budget, then a binary search
between the last fit and the first miss finds the largest that does. No parameter is allocated and the step
is never called. The figures are the local backend's: on a CPU-only machine XLA:CPU's buffer assignment with
compute_dtype auto = float32, so size the batch for a GPU or TPU on that device.

For `estimate.tokens` > 0 it prints, for every device kind in `estimate.price_per_hour`, the hours
(tokens / (mfu x peak FLOP/s x GPUs / training FLOPs per token)) and the cost (hours x GPUs x price).
Exit status: 0 a batch fits, 1 not even one row fits, 2 a mistake in the config or flags (one line).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from jaxtrain.cli import check, common
from jaxtrain import data, models, sharding
from jaxtrain.train import execution, loop as train, optim, state
from jaxtrain.adapters import lora
from jaxtrain.models import flops
from jaxtrain.train.checkpoint import abstract_with_shardings
from jaxtrain.errors import ConfigError
from jaxtrain.config.resolve import resolved
from jaxtrain.models.validate import check_vocab
from jaxtrain.train.budget import parse_bytes

BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask')
# Price-table key -> (substring of jax's device_kind, key of flops.PEAK_FLOPS). 'TPU v5 lite' must be tried
# before 'TPU v5' (v5p reports itself as 'TPU v5').
KINDS = {
    'h100': ('H100', 'H100'), 'h200': ('H200', 'H200'), 'a100': ('A100', 'A100'), 'v4': ('TPU v4', 'TPU v4'),
    'v5e': ('TPU v5 lite', 'TPU v5e'), 'v5p': ('TPU v5', 'TPU v5p'), 'v6e': ('TPU v6', 'TPU v6'),
}
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'out of memory')  # TPU compiles refuse a program that cannot fit HBM


# ----------------------------------------------------------------------------- compiled memory


@dataclasses.dataclass(frozen=True)
class Measured:
  """XLA's memory analysis of the train step compiled for `rows` rows per device (bytes per device)."""
  rows: int
  argument: int  # state + batch
  output: int  # new state + metrics
  alias: int  # outputs written over donated arguments
  temp: int  # activations and workspace
  oom: bool = False  # the compiler itself refused: the program cannot fit the device

  @property
  def total(self) -> int | float:
    """Peak per device: the donated state is written over the old one, so aliased bytes count once (the
    figure tests/test_memory.py checks `check.estimate_memory` against). Infinite when the compile failed."""
    return math.inf if self.oom else self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class Breakdown:
  """Bytes per device by what holds them; activations are an estimate, the rest is exact."""
  weights: int  # the model's parameters (with LoRA: the frozen, possibly quantized base)
  adapters: int  # LoRA adapters (0 without LoRA)
  gradients: int
  optimizer: int
  activations: int

  @property
  def total(self) -> int:
    return self.weights + self.adapters + self.gradients + self.optimizer + self.activations


def _device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class StepMemory:
  """Compiles `config`'s train step for a given micro-batch and reports its memory; results are cached.

  Everything is abstract: the state is ShapeDtypeStructs from `state.build` (the frozen LoRA base through
  `jax.eval_shape`), the batch likewise, and the compiled step is never called.
  """

  def __init__(self, config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh):
    cfg = copy.deepcopy(config)
    # `report` resolved the config: the architecture is in config.model; shapes never need the weights.
    cfg.init.from_hf = ''
    self.mc, self.mesh, self.config = mc, mesh, cfg
    self.execution = execution.plan(cfg, mc)  # the kernel and layer scan train.run would pick here
    self.seq_len, self.accum = cfg.data.seq_len, cfg.train.accum_steps
    self.dp = sharding.data_parallel_size(mesh)
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
      built = state.build(cfg, mc, tx, mesh, self.execution)
      full = jax.eval_shape(built.complete, built.abstract)  # adds the frozen base (LoRA), abstractly
      self.batch_sh = sharding.batch_sharding(mesh)
      self.step, _ = train.jit_steps(cfg, built, tx, schedule, mesh)  # exactly the step train.run compiles
    self.state = abstract_with_shardings(full, built.shardings)
    _, specs, shapes = models.describe(mc)  # the dense weights (what a LoRA base is before quantization)
    self.dense_bytes = _device_bytes(abstract_with_shardings(shapes, sharding.param_shardings(specs, shapes, mesh)))
    self.lora = 'frozen' in self.state
    self.description = built.description
    self.cache: dict[int, Measured] = {}

  def global_batch(self, rows: int) -> int:
    return rows * self.dp * self.accum

  def __call__(self, rows: int) -> Measured:
    if rows not in self.cache:
      self.cache[rows] = self._compile(rows)
    return self.cache[rows]

  def _compile(self, rows: int) -> Measured:
    x = jax.ShapeDtypeStruct((self.global_batch(rows), self.seq_len), jnp.int32, sharding=self.batch_sh)
    try:
      with jax.set_mesh(self.mesh):
        args = train.step_args(self.config, self.mesh, dict.fromkeys(BATCH_KEYS, x))
        ma = self.step.lower(self.state, *args).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
      if any(m.lower() in str(e).lower() for m in OOM_MARKERS):
        return Measured(rows, 0, 0, 0, 0, oom=True)
      raise
    if ma is None:
      raise RuntimeError(f'the {jax.default_backend()} backend gives no memory analysis of compiled programs')
    return Measured(rows, ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                    ma.temp_size_in_bytes)

  def breakdown(self, rows: int) -> Breakdown:
    """Weights, adapters, gradients and optimizer state from the abstract state and its shardings (exact);
    activations from `check.activation_bytes` plus a workspace the size of the dense weights, the convention
    of `check.estimate_memory` (XLA keeps weight copies laid out for the backward's transposed matmuls)."""
    trained = _device_bytes(self.state['params'])
    act = check.activation_bytes(self.mc, rows, self.seq_len, self.mesh.shape['tensor'], self.mesh.shape['fsdp'],
                                 self.execution)
    return Breakdown(weights=_device_bytes(self.state['frozen']) if self.lora else trained,
                     adapters=trained if self.lora else 0,
                     # accumulation keeps a running sum beside each micro-batch's gradient
                     gradients=trained * (2 if self.accum > 1 else 1),
                     optimizer=_device_bytes(self.state['opt_state']), activations=act + self.dense_bytes)


# ----------------------------------------------------------------------------- the search


@dataclasses.dataclass(frozen=True)
class Search:
  """The outcome: `rows` is the largest micro-batch that fits (0: not even one row); `tried` every compile
  in the order made; `capped` when max_rows still fit (more might)."""
  rows: int
  budget: int
  tried: list[Measured]
  capped: bool

  @property
  def compiles(self) -> int:
    return len(self.tried)


def search(measure: Callable[[int], Measured], budget: int, max_rows: int) -> Search:
  """The largest rows in [1, max_rows] with measure(rows).total <= budget, assuming memory grows with rows:
  doubling from 1 to the first miss, then bisecting between the last fit and the first miss."""
  tried: list[Measured] = []

  def fits(rows: int) -> bool:
    m = measure(rows)
    tried.append(m)
    return m.total <= budget

  fit, miss, rows = 0, None, 1
  while miss is None:
    if fits(rows):
      fit = rows
      if rows == max_rows:
        break
      rows = min(2 * rows, max_rows)
    else:
      miss = rows
  while miss is not None and miss - fit > 1:
    mid = (fit + miss) // 2
    fit, miss = (mid, miss) if fits(mid) else (fit, mid)
  return Search(rows=fit, budget=budget, tried=tried, capped=miss is None)


# ----------------------------------------------------------------------------- devices, budget, cost


def detected_kind(device_kind: str | None = None) -> str | None:
  """The price-table key of a jax device_kind ('NVIDIA H100 80GB HBM3' -> 'h100'), or None (CPU, unknown)."""
  device_kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  for key, (needle, _) in KINDS.items():
    if needle.lower() in device_kind.lower():
      return key
  return None


def resolve_budget(text: str) -> tuple[int, str]:
  """(bytes per device, where the figure came from). '' asks the device; CPUs do not say."""
  if text:
    return parse_bytes(text), 'estimate.memory_budget'
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get('bytes_limit'):  # what JAX's allocator may use (GPU: 75% of memory unless configured)
    return int(stats['bytes_limit']), f'the bytes_limit of {jax.devices()[0].device_kind}'
  raise ConfigError('estimate.memory_budget', text, f'{jax.devices()[0].device_kind} does not report its memory; '
                    'give a budget such as --memory-budget=16GB')


@dataclasses.dataclass(frozen=True)
class Cost:
  kind: str
  peak: float  # FLOP/s per device
  price: float | None  # USD per device-hour; None: not in the table
  tokens_per_s: float
  hours: float
  gpus: int

  @property
  def dollars(self) -> float | None:
    return None if self.price is None else self.hours * self.gpus * self.price


def cost(kind: str, peak: float, price: float | None, tokens: float, flops_token: float, mfu: float,
         gpus: int) -> Cost:
  """tokens/s = mfu x peak x gpus / FLOPs per token; hours = tokens / tokens/s / 3600."""
  tokens_per_s = mfu * peak * gpus / flops_token
  return Cost(kind, peak, price, tokens_per_s, tokens / tokens_per_s / 3600, gpus)


def cost_table(e: ml_collections.ConfigDict, flops_token: float, gpus: int,
               local: tuple[str, float] | None = None) -> list[Cost]:
  """One Cost per kind of `e.price_per_hour` (peaks from flops.PEAK_FLOPS), after `local` (name, peak) when
  the local device has no price."""
  rows = [cost(*local, None, e.tokens, flops_token, e.mfu, gpus)] if local else []
  for key, price in e.price_per_hour.items():
    rows.append(cost(key, flops.PEAK_FLOPS[KINDS[key][1]], price, e.tokens, flops_token, e.mfu, gpus))
  return rows


# ----------------------------------------------------------------------------- the report


def _size(n: float) -> str:
  if n == math.inf:
    return 'compile refused (out of memory)'
  return f'{n / 2 ** 30:.3f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _duration(hours: float) -> str:
  if hours < 1 / 60:
    return f'{hours * 3600:.1f} s'
  if hours < 1:
    return f'{hours * 60:.1f} min'
  return f'{hours:,.1f} h' if hours < 48 else f'{hours:,.0f} h ({hours / 24:,.1f} d)'


def _dollars(d: float | None) -> str:
  return '-' if d is None else f'${d:,.2f}' if d >= 1 else f'${d:.2g}'


def _plural(n: int, word: str) -> str:
  return f'{n} {word}' + ('' if n == 1 else 's')


def suggestions(sm: StepMemory, config: ml_collections.ConfigDict) -> list[str]:
  """What would shrink the step, leaving out what the config already does."""
  out = []
  if sm.mc.remat != 'full':
    out.append('--config.model.remat=full')
  if jax.device_count() > 1 and sm.mesh.shape['fsdp'] < jax.device_count():
    out.append('sharding the state with --config.mesh.fsdp=-1 --config.mesh.data=1')
  if not sm.lora:
    out.append('LoRA (--config.lora.rank=16)')
  if config.lora.quantize == 'none':
    out.append('QLoRA (--config.lora.rank=16 --config.lora.quantize=nf4)' if not sm.lora else
               'QLoRA (--config.lora.quantize=nf4)')
  return out + ['a shorter data.seq_len']


def memory_lines(sm: StepMemory, result: Search, config: ml_collections.ConfigDict) -> list[str]:
  lines = [f'search ({_plural(result.compiles, "compile")}; compile-only: the step is lowered on abstract inputs '
           'and never run), per device:']
  for m in result.tried:
    lines.append(f'  {m.rows:5d} rows  {_size(m.total):>14}  {"fits" if m.total <= result.budget else "over"}')
  rows = result.rows or 1
  if result.rows:
    dp = sharding.data_parallel_size(sm.mesh)
    lines.append(f'largest micro-batch: {_plural(rows, "row")} per device x {sm.seq_len} tokens'
                 f'{" (estimate.max_rows: more may fit)" if result.capped else ""} -> global batch '
                 f'{sm.global_batch(rows)} (x {dp} data-parallel x {sm.accum} accum_steps): '
                 f'--config.data.batch_size={sm.global_batch(rows)}')
  else:
    lines.append(f'not even 1 row of {sm.seq_len} tokens per device fits {_size(result.budget)}; try '
                 + ', '.join(suggestions(sm, config)))
  b, m = sm.breakdown(rows), sm(rows)
  lines += [f'memory per device at {_plural(rows, "row")}:',
            f'  weights          {_size(b.weights):>14}' + ('  (frozen base)' if sm.lora else ''),
            f'  adapters         {_size(b.adapters):>14}' + ('' if sm.lora else '  (no LoRA)'),
            f'  gradients        {_size(b.gradients):>14}',
            f'  optimizer state  {_size(b.optimizer):>14}',
            f'  activations      {_size(b.activations):>14}  (estimate: check.activation_bytes + weight-sized '
            f'workspace, remat {sm.mc.remat})',
            f'  sum              {_size(b.total):>14}']
  if not m.oom:
    lines.append(f'  XLA compiled     {_size(m.total):>14}  = arguments {_size(m.argument)} + outputs '
                 f'{_size(m.output)} - aliased {_size(m.alias)} + temporaries {_size(m.temp)}')
  lines.append(f'  budget           {_size(result.budget):>14}  ({result.budget / 1e9:,.3f} GB)')
  return lines


def cost_lines(e: ml_collections.ConfigDict, mc: models.ModelConfig, seq_len: int, tokens_step: int,
               lora: flops.LoraFlops | None = None, compute: str = '') -> list[str]:
  """The time/cost table for e.tokens, the selected kind marked with '*', and what the memory figures are
  (`compute`: the run's compute dtype; default: this backend's)."""
  gpus = e.num_gpus or jax.device_count()
  flops_token = flops.flops_per_token(mc, seq_len, lora=lora)
  device_kind = jax.devices()[0].device_kind
  local_kind = detected_kind(device_kind)
  local, peak_note = None, 'dense bf16 peaks from flops.PEAK_FLOPS'
  if not e.gpu and local_kind is None:  # e.g. CPU: nothing to price, but show what this machine would take
    peak, source = flops.device_peak_flops()
    local, peak_note = ('this machine', peak), f'this machine: {source}; the others: {peak_note}'
  selected = e.gpu or local_kind or 'this machine'
  steps_needed = f'{math.ceil(e.tokens / tokens_step):,d} steps of {tokens_step:,d} tokens' if tokens_step else \
      'no batch fits'
  lines = [f'time and cost of {e.tokens:,.0f} tokens ({steps_needed}) at MFU {e.mfu:g} on {gpus} device(s), '
           f'{flops_token / 1e6:,.2f} MFLOP per token (training, flops.flops_per_token):',
           f'    {"device":<14} {"peak TFLOP/s":>12} {"$/h":>6} {"tokens/s":>14} {"time":>18} {"cost":>12}']
  for c in cost_table(e, flops_token, gpus, local):
    price = '-' if c.price is None else f'{c.price:.2f}'
    lines.append(f'  {"*" if c.kind == selected else " "} {c.kind:<14} {c.peak / 1e12:>12,.2f} {price:>6} '
                 f'{c.tokens_per_s:>14,.0f} {_duration(c.hours):>18} {_dollars(c.dollars):>12}')
  lines.append(f'  ({peak_note}; prices: estimate.price_per_hour, USD per device-hour, placeholders to edit)')
  # The time rows hold for any device; the memory search does not: it compiled for this backend only.
  backend = jax.default_backend()
  compute = compute or models.execution.default(mc).compute_dtype
  where = f'this machine ({backend}{"" if device_kind == backend else ": " + device_kind}, compute {compute})'
  if backend == 'cpu':
    lines.append(f'note: the memory search compiled for {where}: its activations are XLA:CPU\'s, not a GPU\'s or '
                 "TPU's (bf16 compute with compute_dtype auto, other fusions); run `jaxtrain estimate` on the target "
                 'device to size its batch')
  elif selected != local_kind:
    lines.append(f'note: the memory search compiled for {where}, not for {selected}; run `jaxtrain estimate` on '
                 f'a {selected} to size its batch')
  return lines


def report(config: ml_collections.ConfigDict) -> tuple[list[str], Search]:
  """The estimate as lines, and the search. Raises ConfigError or DataError on a config that cannot run."""
  config = resolved(config)  # init.from_hf's architecture (a copy: `config` is left as it is)
  tokenizer = data.load_tokenizer(config.data)
  check_vocab(config.model, tokenizer.vocab_size)
  e = config.estimate
  budget, source = resolve_budget(e.memory_budget)
  mc = models.model_config(config.model, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  sm = StepMemory(config, mc, mesh)
  lines = [f'model: {sm.description}; seq_len {sm.seq_len}, accum_steps {sm.accum}, remat {mc.remat}, compute '
           f'{sm.execution.compute_dtype}; mesh {dict(mesh.shape)} over {jax.device_count()} '
           f'{jax.default_backend()} device(s)',
           f'budget: {_size(budget)} ({budget / 1e9:,.3f} GB) per device, from {source}']
  result = search(sm, budget, e.max_rows)
  lines += memory_lines(sm, result, config)
  if e.tokens > 0:
    tokens_step = sm.global_batch(result.rows) * sm.seq_len if result.rows else 0
    lines += cost_lines(e, mc, sm.seq_len, tokens_step,
                        lora.flops_of(sm.state['params']) if sm.lora else None, sm.execution.compute_dtype)
  return lines, result


def apply_flags(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  """Flag values (None: not given) over the config's estimate section."""
  for key, value in values.items():
    if value is not None:
      config.estimate[key] = value


# ----------------------------------------------------------------------------- the command


def define(fv: flags.FlagValues) -> None:
  common.define_config(fv)
  common.define_workdir(fv)
  flags.DEFINE_string('memory-budget', None, 'Memory per device, e.g. 80GB (10^9 bytes) or 80GiB (2^30); '
                      'overrides config.estimate.memory_budget (default: the device\'s own limit).', flag_values=fv)
  flags.DEFINE_float('tokens', None, 'Training tokens to price, e.g. 2e9; overrides config.estimate.tokens.',
                     flag_values=fv)
  flags.DEFINE_string('gpu', None, 'Device kind to price (a key of config.estimate.price_per_hour); overrides '
                      'config.estimate.gpu.', flag_values=fv)


def main(fv: flags.FlagValues) -> int:
  """Exit status 0 when a batch fits, 1 when not even one row does."""
  from jaxtrain.config import validate as config_lib
  config, workdir = common.config_and_workdir(fv)
  apply_flags(config, {'memory_budget': fv['memory-budget'].value, 'tokens': fv['tokens'].value,
                       'gpu': fv['gpu'].value})
  lines, result = report(config_lib.prepare(config, workdir))
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  return 0 if result.rows else 1
