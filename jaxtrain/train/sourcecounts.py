"""The run's tokens per data source across processes and resumes: summed over processes, kept per checkpoint.

Each process counts its own rows (`data.pipeline.SourceTokens`); the logged `tokens/<source>` and
`epochs/<source>` and WORKDIR/source_tokens.json are the run's, summed over processes by a small allgather
that every process calls at the same steps (when a call's steps are logged and when a checkpoint is saved).
The saved counts are therefore global, and a resume with another process count (data.process_split='rows')
continues them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxtrain import paths


def sum_over_processes(counts: np.ndarray, rows: int = 1) -> np.ndarray:
  """`counts` (int64, shape (k, n)) summed elementwise over every process; each process must call it at the
  same point. `rows`: pad k up to this, so calls of up to `rows` steps share one shape (one compile)."""
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  k = len(counts)
  padded = np.zeros((max(rows, k), *counts.shape[1:]), np.int64)
  padded[:k] = counts
  # 31-bit halves as int32: JAX moves int64 only with x64 enabled, and token counts outgrow int32.
  halves = np.stack([padded >> 31, padded & (2**31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)  # (processes, 2, rows, n)
  return ((gathered[:, 0] << 31) + gathered[:, 1]).sum(axis=0)[:k]


def load(workdir: str, step: int) -> dict[str, int]:
  """The run's tokens per source up to checkpoint `step` (empty if that run did not record them)."""
  try:
    with open(paths.in_run(workdir, paths.SOURCE_TOKENS), encoding='utf-8') as f:
      return json.load(f).get(str(step), {})
  except (OSError, ValueError):
    return {}


def save(workdir: str, step: int, counts: dict[str, int], steps: list[int]) -> None:
  """WORKDIR/source_tokens.json: the run's tokens per source (all processes) at each kept checkpoint step
  `steps` and at `step`; process 0 writes it."""
  if jax.process_index():
    return
  path = paths.in_run(workdir, paths.SOURCE_TOKENS)
  try:
    with open(path, encoding='utf-8') as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  keep = {str(s) for s in steps} | {str(step)}
  table = {k: v for k, v in table.items() if k in keep} | {str(step): counts}
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(table, f)
  os.replace(path + '.tmp', path)
