"""Validation of a run's ConfigDict before anything is written: `prepare(config, workdir)`.

This module only orchestrates; the rules live with what they configure. `schema.check` (unknown keys,
types) runs first, then `resolve.resolved` (init.from_hf's architecture, on a copy), then the single-key
tables (`schema.check_ranges`) and each feature's own `check`, then the files. Every problem becomes a
`ConfigError` (or a `DataError`) whose one line names the key, the offending value and what would be valid;
the command line prints it and exits with status 2, the library raises it unchanged. Nothing here changes
the config it is given.
"""

from __future__ import annotations

import os
import tempfile

import ml_collections

from jaxtrain.config import resolve, schema
from jaxtrain.errors import ConfigError


def prepare(config: ml_collections.ConfigDict, workdir: str,
            num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Schema, resolution and every check, cheapest first; returns the resolved config (a new one, locked like
  `config`), which is what the run uses and writes to WORKDIR/config.json. `num_devices`: jax.device_count()
  when None. Cheap and idempotent: preparing its result again returns an equal config. Raises ConfigError."""
  schema.check(config)
  out = resolve.resolved(config)
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  check_values(out, num_devices)
  check_paths(out, workdir)
  return out


def check_values(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Choices, ranges and cross-field rules of a (resolved) config: the tables, then each feature's `check`."""
  # Imported here: the features import the training stack, which itself calls `prepare` (train.loop).
  from jaxtrain import sharding
  from jaxtrain.adapters import lora
  from jaxtrain.models import validate as model_rules
  from jaxtrain.stackwise import plan as stackwise
  from jaxtrain.train import budget, curriculum, earlystop, optim, recorder
  schema.check_ranges(cfg)
  model_rules.check(cfg.model, cfg.data.seq_len)
  sharding.check(cfg.mesh, cfg.data.batch_size, cfg.train.accum_steps, num_devices)
  optim.check(cfg.optim)
  lora.check(cfg.lora, bool(cfg.init.lora_from))
  budget.check(cfg.estimate)
  stackwise.check(cfg)
  curriculum.check(cfg)
  recorder.check(cfg.provenance)
  earlystop.check(cfg)


def check_paths(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Workdir writable, the adapter to start from present, the data files there (`jaxtrain.data.validate`).
  (init.from_hf is read by `resolve.resolved`.)"""
  from jaxtrain.data import validate as data_rules
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError('workdir', workdir, 'exists and is not a directory')
  parent = os.path.abspath(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, /proc)
    os.rmdir(tempfile.mkdtemp(prefix='.jaxtrain-probe-', dir=parent))
  except OSError as e:
    raise ConfigError('workdir', workdir, f'cannot be created or written ({parent}: {e.strerror})') from None
  if cfg.init.lora_from and not os.path.isfile(os.path.join(cfg.init.lora_from, 'adapter_config.json')):
    raise ConfigError('init.lora_from', cfg.init.lora_from, 'must be a local directory holding adapter_config.json')
  data_rules.check(cfg.data)
