"""How big a micro-batch fits, and what a token budget costs: compile-only, no training step runs.

  jaxtrain estimate --config=configs/llama.py:size=1b --memory-budget=80GB --tokens=2e9 --gpu=h100
  jaxtrain estimate --config=configs/tiny.py --memory-budget=512MiB

What must fit is the compiled train step's peak per device, `jaxtrain.train.memory.DEFINITION` (arguments +
outputs - aliased + temporaries, from XLA's `memory_analysis()`): the figure each size tried is compared with, and
the figure the breakdown splits exactly (weights, adapters, optimizer state, batch, outputs, temporaries). The
train step is built as `train.run` builds it (state from `state.build`, so LoRA and QLoRA are measured as they
train; same shardings, donated state), lowered on ShapeDtypeStructs and compiled; no parameter is allocated and
the step is never called. The search starts at the largest micro-batch (rows per data-parallel device,
data.seq_len fixed) that `jaxtrain check`'s formula allows, then steps to where the line through the measured
sizes meets the budget (memory is close to affine in rows), bisecting on a log scale where the line fails: a
handful of compiles, at most estimate.max_compiles. The figures are the local backend's: on a CPU-only machine
XLA:CPU's buffer assignment with compute_dtype auto = float32, so size the batch for a GPU or TPU on that device.

For `estimate.tokens` > 0 it prints, for every device kind in `estimate.price_per_hour`, the hours
(tokens / (mfu x peak FLOP/s x GPUs / training FLOPs per token)) and the cost (hours x GPUs x price).
Exit status: 0 a batch fits, 1 not even one row fits, 2 a mistake in the config or flags (one line).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from jaxtrain.cli import common
from jaxtrain import data, models, sharding
from jaxtrain.train import budget as budget_lib, execution, loop as train, memory
from jaxtrain.models import flops
from jaxtrain.errors import ConfigError
from jaxtrain.config.resolve import resolved
from jaxtrain.models.validate import check_vocab
from jaxtrain.train.memory import Measured

# Price-table key -> (substring of jax's device_kind, key of flops.PEAK_FLOPS). 'TPU v5 lite' must be tried
# before 'TPU v5' (v5p reports itself as 'TPU v5').
KINDS = {
    'h100': ('H100', 'H100'), 'h200': ('H200', 'H200'), 'a100': ('A100', 'A100'), 'v4': ('TPU v4', 'TPU v4'),
    'v5e': ('TPU v5 lite', 'TPU v5e'), 'v5p': ('TPU v5', 'TPU v5p'), 'v6e': ('TPU v6', 'TPU v6'),
}
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'out of memory')  # TPU compiles refuse a program that cannot fit HBM
# The search reads only the buffer assignment and never runs the program: on CPU, LLVM's cheapest code generation
# halves each compile and leaves memory_analysis() identical (configs/lora_sft.py at 754 rows: 10.3 -> 4.9 s).
CPU_COMPILE_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


# ----------------------------------------------------------------------------- compiled memory


class StepMemory:
  """Compiles `config`'s train step for a given micro-batch and reports its memory; results are cached.

  Everything is abstract: the state is `memory.StepState`'s ShapeDtypeStructs (the frozen LoRA base through
  `jax.eval_shape`), the batch likewise, and the compiled step is never called.
  """

  def __init__(self, config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh):
    ex = execution.plan(config, mc)  # the kernel and layer scan train.run would pick here
    self.ss = memory.StepState(config, mc, mesh, ex)
    self.config, self.mc, self.mesh, self.execution = self.ss.config, mc, mesh, ex
    self.seq_len, self.accum = config.data.seq_len, config.train.accum_steps
    self.dp = sharding.data_parallel_size(mesh)
    self.lora, self.description = self.ss.lora, self.ss.description
    with jax.set_mesh(mesh):
      self.batch_sh = sharding.batch_sharding(mesh)
      # exactly the step train.run compiles
      self.step, _ = train.jit_steps(self.config, self.ss.built, self.ss.tx, self.ss.schedule, mesh)
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
        args = train.step_args(self.config, self.mesh, dict.fromkeys(memory.BATCH_KEYS, x))
        options = CPU_COMPILE_OPTIONS if jax.default_backend() == 'cpu' else None
        ma = self.step.lower(self.ss.abstract, *args).compile(options).memory_analysis()
    except jax.errors.JaxRuntimeError as e:
      if any(m.lower() in str(e).lower() for m in OOM_MARKERS):
        return Measured(rows, 0, 0, 0, 0, oom=True)
      raise
    if ma is None:
      raise RuntimeError(f'the {jax.default_backend()} backend gives no memory analysis of compiled programs')
    return Measured(rows, ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                    ma.temp_size_in_bytes)

  def predict(self, rows: int) -> memory.Prediction:
    """`jaxtrain check`'s formula for `rows` rows per device (no compile)."""
    return memory.predict(self.ss, rows, self.seq_len, self.accum)

  def formula(self, budget: int, max_rows: int) -> tuple[int, float]:
    """(rows, bytes per row) of the formula: the largest rows in [1, max_rows] whose predicted peak fits `budget`,
    and the predicted growth per row (the prediction is affine in rows)."""
    one, per_row = self.predict(1).total, self.predict(2).total - self.predict(1).total
    rows = 1 + math.floor((budget - one) / per_row) if per_row > 0 else max_rows
    return min(max(rows, 1), max_rows), float(per_row)


# ----------------------------------------------------------------------------- the search


@dataclasses.dataclass(frozen=True)
class Search:
  """The outcome: `rows` is the largest micro-batch verified to fit (0: none); `tried` every compile in the order
  made; `capped` when max_rows still fit (more might); `miss` the smallest size verified not to fit (None: none
  tried); `start` where the search began (the formula's answer)."""
  rows: int
  budget: int
  tried: list[Measured]
  capped: bool
  miss: int | None = None
  start: int = 1

  @property
  def compiles(self) -> int:
    return len(self.tried)

  @property
  def exact(self) -> bool:
    """Whether `rows` is the largest that fits (else the compile cap stopped the search inside a gap)."""
    return self.capped or (self.miss is not None and self.miss <= self.rows + 1)


def search(measure: Callable[[int], Measured], budget: int, max_rows: int, start: int = 1, per_row: float = 0.0,
           max_compiles: int = 64) -> Search:
  """The largest rows in [1, max_rows] with measure(rows).total <= budget, assuming memory grows with rows.

  It measures `start` first (the formula's answer), then where the line through the measurements meets the
  budget: through the two sizes that bracket the budget, or from the measurement nearest it with the slope of
  its nearest neighbour (with one measurement: `per_row`, the formula's bytes per row; nothing known: doubling).
  Memory is close to affine in rows, so this lands on the boundary in a few compiles; where the line fails (a
  compile refused, a step that does not halve the gap) it bisects the gap on a log scale. It stops when the
  boundary is found, max_rows fits, or after `max_compiles` compiles."""
  tried: list[Measured] = []
  rows = min(max(start, 1), max_rows)
  while True:
    tried.append(measure(rows))
    fit, miss = _bracket(tried, budget)
    found = (miss is not None and miss <= fit + 1) or (miss is None and fit == max_rows)
    if found or len(tried) >= max_compiles:
      break
    rows = _next_rows(tried, fit, miss, budget, max_rows, per_row)
  return Search(rows=fit, budget=budget, tried=tried, capped=miss is None and fit == max_rows, miss=miss,
                start=tried[0].rows)


def _bracket(tried: list[Measured], budget: int) -> tuple[int, int | None]:
  """(the largest size that fit, 0: none; the smallest that did not, None: none) of `tried`."""
  fits = [m.rows for m in tried if m.total <= budget]
  misses = [m.rows for m in tried if m.total > budget]
  return max(fits, default=0), min(misses, default=None)


def _next_rows(tried: list[Measured], fit: int, miss: int | None, budget: int, max_rows: int,
               per_row: float) -> int:
  """The next size to compile: see `search`. `fit` (0: none yet) and `miss` (None: none yet) bound the answer."""
  total = {m.rows: m.total for m in tried if not m.oom}
  if miss is not None and fit:  # the boundary is bracketed: interpolate, or bisect on a log scale
    lo, hi = fit + 1, miss - 1
    before = _bracket(tried[:-1], budget)  # a last step that did not halve the gap: the line is not to be trusted
    stalled = before[0] and before[1] is not None and miss - fit > (before[1] - before[0]) / 2
    if miss in total and total[miss] > total[fit] and not stalled:
      rows = fit + math.floor((budget - total[fit]) * (miss - fit) / (total[miss] - total[fit]))
    else:
      rows = round(math.sqrt(fit * miss))
    return min(max(rows, lo), hi)
  ref = fit or miss  # one side only: step from the nearest measurement along the line
  rows, least = None, 1
  if ref in total:
    slope = per_row
    others = [r for r in total if r != ref]
    if others:
      near = min(others, key=lambda r: abs(r - ref))
      grew = (total[ref] - total[near]) / (ref - near)
      if grew > 0:
        slope = grew
      else:  # flat: the line says nothing here; step at least twice as far as last time
        least = 2 * abs(ref - near)
    if slope > 0:
      rows = ref + math.floor((budget - total[ref]) / slope)
  if miss is None:  # everything fit so far: up, at most 16x
    return min(max(rows or 2 * fit, fit + least), 16 * fit, max_rows)
  return max(1, min(rows if rows is not None else miss // 2, miss - least), miss // 16)  # nothing fit yet: down


# ----------------------------------------------------------------------------- devices, budget, cost


def detected_kind(device_kind: str | None = None) -> str | None:
  """The price-table key of a jax device_kind ('NVIDIA H100 80GB HBM3' -> 'h100'), or None (CPU, unknown)."""
  device_kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  for key, (needle, _) in KINDS.items():
    if needle.lower() in device_kind.lower():
      return key
  return None


def resolve_budget(text: str) -> tuple[int, str]:
  """(bytes per device, where the figure came from): `budget.resolve`, which for '' asks the device; a CPU does not
  say, and then the search has nothing to compare with. Raises ConfigError."""
  found = budget_lib.resolve(text)
  if found is None:
    raise ConfigError('estimate.memory_budget', text, f'{jax.devices()[0].device_kind} does not report its memory; '
                      'give a budget such as --memory-budget=16GB')
  return found


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


_size = memory.format_bytes


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
  lines = [f'search from {_plural(result.start, "row")} (the largest that `jaxtrain check`\'s formula fits), '
           f'{_plural(result.compiles, "compile")} (at most estimate.max_compiles; compile-only: the step is lowered '
           f'on abstract inputs and never run); peak per device = {memory.DEFINITION} (XLA\'s memory_analysis):']
  for m in sorted(result.tried, key=lambda m: m.rows):
    over = 'fits' if m.total <= result.budget else 'over' + ('' if m.oom else f' by {_size(m.total - result.budget)}')
    lines.append(f'  {m.rows:5d} rows  {_size(m.total):>14}  {over}')
  rows = result.rows or min(m.rows for m in result.tried)
  if result.rows:
    dp = sharding.data_parallel_size(sm.mesh)
    lines.append(f'largest micro-batch: {_plural(rows, "row")} per device x {sm.seq_len} tokens'
                 f'{" (estimate.max_rows: more may fit)" if result.capped else ""} -> global batch '
                 f'{sm.global_batch(rows)} (x {dp} data-parallel x {sm.accum} accum_steps): '
                 f'--config.data.batch_size={sm.global_batch(rows)}')
    if not result.exact:
      gap = 'larger sizes' if result.miss is None else f'sizes up to {result.miss} (which did not fit)'
      lines.append(f'  (estimate.max_compiles reached: {_plural(rows, "row")} verified to fit; {gap} were not '
                   'compiled)')
  else:
    smallest = 'not even 1 row' if rows == 1 else f'no size tried (the smallest: {rows} rows)'
    lines.append(f'{smallest} of {sm.seq_len} tokens per device fits {_size(result.budget)}; try '
                 + ', '.join(suggestions(sm, config)))
  m, b = sm(rows), sm.ss.bytes
  notes = {'weights': (f'frozen base, {b.quantize}-quantized' if b.quantize != 'none' else 'frozen base')
           if b.lora else 'every parameter trains',
           'adapters': 'LoRA, trained' if b.lora else 'no LoRA',
           'optimizer state': 'of the trained parameters',
           'batch, step, rng': 'the rest of the arguments',
           'outputs': 'not written over the donated state: the metrics',
           'temporaries': f'gradients ({_size(b.trained)} for the trained parameters), activations and workspace, '
                          'as XLA assigns them'}
  lines.append(f'memory per device at {_plural(rows, "row")}: the compiled peak, the figure compared with the budget')
  rows_of = memory.parts(m, b)
  if not rows_of:  # the compiler refused: only the state is known
    rows_of = [('weights', b.weights), ('adapters', b.adapters), ('optimizer state', b.optimizer)]
  for name, n in rows_of:
    lines.append(f'  {name:<17}{_size(n):>14}  {notes[name]}')
  detail = '' if m.oom else (f' = arguments {_size(m.argument)} + outputs {_size(m.output)} - aliased '
                             f'{_size(m.alias)} + temporaries {_size(m.temp)}')
  lines.append(f'  {"peak (sum)":<17}{_size(m.total):>14}  {memory.verdict(m.total, result.budget)}{detail}')
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
  start, per_row = sm.formula(budget, e.max_rows)
  result = search(sm, budget, e.max_rows, start, per_row, e.max_compiles)
  lines += memory_lines(sm, result, config)
  if e.tokens > 0:
    tokens_step = sm.global_batch(result.rows) * sm.seq_len if result.rows else 0
    lines += cost_lines(e, mc, sm.seq_len, tokens_step, sm.ss.lora_flops(), sm.execution.compute_dtype)
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
  common.define_memory_budget(fv)
  flags.DEFINE_float('tokens', None, 'Training tokens to price, e.g. 2e9; overrides config.estimate.tokens.',
                     flag_values=fv)
  flags.DEFINE_string('gpu', None, 'Device kind to price (a key of config.estimate.price_per_hour); overrides '
                      'config.estimate.gpu.', flag_values=fv)


def main(fv: flags.FlagValues) -> int:
  """Exit status 0 when a batch fits, 1 when not even one row does."""
  from jaxtrain.config import validate as config_lib
  config, workdir = common.config_and_workdir(fv)
  apply_flags(config, {'memory_budget': common.memory_budget(fv), 'tokens': fv['tokens'].value,
                       'gpu': fv['gpu'].value})
  lines, result = report(config_lib.prepare(config, workdir))
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  return 0 if result.rows else 1
