"""The shape of a config: every key known, every value of its default's type, and the single-key ranges.

`check(cfg)` compares a config with `jaxtrain.config.defaults.base_config()` (unknown keys, wrong types,
missing keys); `check_ranges(cfg)` applies the declarative tables below: keys whose only rule is a choice
or a range. Rules that involve more than one key, or a value a feature enumerates itself, live in that
feature's `check` (see `jaxtrain.config.validate`). Raises `ConfigError`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxtrain.config.defaults import base_config
from jaxtrain.errors import ConfigError

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
    'log.wandb': ('disabled', 'offline', 'online'),
    'data.process_split': ('documents', 'rows'),
    'lora.mode': ('auto', 'merged', 'factored'),
    'lora.quantize': ('none', 'nf4', 'int8'),
    'sample.schedule': ('linear', 'cosine'),
    'train.early_stop.mode': ('min', 'max'),
}
POSITIVE = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.num_kv_heads', 'model.mlp_dim',
            'model.rope_theta', 'model.norm_eps', 'model.rope_factor', 'model.rope_low_freq_factor',
            'model.rope_high_freq_factor', 'model.rope_original_max_positions',
            'data.batch_size', 'data.seq_len', 'data.tokenizer_vocab_size', 'data.pack_buffer',
            'optim.lr', 'train.steps', 'train.accum_steps', 'train.eval_batches', 'checkpoint.keep', 'log.every',
            'lora.alpha', 'lora.quant_block')
NON_NEGATIVE = ('model.vocab_size', 'model.head_dim', 'model.init_std', 'model.max_positions', 'model.sliding_window',
                'model.residual_gain', 'model.mla_q_rank', 'model.mla_kv_rank', 'model.mla_nope_dim',
                'model.mla_rope_dim', 'model.mla_v_dim',
                'data.max_files', 'data.prefetch', 'data.shuffle_window', 'data.temperature', 'data.max_doc_bytes',
                'optim.warmup_steps', 'optim.weight_decay', 'optim.clip_norm', 'optim.eps', 'train.z_loss',
                'train.eval_every', 'train.max_bad_steps', 'train.steps_per_call', 'log.peak_flops', 'checkpoint.every',
                'distributed.num_processes', 'lora.rank', 'train.early_stop.patience', 'train.early_stop.min_delta')
UNIT_INTERVAL = ('data.eval_fraction', 'optim.b1', 'optim.b2', 'lora.dropout')  # [0, 1)
UNIT_CLOSED = ('optim.min_lr_ratio', 'optim.decay_fraction', 'data.max_bad_fraction')  # [0, 1]


def get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  """cfg['a']['b'] for 'a.b'."""
  node = cfg
  for part in dotted.split('.'):
    node = node[part]
  return node


def check(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
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
      from jaxtrain.data import sources  # the one definition of a source section's keys
      for name in value.keys():
        check(value[name], sources.source(''), f'{path}.{name}.')
      continue
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(path, value, 'must be a config section')
      check(value, ref, path + '.')
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
      raise ConfigError(f'{prefix}{key}', None,
                        'is missing; start config files from jaxtrain.config.defaults.base_config()')


def check_ranges(cfg: ml_collections.ConfigDict) -> None:
  """The tables above: choices and ranges of single keys."""
  for key, options in CHOICES.items():
    if get(cfg, key) not in options:
      raise ConfigError(key, get(cfg, key), f'must be one of {", ".join(options)}')
  for keys, ok, valid in ((POSITIVE, lambda v: v > 0, 'must be > 0'), (NON_NEGATIVE, lambda v: v >= 0, 'must be >= 0'),
                          (UNIT_INTERVAL, lambda v: 0 <= v < 1, 'must be in [0, 1)'),
                          (UNIT_CLOSED, lambda v: 0 <= v <= 1, 'must be in [0, 1]')):
    for key in keys:
      if not ok(get(cfg, key)):
        raise ConfigError(key, get(cfg, key), valid)
