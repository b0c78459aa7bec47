"""Context-length curriculum: an attention window that widens from short to long during training (SkyLadder).

Early steps let a token attend only to the last `start` tokens of its own document; over the first `fraction`
of training the window grows to `data.seq_len`, after which the model is the normal one. The rows, packing
and loss stay the same throughout: only the attention mask changes, and it is the model's own sliding-window
mask (`transformer.attention_mask`, `model.sliding_window` semantics: a query sees keys less than `window`
positions back, itself included, within its segment). Blocked causal attention (`model.attention_block`,
128 on CPU) then skips the key blocks that fall outside the window, and `metrics.flops_per_token` counts
the keys a query actually sees, so MFU and the FLOPs totals follow the window.

Shapes of the raw schedule, with p = min(step / (fraction * (total - 1)), 1), s = start, L = seq_len (the
step is 0-based, so fraction = 1 reaches L on the last step):
  linear  s + (L - s) p
  cosine  s + (L - s) (1 - cos(pi p)) / 2       (slow at both ends)
  step    linear, held for `steps_per_stage` steps at a time from each stage's first step (0: the ramp
          split into max_variants - 1 equal stages, which after quantisation equals the quantised linear)

Bounded compilation: a window is a static part of the compiled program (it fixes which keys a block reads),
so every distinct window is one compiled train step. The raw schedule is therefore quantised to at most
`max_variants` levels spaced evenly between s and L (both included), rounding down: the quantised window
never exceeds the raw one, stays within (L - s) / (max_variants - 1) of it, and reaches L exactly where the
ramp ends. Even spacing (rather than powers of two) keeps the attention work, which grows with the window,
close to the schedule's plan. Each level's step is built and compiled the first time the schedule reaches
it, so a resumed run compiles only what it still needs; the last level is the run's ordinary train step
object, so the end of training runs exactly the program a run without a curriculum runs.

The window is a pure function of the step, so checkpoints need nothing new: a resumed run picks the window
of its next step. Evaluation always uses the full window (the model being trained for).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from jaxtrain.errors import ConfigError
from jaxtrain.models import ModelConfig

KINDS = ('none', 'linear', 'cosine', 'step')

# Slack when comparing the float schedule with integer levels, so a level the formula hits exactly
# (cos(pi/3) = 0.5000000000000001) is not lost to rounding.
_EPS = 1e-6


def _problem(kind: str, start: int, seq_len: int, fraction: float, steps_per_stage: int,
             max_variants: int) -> tuple[str, Any, str] | None:
  """(key, value, what is valid) of the first curriculum setting that cannot work, else None."""
  if kind not in KINDS:
    return 'curriculum.kind', kind, f'must be one of {", ".join(KINDS)}'
  if start < 1:
    return 'curriculum.start', start, 'must be > 0'
  if kind != 'none' and start > seq_len:
    return 'curriculum.start', start, f'must be <= data.seq_len={seq_len}'
  if not 0 < fraction <= 1:
    return 'curriculum.fraction', fraction, 'must be in (0, 1]: the share of train.steps spent widening'
  if steps_per_stage < 0:
    return ('curriculum.steps_per_stage', steps_per_stage,
            'must be >= 0 (0: the ramp split into max_variants - 1 stages)')
  if max_variants < 2:
    return ('curriculum.max_variants', max_variants,
            'must be >= 2 (a short window and the full one; each distinct window compiles one train step)')
  return None


def check(config: Any) -> None:
  """The `curriculum` section of a run config (with `data.seq_len`): the schedule's settings, and plain
  decoder runs only. Raises ConfigError."""
  c = config.curriculum
  problem = _problem(c.kind, c.start, config.data.seq_len, c.fraction, c.steps_per_stage, c.max_variants)
  if problem:
    raise ConfigError(*problem)
  if c.kind != 'none' and config.stackwise.num_stacks:
    raise ConfigError('curriculum.kind', c.kind, "applies to plain decoder runs; use 'none' with "
                      f'stackwise.num_stacks = {config.stackwise.num_stacks}')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The window schedule of one run: `kind` from `start` to `seq_len` over the first `fraction` of `total`
  steps, quantised to at most `max_variants` windows (see the module docstring)."""

  kind: str
  start: int
  seq_len: int
  total: int
  fraction: float = 0.5
  steps_per_stage: int = 0
  max_variants: int = 4

  def __post_init__(self):
    problem = _problem(self.kind, self.start, self.seq_len, self.fraction, self.steps_per_stage, self.max_variants)
    if problem:
      raise ConfigError(*problem)

  @classmethod
  def of(cls, config: Any) -> Schedule:
    """From a run config: its `curriculum` section, `data.seq_len` and `train.steps`."""
    c = config.curriculum
    return cls(c.kind, c.start, config.data.seq_len, config.train.steps, c.fraction, c.steps_per_stage,
               c.max_variants)

  @property
  def ramp(self) -> float:
    """The step (0-based, maybe fractional) from which the window is `seq_len`: measured on the last step's
    index, total - 1, so that fraction = 1 still trains the last step with the full window."""
    return self.fraction * (self.total - 1)

  @property
  def stage_steps(self) -> float:
    """Steps a `step` schedule holds each window; auto (0) may be fractional, so that stage i starts at
    the first step at or after i / (max_variants - 1) of the ramp and the last stage starts where it ends."""
    return self.steps_per_stage or self.ramp / (self.max_variants - 1)

  def raw(self, step: int) -> float:
    """The unquantised window before step `step` (0-based) runs."""
    if self.kind == 'none':
      return float(self.seq_len)
    if self.kind == 'step':
      step = math.floor(step / self.stage_steps + _EPS) * self.stage_steps
    p = min(max(step, 0) / self.ramp, 1.0) if self.ramp > 0 else 1.0
    if self.kind == 'cosine':
      p = (1 - math.cos(math.pi * p)) / 2
    return self.start + (self.seq_len - self.start) * p

  def levels(self) -> tuple[int, ...]:
    """The windows the schedule may take, increasing, `seq_len` last: at most `max_variants` of them."""
    if self.kind == 'none' or self.start == self.seq_len:
      return (self.seq_len,)
    span, v = self.seq_len - self.start, self.max_variants - 1
    return tuple(sorted({self.start + span * i // v for i in range(v + 1)}))

  def window(self, step: int) -> int:
    """The attention window step `step` trains with: the largest level not above the raw schedule."""
    levels = self.levels()
    return levels[max(bisect.bisect_right(levels, self.raw(step) + _EPS) - 1, 0)]

  def segments(self) -> list[tuple[int, int, int]]:
    """(first step, end step, window) of each window the run uses, in order; together they cover
    [0, total). The schedule never narrows, so each level's first step is found by bisection."""
    firsts = [(bisect.bisect_left(range(self.total), level, key=self.window), level) for level in self.levels()]
    firsts = [(first, level) for first, level in firsts if first < self.total and self.window(first) == level]
    ends = [first for first, _ in firsts[1:]] + [self.total]
    return [(first, end, level) for (first, level), end in zip(firsts, ends, strict=True)]


def window(step: int, total: int, cfg: Any) -> int:
  """The attention window of step `step` (0-based) of a `total`-step run configured by `cfg` (a run config
  with `curriculum` and `data` sections); `data.seq_len` when the curriculum is off."""
  c = cfg.curriculum
  return Schedule(c.kind, c.start, cfg.data.seq_len, total, c.fraction, c.steps_per_stage, c.max_variants).window(step)


def enabled(config: Any) -> bool:
  """Whether `config` asks for a curriculum (configs from before the section existed do not)."""
  return 'curriculum' in config and config.curriculum.kind != 'none'


def window_config(mc: ModelConfig, window_size: int, seq_len: int) -> ModelConfig:
  """The model a step with this window runs: `mc` itself at the full window, else `mc` with a sliding window
  (the narrower one if the model has its own)."""
  if window_size >= seq_len:
    return mc
  own = mc.sliding_window
  return dataclasses.replace(mc, sliding_window=min(window_size, own) if own else window_size)


class Variants:
  """The train steps of a curriculum run, one per window, chosen by the host step: the `loop.StepChoice` of
  its `Job`.

  `make_step(model_config)` builds a jitted `train_step(state, batch)` for a model config; it is called once
  per window, the first time the schedule reaches it. `full_step`, the run's ordinary step, serves the full
  window. `flops(model_config)` is the model FLOPs per trained token of a step with that model.
  `_cache_size()` adds up the compiled programs of every variant, as `jax.jit`'s own does for one.
  """

  def __init__(self, schedule: Schedule, mc: ModelConfig, make_step: Callable[[ModelConfig], Any],
               flops: Callable[[ModelConfig], float], full_step: Any = None):
    self.schedule, self.mc = schedule, mc
    self._make_step, self._steps = make_step, {}
    if full_step is not None:
      self._steps[schedule.seq_len] = full_step
    self._flops = {w: flops(window_config(mc, w, schedule.seq_len)) for w in schedule.levels()}
    self._segments = schedule.segments()

  def window(self, step: int) -> int:
    """The window of step `step` (0-based)."""
    return self.schedule.window(step)

  def at(self, step: int) -> Any:
    """The jitted train step to run as step `step` (0-based)."""
    w = self.window(step)
    if w not in self._steps:
      self._steps[w] = self._make_step(window_config(self.mc, w, self.schedule.seq_len))
    return self._steps[w]

  def segment_end(self, step: int) -> int:
    """The first step after step `step` (0-based) that runs at another window, or the run's end."""
    return next(end for first, end, _ in self._segments if first <= step < end)

  def flops_per_token(self, step: int) -> float:
    """Model FLOPs per token of step `step` (0-based), at its window."""
    return self._flops[self.window(step)]

  def flops_total(self, steps: int) -> float:
    """Model FLOPs per token-position summed over steps [0, steps): multiply by tokens per step."""
    return sum(max(0, min(end, steps) - first) * self._flops[w] for first, end, w in self._segments)

  def step_metrics(self, step: int) -> dict[str, int]:
    """Logged with step `step` (0-based): its attention window."""
    return {'attn_window': self.window(step)}

  def built_windows(self) -> tuple[int, ...]:
    """The windows whose step exists so far (the full one from the start when given)."""
    return tuple(sorted(self._steps))

  def _cache_size(self) -> int:
    return sum(step._cache_size() for step in self._steps.values())  # pylint: disable=protected-access


def variants(config: Any, mc: ModelConfig, full_step: Any, make_step: Callable[[ModelConfig], Any],
             flops: Callable[[ModelConfig], float]) -> Variants:
  """`Variants` for a run config (see the class); `full_step` is the step a run without a curriculum uses."""
  return Variants(Schedule.of(config), mc, make_step, flops, full_step)
