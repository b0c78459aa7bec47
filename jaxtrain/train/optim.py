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
  """lr(step) for `cfg` (the optim config section) over a run of `total_steps` train steps, `step` being the
  0-based index of the train step (the state's step counter before the step: skipped steps count).

  Warmup: w = min(warmup_steps, total_steps) (a warmup longer than the run is clamped to it, see
  `warmup_note`); step i < w uses lr*(i+1)/w, so step 0 already moves and step w-1 is the first at the peak.
  Then constant holds the peak; linear and cosine go from the peak at step w to lr*min_lr_ratio at step
  total_steps-1, the last trained step; wsd holds the peak and decays over the last
  D = max(1, round(decay_fraction*total_steps)) steps with shape linear, cosine or sqrt (1 - sqrt(u)),
  u = (step - (total_steps-1-D)) / D, so the last step is at the floor. Where warmup leaves no step to decay
  in (w >= total_steps-1), the run ends at the end of its warmup instead.
  """
  peak, floor = float(cfg.lr), float(cfg.min_lr_ratio)
  warmup = min(int(cfg.warmup_steps), total_steps)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={cfg.schedule!r}; valid: {SCHEDULES}')
  last = total_steps - 1  # the index of the last trained step: it trains at the floor
  decay_steps = max(1, round(float(cfg.decay_fraction) * total_steps))
  decay_start = last - decay_steps  # the last step at the peak (u = 0)

  def shape(u: jax.Array) -> jax.Array:  # 1 -> 0 as u goes 0 -> 1
    if cfg.decay_shape == 'cosine':
      return 0.5 * (1 + jnp.cos(jnp.pi * u))
    if cfg.decay_shape == 'sqrt':
      return 1 - jnp.sqrt(u)
    return 1 - u

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    span = max(1, last - warmup)
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


def warmup_note(cfg: Any, total_steps: int) -> str | None:
  """The line a run prints at its start when `optim.warmup_steps` is longer than its `total_steps` and is
  clamped to them (`make_schedule`), else None."""
  if cfg.warmup_steps <= total_steps:
    return None
  return (f'note: optim.warmup_steps={cfg.warmup_steps} is longer than the {total_steps} steps of this run; '
          f'warming up over all {total_steps} (the run ends at the peak lr)')


def check(cfg: Any) -> None:
  """The `optim` section's rules (single-key ranges: `jaxtrain.config.schema`): the schedule and decay shape and
  a `no_decay` that compiles. Raises ConfigError. A warmup longer than the run is clamped, not refused
  (`make_schedule`, `warmup_note`)."""
  for key, options in (('schedule', SCHEDULES), ('decay_shape', DECAY_SHAPES)):
    if cfg[key] not in options:
      raise ConfigError(f'optim.{key}', cfg[key], f'must be one of {", ".join(options)}')
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


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` run on float32 copies of the gradients and parameters, so the state it keeps (Adam's moments) and
  the updates it returns are float32 whatever the parameters are stored in (`optax.apply_updates` casts each
  update back to its parameter's dtype)."""
  tx = optax.with_extra_args_support(tx)

  def f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
    return tx.update(f32(updates), state, None if params is None else f32(params), **extra_args)

  return optax.GradientTransformationExtraArgs(lambda params: tx.init(f32(params)), update)


def scale_by_step_schedule(schedule: Callable[[Any], jax.Array]) -> optax.GradientTransformationExtraArgs:
  """Multiplies the updates by -schedule(step), `step` being the train step the caller passes
  (`tx.update(..., step=state['step'])`, as `steps.make_train_step` does). Keeps no counter of its own, so the
  lr follows the train step count, skipped steps included."""

  def update(updates: Any, state: Any, params: Any = None, *, step: Any = None, **extra_args: Any):
    del params, extra_args
    if step is None:
      raise TypeError('this optimizer takes the train step: tx.update(grads, opt_state, params, step=step)')
    lr = schedule(step)
    return jax.tree.map(lambda u: -lr * u, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformationExtraArgs, Callable]:
  """(optax transform, schedule) for the optim config section: global-norm clipping, then AdamW (the same
  updates as `optax.adamw`) with the learning rate lr = schedule(step).

  One step counter drives the lr: the transform's `update` takes the train step (`step=state['step']`) and
  keeps no schedule counter of its own, so a skipped non-finite step consumes its schedule step like any other
  (the logged `lr` is the applied one). Adam's bias correction counts the updates actually applied. The
  optimizer state (Adam's moments) is float32 whatever `model.param_dtype` is (`in_float32`).
  """
  schedule = make_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.no_decay))]
  return optax.chain(in_float32(optax.chain(*parts)), scale_by_step_schedule(schedule)), schedule
