"""Writes configs/data/sft_demo.jsonl: question/answer pairs about Python's standard library, made from the
docstrings of the running Python, so the LoRA fine-tuning demo has local chat-shaped data and never downloads.

  .venv/bin/python configs/data/make_sft_demo.py

Each line holds `messages` (user asks what a function does, assistant answers with the first paragraph of
its docstring) and the same exchange as plain `text`. Deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os

MODULES = ('os', 'os.path', 'json', 're', 'math', 'random', 'string', 'textwrap', 'shutil', 'itertools',
           'functools', 'collections', 'heapq', 'bisect', 'statistics', 'datetime', 'time', 'pathlib', 'glob',
           'fnmatch', 'csv', 'base64', 'hashlib', 'zlib', 'gzip', 'tarfile', 'zipfile', 'tempfile', 'copy', 'struct')


def pairs() -> list[dict]:
  out = []
  for name in MODULES:
    module = importlib.import_module(name)
    for attr in sorted(dir(module)):
      if attr.startswith('_'):
        continue
      obj = getattr(module, attr)
      if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
        continue
      doc = inspect.getdoc(obj) or ''
      answer = ' '.join(doc.split('\n\n')[0].split())
      if not 20 <= len(answer) <= 400:
        continue
      question = f'What does {name}.{attr} do?'
      out.append({'messages': [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}],
                  'text': f'Question: {question}\nAnswer: {answer}'})
  return out


if __name__ == '__main__':
  rows = pairs()
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sft_demo.jsonl')
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  print(f'{len(rows)} examples -> {path}')
