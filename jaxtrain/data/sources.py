"""Where documents come from: file lists per split and random access to document texts.

A source is either the embedded corpus (`data.train='stdlib'`: the `.py` files of the running Python's
standard library, one document per file) or comma-separated globs of JSON Lines, Parquet or plain text files.
Train/eval splits are decided by a stable hash, so they are the same on every machine and every run:
by file for stdlib, by (file, index in file) for a held-out split of globbed files.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

STDLIB = 'stdlib'
SPLITS = ('train', 'eval')
_JSONL_EXTS = ('.jsonl', '.json')
_PARQUET_EXTS = ('.parquet',)
_COMPRESSED_EXTS = ('.gz', '.bz2', '.xz', '.zst', '.zip')
_STDLIB_SKIP_DIRS = frozenset({'test', 'tests', 'idlelib', 'lib2to3', '__pycache__'})
_SPLIT_HINT = 'set data.eval or raise data.eval_fraction'


class DataError(ValueError):
  """A data setting that cannot work; the message names the config key, its value and what is valid."""

  def __init__(self, key: str, value: object, problem: str, valid: str):
    self.key = key
    self.value = value
    self.problem = problem
    self.valid = valid
    super().__init__(f'{key}={value!r} {problem}; {valid}')


# ----------------------------------------------------------------------------- file lists


def stdlib_root() -> str:
  """Directory of the running Python's standard library."""
  return sysconfig.get_paths()['stdlib']


@functools.lru_cache(maxsize=4)
def _stdlib_relpaths(root: str) -> tuple[str, ...]:
  """All eligible `.py` files under `root`, as sorted '/'-separated relative paths."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place keeps os.walk out of tests and installed packages.
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and 'site-packages' not in d
                   and 'dist-packages' not in d]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith('.py'):
        rel = name if rel_dir == '.' else os.path.join(rel_dir, name)
        found.append(rel.replace(os.sep, '/'))
  return tuple(sorted(found))


def _in_eval(key: str, eval_fraction: float) -> bool:
  # crc32 of the name, not Python's hash(): stable across processes, machines and Python versions.
  return zlib.crc32(key.encode('utf-8')) % 1000 < eval_fraction * 1000


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not valid; expected one of {SPLITS}')


def _check_fraction(cfg: Any) -> float:
  fraction = float(cfg.eval_fraction)
  if not 0.0 <= fraction < 1.0:
    raise DataError('data.eval_fraction', cfg.eval_fraction, 'is out of range',
                    'expected 0 <= eval_fraction < 1 (share of documents held out for eval)')
  return fraction


def _stdlib_split(cfg: Any, split: str) -> list[str]:
  """Relative paths of the stdlib files in `split` (split by file)."""
  rels = list(_stdlib_relpaths(stdlib_root()))
  if cfg.max_files < 0:
    raise DataError('data.max_files', cfg.max_files, 'is negative', 'expected 0 (all files) or a positive count')
  if cfg.max_files > 0:
    rels = rels[:cfg.max_files]
  fraction = _check_fraction(cfg)
  want_eval = split == 'eval'
  chosen = [r for r in rels if _in_eval(r, fraction) == want_eval]
  if not chosen:
    if want_eval:
      raise DataError('data.eval_fraction', cfg.eval_fraction,
                      f'leaves no eval file among the {len(rels)} stdlib files (data.max_files={cfg.max_files})',
                      f'{_SPLIT_HINT}, or raise data.max_files')
    raise DataError('data.eval_fraction', cfg.eval_fraction, f'leaves no train file among {len(rels)} stdlib files',
                    'lower data.eval_fraction or raise data.max_files')
  return chosen


def expand_globs(key: str, value: str) -> list[str]:
  """Comma-separated globs -> sorted, deduplicated absolute file paths; every glob must match a file."""
  patterns = [p.strip() for p in str(value).split(',') if p.strip()]
  if not patterns:
    raise DataError(key, value, 'names no file', "expected 'stdlib' or comma-separated globs of files")
  files = set()
  for pattern in patterns:
    matched = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
    if not matched:
      what = 'matches no file' if len(patterns) == 1 else f'has a glob {pattern!r} that matches no file'
      raise DataError(key, value, what, 'expected globs of .jsonl/.json/.parquet/text files, comma-separated')
    files.update(os.path.abspath(m) for m in matched)
  return sorted(files)


def list_files(cfg: Any, split: str) -> list[str]:
  """Sorted absolute paths of the files that feed `split` ('train' or 'eval').

  Without `data.eval`, a held-out split of globbed files reads the same files as train (split by document).
  """
  check_split(split)
  if cfg.train == STDLIB:
    root = stdlib_root()
    return [os.path.join(root, r) for r in _stdlib_split(cfg, split)]
  if split == 'eval' and cfg.eval:
    return expand_globs('data.eval', cfg.eval)
  return expand_globs('data.train', cfg.train)


# ----------------------------------------------------------------------------- documents


@dataclasses.dataclass(frozen=True)
class _FileSpec:
  """What is known about a file before indexing it: enough to key the index cache."""
  path: str
  rel: str  # name used in split hashes, independent of where the data directory lives.
  size: int
  mtime_ns: int


class Documents(Sequence[str]):
  """Random-access texts of one split. Holds only an index (file, offset/row) plus Parquet text columns."""

  def __init__(self, files: Sequence[_FileSpec], file_idx: np.ndarray, loc: np.ndarray, in_file: np.ndarray,
               text_field: str, columns: dict[int, Any]):
    self.files = list(files)
    self._file_idx = file_idx
    self._loc = loc  # JSONL: byte offset of the line; Parquet: row; text: unused.
    self._in_file = in_file  # JSONL: line index; Parquet: row; text: 0.
    self._text_field = text_field
    self._columns = columns

  def __len__(self) -> int:
    return len(self._file_idx)

  def __getitem__(self, index):  # Sequence protocol; grain calls it with ints.
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if index < 0:
      index += len(self)
    f = int(self._file_idx[index])
    loc = int(self._loc[index])
    path = self.files[f].path
    if f in self._columns:
      return self._columns[f][loc].as_py()
    if path.endswith(_JSONL_EXTS):
      with open(path, 'rb') as fh:
        fh.seek(loc)
        return json.loads(fh.readline())[self._text_field]
    with open(path, encoding='utf-8', errors='replace') as fh:
      return fh.read()

  def name(self, index: int) -> str:
    """'<file>:<index in file>' of document `index`: the file relative to the split's common directory (the
    stdlib root for stdlib), the index a line index for JSONL, a row for Parquet and 0 for a text file."""
    if not -len(self) <= index < len(self):
      raise IndexError(f'document index={index} is not valid; expected 0 <= index < {len(self)}')
    return f'{self.files[int(self._file_idx[index])].rel}:{int(self._in_file[index])}'

  def subset(self, mask: np.ndarray) -> Documents:
    """The documents where `mask` is True, in the same order."""
    return Documents(self.files, self._file_idx[mask], self._loc[mask], self._in_file[mask], self._text_field,
                     self._columns)

  @property
  def total_bytes(self) -> int:
    """Bytes of the files this split reads (an upper bound on its text size when split by document)."""
    return sum(self.files[i].size for i in np.unique(self._file_idx))

  def fingerprint(self) -> str:
    """Hash of the file list with sizes and mtimes, and of which documents this split holds."""
    h = hashlib.sha256()
    for spec in self.files:
      h.update(f'{spec.rel}\0{spec.size}\0{spec.mtime_ns}\n'.encode())
    # `_in_file` follows from the files and `_loc`; leaving it out keeps older cache keys valid.
    h.update(self._file_idx.tobytes())
    h.update(self._loc.tobytes())
    return h.hexdigest()


def _spec(path: str, rel: str) -> _FileSpec:
  st = os.stat(path)
  return _FileSpec(path=path, rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _relative_specs(paths: Sequence[str]) -> list[_FileSpec]:
  # Names relative to the files' common directory, so moving the data keeps the split.
  base = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [_spec(p, os.path.relpath(p, base).replace(os.sep, '/')) for p in paths]


def _index_jsonl(spec: _FileSpec, key: str, value: str, text_field: str) -> list[tuple[int, int]]:
  """(index in file, byte offset) of every non-empty document line; validates every line."""
  found = []
  offset = 0
  with open(spec.path, 'rb') as fh:
    for lineno, line in enumerate(fh, start=1):
      start, offset = offset, offset + len(line)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataError(key, value, f'has a line that is not valid JSON at {spec.path}:{lineno} ({e})',
                        f'expected one JSON object per line with a string field data.text_field={text_field!r}'
                        ) from None
      if not isinstance(record, dict) or text_field not in record:
        present = sorted(record) if isinstance(record, dict) else f'a JSON {type(record).__name__}, not an object'
        raise DataError('data.text_field', text_field, f'is missing at {spec.path}:{lineno} (keys present: {present})',
                        'set data.text_field to the field that holds the document text')
      text = record[text_field]
      if not isinstance(text, str):
        raise DataError('data.text_field', text_field,
                        f'holds a {type(text).__name__}, not a string, at {spec.path}:{lineno}',
                        'set data.text_field to a field whose values are strings')
      if text:
        found.append((lineno - 1, start))
  return found


def _load_parquet_column(spec: _FileSpec, text_field: str):
  """The text column of a Parquet file (a pyarrow Array) and the rows that hold non-empty text."""
  import pyarrow as pa  # Deferred: only Parquet sources pay for the import.
  import pyarrow.compute as pc
  import pyarrow.parquet as pq

  names = pq.ParquetFile(spec.path).schema_arrow.names
  if text_field not in names:
    raise DataError('data.text_field', text_field, f'is not a column of {spec.path} (columns: {names})',
                    'set data.text_field to the column that holds the document text')
  column = pq.read_table(spec.path, columns=[text_field]).column(text_field).combine_chunks()
  if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
    raise DataError('data.text_field', text_field, f'has type {column.type} in {spec.path}',
                    'set data.text_field to a string column')
  keep = pc.and_(pc.is_valid(column), pc.greater(pc.utf8_length(column), 0))
  rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
  return column, rows


@functools.lru_cache(maxsize=8)
def _index_files(specs: tuple[_FileSpec, ...], key: str, value: str, text_field: str,
                 eval_fraction: float) -> tuple[Documents, np.ndarray]:
  """All non-empty documents of `specs`, and which of them a held-out split by document puts in eval."""
  file_idx, locs, in_file, in_eval, columns = [], [], [], [], {}
  for f, spec in enumerate(specs):
    if spec.path.endswith(_COMPRESSED_EXTS):
      raise DataError(key, value, f'matches a compressed file {spec.path}',
                      'expected uncompressed .jsonl/.json/.parquet/text files')
    if spec.path.endswith(_JSONL_EXTS):
      entries = _index_jsonl(spec, key, value, text_field)
    elif spec.path.endswith(_PARQUET_EXTS):
      column, rows = _load_parquet_column(spec, text_field)
      columns[f] = column
      entries = [(int(r), int(r)) for r in rows]
    else:
      entries = [(0, 0)] if spec.size > 0 else []
    for index, loc in entries:
      file_idx.append(f)
      locs.append(loc)
      in_file.append(index)
      in_eval.append(_in_eval(f'{spec.rel}:{index}', eval_fraction))
  docs = Documents(specs, np.asarray(file_idx, np.int32), np.asarray(locs, np.int64), np.asarray(in_file, np.int64),
                   text_field, columns)
  return docs, np.asarray(in_eval, bool)


def load_documents(cfg: Any, split: str) -> Documents:
  """The documents of `split` ('train' or 'eval'); empty documents are skipped.

  Raises DataError when the split holds no document. Indexes are cached per process and keyed on file
  sizes and mtimes, so repeated calls (tokenizer, train and eval datasets) read the files once.
  """
  check_split(split)
  held_out = False
  if cfg.train == STDLIB:
    root = stdlib_root()
    key, value = 'data.train', cfg.train
    specs = [_spec(os.path.join(root, r), r) for r in _stdlib_split(cfg, split)]
  elif split == 'eval' and cfg.eval:
    key, value = 'data.eval', cfg.eval
    specs = _relative_specs(expand_globs(key, value))
  else:
    key, value = 'data.train', cfg.train
    specs = _relative_specs(expand_globs(key, value))
    held_out = not cfg.eval
  fraction = _check_fraction(cfg) if held_out else 0.0
  docs, in_eval = _index_files(tuple(specs), key, value, cfg.text_field, fraction)
  if held_out:
    docs = docs.subset(in_eval if split == 'eval' else ~in_eval)
  if len(docs) == 0:
    if held_out and split == 'eval':
      raise DataError('data.eval_fraction', cfg.eval_fraction,
                      f'holds out no document of data.train={cfg.train!r}', _SPLIT_HINT)
    raise DataError(key, value, f'holds no non-empty document for the {split} split',
                    f'expected files with text in field/column data.text_field={cfg.text_field!r}')
  return docs
