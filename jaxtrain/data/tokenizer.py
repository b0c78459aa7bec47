"""Tokenizers: a byte-level BPE built from the train split and cached, or one loaded from disk.

The built tokenizer is trained on at most `TRAIN_BUDGET_CHARS` characters picked deterministically from the
train documents, so building takes seconds and every process that builds it gets the same vocabulary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxtrain.data import chat_templates, sources
from jaxtrain.data.sources import DataError
from jaxtrain.paths import cache_root

EOS = '<|endoftext|>'
# Bump when the build recipe changes, so caches of the old recipe are not reused.
BUILD_VERSION = 'bpe-v1'
TRAIN_BUDGET_CHARS = 4_000_000
_EOS_FALLBACKS = (EOS, '</s>')
_PATH_HINT = "expected '' (build a BPE from data.train), a tokenizer.json file or a Hugging Face tokenizer directory"


class Tokenizer:
  """Thin wrapper over a `tokenizers.Tokenizer` or a `transformers` tokenizer, with a known EOS id.

  `encode` adds no special tokens (no BOS/EOS); the data pipeline appends `eos_id` to each document itself.
  """

  def __init__(self, backend: Any, *, eos_id: int, path: str):
    self._backend = backend
    self._is_fast_lib = isinstance(backend, tokenizers.Tokenizer)
    self.eos_id = int(eos_id)
    self.path = path
    self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True) if self._is_fast_lib else len(backend))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    if self._is_fast_lib:
      return self._backend.encode(text, add_special_tokens=False).ids
    return self._backend.encode(text, add_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens; tokenizes in parallel outside the GIL."""
    if self._is_fast_lib:
      return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
    return self._backend(list(texts), add_special_tokens=False)['input_ids']

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special tokens such as EOS are kept so document boundaries stay visible."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._backend.decode(ids, skip_special_tokens=False)

  def token_bytes(self) -> np.ndarray:
    """(vocab_size,) int64: the UTF-8 bytes of text each token id stands for, 0 for special tokens (EOS, chat
    markers: they are not text of a document). Byte-level BPE (the built tokenizer, GPT-2 style): one byte per
    character of the token's string; SentencePiece style: '<0xNN>' is one byte, U+2581 one space; otherwise the
    token decoded alone. Bits per byte divide by these (`jaxtrain.evaluation`)."""
    fast = self._backend if self._is_fast_lib else getattr(self._backend, 'backend_tokenizer', None)
    kinds = _decoder_kinds(json.loads(fast.to_str()).get('decoder')) if fast is not None else set()
    added = fast.get_added_tokens_decoder() if fast is not None else {}
    special = {i for i, t in added.items() if t.special} | set(getattr(self._backend, 'all_special_ids', ()))
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      token = fast.id_to_token(i) if fast is not None else self._backend.convert_ids_to_tokens(i)
      if i in special or token is None:
        continue
      if i in added:  # added text tokens decode to their content as written
        out[i] = len(added[i].content.encode('utf-8'))
      elif 'ByteLevel' in kinds:
        out[i] = len(token)
      elif 'ByteFallback' in kinds and len(token) == 6 and token.startswith('<0x') and token.endswith('>'):
        out[i] = 1
      elif kinds & {'Metaspace', 'Replace'} or token.startswith('\u2581'):
        out[i] = len(token.replace('\u2581', ' ').encode('utf-8'))
      else:
        out[i] = len(self.decode([i]).encode('utf-8'))
    return out

  def __repr__(self) -> str:
    return f'Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})'


def _decoder_kinds(decoder: dict | None) -> set[str]:
  """The types of a tokenizer.json decoder and of the decoders of a Sequence decoder."""
  if not decoder:
    return set()
  return {decoder.get('type', '')}.union(*(_decoder_kinds(d) for d in decoder.get('decoders') or []))


def load_tokenizer(cfg: Any) -> Tokenizer:
  """The tokenizer named by `cfg.tokenizer` (the data config section); '' builds or reuses a cached BPE."""
  if not cfg.tokenizer:
    return _built_tokenizer(cfg)
  path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
  if not os.path.exists(path):
    raise DataError('data.tokenizer', cfg.tokenizer, 'does not exist', _PATH_HINT)
  if os.path.isdir(path):
    return _load_pretrained_dir(cfg.tokenizer, path)
  try:
    backend = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust loader raises a bare Exception on malformed files.
    raise DataError('data.tokenizer', cfg.tokenizer, f'is not a readable tokenizer.json ({e})', _PATH_HINT) from None
  return Tokenizer(backend, eos_id=_eos_of_json(cfg.tokenizer, path, backend), path=path)


def _eos_of_json(value: str, path: str, backend: tokenizers.Tokenizer) -> int:
  # A bare tokenizer.json does not say which token is EOS; a tokenizer_config.json beside it may.
  candidates = []
  config = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if os.path.exists(config):
    with open(config, encoding='utf-8') as fh:
      eos = json.load(fh).get('eos_token')
    candidates.append(eos.get('content') if isinstance(eos, dict) else eos)
  candidates.extend(_EOS_FALLBACKS)
  for token in candidates:
    if isinstance(token, str) and backend.token_to_id(token) is not None:
      return backend.token_to_id(token)
  raise DataError('data.tokenizer', value, f'has no EOS token (looked for {candidates})',
                  'use a tokenizer whose vocabulary holds an EOS token')


def _load_pretrained_dir(value: str, path: str) -> Tokenizer:
  import transformers  # Deferred: importing transformers costs seconds and only this branch needs it.

  try:
    backend = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise DataError('data.tokenizer', value, f'is not a loadable Hugging Face tokenizer directory ({e})',
                    _PATH_HINT) from None
  eos_id = backend.eos_token_id
  if eos_id is None:
    vocab = backend.get_vocab()
    eos_id = next((vocab[t] for t in _EOS_FALLBACKS if t in vocab), None)
  if eos_id is None:
    raise DataError('data.tokenizer', value, f'has no eos_token and none of {_EOS_FALLBACKS} in its vocabulary',
                    'use a tokenizer with an EOS token')
  return Tokenizer(backend, eos_id=eos_id, path=path)


def as_transformers(tokenizer: Tokenizer, chat_template: str | None = None) -> Any:
  """A transformers tokenizer giving the same ids as `tokenizer`, whose eos_token is `tokenizer.eos_id` and,
  when given, whose chat_template is `chat_template` (a copy: `tokenizer` is left unchanged)."""
  import copy

  import transformers  # Deferred: importing transformers costs seconds.

  backend = tokenizer._backend
  if isinstance(backend, tokenizers.Tokenizer):
    eos = backend.id_to_token(tokenizer.eos_id)
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(backend.to_str()),
                                               eos_token=eos)
  else:
    out = copy.deepcopy(backend)
    if out.eos_token_id != tokenizer.eos_id:  # an EOS found by the fallbacks: say which it is
      out.eos_token = out.convert_ids_to_tokens(tokenizer.eos_id)
  if chat_template:
    out.chat_template = chat_template
  return out


def save_dir(tokenizer: Tokenizer, directory: str, chat_template: str | None = None) -> str:
  """Writes `tokenizer` as a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json holding the
  EOS token and the chat template) that `load_tokenizer` (data.tokenizer=DIR) and transformers' AutoTokenizer
  read back with the same ids. Written aside, then renamed over `directory`. Returns `directory`."""
  import shutil

  directory = os.path.abspath(directory)
  tmp = f'{directory}.{os.getpid()}.{uuid.uuid4().hex}.tmp'
  as_transformers(tokenizer, chat_template).save_pretrained(tmp, save_jinja_files=False)
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return directory


# ----------------------------------------------------------------------------- the built BPE


def _fingerprint(cfg: Any, parts: Sequence[tuple[str, sources.Documents]], specials: Sequence[str]) -> str:
  h = hashlib.sha256()
  if len(parts) == 1 and not specials:  # the single-source recipe, whose cache keys predate named sources
    key = [BUILD_VERSION, tokenizers.__version__, cfg.train, int(cfg.tokenizer_vocab_size), int(cfg.max_files),
           TRAIN_BUDGET_CHARS]
    if cfg.train == sources.STDLIB:
      key.append(sys.version_info[:2])  # The file list below already pins the stdlib content.
  else:
    key = [BUILD_VERSION, tokenizers.__version__, int(cfg.tokenizer_vocab_size), TRAIN_BUDGET_CHARS,
           sys.version_info[:2], [name for name, _ in parts], list(specials)]
  h.update(repr(key).encode())
  for _, docs in parts:
    h.update(docs.fingerprint().encode())
  return h.hexdigest()[:16]


def _as_text(doc: Any) -> str:
  """A document's text for BPE training: chat records contribute their message contents."""
  if isinstance(doc, str):
    return doc
  return '\n'.join(m.get('content') or '' for m in doc if isinstance(m, dict) and isinstance(m.get('content'), str))


def training_texts(docs: Sequence[str], total_bytes: int, budget: int = TRAIN_BUDGET_CHARS) -> Iterator[str]:
  """Every k-th document (k chosen so about `budget` characters come out), cut at `budget` in total.

  A stride rather than the first files, so a corpus sorted by name still yields a representative sample.
  """
  stride = max(1, math.ceil(total_bytes / budget))
  left = budget
  for i in range(0, len(docs), stride):
    if left <= 0:
      return
    try:
      doc = docs[i]
    except ValueError:  # unreadable since it was indexed (the prepare step skips and counts it)
      continue
    text = _as_text(doc)[:left]
    left -= len(text)
    yield text


def build_bpe(texts: Iterator[str], vocab_size: int, specials: Sequence[str] = ()) -> tokenizers.Tokenizer:
  """A byte-level BPE with `EOS` (then `specials`, e.g. a chat template's tokens) as special tokens."""
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *[t for t in specials if t != EOS]],
                                show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(texts, trainer=trainer)
  return backend


def _template_specials(specs: Sequence[sources.SourceSpec]) -> list[str]:
  """Special tokens the chat templates of `specs` need, in a stable order."""
  names = sorted({s.template for s in specs if s.format in sources.CHAT_FORMATS and s.template != 'tokenizer'})
  if not names:
    return []
  return list(dict.fromkeys(t for name in names for t in chat_templates.special_tokens(name)))


def _built_tokenizer(cfg: Any) -> Tokenizer:
  min_vocab = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 byte symbols + EOS.
  if cfg.tokenizer_vocab_size < min_vocab:
    raise DataError('data.tokenizer_vocab_size', cfg.tokenizer_vocab_size, 'is too small for a byte-level BPE',
                    f'expected at least {min_vocab} (256 bytes + EOS); 4096-32768 are typical')
  specs = sources.source_specs(cfg)
  for spec in specs:
    if spec.format in sources.CHAT_FORMATS and spec.template == 'tokenizer':
      raise DataError(f'data.sources.{spec.name}.template', spec.template, 'needs a tokenizer with a chat template',
                      "set data.tokenizer to a Hugging Face tokenizer directory, or name a shipped template")
  parts = [(spec.name, sources.load_documents(spec.view, 'train')) for spec in specs]
  specials = _template_specials(specs)
  path = os.path.join(cache_root(), 'tokenizers', _fingerprint(cfg, parts, specials), 'tokenizer.json')
  if not os.path.exists(path):
    total = sum(docs.total_bytes for _, docs in parts)
    # Each source gets a share of the character budget in proportion to its bytes.
    texts = itertools.chain.from_iterable(
        training_texts(docs, docs.total_bytes, max(1, TRAIN_BUDGET_CHARS * docs.total_bytes // max(total, 1)))
        for _, docs in parts)
    backend = build_bpe(texts, int(cfg.tokenizer_vocab_size), specials)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename: a concurrent reader sees either no file or a complete one.
    tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp'
    backend.save(tmp)
    os.replace(tmp, path)
  backend = tokenizers.Tokenizer.from_file(path)
  return Tokenizer(backend, eos_id=backend.token_to_id(EOS), path=path)
