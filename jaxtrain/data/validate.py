"""The `data` section's files, checked before a run writes anything: the tokenizer, every source's globs and
its train/eval split, the mixture weights, the blocklists and the named eval sets. Raises ConfigError (a glob
that matches no file) or DataError (a split or mixture that cannot work)."""

from __future__ import annotations

import glob
import os
from typing import Any

from jaxtrain.data import evalsets, mixing, sources
from jaxtrain.errors import ConfigError


def check(d: Any) -> None:
  """`d`: the data section."""
  if d.tokenizer and not os.path.exists(d.tokenizer):
    raise ConfigError('data.tokenizer', d.tokenizer, 'does not exist; give a tokenizer.json, a tokenizer '
                      "directory, or '' to build one on the train data")
  specs = sources.source_specs(d)
  if not d.temperature:  # weights are checked now; token counts (for a temperature) need the data
    mixing.mixture_weights({s.name: 1 for s in specs}, {s.name: s.weight for s in specs}, None)
  for spec in specs:
    for key, value in zip(spec.view.config_keys[:2], (spec.view.train, spec.view.eval), strict=True):
      if not value or value == 'stdlib':
        continue
      for pattern in value.split(','):
        if not glob.glob(os.path.expanduser(pattern.strip()), recursive=True):
          raise ConfigError(key, value, f'pattern {pattern.strip()!r} matches no file')
    for split in ('train', 'eval'):  # e.g. an eval_fraction that leaves no eval file: fail now, not at the end
      sources.list_files(spec.view, split)
  for path in (p.strip() for p in d.exclude.split(',') if p.strip()):
    if not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError('data.exclude', d.exclude, f'file {path!r} does not exist; expected comma-separated '
                        'blocklist files (written by `jaxtrain blocklist`)')
  evalsets.parse(d.eval_sets)  # names and globs; the files are read before the run writes (train.loop.check_data)
