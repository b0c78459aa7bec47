"""Early stopping on a logged eval metric, and the best checkpoint by it (`train.early_stop`).

The decision is a pure function of the run's evaluations so far: `update(settings, tracker, step, value)` folds one
evaluation into a `Tracker` (the best value and its step, evaluations without improvement, and why to stop, if the
rule says so now). An improvement is a value better than the best by more than nothing and by at least
`min_delta` (so a flat metric never improves); the best moves only on an improvement, and `patience`
evaluations without one stop the run; `target` stops it at the first evaluation that reaches it.

A resumed run replays its evaluations from metrics.jsonl (`replay`): no state of its own to save, and a resume
with other settings (a larger patience, another metric) judges the same history by the new rule. The best
checkpoint is kept whatever checkpoint.keep says (`Checkpointer(keep_also=...)`), and WORKDIR/checkpoints/
early_stop.json records it, and a stop, for tools without JAX: `best_step(workdir)`, `read(workdir)`. A rerun of
a run that stopped early does not train further while train.steps and train.early_stop are those it stopped
with (`already_stopped`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from typing import Any

from jaxtrain import paths
from jaxtrain.errors import ConfigError, UserError

MODES = ('min', 'max')
# The eval metrics a rule may watch: per-token figures of every evaluation (eval_tokens counts, eval_flops and
# eval_tflops_per_s measure cost), each also per named set as METRIC/NAME; masked StackWise objectives add theirs.
METRICS = ('eval_loss', 'eval_ppl')
MASKED_METRICS = ('eval_masked_ce',)


class NoBestError(UserError):
  """`--best` for a run that recorded no best checkpoint (or whose best checkpoint is gone)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """`train.early_stop`: `metric` ('' = off), `mode` (min | max), `patience` (evaluations without improvement
  that stop the run; 0: never), `min_delta` (the least improvement that counts), `target` (None: none)."""

  metric: str = ''
  mode: str = 'min'
  patience: int = 0
  min_delta: float = 0.0
  target: float | None = None

  @classmethod
  def from_config(cls, config: Any) -> Settings:
    e = config.train.early_stop
    return cls(str(e.metric), str(e.mode), int(e.patience), float(e.min_delta),
               None if e.target is None else float(e.target))

  @property
  def enabled(self) -> bool:
    return bool(self.metric)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Tracker:
  """The rule's state after some evaluations: the best value and its step (None before the first), the
  evaluations since the last improvement, whether the last one improved, and `reason`: why to stop after the
  last evaluation (one line), or None."""

  best: float | None = None
  best_step: int | None = None
  bad: int = 0
  improved: bool = False
  reason: str | None = None

  def best_record(self, metric: str) -> dict | None:
    """{'metric', 'value', 'step'} of the best evaluation, or None before the first."""
    return None if self.best_step is None else {'metric': metric, 'value': self.best, 'step': self.best_step}


def update(s: Settings, t: Tracker, step: int, value: float) -> Tracker:
  """`t` after the evaluation of `s.metric` at `step` gave `value` (pure). A non-finite value never improves."""
  sign = 1.0 if s.mode == 'min' else -1.0
  gain = math.inf if t.best is None else sign * (t.best - value)  # > 0: better than the best
  improved = math.isfinite(value) and gain > 0 and gain >= s.min_delta
  best, best_step = (value, step) if improved else (t.best, t.best_step)
  bad = 0 if improved else t.bad + 1
  reason = None
  if s.target is not None and math.isfinite(value) and sign * (value - s.target) <= 0:
    reason = (f'{s.metric} {value:.6g} at step {step} reached train.early_stop.target={s.target:g} '
              f'(mode {s.mode})')
  elif s.patience and bad >= s.patience:
    by = f' by train.early_stop.min_delta={s.min_delta:g} or more' if s.min_delta else ''
    reason = (f'{s.metric} did not improve on its best {best:.6g} (step {best_step}){by} in {bad} '
              f'evaluation{"s" if bad > 1 else ""} (train.early_stop.patience={s.patience}, mode {s.mode})')
  return Tracker(best, best_step, bad, improved, reason)


def replay(s: Settings, records: Iterable[dict]) -> Tracker:
  """The tracker after the evaluations among `records` (metrics.jsonl rows, in order) that logged `s.metric`."""
  t = Tracker()
  for r in records:
    if s.metric in r:
      t = update(s, t, int(r['step']), float(r[s.metric]))
  return t


def valid_metrics(config: Any) -> list[str]:
  """The eval metrics `config`'s evaluations log that a rule may watch: `METRICS` (+ the masked objectives'),
  each also as METRIC/NAME for every named set of data.eval_sets."""
  from jaxtrain.data import evalsets  # names only; checked, with the globs, by the data section's own check

  base = list(METRICS)
  if config.stackwise.num_stacks and config.objective.kind in ('mlm', 'diffusion'):
    base += MASKED_METRICS
  names = [n for n, _ in evalsets.parse(config.data.eval_sets)] if config.data.eval_sets else []
  return base + [f'{m}/{n}' for n in names for m in base]


def check(config: Any) -> None:
  """The rules `schema`'s tables cannot state: a metric the run logs, a finite target, an evaluation to stop at.
  (mode, patience >= 0 and min_delta >= 0 are in `jaxtrain.config.schema`'s tables.)"""
  e = config.train.early_stop
  if e.target is not None and (isinstance(e.target, bool) or not isinstance(e.target, (int, float))
                               or not math.isfinite(e.target)):
    raise ConfigError('train.early_stop.target', e.target, 'must be a finite number, or None for no target')
  if not e.metric:
    if e.target is not None:
      raise ConfigError('train.early_stop.metric', e.metric, "is empty (off) but train.early_stop.target is set; "
                        "name the metric the target is for, e.g. 'eval_loss'")
    return
  valid = valid_metrics(config)
  if e.metric not in valid:
    raise ConfigError('train.early_stop.metric', e.metric, f'is not an eval metric this run logs; valid: '
                      f"{', '.join(valid)} ('' = off; METRIC/NAME needs NAME in data.eval_sets)")
  if not config.train.eval_every:
    raise ConfigError('train.early_stop.metric', e.metric, 'is set but train.eval_every=0 evaluates only at the '
                      'end: set train.eval_every to the steps between the evaluations the rule judges')


# ----------------------------------------------------------------------------- the record on disk


def record_path(workdir: str) -> str:
  return os.path.join(workdir, paths.CHECKPOINTS, paths.EARLY_STOP)


def read(workdir: str) -> dict | None:
  """WORKDIR/checkpoints/early_stop.json: {'settings', 'best': {'metric', 'value', 'step'} | None, 'stopped':
  {'step', 'reason', 'steps', 'settings'} | None}; None when absent or unreadable. Needs no JAX."""
  try:
    with open(record_path(workdir), encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def write(workdir: str, record: dict) -> None:
  """Replaces the record atomically (a reader never sees half of it)."""
  path = record_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def best_step(workdir: str) -> int | None:
  """The step of the run's best checkpoint by its train.early_stop.metric, or None when none was recorded or
  its checkpoint no longer exists. Reads the record and a directory listing only (no JAX)."""
  best = (read(workdir) or {}).get('best') or {}
  step = best.get('step')
  if not isinstance(step, int) or not os.path.isdir(os.path.join(workdir, paths.CHECKPOINTS, str(step))):
    return None
  return step


def best_checkpoint(workdir: str, saved: list[int], flag: str = '--best') -> int:
  """The step `--best` names among the `saved` checkpoint steps; NoBestError (one line) when there is none."""
  step = best_step(workdir)
  if step is not None and step in saved:
    return step
  best = (read(workdir) or {}).get('best')
  available = ', '.join(map(str, saved)) or 'none'
  if best:
    raise NoBestError(flag, valid=f"the best checkpoint of {workdir} ({best['metric']} {best['value']:.6g}, step "
                      f"{best['step']}) is no longer in {workdir}/checkpoints; choose --step=N (available: "
                      f'{available})')
  raise NoBestError(flag, valid=f'{workdir} recorded no best checkpoint (it trained without '
                    'train.early_stop.metric); choose --step=N (available: '
                    f'{available}), or train with --config.train.early_stop.metric=eval_loss')


def already_stopped(record: dict | None, s: Settings, start: int, steps: int) -> str | None:
  """The reason a run stopped early, when it did so at `start` (the step it resumes from) with these settings
  and this many train.steps: a rerun of the same command then trains no further. None otherwise."""
  stopped = (record or {}).get('stopped')
  if not stopped or not s.enabled:
    return None
  same = stopped.get('step') == start and stopped.get('steps') == steps and stopped.get('settings') == s.as_dict()
  return stopped.get('reason') if same else None


# ----------------------------------------------------------------------------- the loop's side


class Watch:
  """What the training loop holds: the rule's settings and tracker, and the record it keeps on disk (process 0
  writes it; every process decides alike, from the same evaluations)."""

  def __init__(self, s: Settings, workdir: str, primary: bool):
    self.s, self.workdir, self.primary = s, workdir, primary
    self.tracker = Tracker()
    self.logged: dict[str, float] | None = None  # an already-stopped run's evaluation at its stop

  def keep(self) -> int | None:
    """The checkpoint step to keep besides the newest (the best so far); a `Checkpointer`'s `keep_also`."""
    return self.tracker.best_step if self.s.enabled else None

  def resume(self, records: list[dict], start: int, steps: int) -> str | None:
    """Replays `records` (metrics.jsonl, as kept for a resume from `start`) and records the best they give. The
    reason the run stopped early, when a rerun of the same command finds it stopped at `start` (it then trains
    no further; `logged` holds that evaluation); else None."""
    if not self.s.enabled:
      return None
    self.tracker = dataclasses.replace(replay(self.s, records), improved=False, reason=None)
    record = read(self.workdir) if self.primary else None
    reason = already_stopped(record, self.s, start, steps)
    import jax  # deferred: the rest of this module (what tools read) needs no JAX
    if jax.process_count() > 1:  # only process 0 reads the files; the others follow it
      reason = _broadcast_stop(self, reason)
    if reason:
      self.logged = next((_eval_values(r) for r in reversed(records) if r['step'] == start and self.s.metric in r),
                         None)
    elif self.primary and record != self._record(None):
      write(self.workdir, self._record(None))  # the best under these settings; no stop (any earlier one is over)
    return reason

  def update(self, step: int, values: dict[str, float]) -> Tracker | None:
    """The tracker after an evaluation (None when the rule is off)."""
    if not self.s.enabled:
      return None
    self.tracker = update(self.s, self.tracker, step, float(values[self.s.metric]))
    return self.tracker

  def note(self, stopped: dict | None = None) -> None:
    """Writes the record (process 0): after a checkpoint of a new best was started, or at a stop."""
    if self.primary:
      write(self.workdir, self._record(stopped))

  def best(self) -> dict | None:
    return self.tracker.best_record(self.s.metric) if self.s.enabled else None

  def _record(self, stopped: dict | None) -> dict:
    return {'settings': self.s.as_dict(), 'best': self.best(), 'stopped': stopped}

  def stop_record(self, step: int, reason: str, steps: int) -> dict:
    return {'step': step, 'reason': reason, 'steps': steps, 'settings': self.s.as_dict()}


def _eval_values(record: dict) -> dict[str, float]:
  return {k: float(v) for k, v in record.items() if k.startswith('eval_')}


def _broadcast_stop(watch: Watch, reason: str | None) -> str | None:
  """Process 0's answer (stopped or not) for every process; the tracker is replayed alike from the same rows
  where the processes share the file system, and process 0's is taken where they do not."""
  import numpy as np
  from jax.experimental import multihost_utils

  t = watch.tracker
  mine = np.array([float(bool(reason)), -1.0 if t.best_step is None else float(t.best_step),
                   np.nan if t.best is None else t.best, float(t.bad)], np.float64)
  got = np.asarray(multihost_utils.broadcast_one_to_all(mine))
  watch.tracker = Tracker(None if np.isnan(got[2]) else float(got[2]), None if got[1] < 0 else int(got[1]),
                          int(got[3]))
  return (reason or 'stopped early (process 0 read why)') if got[0] else None
