"""The `model` config section's rules across keys (single-key choices and ranges: `jaxtrain.config.schema`)."""

from __future__ import annotations

from typing import Any

from jaxtrain.errors import ConfigError


def check(m: Any, seq_len: int) -> None:
  """Head counts, head width, positions against `seq_len` (data.seq_len), MLA and rope scaling."""
  if m.attention_block < -1:
    raise ConfigError('model.attention_block', m.attention_block, 'must be -1 (auto), 0 (off) or a block size')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError('model.num_kv_heads', m.num_kv_heads, f'must divide model.num_heads={m.num_heads}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError('model.num_heads', m.num_heads, f'must divide model.d_model={m.d_model} (or set model.head_dim)')
  if m.positions == 'rope' and (m.head_dim or m.d_model // m.num_heads) % 2:
    raise ConfigError('model.head_dim', m.head_dim or m.d_model // m.num_heads, 'must be even (rotary embedding)')
  if m.positions == 'learned' and m.max_positions < seq_len:
    raise ConfigError('model.max_positions', m.max_positions,
                      f"must be >= data.seq_len={seq_len} with model.positions='learned'")
  if m.attention == 'mla':
    from jaxtrain import models  # MLA's own rules, on the ModelConfig this section builds
    problem = models.mla.config_error(models.model_config(m, 1))
    if problem:
      raise ConfigError(f'model.{problem[0]}', problem[1], problem[2])
  if m.rope_scaling == 'llama3' and m.rope_high_freq_factor <= m.rope_low_freq_factor:
    raise ConfigError('model.rope_high_freq_factor', m.rope_high_freq_factor,
                      f'must be > model.rope_low_freq_factor={m.rope_low_freq_factor} for llama3 rope scaling')


def check_vocab(m: Any, tokenizer_vocab: int) -> None:
  """An explicit model vocabulary (`m`: the model section) must hold every token id the tokenizer can produce."""
  if m.vocab_size and m.vocab_size < tokenizer_vocab:
    raise ConfigError('model.vocab_size', m.vocab_size,
                      f'must be >= the tokenizer vocabulary ({tokenizer_vocab}) or 0 to derive it')
