"""A run directory, read back: the config the run trained with (every section, named sources included) and
the tokenizer it trained with (its own copy in WORKDIR/tokenizer/). Every command that reads a run goes
through here (`jaxtrain export`; `samples` and `blocklist` read only the files the recorder wrote), so a run
directory is self-contained: nothing is rebuilt from the corpus or read from the cache.

  config = rundir.load_config(workdir)
  tokenizer = rundir.load_tokenizer(config, workdir)    # WORKDIR/tokenizer/, else (older runs) rebuilt
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxtrain import data, paths
from jaxtrain.config.defaults import base_config
from jaxtrain.data import chat, tokenizer as tokenizer_lib
from jaxtrain.data.sources import source
from jaxtrain.errors import UserError


class RunDirError(UserError):
  """A directory that is not (or not yet) a jaxtrain run: the message is one line for the console."""


def load_config(workdir: str, error: type[UserError] = RunDirError) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, completely: on top of today's defaults (keys added since the run was trained keep
  their defaults), with every key the run saved, named data sources (`data.sources.NAME`, each completed
  with today's source defaults) and keys unknown today included. `error`: the UserError type to raise."""
  path = paths.in_run(workdir, paths.CONFIG)
  if not os.path.isdir(workdir):
    raise error(f'--workdir={workdir} does not exist')
  if not os.path.isfile(path):
    raise error(f'--workdir={workdir} has no config.json; expected the directory of a jaxtrain training run')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except ValueError as e:
    raise error(f'{path} is not readable JSON ({e}); expected the config.json a jaxtrain run writes') from None
  config = base_config()
  _merge(config, saved, '')
  return config


def _merge(node: ml_collections.ConfigDict, values: dict, where: str) -> None:
  for key, value in values.items():
    here = f'{where}.{key}' if where else key
    if key in node and isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(node[key], value, here)
    elif key in node:
      node[key] = value
    elif where == 'data.sources' and isinstance(value, dict):  # a named source: today's source defaults first
      node[key] = source(value.get('path', ''))
      _merge(node[key], value, here)
    else:  # a key today's defaults lack: kept, so that nothing the run saved is dropped
      node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def tokenizer_dir(workdir: str) -> str:
  """WORKDIR/tokenizer: the run's copy of the tokenizer it trained with."""
  return paths.in_run(workdir, paths.TOKENIZER)


def save_tokenizer(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str) -> str | None:
  """Keeps a copy of `tokenizer` (the one the run trains with) in WORKDIR/tokenizer/ as a Hugging Face
  tokenizer directory, with the run's chat template and EOS token (process 0; call after validation, when
  config.json is written). Returns the directory (None on other processes)."""
  import jax  # Deferred: reading a run needs no JAX.

  if jax.process_index() != 0:
    return None
  return tokenizer_lib.save_dir(tokenizer, tokenizer_dir(workdir), chat.run_template(config.data))


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                   say: Callable[[str], Any] | None = None) -> data.Tokenizer:
  """The tokenizer the run in `workdir` trained with: its copy in WORKDIR/tokenizer/. A run from before the
  copy existed gets `config.data`'s tokenizer (rebuilt from the corpus unless cached), noted in one line on
  stderr (or passed to `say`)."""
  directory = tokenizer_dir(workdir)
  if os.path.isdir(directory):
    return data.load_tokenizer(ml_collections.ConfigDict({'tokenizer': directory}))
  note = (f'note: {workdir} holds no copy of its tokenizer ({directory}: a run from before runs kept one); '
          'using the tokenizer its config names, rebuilt from its data if not cached')
  if say is None:
    print(note, file=sys.stderr, flush=True)
  else:
    say(note)
  return data.load_tokenizer(config.data)
