"""Blocklists: files of document ids (one per line, '#' comments) that `data.exclude` keeps out of training,
as written by `jaxtrain blocklist` from a run's loss-spike dumps."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxtrain.data.sources import DataError


def load_blocklist(paths: str | Sequence[str]) -> set[str]:
  """The document ids of blocklist files (a comma-separated string or a list); '#' lines and blanks skipped."""
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(',') if p.strip()]
  out: set[str] = set()
  for path in (os.path.expanduser(p) for p in paths):
    if not os.path.isfile(path):
      raise DataError('data.exclude', path, 'is not a file', 'expected comma-separated blocklist files, as '
                      'written by `jaxtrain blocklist`')
    with open(path, encoding='utf-8') as f:
      out.update(line.strip() for line in f if line.strip() and not line.lstrip().startswith('#'))
  return out
