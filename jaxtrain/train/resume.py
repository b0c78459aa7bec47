"""Whether a run directory can be resumed by this config, checked before anything in it is touched.

A rerun of a workdir resumes from its newest checkpoint. That is only right when the checkpoints were trained
with the same config, up to the keys that may change on a resume (`RESUMABLE_KEYS`: how long to train, how
often to log, evaluate and save, what to evaluate and stop on, execution choices). `check` compares the run's
config with the saved WORKDIR/config.json, and the run's abstract state with the tree the newest readable
checkpoint holds (orbax metadata: paths, shapes, dtypes; no array is read); a difference raises
`checkpoint.ResumeError`, one line naming the first differing key or parameter path with both values.
`start_over` moves the old run's history (checkpoints, metrics, samples, spikes, with its config.json and
tokenizer: `paths.HISTORY`) into WORKDIR/old-<time>/ so the run trains from step 0 and the old one stays a run
directory of its own.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from jaxtrain import paths
from jaxtrain.config.defaults import base_config
from jaxtrain.train.checkpoint import (HOW_TO_PROCEED, ResumeError, check_data_state, check_format, check_state,
                                       step_dirs)

# Config keys (glob patterns over dotted keys) that may differ from the config the checkpoints were trained
# with; every other key must be equal for a resume.
RESUMABLE_KEYS = (
    'train.steps', 'train.eval_every', 'train.eval_batches', 'train.max_bad_steps', 'train.steps_per_call',
    'train.early_stop.*', 'data.eval_sets',  # what is evaluated and judged, not what trains
    'checkpoint.*', 'log.*', 'provenance.*', 'estimate.*', 'sample.*', 'distributed.*',
    'mesh.*',  # restores reshard onto the run's mesh
    # How, not what, the model computes (the execution plan; parameters are layer-stacked either way).
    'data.prefetch', 'model.attention_impl', 'model.attention_block', 'model.remat', 'model.scan_layers',
    'model.compute_dtype',
)

_ABSENT = object()


def flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{dotted key: value} of a JSON config tree (nested dicts)."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def resumable(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def config_difference(saved: dict, config: ml_collections.ConfigDict,
                      fixed: Iterable[str] = ()) -> tuple[str, Any, Any] | None:
  """(key, saved value, this run's value) of the first key outside `RESUMABLE_KEYS` that differs between a
  saved config.json and `config` (compared as JSON); None when none does. A key the saved config lacks
  (written before the key existed) counts as its default. `fixed`: resumable keys this job still cannot change
  (a StackWise rack's stage lengths follow train.steps)."""
  defaults = flat(json.loads(base_config().to_json_best_effort()))
  old = flat(saved)
  now = flat(json.loads(config.to_json_best_effort()))
  for key, value in now.items():
    before = old.get(key, defaults.get(key, _ABSENT))
    if before != value and (key in fixed or not resumable(key)):
      return key, before, value
  for key, before in old.items():  # keys this config lacks: a source taken out of data.sources, ...
    if key not in now and key not in defaults and not resumable(key):
      return key, before, _ABSENT
  return None


def _absent_section(key: str, keys: Iterable[str]) -> str:
  """The shortest dotted prefix of `key` that no key of `keys` has: `data.sources.chat` for a whole source."""
  parts = key.split('.')
  for n in range(1, len(parts) + 1):
    prefix = '.'.join(parts[:n])
    if not any(k == prefix or k.startswith(prefix + '.') for k in keys):
      return prefix
  return key


def _saved_config(workdir: str) -> dict | None:
  try:
    with open(paths.in_run(workdir, paths.CONFIG), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def check(config: ml_collections.ConfigDict, workdir: str, checkpoint_dirs: Iterable[str] = (paths.CHECKPOINTS,),
          abstract: Any = None, fixed: Iterable[str] = ()) -> None:
  """Raises ResumeError when `workdir` holds checkpoints (under any of `checkpoint_dirs`, relative to it)
  that this run cannot resume: newer format, another config (WORKDIR/config.json), or with `abstract`,
  another train state in the newest readable checkpoint of the first directory. Reads files only."""
  dirs = [os.path.join(workdir, d) for d in checkpoint_dirs]
  found = [d for d in dirs if step_dirs(d) or glob.glob(os.path.join(d, 'stage_*.json'))]  # + StackWise racks
  if not found:
    return
  for d in found:
    for step in step_dirs(d)[:1]:
      check_format(os.path.join(d, str(step)))
      check_data_state(os.path.join(d, str(step)))  # another process count, an older pipeline's position
  saved = _saved_config(workdir)
  diff = config_difference(saved, config, tuple(fixed)) if saved is not None else None
  if diff is not None:
    key, before, now = diff
    where = found[0] + (f' (and {len(found) - 1} more)' if len(found) > 1 else '')
    if now is _ABSENT:  # named by the outermost section this config lacks (a source taken out: its section)
      section = _absent_section(key, flat(json.loads(config.to_json_best_effort())))
      raise ResumeError(f'config.{section}', valid=f'is not set, but the checkpoints in {where} were trained with '
                        f'it ({key}={before!r}); resume with it, or {HOW_TO_PROCEED}')
    if before is _ABSENT:
      section = _absent_section(key, flat(saved))
      raise ResumeError(f'config.{section}', valid=f'is set, but the checkpoints in {where} were trained without '
                        f'it; resume without it, or {HOW_TO_PROCEED}')
    raise ResumeError(f'config.{key}', now, f'the checkpoints in {where} were trained with {key}={before!r}; '
                      f'resume with that value, or {HOW_TO_PROCEED}')
  if abstract is not None:
    for step in step_dirs(dirs[0]):  # the newest whose tree can be read decides; unreadable ones are corrupt
      if check_state(os.path.join(dirs[0], str(step)), abstract):
        return


def start_over(workdir: str, names: Iterable[str] = paths.HISTORY, say: Any = print) -> list[str]:
  """Moves each WORKDIR/<name> that exists into WORKDIR/old-<time>/ (process 0; all processes wait for it), so
  the run trains from step 0 and nothing of the old run is lost or mixed into the new one. Returns the new
  paths."""
  aside_dir = os.path.join(workdir, 'old-' + time.strftime('%Y%m%d-%H%M%S'))
  while os.path.exists(aside_dir):  # two start-overs within a second
    aside_dir += '+'
  moved = []
  for name in names:
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      moved.append(os.path.join(aside_dir, name))
  if moved and jax.process_index() == 0:
    os.makedirs(aside_dir)
    for aside in moved:
      os.rename(os.path.join(workdir, os.path.basename(aside)), aside)
    say(f'start_over: moved {", ".join(os.path.basename(m) for m in moved)} of the old run to {aside_dir}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxtrain-start-over')
  return moved
