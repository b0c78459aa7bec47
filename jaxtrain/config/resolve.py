"""Explicit config steps that derive values, kept out of validation (which never changes a config)."""

from __future__ import annotations

import copy
import os

import ml_collections

from jaxtrain.errors import ConfigError


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` (locked like it) with `init.from_hf` applied: the architecture from the checkpoint's
  config.json (model keys overwritten) and the tokenizer from its directory unless data.tokenizer names one.
  The safetensors headers are checked against that architecture, so a missing, unknown or mis-shaped tensor
  fails before anything is written. Without init.from_hf, an unchanged copy. Idempotent. Raises ConfigError."""
  out = copy.deepcopy(config)
  where = out.init.from_hf
  if not where:
    return out
  if not os.path.isfile(os.path.join(where, 'config.json')):
    raise ConfigError('init.from_hf', where, 'must be a local directory holding config.json and *.safetensors')
  # Only runs that import a checkpoint pay for reading it.
  from jaxtrain import models
  from jaxtrain.hf import config as hf_config, weights as hf_weights
  try:
    hf_config.apply_overrides(out)
    hf_weights.check_weights(where, models.model_config(out.model, out.model.vocab_size))
  except hf_config.HfError as e:
    raise ConfigError('init.from_hf', where, str(e)) from None
  return out
