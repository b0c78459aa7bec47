"""The tokenized prepare cache: a source's documents tokenized once, stored flat and memory-mapped.

  prepared = prepare(docs, text_encoder(tokenizer), fingerprint_of({...}), name='train')
  ids, mask = prepared[i]            # int32 token ids (EOS included), uint8 loss mask
  prepared.lengths                   # token count of every record, from the offsets alone

Layout of `cache_root()/prepared/<fingerprint>/`:
  tokens.npy   int32 (T,)    the token ids of every kept record, one after the other
  masks.npy    uint8 (T,)    their loss mask (0/1)
  offsets.npy  int64 (N+1,)  record i is tokens[offsets[i]:offsets[i+1]]
  index.npy    int64 (N,)    record i's index in the source's documents (skipped records leave gaps)
  meta.json    format version, name, counts, skipped records (count and the first reasons), build time

The arrays are written as they are tokenized (a placeholder .npy header first, rewritten with the final
length at the end: a 1-D header is 128 bytes for any length), so a build holds one chunk in memory, not the
corpus. A build writes into a hidden temp dir beside the cache and renames it into place once complete: a
reader either finds no cache or a whole one, and a killed build leaves only a temp dir that nobody reads (a
later build of the same fingerprint deletes it once its owner is gone). Concurrent builders of one fingerprint
serialise on an flock'ed `<fingerprint>.lock`, so the second one waits and then reads the first one's cache
instead of tokenizing again; should locking not work (some network file systems), both build and the rename
of the second fails harmlessly onto the first's complete dir.

The key is the caller's `fingerprint`, normally `fingerprint_of(parts)`: a hash of everything that decides the
tokens (the documents' fingerprint, the tokenizer's identity, the chat template, settings) plus FORMAT_VERSION.
Every source gets its own cache, so adding a source to a mixture tokenizes only the new one.

Records the encoder rejects (a ValueError or TypeError for that record: the Rust tokenizer raises TypeError
on text it cannot take, such as a lone surrogate) are skipped and counted, as are empty ones and documents that
cannot be read. The encoder is called on chunks of documents (the Rust tokenizer encodes a batch in parallel); a
chunk that raises is bisected until the offending records are isolated, so one bad record costs O(log chunk)
extra calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from jaxtrain.data import sources
from jaxtrain.data.sources import DataError
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.paths import cache_root

# Bump when the layout or the meaning of the arrays changes: it is hashed into every fingerprint.
FORMAT_VERSION = 'prepared-v1'
# A chunk ends at whichever limit comes first; characters bound the memory of one chunk of long documents.
CHUNK_DOCS = 256
CHUNK_CHARS = 4_000_000
MAX_REASONS = 5  # skip reasons kept in meta.json; the count covers all of them
_HEADER_BYTES = 128  # numpy's 1-D .npy v1 header for any length (padded to 64-byte alignment)
_STALE_SECONDS = 24 * 3600  # a temp dir of another host is left alone for this long
_ARRAYS = {'tokens': np.int32, 'masks': np.uint8, 'offsets': np.int64, 'index': np.int64}
# Files of a tokenizer directory that decide tokenization; weights beside them (an HF model dir) are not read.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
                   'vocab.json', 'vocab.txt', 'merges.txt', 'tokenizer.model', 'spiece.model',
                   'sentencepiece.bpe.model', 'chat_template.jinja', 'chat_template.json')
_FINGERPRINT_RE = re.compile(r'[0-9A-Za-z_-][0-9A-Za-z_.-]*')

Encoded = tuple[np.ndarray, np.ndarray]
Encoder = Callable[[list], list[Encoded]]


# ----------------------------------------------------------------------------- keys


def fingerprint_of(parts: Mapping[str, Any]) -> str:
  """A stable hash (32 hex digits) of `parts` and FORMAT_VERSION, for use as `prepare`'s fingerprint.

  `parts` holds JSON values only (str, int, float, bool, None, lists, dicts), so the hash is the same in every
  process and on every machine; key order does not matter. Typical parts: {'docs': docs.fingerprint(),
  'tokenizer': tokenizer_identity(tok), 'template': 'none', 'text_field': 'text'}.
  """
  try:
    text = json.dumps({'format': FORMAT_VERSION, 'parts': dict(parts)}, sort_keys=True, separators=(',', ':'),
                      allow_nan=False, ensure_ascii=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f'fingerprint parts must be JSON values (str, int, float, bool, None, list, dict): {e}') from None
  return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the cache key only: a rewritten file is hashed again
  h = hashlib.sha256()
  with open(path, 'rb') as fh:
    for block in iter(lambda: fh.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
  """What decides a tokenizer's output: its path, vocabulary size, EOS id, the tokenizers library version and
  a sha256 of the content of its file (or of the TOKENIZER_FILES of its directory)."""
  path = tokenizer.path
  if os.path.isdir(path):
    files = [os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
  else:
    files = [path] if os.path.isfile(path) else []
  content = {}
  for f in files:
    st = os.stat(f)
    content[os.path.basename(f)] = _file_sha256(f, st.st_size, st.st_mtime_ns)
  return {'path': path, 'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id,
          'tokenizers': tokenizers.__version__, 'content': content}


def text_encoder(tokenizer: Tokenizer) -> Encoder:
  """An encoder for plain-text documents: token ids + EOS, loss mask 1 on every token.

  A record that is not a string raises ValueError, which `prepare` turns into a skipped record.
  """
  eos = tokenizer.eos_id

  def encode(texts: list) -> list[Encoded]:
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f'is a {type(t).__name__}, not a text string')
    out = []
    for ids in tokenizer.encode_batch(texts):
      arr = np.empty(len(ids) + 1, np.int32)
      arr[:-1] = ids
      arr[-1] = eos
      out.append((arr, np.ones(len(arr), np.uint8)))
    return out

  return encode


# ----------------------------------------------------------------------------- the prepared source


@dataclasses.dataclass(frozen=True)
class _Meta:
  name: str
  fingerprint: str
  documents: int  # records kept
  tokens: int
  source_documents: int
  skipped: int
  skipped_reasons: tuple[str, ...]
  seconds: float  # build time


class Prepared(Sequence):
  """Random access to a prepared source: `[i] -> (ids int32, mask uint8)`, read-only views of memory maps.

  Pickles as its directory (the arrays are mapped again on load), so it can be a grain data source in worker
  processes. `tokenized` is the number of documents this process encoded to produce it: 0 on a cache hit.
  """

  def __init__(self, directory: str, *, tokenized: int = 0):
    self.directory = directory
    self.tokenized = tokenized
    self._open()

  def _open(self) -> None:
    with open(os.path.join(self.directory, 'meta.json'), encoding='utf-8') as fh:
      meta = json.load(fh)
    if meta.get('format') != FORMAT_VERSION:
      raise ValueError(f'{self.directory} holds format {meta.get("format")!r}, expected {FORMAT_VERSION!r}')
    self._meta = _Meta(**{f.name: meta[f.name] for f in dataclasses.fields(_Meta)})
    arrays = {}
    for key, dtype in _ARRAYS.items():
      # mmap_mode='r' checks the file holds as many bytes as the header promises.
      arr = np.load(os.path.join(self.directory, f'{key}.npy'), mmap_mode='r', allow_pickle=False)
      if arr.dtype != dtype or arr.ndim != 1:
        raise ValueError(f'{self.directory}/{key}.npy is {arr.dtype}{arr.shape}, expected a 1-D {np.dtype(dtype)}')
      arrays[key] = arr
    n, t = self._meta.documents, self._meta.tokens
    if (len(arrays['offsets']) != n + 1 or len(arrays['index']) != n or len(arrays['tokens']) != t
        or len(arrays['masks']) != t or int(arrays['offsets'][-1]) != t):
      raise ValueError(f'{self.directory} has arrays that disagree with meta.json ({n} records, {t} tokens)')
    self.tokens, self.masks = arrays['tokens'], arrays['masks']
    self.offsets, self.source_index = arrays['offsets'], arrays['index']

  def __getstate__(self) -> dict:
    return {'directory': self.directory, 'tokenized': self.tokenized}

  def __setstate__(self, state: dict) -> None:
    self.directory, self.tokenized = state['directory'], state['tokenized']
    self._open()

  def __len__(self) -> int:
    return self._meta.documents

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'record index={index} is not valid; expected {-n} <= index < {n}')
    index = int(index) % n
    a, b = int(self.offsets[index]), int(self.offsets[index + 1])
    return np.asarray(self.tokens[a:b]), np.asarray(self.masks[a:b])

  @property
  def name(self) -> str:
    return self._meta.name

  @property
  def fingerprint(self) -> str:
    return self._meta.fingerprint

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """Token count of every record (int64), computed from the offsets without reading any token."""
    return np.diff(np.asarray(self.offsets))

  @property
  def total_tokens(self) -> int:
    return self._meta.tokens

  @property
  def source_documents(self) -> int:
    """Documents in the source, kept or skipped."""
    return self._meta.source_documents

  @property
  def skipped(self) -> int:
    return self._meta.skipped

  @property
  def skipped_reasons(self) -> list[str]:
    """The first MAX_REASONS reasons, '<document name>: <why>'."""
    return list(self._meta.skipped_reasons)

  @property
  def build_seconds(self) -> float:
    return self._meta.seconds

  def __repr__(self) -> str:
    return (f'Prepared(name={self.name!r}, records={len(self)}, tokens={self.total_tokens}, '
            f'skipped={self.skipped}, directory={self.directory!r})')


def default_root() -> str:
  """Where prepared sources live: `cache_root()/prepared`."""
  return os.path.join(cache_root(), 'prepared')


def prepare(docs: Sequence, encode: Encoder, fingerprint: str, *, name: str, root: str | None = None,
            chunk_docs: int = CHUNK_DOCS, log: Callable[[str], None] | None = None) -> Prepared:
  """The prepared cache of `docs` under `root/<fingerprint>/` (root: `default_root()`), built if missing.

  `encode` maps a list of records to one (ids, loss mask) pair each, EOS already appended; a ValueError or
  TypeError for a record skips it (counted in `Prepared.skipped`), as does an empty record or one encoded to no token.
  `docs[i]` is read in order; `docs.name(i)`, where it exists, names skipped records. `log` receives a line
  when a build starts, waits for another process and ends.
  """
  if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.fullmatch(fingerprint):
    raise ValueError(f'fingerprint={fingerprint!r} is not valid; expected letters, digits, "_", "-" or "." '
                     '(e.g. fingerprint_of(parts))')
  if chunk_docs < 1:
    raise ValueError(f'chunk_docs={chunk_docs} is not valid; expected a positive number of documents per call')
  root = root or default_root()
  directory = os.path.join(root, fingerprint)
  found = _open_if_valid(directory)
  if found is not None:
    return found
  os.makedirs(root, exist_ok=True)
  with _locked(os.path.join(root, f'{fingerprint}.lock'), name, log):
    found = _open_if_valid(directory)  # another process may have built it while this one waited
    if found is not None:
      return found
    _remove_leftovers(root, fingerprint)
    if os.path.exists(directory):  # unreadable (e.g. files deleted by hand): move it aside, then rebuild
      _discard(directory, root, fingerprint)
    tmp = os.path.join(root, f'.tmp-{fingerprint}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}')
    try:
      tokenized = _build(tmp, docs, encode, fingerprint=fingerprint, name=name, chunk_docs=chunk_docs, log=log)
      try:
        os.rename(tmp, directory)
      except OSError as e:
        # Only a concurrent builder that bypassed the lock can have put a complete cache there first.
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _open_if_valid(directory) is None:
          raise
        shutil.rmtree(tmp, ignore_errors=True)
        return Prepared(directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return Prepared(directory, tokenized=tokenized)


def _open_if_valid(directory: str) -> Prepared | None:
  if not os.path.isfile(os.path.join(directory, 'meta.json')):
    return None
  try:
    return Prepared(directory)
  except (OSError, ValueError, KeyError, TypeError):
    return None


@contextlib.contextmanager
def _locked(path: str, name: str, log: Callable[[str], None] | None) -> Iterator[None]:
  with open(path, 'a+b') as fh:
    try:
      try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        if log:
          log(f'prepare {name!r}: waiting for another process building {os.path.basename(path)[:-5]}')
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      # No locking here: correctness still holds through the atomic rename, only work may be duplicated.
    yield  # the lock goes with the file descriptor, also when the process dies


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_leftovers(root: str, fingerprint: str) -> None:
  """Deletes temp dirs of dead builds of `fingerprint`: this host's whose process is gone, others' after a day."""
  prefix = f'.tmp-{fingerprint}-'
  host = socket.gethostname()
  for entry in os.listdir(root):
    if not entry.startswith(prefix):
      continue
    path = os.path.join(root, entry)
    owner = entry[len(prefix):].rsplit('-', 2)
    try:
      age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
      continue
    dead = len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _pid_alive(int(owner[1]))
    if dead or age > _STALE_SECONDS:
      shutil.rmtree(path, ignore_errors=True)


def _discard(directory: str, root: str, fingerprint: str) -> None:
  aside = os.path.join(root, f'.tmp-{fingerprint}-broken-{uuid.uuid4().hex[:8]}')
  os.rename(directory, aside)
  shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- building


class _FlatWriter:
  """Appends to a 1-D .npy file whose header is rewritten with the final length on close."""

  def __init__(self, path: str, dtype: Any):
    self._dtype = np.dtype(dtype)
    self._fh = open(path, 'wb')  # noqa: SIM115 - closed in finish()
    self._fh.write(self._header(0))
    self.count = 0

  def _header(self, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {'descr': np.lib.format.dtype_to_descr(self._dtype),
                                               'fortran_order': False, 'shape': (n,)})
    header = buf.getvalue()
    if len(header) != _HEADER_BYTES:
      raise RuntimeError(f'numpy wrote a {len(header)}-byte .npy header, expected {_HEADER_BYTES}')
    return header

  def write(self, arr: np.ndarray) -> None:
    self._fh.write(np.ascontiguousarray(arr, self._dtype).tobytes())
    self.count += len(arr)

  def finish(self) -> None:
    self._fh.seek(0)
    self._fh.write(self._header(self.count))
    self._fh.flush()
    os.fsync(self._fh.fileno())  # the rename that publishes the cache must not overtake the data on disk
    self._fh.close()

  def abort(self) -> None:
    self._fh.close()


def _record_chars(record: Any) -> int:
  if isinstance(record, str):
    return len(record)
  if isinstance(record, (list, tuple)):  # a chat: messages with 'content'
    return sum(len(m.get('content') or '') if isinstance(m, dict) else 1 for m in record)
  return 1


def _is_empty(record: Any) -> bool:
  return record is None or (isinstance(record, (str, list, tuple, dict)) and len(record) == 0)


def _chunks(docs: Sequence, chunk_docs: int, on_skip: Callable[[int, str], None]) -> Iterator[list[tuple[int, Any]]]:
  chunk, chars = [], 0
  for i in range(len(docs)):
    try:
      record = docs[i]
    except ValueError as e:  # e.g. a text file that is not valid UTF-8 (any more: indexing read it)
      on_skip(i, f'unreadable ({str(e)[:120]})')
      continue
    chunk.append((i, record))
    chars += _record_chars(record)
    if len(chunk) >= chunk_docs or chars >= CHUNK_CHARS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


def _check_encoded(pair: Any) -> Encoded:
  """(ids, mask) as int32 / uint8 arrays; an encoder returning anything else is a bug in the encoder."""
  ids, mask = pair
  ids, mask = np.asarray(ids), np.asarray(mask)
  if ids.ndim != 1 or mask.shape != ids.shape:
    raise TypeError(f'the encoder returned ids of shape {ids.shape} with a mask of shape {mask.shape}; expected two '
                    '1-D arrays of the same length')
  if len(ids):
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
      raise TypeError(f'the encoder returned ids of dtype {ids.dtype} in [{ids.min()}, {ids.max()}]; expected '
                      'non-negative int32 token ids')
    if ((mask != 0) & (mask != 1)).any():
      raise TypeError(f'the encoder returned a loss mask with values {np.unique(mask)[:8]}; expected 0/1')
  return ids.astype(np.int32, copy=False), mask.astype(np.uint8, copy=False)


def _encode_isolating(encode: Encoder, chunk: list[tuple[int, Any]],
                      on_skip: Callable[[int, str], None]) -> list[tuple[int, Encoded]]:
  """Encodes `chunk`; where the encoder raises ValueError or TypeError, halves the chunk until the bad records
  are alone."""
  try:
    out = encode([record for _, record in chunk])
  except (ValueError, TypeError) as e:
    if len(chunk) == 1:
      on_skip(chunk[0][0], str(e) or type(e).__name__)
      return []
    half = len(chunk) // 2
    return (_encode_isolating(encode, chunk[:half], on_skip) + _encode_isolating(encode, chunk[half:], on_skip))
  if len(out) != len(chunk):
    raise TypeError(f'the encoder returned {len(out)} results for {len(chunk)} records; expected one each')
  return [(i, _check_encoded(pair)) for (i, _), pair in zip(chunk, out, strict=True)]


def _build(tmp: str, docs: Sequence, encode: Encoder, *, fingerprint: str, name: str, chunk_docs: int,
           log: Callable[[str], None] | None) -> int:
  """Writes the cache of `docs` into `tmp` (meta.json last); returns the number of documents encoded."""
  os.makedirs(tmp)
  start = time.perf_counter()
  n_docs = len(docs)
  if log:
    log(f'prepare {name!r}: tokenizing {n_docs} documents into {os.path.dirname(tmp)}/{fingerprint}')
  namer = getattr(docs, 'name', None)
  skipped, reasons = 0, []

  def on_skip(i: int, why: str) -> None:
    nonlocal skipped
    skipped += 1
    if len(reasons) < MAX_REASONS:
      label = namer(i) if callable(namer) else f'document {i}'
      reasons.append(f'{label}: {why}')

  writers = {key: _FlatWriter(os.path.join(tmp, f'{key}.npy'), dtype) for key, dtype in _ARRAYS.items()}
  encoded = 0
  try:
    writers['offsets'].write(np.zeros(1, np.int64))
    end = 0
    for chunk in _chunks(docs, chunk_docs, on_skip):
      live = []
      for i, record in chunk:
        if _is_empty(record):
          on_skip(i, 'empty document')
        else:
          live.append((i, record))
      if not live:
        continue
      encoded += len(live)
      kept = []
      for i, (ids, mask) in _encode_isolating(encode, live, on_skip):
        if len(ids) == 0:
          on_skip(i, 'encoded to no token')
        else:
          kept.append((i, ids, mask))
      if not kept:
        continue
      lengths = np.fromiter((len(ids) for _, ids, _ in kept), np.int64, len(kept))
      writers['tokens'].write(np.concatenate([ids for _, ids, _ in kept]))
      writers['masks'].write(np.concatenate([mask for _, _, mask in kept]))
      writers['offsets'].write(end + np.cumsum(lengths))
      writers['index'].write(np.fromiter((i for i, _, _ in kept), np.int64, len(kept)))
      end += int(lengths.sum())
    for w in writers.values():
      w.finish()
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  seconds = time.perf_counter() - start
  meta = {'format': FORMAT_VERSION, 'name': name, 'fingerprint': fingerprint, 'documents': writers['index'].count,
          'tokens': end, 'source_documents': n_docs, 'skipped': skipped, 'skipped_reasons': reasons,
          'seconds': round(seconds, 3), 'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
  with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as fh:
    json.dump(meta, fh, indent=1)
    fh.flush()
    os.fsync(fh.fileno())
  if log:
    log(f'prepare {name!r}: {meta["documents"]} records, {end:,d} tokens in {seconds:.1f} s'
        f' ({end / max(seconds, 1e-9):,.0f} tokens/s), {skipped} skipped')
  return encoded


# ----------------------------------------------------------------------------- the configured split


def split_fingerprint(data_cfg: Any, tokenizer: Tokenizer, docs: sources.Documents, *, template: Any = 'none') -> str:
  """`fingerprint_of` the parts that decide a split's tokens: its documents, the field read, tokenizer, and the
  encoder (`template`: 'none' for plain text, else what identifies the chat encoder)."""
  return fingerprint_of({'docs': docs.fingerprint(), 'text_field': data_cfg.text_field,
                         'tokenizer': tokenizer_identity(tokenizer), 'template': template})


def prepare_split(data_cfg: Any, tokenizer: Tokenizer, split: str, *, encode: Encoder | None = None,
                  template: Any = 'none', name: str | None = None, root: str | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[sources.Documents, Prepared]:
  """The documents of `split` and their prepared cache, for the data section (a single source) or a
  `SourceSpec.view`. `encode` defaults to `text_encoder(tokenizer)`; a chat source passes its template's
  encoder and what identifies it as `template`, which joins the fingerprint.

  Raises DataError when the encoder accepts none of the split's documents.
  """
  docs = sources.load_documents(data_cfg, split)
  prepared = prepare(docs, encode or text_encoder(tokenizer),
                     split_fingerprint(data_cfg, tokenizer, docs, template=template), name=name or split, root=root,
                     log=log)
  if len(prepared) == 0:
    train_key, eval_key, _ = sources.config_keys(data_cfg)
    use_eval = split == 'eval' and data_cfg.eval
    first = prepared.skipped_reasons[0] if prepared.skipped_reasons else 'none'
    raise DataError(eval_key if use_eval else train_key, data_cfg.eval if use_eval else data_cfg.train,
                    f'has no {split} document the encoder accepts ({prepared.skipped} skipped; first: {first})',
                    'expected documents the tokenizer (and chat template) can encode')
  return docs, prepared


def stderr_log(line: str) -> None:
  """A `log` for `prepare` that writes to stderr, keeping stdout for reports."""
  print(line, file=sys.stderr, flush=True)
