"""The named sets `jaxtrain eval` scores, as host batches of the run's fixed shape [rows, seq_len].

A run's own sets are its sources' eval splits (`data.pipeline.load_sources(cfg.data, tokenizer, 'eval')`), one
per source and named by it. `--data=NAME=GLOB` adds files read as a source of the run would read them: in its
first source's format (text field; a chat run's messages field and chat template, so chat files get the run's
template and assistant-only loss mask), tokenized by the run's own tokenizer.

Each set's rows come from `data.make_dataset` (split 'eval': packed as training packs, in one fixed order),
which repeats a set endlessly. A set is read until every one of its seq_len pieces has been scored or the batch
budget is spent; a piece that comes round again (a set smaller than the budget) is masked out of the loss, so
nothing is scored twice and nothing is dropped unsaid: `EvalSet` says how much of the set was scored.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxtrain import data
from jaxtrain.data import evalsets, sources
from jaxtrain.evaluation import EvalError

_NAME = re.compile(r'[A-Za-z0-9_-]+')
# What the score function reads of a batch; `scored` marks the tokens of pieces scored for the first time.
KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask', 'scored')
# What a masked-objective rack reads besides: its masks and times are keyed by sample id (`objectives`).
MASK_KEYS = ('doc_ids', 'doc_chunks')


@dataclasses.dataclass(frozen=True)
class SetSpec:
  """A named set before it is read: `kind` 'source' (a run source's eval split), 'named' (one of the run's
  data.eval_sets) or 'extra' (--data files);
  `where` its files as the user would name them; `data_cfg` the data section whose sources are `srcs`."""

  name: str
  kind: str
  where: str
  chat: bool
  data_cfg: Any
  srcs: list


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """A set read into host batches ready to score. `pieces` / `set_tokens`: seq_len pieces and loss tokens of
  the whole set (a piece's first token has no prediction); `pieces_scored` of them are in `batches`;
  `repeats`: pieces that came round again in those batches (masked out: a set smaller than the budget)."""

  name: str
  kind: str
  where: str
  chat: bool
  batches: list[dict[str, np.ndarray]]
  pieces: int
  pieces_scored: int
  set_tokens: int
  repeats: int

  @property
  def complete(self) -> bool:
    return self.pieces_scored == self.pieces


def parse_data(values: Sequence[str]) -> list[tuple[str, str]]:
  """`--data=NAME=GLOB` values -> [(name, comma-separated globs)]; EvalError for a malformed value, a bad or
  repeated name, or a glob that matches no file."""
  out: list[tuple[str, str]] = []
  for value in values:
    name, sep, pattern = value.partition('=')
    name, pattern = name.strip(), pattern.strip()
    if not sep or not name or not pattern:
      raise EvalError('--data', value, "expected NAME=GLOB (e.g. --data=wiki='data/wiki/*.jsonl'; several globs "
                      'comma-separated)')
    if not _NAME.fullmatch(name):
      raise EvalError('--data', value, f'the set name {name!r} may hold only letters, digits, - and _')
    if name in (n for n, _ in out):
      raise EvalError('--data', value, f'names the set {name!r} twice; give each --data its own NAME')
    for one in (p.strip() for p in pattern.split(',') if p.strip()):
      if not any(os.path.isfile(m) for m in glob.glob(os.path.expanduser(one), recursive=True)):
        raise EvalError('--data', value, f'the glob {one!r} matches no file')
    out.append((name, pattern))
  return out


def run_sets(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer) -> list[SetSpec]:
  """One set per source of the run (its eval split, as the run's in-loop evaluation reads it), then each of the
  run's named `data.eval_sets` (logged in the run as eval_loss/NAME; a name a source already has gets
  '(eval_sets)' added here)."""
  srcs = data.pipeline.load_sources(config.data, tokenizer, 'eval')
  out = [SetSpec(s.name, 'source', _where(s.spec), s.spec.format in sources.CHAT_FORMATS, config.data, [s])
         for s in srcs]
  chat = sources.source_specs(config.data)[0].format in sources.CHAT_FORMATS
  patterns = dict(evalsets.parse(config.data.get('eval_sets', '') or ''))
  for name, cfg, set_srcs in evalsets.load(config.data, tokenizer):
    shown = name if name not in {s.name for s in out} else f'{name}(eval_sets)'
    out.append(SetSpec(shown, 'named', f'data.eval_sets {name}={patterns[name]}', chat, cfg, set_srcs))
  return out


def _where(spec: sources.SourceSpec) -> str:
  train_key, eval_key, _ = spec.view.config_keys
  if spec.view.eval and spec.view.train != sources.STDLIB:
    return f'{eval_key}={spec.view.eval!r}'
  return f'{spec.view.eval_fraction:g} of {train_key}={spec.view.train!r} held out'


def extra_sets(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, pairs: Sequence[tuple[str, str]],
               taken: Sequence[str]) -> list[SetSpec]:
  """A set per `--data` (name, globs): the files whole, read in the format of the run's first source."""
  first = sources.source_specs(config.data)[0]
  out = []
  for name, pattern in pairs:
    if name in taken:
      raise EvalError('--data', f'{name}={pattern}', f'{name!r} is already the name of one of the run\'s sets '
                      f'({", ".join(taken)}); choose another NAME')
    cfg = evalsets.set_config(config.data, name, pattern)  # as the run's data.eval_sets are read in training
    try:
      srcs = data.pipeline.load_sources(cfg, tokenizer, 'eval')
    except sources.DataError as e:  # said as the user gave it: the set's config key is internal, eval takes no config
      valid = e.valid.replace(f'data.sources.{name}.', '')
      if 'max_bad_fraction' in valid:
        valid = "fix or remove those records (eval skips bad ones up to the run's own data.max_bad_fraction)"
      raise EvalError('--data', f'{name}={pattern}', f'{e.problem}; {valid}') from None
    out.append(SetSpec(name, 'extra', f'--data={name}={pattern}', first.format in sources.CHAT_FORMATS, cfg, srcs))
  return out


def read(spec: SetSpec, tokenizer: data.Tokenizer, *, rows: int, seed: int, max_batches: int) -> EvalSet:
  """The set's batches of `rows` rows: until every piece is scored, or `max_batches` (0: no limit)."""
  seq_len = int(spec.data_cfg.seq_len)
  blocked = data.pipeline.blocklist(spec.data_cfg)
  counts = [_pieces(s, seq_len, blocked) for s in spec.srcs]
  pieces, set_tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
  it = iter(data.make_dataset(spec.data_cfg, tokenizer, split='eval', seed=seed, batch_size=rows, srcs=spec.srcs))
  seen: set[tuple[int, int]] = set()
  batches, repeats = [], 0
  try:
    while len(seen) < pieces and (max_batches <= 0 or len(batches) < max_batches):
      batch = next(it)
      fresh, again = first_pass(batch, seen)
      repeats += again
      batches.append({'tokens': batch['tokens'], 'segment_ids': batch['segment_ids'], 'positions': batch['positions'],
                      'loss_mask': batch['loss_mask'] * fresh,
                      'scored': (fresh & (batch['segment_ids'] > 0)).astype(np.int32),
                      **{k: batch[k] for k in MASK_KEYS}})
  finally:
    close = getattr(it, 'close', None)  # the prefetch thread
    if close:
      close()
  return EvalSet(spec.name, spec.kind, spec.where, spec.chat, batches, pieces, len(seen), set_tokens, repeats)


def first_pass(batch: dict[str, np.ndarray], seen: set[tuple[int, int]]) -> tuple[np.ndarray, int]:
  """((B, T) bool: the tokens of pieces (document id, piece index) not in `seen`, which they are added to;
  how many pieces were in `seen` already).

  A piece is a run of tokens with one (doc id, piece, segment); padding (doc id -1) is never fresh."""
  ids, chunks, seg = (np.asarray(batch[k]) for k in ('doc_ids', 'doc_chunks', 'segment_ids'))
  start = np.ones(ids.shape, bool)
  start[:, 1:] = (ids[:, 1:] != ids[:, :-1]) | (chunks[:, 1:] != chunks[:, :-1]) | (seg[:, 1:] != seg[:, :-1])
  flat = start.ravel()
  firsts = np.flatnonzero(flat)
  fresh = np.zeros(len(firsts), bool)
  again = 0
  for k, at in enumerate(firsts.tolist()):
    key = (int(ids.flat[at]), int(chunks.flat[at]))
    if key[0] < 0:
      continue
    if key in seen:
      again += 1
    else:
      seen.add(key)
      fresh[k] = True
  return fresh[np.cumsum(flat) - 1].reshape(ids.shape), again


def _pieces(src: data.pipeline.Source, seq_len: int, blocked: frozenset[str]) -> tuple[int, int]:
  """(seq_len pieces, loss tokens) of one pass over a source's split, as the pipeline cuts it: each document
  into consecutive seq_len pieces, documents of data.exclude left out; a piece's first token is not predicted."""
  prepared = src.prepared
  offsets = np.asarray(prepared.offsets, np.int64)
  keep = np.ones(len(offsets) - 1, bool)
  if blocked:
    keep = np.asarray([f'{src.name}:{src.docs.name(int(i))}' not in blocked for i in prepared.source_index])
  starts, lengths = offsets[:-1][keep], np.diff(offsets)[keep]
  per_doc = -(-lengths // seq_len)
  n = int(per_doc.sum())
  if n == 0:
    return 0, 0
  within = np.arange(n) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
  piece_starts = np.repeat(starts, per_doc) + within * seq_len
  masks = prepared.masks
  mask_total = int(np.add.reduceat(masks, offsets[:-1], dtype=np.int64)[keep].sum())
  return n, mask_total - int(np.asarray(masks[piece_starts], np.int64).sum())
