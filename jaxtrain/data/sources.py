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
import re
import sysconfig
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtrain.data.records import BadRecords, to_document
from jaxtrain.errors import UserError


STDLIB = 'stdlib'
SPLITS = ('train', 'eval')
_JSONL_EXTS = ('.jsonl', '.json')
_PARQUET_EXTS = ('.parquet',)
_COMPRESSED_EXTS = ('.gz', '.bz2', '.xz', '.zst', '.zip')
_STDLIB_SKIP_DIRS = frozenset({'test', 'tests', 'idlelib', 'lib2to3', '__pycache__'})
_SPLIT_HINT = 'set data.eval or raise data.eval_fraction'


class DataError(UserError):
  """A data setting that cannot work; the message names the config key, its value and what is valid."""

  def __init__(self, key: str, value: object, problem: str, valid: str):
    self.key, self.problem = key, problem
    super().__init__(key, value, valid)

  def line(self) -> str:
    return ' '.join(f'{self.key}={self.value!r} {self.problem}; {self.valid}'.split())

  def __reduce__(self):
    return type(self), (self.key, self.value, self.problem, self.valid)


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
  train_key, eval_key, _ = config_keys(cfg)
  if cfg.train == STDLIB:
    root = stdlib_root()
    return [os.path.join(root, r) for r in _stdlib_split(cfg, split)]
  if split == 'eval' and cfg.eval:
    return expand_globs(eval_key, cfg.eval)
  return expand_globs(train_key, cfg.train)


# ----------------------------------------------------------------------------- named sources

FORMATS = ('text', 'chat', 'alpaca', 'sharegpt')
# Formats whose records become a list of messages, encoded with a chat template and an assistant-only loss mask.
CHAT_FORMATS = ('chat', 'alpaca', 'sharegpt')
ON_END = ('repeat', 'drop', 'stop')
SHAREGPT_FIELD = 'conversations'


def source(path: str, **settings: Any) -> Any:
  """A `data.sources.NAME` section: where one source's documents are and how it joins the mixture.

    path        'stdlib' or comma-separated globs of .jsonl/.json/.parquet/text files
    eval        globs of its held-out files; '' holds out data.eval_fraction of `path`
    weight      share of the mixture's tokens (every non-padding token, loss-masked ones too; normalised over the
                sources); ignored when data.temperature > 0
    epochs      0: endless (reshuffled every epoch); N: the source ends after N passes, then `on_end`
    on_end      repeat (start over) | drop (leave the mixture, the others share its tokens) | stop (end the run)
    format      text (a document per record) | chat (a `messages` list per record) | alpaca (instruction,
                input, output) | sharegpt (`conversations` of {from: system|human|gpt, value}); the last three
                are rendered with `template` and trained on the assistant's tokens only
    text_field  field / column of the text (format text)
    messages_field  field of the messages list (format chat; sharegpt: 'conversations' unless set)
    template    chat template: chatml | llama3 | mistral | gemma | qwen | tokenizer (the tokenizer's own)
    max_files   stdlib only: the first N files (0: all)
  """
  import ml_collections  # Deferred: the data package itself does not need it.

  s = ml_collections.ConfigDict()
  s.path = path
  s.eval = ''
  s.weight = 1.0
  s.epochs = 0
  s.on_end = 'repeat'
  s.format = 'text'
  s.text_field = 'text'
  s.messages_field = 'messages'
  s.template = 'chatml'
  s.max_files = 0
  for key, value in settings.items():
    if key not in s:
      raise DataError(f'data.sources.<name>.{key}', value, 'is not a source setting', f'expected one of {sorted(s)}')
    s[key] = value
  return s


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One named source of a run, with a data-section view that `load_documents` reads."""
  name: str
  view: Any  # has train, eval, eval_fraction, text_field, max_files, like the data section
  weight: float
  epochs: int
  on_end: str
  format: str
  field: str  # the text field (text) or the messages field (chat)
  template: str


@dataclasses.dataclass(frozen=True)
class _View:
  train: str
  eval: str
  eval_fraction: float
  text_field: str  # the field read: text or messages
  max_files: int
  format: str
  max_doc_bytes: int
  max_bad_fraction: float
  config_keys: tuple[str, str, str]  # config keys of train, eval and the field, for messages


def split_label(name: str, split: str) -> str:
  """How `jaxtrain check` and `jaxtrain analyze` name a source's split: "'NAME', SPLIT split", NAME being the
  source's name in sample ids, `tokens/NAME` metrics and the run's log."""
  return f'{name!r}, {split} split'


def source_specs(cfg: Any) -> list[SourceSpec]:
  """The run's sources: the `data.sources` sections in order, or data.train alone (named 'stdlib' for the
  embedded corpus, else 'train') when there are none."""
  named = getattr(cfg, 'sources', None)
  if not named:
    view = _View(cfg.train, cfg.eval, cfg.eval_fraction, cfg.text_field, cfg.max_files, 'text', cfg.max_doc_bytes,
                 cfg.max_bad_fraction, ('data.train', 'data.eval', 'data.text_field'))
    return [SourceSpec('stdlib' if cfg.train == STDLIB else 'train', view, 1.0, 0, 'repeat', 'text', cfg.text_field,
                       '')]
  specs = []
  for name in named:
    s = named[name]
    key = f'data.sources.{name}'
    if not isinstance(name, str) or not name.replace('_', '').replace('-', '').isalnum():
      raise DataError(key, name, 'is not a valid source name', 'expected letters, digits, - and _')
    if s.format not in FORMATS:
      raise DataError(f'{key}.format', s.format, 'is not valid', f'expected one of {FORMATS}')
    if s.on_end not in ON_END:
      raise DataError(f'{key}.on_end', s.on_end, 'is not valid', f'expected one of {ON_END}')
    if isinstance(s.epochs, bool) or not isinstance(s.epochs, int) or s.epochs < 0:
      raise DataError(f'{key}.epochs', s.epochs, 'is not valid', 'expected 0 (endless) or a number of passes')
    if not s.path:
      raise DataError(f'{key}.path', s.path, 'names no data', "expected 'stdlib' or globs of files")
    field, field_key = s.text_field, f'{key}.text_field'
    if s.format in ('chat', 'sharegpt'):
      field, field_key = s.messages_field, f'{key}.messages_field'
      if s.format == 'sharegpt' and field == 'messages':  # the default of `source()`: ShareGPT's own name
        field = SHAREGPT_FIELD
    elif s.format == 'alpaca':
      field, field_key = 'instruction', f'{key}.format'
    view = _View(s.path, s.eval, cfg.eval_fraction, field, s.max_files, s.format, cfg.max_doc_bytes,
                 cfg.max_bad_fraction, (f'{key}.path', f'{key}.eval', field_key))
    specs.append(SourceSpec(name, view, float(s.weight), int(s.epochs), s.on_end, s.format, field,
                            s.template if s.format in CHAT_FORMATS else ''))
  return specs


# ----------------------------------------------------------------------------- documents


@dataclasses.dataclass(frozen=True)
class _FileSpec:
  """What is known about a file before indexing it: enough to key the index cache."""
  path: str
  rel: str  # name used in split hashes, independent of where the data directory lives.
  size: int
  mtime_ns: int


class Documents(Sequence[Any]):
  """Random-access documents of one split: texts, or message lists for chat sources. Holds only an index
  (file, offset/row) plus Parquet text columns."""

  def __init__(self, files: Sequence[_FileSpec], file_idx: np.ndarray, loc: np.ndarray, in_file: np.ndarray,
               text_field: str, columns: dict[int, Any], bad: BadRecords | None = None, fmt: str = 'text'):
    self.files = list(files)
    self.format = fmt
    self.bad = bad or BadRecords()  # what indexing skipped, for the per-source report
    self._file_idx = file_idx
    self._loc = loc  # JSONL: byte offset of the line; Parquet: row; JSON array: position in `columns`; text: unused.
    self._in_file = in_file  # JSONL: line index; Parquet: row; JSON array: index in the array; text: 0.
    self._text_field = text_field
    self._columns = columns  # Parquet: the text column (pyarrow); JSON array: the usable documents (a list)

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
      column = self._columns[f]
      return column[loc] if isinstance(column, list) else column[loc].as_py()
    if path.endswith(_JSONL_EXTS):
      with open(path, 'rb') as fh:
        fh.seek(loc)
        doc, problem = to_document(json.loads(fh.readline()), self._text_field, self.format, check_text=False)
      if problem:  # the file changed since it was indexed: the prepare step skips and counts it
        raise ValueError(problem)
      return doc
    with open(path, encoding='utf-8') as fh:  # invalid UTF-8 raises: the prepare step skips and counts it
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
                     self._columns, self.bad, self.format)

  @property
  def total_bytes(self) -> int:
    """Bytes of the files this split reads (an upper bound on its text size when split by document)."""
    return sum(self.files[i].size for i in np.unique(self._file_idx))

  def fingerprint(self) -> str:
    """Hash of the file list with sizes and mtimes, and of which documents this split holds."""
    h = hashlib.sha256()
    for spec in self.files:
      h.update(f'{spec.rel}\0{spec.size}\0{spec.mtime_ns}\n'.encode())
    if self.format not in ('text', 'chat'):  # the record -> messages conversion decides the documents too
      h.update(f'format={self.format}\n'.encode())
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


# JSON escapes that can decode to text no tokenizer takes: lone surrogates and NUL (a raw NUL byte or invalid
# UTF-8 already fails json.loads). Lines without them skip the walk over the parsed record.
_SUSPECT_ESCAPE = re.compile(rb'\\u(?:[dD][89a-fA-F]|0000)')


def _index_jsonl(spec: _FileSpec, field: str, fmt: str, max_bytes: int, bad: BadRecords) -> list[tuple[int, int]]:
  """(index in file, byte offset) of every usable document line; bad lines are counted in `bad`."""
  found = []
  offset = 0
  with open(spec.path, 'rb') as fh:
    for lineno, line in enumerate(fh, start=1):
      start, offset = offset, offset + len(line)
      where = f'{spec.path}:{lineno}'
      if not line.strip():
        continue
      bad.read += 1
      if max_bytes and len(line) > max_bytes:
        bad.add(f'a record over data.max_doc_bytes={max_bytes}', where)
        continue
      try:
        record = json.loads(line)  # bytes: invalid UTF-8 raises here too
      except ValueError as e:
        bad.add(f'not valid JSON or UTF-8 ({str(e)[:60]})', where)
        continue
      value, problem = to_document(record, field, fmt, check_text=bool(_SUSPECT_ESCAPE.search(line)))
      if problem:
        bad.add(problem, where)
      elif not value:
        bad.empty += 1
      else:
        found.append((lineno - 1, start))
  return found


def _is_json_array(path: str) -> bool:
  """Whether a .json file holds one JSON array (Alpaca-style) rather than a record per line."""
  if not path.endswith('.json'):
    return False
  with open(path, 'rb') as fh:
    head = fh.read(4096).lstrip(b'\xef\xbb\xbf \t\r\n')
  return head.startswith(b'[')


def _index_json_array(spec: _FileSpec, field: str, fmt: str, max_bytes: int, bad: BadRecords) -> tuple[list, list]:
  """The usable documents of a file holding one JSON array of records, and their indexes in the array."""
  with open(spec.path, 'rb') as fh:
    raw = fh.read()
  try:
    # Invalid UTF-8 inside a string becomes lone surrogates, so only the records holding it are bad.
    records = json.loads(raw.decode('utf-8-sig', 'surrogateescape'))
  except ValueError as e:
    bad.read += 1
    bad.add(f'not valid JSON ({str(e)[:60]})', spec.path)
    return [], []
  if not isinstance(records, list):
    bad.read += 1
    bad.add(f'a JSON {type(records).__name__} where an array of records was expected', spec.path)
    return [], []
  docs, where = [], []
  for k, record in enumerate(records):
    bad.read += 1
    place = f'{spec.path} record {k}'
    if max_bytes and spec.size > max_bytes and len(json.dumps(record).encode()) > max_bytes:
      bad.add(f'a record over data.max_doc_bytes={max_bytes}', place)
      continue
    value, problem = to_document(record, field, fmt)
    if problem:
      bad.add(problem, place)
    elif not value:
      bad.empty += 1
    else:
      docs.append(value)
      where.append(k)
  return docs, where


def _read_text(path: str) -> tuple[str | None, str | None]:
  """(text, None) of a text file, or (None, why it cannot be a document: not UTF-8, a NUL character)."""
  with open(path, 'rb') as fh:
    raw = fh.read()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    return None, f'not valid UTF-8 (byte {e.object[e.start]:#04x})'
  if '\x00' in text:
    return None, 'text holding a NUL character'
  return text, None


def _load_parquet_column(spec: _FileSpec, text_field: str, max_bytes: int, bad: BadRecords):
  """The text column of a Parquet file (a pyarrow Array) and the rows that hold usable text."""
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
  bad.read += len(column)
  lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
  usable = lengths > 0
  bad.empty += int((~usable).sum())
  if max_bytes:
    for r in np.flatnonzero(lengths > max_bytes)[:1_000_000]:
      bad.add(f'a record over data.max_doc_bytes={max_bytes}', f'{spec.path} row {int(r)}')
    usable &= lengths <= max_bytes
  nul = pc.fill_null(pc.match_substring(column, '\x00'), False).to_numpy(zero_copy_only=False) & usable
  for r in np.flatnonzero(nul):
    bad.add('text holding a NUL character', f'{spec.path} row {int(r)}')
  return column, np.flatnonzero(usable & ~nul)


@functools.lru_cache(maxsize=16)
def _index_files(specs: tuple[_FileSpec, ...], key: str, value: str, field: str, fmt: str, max_bytes: int,
                 eval_fraction: float) -> tuple[Documents, np.ndarray]:
  """All usable documents of `specs`, and which of them a held-out split by document puts in eval."""
  file_idx, locs, in_file, in_eval, columns = [], [], [], [], {}
  bad = BadRecords()
  for f, spec in enumerate(specs):
    if spec.path.endswith(_COMPRESSED_EXTS):
      raise DataError(key, value, f'matches a compressed file {spec.path}',
                      'expected uncompressed .jsonl/.json/.parquet/text files')
    if _is_json_array(spec.path):
      records, where = _index_json_array(spec, field, fmt, max_bytes, bad)
      columns[f] = records
      entries = [(k, j) for j, k in enumerate(where)]
    elif spec.path.endswith(_JSONL_EXTS):
      entries = _index_jsonl(spec, field, fmt, max_bytes, bad)
    elif fmt in CHAT_FORMATS:
      raise DataError(key, value, f'matches {spec.path}, which cannot hold {fmt} records',
                      f'expected .jsonl/.json files of JSON records for format {fmt}')
    elif spec.path.endswith(_PARQUET_EXTS):
      column, rows = _load_parquet_column(spec, field, max_bytes, bad)
      columns[f] = column
      entries = [(int(r), int(r)) for r in rows]
    else:
      bad.read += 1
      problem = None
      if spec.size == 0:
        bad.empty += 1
      elif max_bytes and spec.size > max_bytes:
        problem = f'a file over data.max_doc_bytes={max_bytes}'
      else:
        problem = _read_text(spec.path)[1]  # read once here, so a bad file is counted before anything uses it
      if problem:
        bad.add(problem, spec.path)
      entries = [] if problem or spec.size == 0 else [(0, 0)]
    for index, loc in entries:
      file_idx.append(f)
      locs.append(loc)
      in_file.append(index)
      in_eval.append(_in_eval(f'{spec.rel}:{index}', eval_fraction))
  docs = Documents(specs, np.asarray(file_idx, np.int32), np.asarray(locs, np.int64), np.asarray(in_file, np.int64),
                   field, columns, bad, fmt)
  return docs, np.asarray(in_eval, bool)


def config_keys(cfg: Any) -> tuple[str, str, str]:
  """Config keys of a split's train files, eval files and field, for error messages."""
  return cfg.config_keys if isinstance(cfg, _View) else ('data.train', 'data.eval', 'data.text_field')


def load_documents(cfg: Any, split: str) -> Documents:
  """The documents of `split` ('train' or 'eval') of the data section or of a `SourceSpec.view`.

  Records that cannot be documents (malformed JSON or UTF-8, a missing or mistyped field, text no tokenizer
  takes - a lone surrogate or a NUL character -, over data.max_doc_bytes) are skipped and counted in
  `Documents.bad`, as are empty ones; more bad records than data.max_bad_fraction of the records read from the
  split's files raises DataError, as does a split without documents. Indexes are cached per process and keyed
  on file sizes and mtimes, so repeated calls read the files once.
  """
  check_split(split)
  train_key, eval_key, field_key = config_keys(cfg)
  fmt = getattr(cfg, 'format', 'text')
  max_bytes = int(getattr(cfg, 'max_doc_bytes', 0))
  held_out = False
  if cfg.train == STDLIB:
    root = stdlib_root()
    key, value = train_key, cfg.train
    specs = [_spec(os.path.join(root, r), r) for r in _stdlib_split(cfg, split)]
  elif split == 'eval' and cfg.eval:
    key, value = eval_key, cfg.eval
    specs = _relative_specs(expand_globs(key, value))
  else:
    key, value = train_key, cfg.train
    specs = _relative_specs(expand_globs(key, value))
    held_out = not cfg.eval
  fraction = _check_fraction(cfg) if held_out else 0.0
  docs, in_eval = _index_files(tuple(specs), key, value, cfg.text_field, fmt, max_bytes, fraction)
  check_bad_fraction(key, value, docs.bad.total, docs.bad.read, docs.bad.examples,
                     float(getattr(cfg, 'max_bad_fraction', 1.0)))
  if held_out:
    docs = docs.subset(in_eval if split == 'eval' else ~in_eval)
  if len(docs) == 0:
    if held_out and split == 'eval':
      raise DataError('data.eval_fraction', cfg.eval_fraction,
                      f'holds out no document of {train_key}={cfg.train!r}', _SPLIT_HINT)
    raise DataError(key, value, f'holds no non-empty document for the {split} split',
                    f'expected files with {f"{fmt} records" if fmt in CHAT_FORMATS else "text"} in field/column '
                    f'{field_key}={cfg.text_field!r}')
  return docs


def check_bad_fraction(key: str, value: Any, bad: int, read: int, examples: Sequence[str], max_fraction: float, *,
                       rejected: int = 0, split_docs: int = 0, split: str = '') -> None:
  """DataError when the bad share of a source's records is more than data.max_bad_fraction.

  `bad` of the `read` records of the files were unusable at indexing (the same files, and so the same share, for
  both splits of a held-out source); `rejected` of the `split_docs` documents of `split` were then rejected by
  the tokenizer or chat template. The share is bad / read + rejected / split_docs; `examples` name the first.
  """
  share = bad / max(read, 1) + (rejected / max(split_docs, 1) if rejected else 0.0)
  if (bad or rejected) and share > max_fraction:
    first = f'first: {"; ".join(examples)}'
    if rejected:
      what = (f'has {bad + rejected} bad records ({bad} of the {read} records read, {rejected} of the {split_docs} '
              f'{split} documents rejected by the tokenizer or template; {share:.1%}, more than '
              f'data.max_bad_fraction={max_fraction:g}; {first})')
    else:
      what = f'has {bad} bad records of {read} ({share:.1%}, more than data.max_bad_fraction={max_fraction:g}; {first})'
    raise DataError(key, value, what, 'fix or remove those records, or raise data.max_bad_fraction to skip them')
