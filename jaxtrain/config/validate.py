"""Validation of a run's ConfigDict before anything is written.

Every problem becomes a `ConfigError` whose message names the key, the offending value and what would be
valid; `jaxtrain.main` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any

import ml_collections

from jaxtrain import data, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.config.defaults import base_config

CHOICES = {
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.compute_dtype': ('auto', 'float32', 'bfloat16', 'float16'),
    'model.remat': ('none', 'full', 'save_dots'),
    'model.norm': ('rmsnorm', 'layernorm'),
    'model.positions': ('rope', 'learned'),
    'model.mlp': ('swiglu', 'gelu', 'gelu_tanh'),
    'model.rope_scaling': ('none', 'linear', 'llama3'),
    'model.attention': ('gqa', 'mla'),
    'model.attention_impl': ('auto', 'xla', 'cpu_fused'),
    'optim.schedule': ('constant', 'linear', 'cosine', 'wsd'),
    'optim.decay_shape': ('linear', 'cosine', 'sqrt'),
    'log.wandb': ('disabled', 'offline', 'online'),
    'data.process_split': ('documents', 'rows'),
    'lora.mode': ('auto', 'merged', 'factored'),
    'lora.quantize': ('none', 'nf4', 'int8'),
    'objective.kind': ('clm', 'mlm', 'diffusion'),
    'objective.time': ('input', 'depth'),
    'objective.time_embedding': ('none', 'sinusoidal', 'learned'),
    'stackwise.direction': ('append', 'prepend', 'joint'),
    'stackwise.trunk': ('frozen', 'lora', 'qlora'),
    'stackwise.quantize': ('none', 'nf4', 'int8'),
    'stackwise.rank_schedule': ('constant', 'increasing', 'list'),
    'stackwise.new_stack_init': ('identity', 'random', 'copy'),
    'sample.schedule': ('linear', 'cosine'),
    'curriculum.kind': ('none', 'linear', 'cosine', 'step'),
}
POSITIVE = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.num_kv_heads', 'model.mlp_dim',
            'model.rope_theta', 'model.norm_eps', 'model.rope_factor', 'model.rope_low_freq_factor',
            'model.rope_high_freq_factor', 'model.rope_original_max_positions',
            'data.batch_size', 'data.seq_len', 'data.tokenizer_vocab_size', 'data.pack_buffer',
            'optim.lr', 'train.steps', 'train.accum_steps', 'train.eval_batches', 'checkpoint.keep', 'log.every',
            'lora.alpha', 'lora.quant_block', 'curriculum.start', 'curriculum.max_variants')
NON_NEGATIVE = ('model.vocab_size', 'model.head_dim', 'model.init_std', 'model.max_positions', 'model.sliding_window',
                'model.residual_gain', 'model.mla_q_rank', 'model.mla_kv_rank', 'model.mla_nope_dim',
                'model.mla_rope_dim', 'model.mla_v_dim',
                'data.max_files', 'data.prefetch', 'data.shuffle_window', 'data.temperature', 'data.max_doc_bytes',
                'optim.warmup_steps', 'optim.weight_decay', 'optim.clip_norm', 'optim.eps', 'train.z_loss',
                'train.eval_every', 'train.max_bad_steps', 'train.steps_per_call', 'log.peak_flops', 'checkpoint.every',
                'distributed.num_processes',
                'lora.rank', 'curriculum.steps_per_stage')
UNIT_INTERVAL = ('data.eval_fraction', 'optim.b1', 'optim.b2', 'lora.dropout')  # [0, 1)
UNIT_CLOSED = ('optim.min_lr_ratio', 'optim.decay_fraction', 'data.max_bad_fraction')  # [0, 1]


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split('.'):
    node = node[part]
  return node


def check_schema(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
                 prefix: str = '') -> None:
  """Unknown keys and wrong types against `reference` (the defaults). ints are accepted for floats."""
  reference = base_config() if reference is None else reference
  for key in cfg.keys():
    path = f'{prefix}{key}'
    value = cfg[key]
    if key not in reference:
      known = ', '.join(sorted(reference.keys()))
      raise ConfigError(path, value, f'unknown key; known keys here: {known}')
    ref = reference[key]
    if path == 'data.sources':  # named sections, each shaped like sources.source()
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(path, value, 'must be a config section of named sources')
      for name in value.keys():
        check_schema(value[name], data.sources.source(''), f'{path}.{name}.')
      continue
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(path, value, 'must be a config section')
      check_schema(value, ref, path + '.')
    elif isinstance(ref, bool):
      if not isinstance(value, bool):
        raise ConfigError(path, value, 'must be True or False')
    elif isinstance(ref, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, value, 'must be a number')
    elif isinstance(ref, int):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, value, 'must be an integer')
    elif isinstance(ref, str) and not isinstance(value, str):
      raise ConfigError(path, value, 'must be a string')
  for key in reference.keys():
    if key not in cfg:
      raise ConfigError(f'{prefix}{key}', None, 'is missing; start config files from jaxtrain.config.defaults.base_config()')


def check_values(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Choices, ranges and cross-field consistency (mesh vs devices, batch vs data parallelism)."""
  for key, options in CHOICES.items():
    if _get(cfg, key) not in options:
      raise ConfigError(key, _get(cfg, key), f'must be one of {", ".join(options)}')
  for key in POSITIVE:
    if not _get(cfg, key) > 0:
      raise ConfigError(key, _get(cfg, key), 'must be > 0')
  for key in NON_NEGATIVE:
    if not _get(cfg, key) >= 0:
      raise ConfigError(key, _get(cfg, key), 'must be >= 0')
  for key in UNIT_INTERVAL:
    if not 0 <= _get(cfg, key) < 1:
      raise ConfigError(key, _get(cfg, key), 'must be in [0, 1)')
  for key in UNIT_CLOSED:
    if not 0 <= _get(cfg, key) <= 1:
      raise ConfigError(key, _get(cfg, key), 'must be in [0, 1]')
  m = cfg.model
  if m.attention_block < -1:
    raise ConfigError('model.attention_block', m.attention_block, 'must be -1 (auto), 0 (off) or a block size')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError('model.num_kv_heads', m.num_kv_heads, f'must divide model.num_heads={m.num_heads}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError('model.num_heads', m.num_heads, f'must divide model.d_model={m.d_model} (or set model.head_dim)')
  if m.positions == 'rope' and (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError('model.head_dim', m.head_dim or m.d_model // m.num_heads, 'must be even (rotary embedding)')
  if m.positions == 'learned' and m.max_positions < cfg.data.seq_len:
    raise ConfigError('model.max_positions', m.max_positions,
                      f"must be >= data.seq_len={cfg.data.seq_len} with model.positions='learned'")
  if m.attention == 'mla':
    from jaxtrain import models  # MLA's own rules, on the ModelConfig this section builds
    problem = models.mla.config_error(models.model_config(m, 1))
    if problem:
      raise ConfigError(f'model.{problem[0]}', problem[1], problem[2])
  if m.rope_scaling == 'llama3' and m.rope_high_freq_factor <= m.rope_low_freq_factor:
    raise ConfigError('model.rope_high_freq_factor', m.rope_high_freq_factor,
                      f'must be > model.rope_low_freq_factor={m.rope_low_freq_factor} for llama3 rope scaling')
  try:
    shape = sharding.mesh_shape(cfg.mesh, num_devices)
  except ValueError as e:
    raise ConfigError('mesh', dict(cfg.mesh), str(e)) from None
  dp = shape[0] * shape[1]
  b, accum = cfg.data.batch_size, cfg.train.accum_steps
  if b % accum:
    raise ConfigError('data.batch_size', b, f'must be divisible by train.accum_steps={accum}')
  if (b // accum) % dp:
    raise ConfigError('data.batch_size', b, f'micro-batch {b // accum} (batch_size / train.accum_steps) must be '
                      f'divisible by the data-parallel size {dp} (mesh data={shape[0]} x fsdp={shape[1]})')
  if cfg.optim.warmup_steps > cfg.train.steps:
    raise ConfigError('optim.warmup_steps', cfg.optim.warmup_steps, f'must be <= train.steps={cfg.train.steps}')
  check_lora(cfg.lora, bool(cfg.init.lora_from))
  check_estimate(cfg.estimate)
  check_objective(cfg)
  check_curriculum(cfg)
  check_provenance(cfg.provenance)


def check_provenance(v: ml_collections.ConfigDict) -> None:
  """The `provenance` section (jaxtrain.train.recorder): spike detection settings."""
  if not (v.spike_factor == 0 or v.spike_factor > 1):
    raise ConfigError('provenance.spike_factor', v.spike_factor, 'must be 0 (off) or > 1 (a multiple of the '
                      'rolling mean that makes a spike)')
  if v.spike_window < 1:
    raise ConfigError('provenance.spike_window', v.spike_window, 'must be >= 1 (steps in the rolling means)')
  for key in ('spike_warmup', 'max_dumps'):
    if v[key] < 0:
      raise ConfigError(f'provenance.{key}', v[key], 'must be >= 0')


def check_curriculum(cfg: ml_collections.ConfigDict) -> None:
  """The context-length curriculum's cross-field rules (jaxtrain.train.curriculum)."""
  u = cfg.curriculum
  if not 0 < u.fraction <= 1:
    raise ConfigError('curriculum.fraction', u.fraction, 'must be in (0, 1]: the share of train.steps spent widening')
  if u.kind == 'none':
    return
  if u.start > cfg.data.seq_len:
    raise ConfigError('curriculum.start', u.start, f'must be <= data.seq_len={cfg.data.seq_len}')
  if u.max_variants < 2:
    raise ConfigError('curriculum.max_variants', u.max_variants, 'must be >= 2 (a short window and the full one)')
  if cfg.stackwise.num_stacks:
    raise ConfigError('curriculum.kind', u.kind, "applies to plain decoder runs; use 'none' with stackwise.num_stacks "
                      f'= {cfg.stackwise.num_stacks}')


def check_objective(cfg: ml_collections.ConfigDict) -> None:
  """Objective ranges; masked objectives need a StackWise rack; the rack's stages must be possible."""
  o = cfg.objective
  if not 0 < o.mlm_ratio < 1:
    raise ConfigError('objective.mlm_ratio', o.mlm_ratio, 'must be in (0, 1)')
  if not 0 < o.t_min < 1:
    raise ConfigError('objective.t_min', o.t_min, 'must be in (0, 1)')
  w = cfg.stackwise
  if w.num_stacks < 0:
    raise ConfigError('stackwise.num_stacks', w.num_stacks, 'must be >= 0 (0: not a StackWise run)')
  if not w.num_stacks:
    if o.kind != 'clm':
      raise ConfigError('objective.kind', o.kind, 'masked objectives train StackWise racks: set stackwise.num_stacks '
                        '> 0 (e.g. configs/stackwise.py), or use clm')
    return
  if cfg.init.from_hf or cfg.init.lora_from or cfg.lora.rank:
    raise ConfigError('stackwise.num_stacks', w.num_stacks, 'a StackWise rack starts from a random init and takes '
                      'its adapters from the stackwise section: leave init.from_hf, init.lora_from and lora.rank unset')
  from jaxtrain.stackwise import plan as stackwise  # the stage plan checks directions, ranks, schedules and step counts
  stackwise.plan(cfg)  # raises StackwiseError, a ConfigError


def check_lora(c: ml_collections.ConfigDict, from_adapter: bool) -> None:
  """LoRA keys that only make sense together."""
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


# Units of estimate.memory_budget: decimal (SI) ones are powers of 1000, binary (IEC) ones powers of 1024.
BYTE_UNITS = {'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'TB': 10 ** 12,
              'KiB': 2 ** 10, 'MiB': 2 ** 20, 'GiB': 2 ** 30, 'TiB': 2 ** 40}
SIZE_HELP = ('a size such as 80GB or 80GiB: a number and one of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, '
             'GiB, TiB (powers of 1024)')


def parse_bytes(text: str) -> int:
  """'80GB' -> 80 * 10**9, '80GiB' -> 80 * 2**30, '1.5TB', '512 MiB' (units in any case). Raises ValueError."""
  m = re.fullmatch(r'\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]+)\s*', text)
  unit = {u.lower(): u for u in BYTE_UNITS}.get(m.group(2).lower()) if m else None
  if unit is None:
    raise ValueError(f'{text!r} is not {SIZE_HELP}')
  size = round(float(m.group(1)) * BYTE_UNITS[unit])
  if size <= 0:
    raise ValueError(f'{text!r} must be more than 0 bytes')
  return size


def check_estimate(e: ml_collections.ConfigDict) -> None:
  """The `estimate` section (`jaxtrain estimate`)."""
  if e.memory_budget:
    try:
      parse_bytes(e.memory_budget)
    except ValueError:
      raise ConfigError('estimate.memory_budget', e.memory_budget, f"must be '' (the device's memory) or "
                        f'{SIZE_HELP}') from None
  for key in ('tokens', 'num_gpus'):
    if not e[key] >= 0:
      raise ConfigError(f'estimate.{key}', e[key], 'must be >= 0')
  if not e.max_rows > 0:
    raise ConfigError('estimate.max_rows', e.max_rows, 'must be > 0')
  if not 0 < e.mfu <= 1:
    raise ConfigError('estimate.mfu', e.mfu, 'must be in (0, 1]')
  if e.gpu and e.gpu not in e.price_per_hour:
    raise ConfigError('estimate.gpu', e.gpu, f"must be '' (the detected device) or one of "
                      f'{", ".join(e.price_per_hour.keys())}')
  for key, price in e.price_per_hour.items():
    if not price >= 0:
      raise ConfigError(f'estimate.price_per_hour.{key}', price, 'must be >= 0 (USD per GPU-hour)')


def check_paths(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Workdir writable; tokenizer and data files exist."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError('workdir', workdir, 'exists and is not a directory')
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, /proc)
    os.rmdir(tempfile.mkdtemp(prefix='.jaxtrain-probe-', dir=parent))
  except OSError as e:
    raise ConfigError('workdir', workdir, f'cannot be created or written ({parent}: {e.strerror})') from None
  for key, marker in (('init.from_hf', 'config.json'), ('init.lora_from', 'adapter_config.json')):
    where = _get(cfg, key)
    if where and not os.path.isfile(os.path.join(where, marker)):
      raise ConfigError(key, where, f'must be a local directory holding {marker}')
  if cfg.data.tokenizer and not os.path.exists(cfg.data.tokenizer):
    raise ConfigError('data.tokenizer', cfg.data.tokenizer, 'does not exist; give a tokenizer.json, a tokenizer '
                      "directory, or '' to build one on the train data")
  specs = data.sources.source_specs(cfg.data)
  if not cfg.data.temperature:  # weights are checked now; token counts (for a temperature) need the data
    from jaxtrain.data import mixing
    mixing.mixture_weights({s.name: 1 for s in specs}, {s.name: s.weight for s in specs}, None)
  for spec in specs:
    for key, value in zip(spec.view.config_keys[:2], (spec.view.train, spec.view.eval), strict=True):
      if not value or value == 'stdlib':
        continue
      for pattern in value.split(','):
        if not glob.glob(os.path.expanduser(pattern.strip()), recursive=True):
          raise ConfigError(key, value, f'pattern {pattern.strip()!r} matches no file')
    for split in ('train', 'eval'):  # e.g. an eval_fraction that leaves no eval file: fail now, not at the end
      data.list_files(spec.view, split)
  for path in (p.strip() for p in cfg.data.exclude.split(',') if p.strip()):
    if not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError('data.exclude', cfg.data.exclude, f'file {path!r} does not exist; expected comma-separated '
                        'blocklist files (written by `jaxtrain blocklist`)')


def check_vocab(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
  """An explicit model vocabulary must hold every token id the tokenizer can produce."""
  if cfg.model.vocab_size and cfg.model.vocab_size < tokenizer_vocab:
    raise ConfigError('model.vocab_size', cfg.model.vocab_size,
                      f'must be >= the tokenizer vocabulary ({tokenizer_vocab}) or 0 to derive it')


def resolve_init(cfg: ml_collections.ConfigDict) -> None:
  """With `init.from_hf`, the architecture comes from the checkpoint's config.json (model keys are
  overwritten) and the tokenizer from its directory unless data.tokenizer names one. Idempotent."""
  where = cfg.init.from_hf
  if not where:
    return
  if not os.path.isfile(os.path.join(where, 'config.json')):
    raise ConfigError('init.from_hf', where, 'must be a local directory holding config.json and *.safetensors')
  # Only runs that import a checkpoint pay for reading it.
  from jaxtrain import models
  from jaxtrain.hf import config as hf_config, weights as hf_weights
  try:
    hf_config.apply_overrides(cfg)
    # The safetensors headers only: a missing, unknown or mis-shaped tensor fails before anything is written.
    hf_weights.check_weights(where, models.model_config(cfg.model, cfg.model.vocab_size))
  except hf_config.HfError as e:
    raise ConfigError('init.from_hf', where, str(e)) from None


def validate(cfg: ml_collections.ConfigDict, workdir: str, num_devices: int) -> None:
  """All checks, cheapest first. Raises ConfigError."""
  check_schema(cfg)
  resolve_init(cfg)
  check_values(cfg, num_devices)
  check_paths(cfg, workdir)

