"""Optimizer: AdamW with a weight-decay mask and global-norm clipping; learning-rate schedules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain.errors import ConfigError

SCHEDULES = ('constant', 'linear', 'cosine', 'wsd')
DECAY_SHAPES = ('linear', 'cosine', 'sqrt')


def make_schedule(cfg: Any, total_steps: int) -> Callable[[Any], jax.Array]:
  """lr(step) for `cfg` (the optim config section): linear warmup, then constant/linear/cosine/wsd.

  Warmup reaches the peak at step `warmup_steps` (lr*(step+1)/warmup before, so step 0 already moves).
  linear and cosine decay from the peak to lr*min_lr_ratio at `total_steps`; wsd holds the peak and
  decays over the last `decay_fraction` of the steps with shape linear, cosine or sqrt (1 - sqrt(u)).
  """
  peak, warmup, floor = float(cfg.lr), int(cfg.warmup_steps), float(cfg.min_lr_ratio)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={cfg.schedule!r}; valid: {SCHEDULES}')
  decay_steps = max(1, round(float(cfg.decay_fraction) * total_steps))
  decay_start = total_steps - decay_steps

  def shape(u: jax.Array) -> jax.Array:  # 1 -> 0 as u goes 0 -> 1
    if cfg.decay_shape == 'cosine':
      return 0.5 * (1 + jnp.cos(jnp.pi * u))
    if cfg.decay_shape == 'sqrt':
      return 1 - jnp.sqrt(u)
    return 1 - u

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    span = max(1, total_steps - warmup)
    s = jnp.clip((step - warmup) / span, 0.0, 1.0)
    if cfg.schedule == 'constant':
      factor = jnp.ones_like(s)
    elif cfg.schedule == 'linear':
      factor = floor + (1 - floor) * (1 - s)
    elif cfg.schedule == 'cosine':
      factor = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * s))
    else:
      u = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
      factor = floor + (1 - floor) * shape(u)
    if warmup > 0:
      factor = jnp.where(step < warmup, (step + 1) / warmup, factor)
    return peak * factor

  return schedule


def check(cfg: Any, total_steps: int) -> None:
  """The `optim` section's rules (single-key ranges: `jaxtrain.config.schema`): the schedule and decay shape,
  warmup within `total_steps` (train.steps), and a `no_decay` that compiles. Raises ConfigError."""
  for key, options in (('schedule', SCHEDULES), ('decay_shape', DECAY_SHAPES)):
    if cfg[key] not in options:
      raise ConfigError(f'optim.{key}', cfg[key], f'must be one of {", ".join(options)}')
  if cfg.warmup_steps > total_steps:
    raise ConfigError('optim.warmup_steps', cfg.warmup_steps, f'must be <= train.steps={total_steps}')
  try:
    re.compile(cfg.no_decay)
  except re.error as e:
    raise ConfigError('optim.no_decay', cfg.no_decay, f'is not a valid regular expression ({e})') from None


def decay_mask(params: Any, no_decay: str) -> Any:
  """True for parameters that get weight decay: those whose path does not match the `no_decay` regex."""
  pattern = re.compile(no_decay) if no_decay else None

  def keep(path: tuple, _: Any) -> bool:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return not (pattern and pattern.search(name))

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """(optax transform, schedule) for the optim config section."""
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=lambda p: decay_mask(p, cfg.no_decay))
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  return optax.chain(*parts, adamw), schedule
