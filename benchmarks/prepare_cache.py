"""Preparing the embedded corpus cold against reading it back from the prepare cache; and a growing set of
sources, where each added source is the only one tokenized.

  .venv/bin/python benchmarks/prepare_cache.py                  # the whole stdlib corpus, 3 warm repeats
  .venv/bin/python benchmarks/prepare_cache.py --max_files=60   # quick

Caches go to a fresh temporary directory, so the first prepare is cold; the tokenizer is the default config's
(the 4096-token BPE, built once in the usual cache and not timed). Side by side:

  (a) cold: `prepare_split(train)`: read every document, tokenize in chunks (`encode_batch`), write the arrays;
  (b) warm: the same call again (`--repeats` times, median): open meta.json and map the arrays;
  (c) every record read back from the warm cache (`prepared[i]` for all i, summing lengths), against encoding
      every document again (what the lazy pipeline does per epoch);
  (d) sources added one at a time: stdlib train; + stdlib eval; + a JSONL of `--piece_lines`-line pieces of the
      train files. Each step prepares the whole set and counts the documents handed to the encoder per source.

Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from jaxtrain.data import load_tokenizer, prepare, sources
from jaxtrain.config.defaults import base_config


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--max_files', type=int, default=0, help='stdlib files (0: all)')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--piece_lines', type=int, default=40, help='lines per record of the JSONL source in (d)')
  return p.parse_args()


class Counting:
  """An encoder wrapper counting the records it encodes."""

  def __init__(self, encode):
    self.encode, self.records = encode, 0

  def __call__(self, batch):
    self.records += len(batch)
    return self.encode(batch)


def jsonl_pieces(docs: sources.Documents, path: str, lines: int) -> None:
  with open(path, 'w', encoding='utf-8') as fh:
    for i in range(len(docs)):
      text = docs[i].splitlines(keepends=True)
      for s in range(0, len(text), lines):
        piece = ''.join(text[s:s + lines])
        if piece.strip():
          fh.write(json.dumps({'text': piece}) + '\n')


def prepare_set(named: dict, tokenizer, root: str) -> tuple[float, dict[str, int], dict[str, int]]:
  """Prepares every source of `named` (name -> (data cfg, split)); (seconds, encoded per source, tokens)."""
  encoded, tokens = {}, {}
  t = time.perf_counter()
  for name, (cfg, split) in named.items():
    docs = sources.load_documents(cfg, split)
    enc = Counting(prepare.text_encoder(tokenizer))
    p = prepare.prepare(docs, enc, prepare.split_fingerprint(cfg, tokenizer, docs), name=name, root=root)
    encoded[name], tokens[name] = enc.records, p.total_tokens
  return time.perf_counter() - t, encoded, tokens


def main() -> None:
  args = parse_args()
  cfg = base_config().data
  cfg.max_files = args.max_files
  tokenizer = load_tokenizer(cfg)
  root = tempfile.mkdtemp(prefix='prepare-bench-')
  try:
    print(f"`{' '.join(['.venv/bin/python', *sys.argv])}`  ")
    print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores; tokenizer {tokenizer.vocab_size} '
          f'tokens; caches in {root}')
    print()

    t = time.perf_counter()
    docs, cold = prepare.prepare_split(cfg, tokenizer, 'train', root=os.path.join(root, 'a'))
    cold_s = time.perf_counter() - t
    warm = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      _, again = prepare.prepare_split(cfg, tokenizer, 'train', root=os.path.join(root, 'a'))
      warm.append(time.perf_counter() - t)
      assert again.tokenized == 0
    t = time.perf_counter()
    total = sum(len(again[i][0]) for i in range(len(again)))
    read_s = time.perf_counter() - t
    assert total == again.total_tokens
    t = time.perf_counter()
    encode = prepare.text_encoder(tokenizer)
    for s in range(0, len(docs), prepare.CHUNK_DOCS):
      encode([docs[i] for i in range(s, min(len(docs), s + prepare.CHUNK_DOCS))])
    encode_s = time.perf_counter() - t
    mb = docs.total_bytes / 1e6
    print(f'**stdlib train split: {len(docs)} documents, {mb:.1f} MB, {cold.total_tokens:,d} tokens**')
    print()
    print('| step | seconds | documents encoded | tokens/s |')
    print('|---|---:|---:|---:|')
    print(f'| (a) prepare, cold | {cold_s:.2f} | {cold.tokenized} | {cold.total_tokens / cold_s:,.0f} |')
    print(f'| (b) prepare, from the cache (median of {args.repeats}) | {statistics.median(warm):.4f} | 0 | - |')
    print(f'| (c) read every record from the cache | {read_s:.4f} | 0 | {total / read_s:,.0f} |')
    print(f'| (c) encode every document again | {encode_s:.2f} | {len(docs)} | {total / encode_s:,.0f} |')
    print()

    pieces = os.path.join(root, 'pieces.jsonl')
    jsonl_pieces(docs, pieces, args.piece_lines)
    jsonl = base_config().data
    jsonl.train, jsonl.eval_fraction = pieces, 0.0
    steps = [{'stdlib_train': (cfg, 'train')},
             {'stdlib_train': (cfg, 'train'), 'stdlib_eval': (cfg, 'eval')},
             {'stdlib_train': (cfg, 'train'), 'stdlib_eval': (cfg, 'eval'), 'pieces': (jsonl, 'train')}]
    print('**sources added one at a time (each step prepares the whole set)**')
    print()
    print('| sources | seconds | documents encoded per source | tokens per source |')
    print('|---|---:|---|---|')
    for named in steps:
      seconds, encoded, tokens = prepare_set(named, tokenizer, os.path.join(root, 'set'))
      print(f"| {' + '.join(named)} | {seconds:.2f} | {', '.join(f'{k} {v:,d}' for k, v in encoded.items())} | "
            f"{', '.join(f'{k} {v:,d}' for k, v in tokens.items())} |")
    print()
    sizes = {e: sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(root, 'a', e))
                    for f in fs) for e in os.listdir(os.path.join(root, 'a')) if not e.endswith('.lock')}
    print(f'cache size of (a): {np.sum(list(sizes.values())) / 1e6:.1f} MB '
          f'({cold.total_tokens * 5 / 1e6:.1f} MB of int32 tokens + uint8 masks, plus offsets and index)')
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
