"""The README's config reference, generated from `jaxtrain/config/defaults.py`.

defaults.py builds each config section in a function whose docstring describes the section, and gives every
key a comment (comment lines directly above the key and/or a comment at the end of its line). This module
reads those docstrings and comments from the source with `ast` and `tokenize`, takes the keys and defaults
from `base_config()` itself, and renders one markdown table per section. The keys of a named data source
(`data.sources.NAME`, built by `jaxtrain.data.sources.source`) come from that function's docstring, which
lists one `key  description` per line.

`python docs/config_table.py` prints the block; `--write` puts it into README.md between START and END.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import tokenize
from typing import Any

import ml_collections

from jaxtrain.config import defaults

START = '<!-- config-table:start -->'
END = '<!-- config-table:end -->'
README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'README.md')
SOURCE_KEY = 'data.sources.NAME'  # how the keys of a named source appear in the table


@dataclasses.dataclass(frozen=True)
class Doc:
  """What defaults.py says about one key: its comment, the default as written, and for a key whose value a
  section function builds, that function's docstring."""
  comment: str
  default: str  # the source text of the value ('' for a section built by a function)
  section_doc: str = ''

  @property
  def text(self) -> str:
    return ' '.join(t for t in (self.comment, self.section_doc) if t)


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """Comment text by line number, and the lines holding nothing but a comment."""
  comments, alone = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip('#').strip()
      if not tok.line[:tok.start[1]].strip():
        alone.add(tok.start[0])
  return comments, alone


def _clean_doc(doc: str | None) -> str:
  return ' '.join(inspect.cleandoc(doc or '').split())


def describe(source: str | None = None) -> tuple[dict[str, str], dict[str, Doc]]:
  """(section docstrings, key docs) of defaults.py (or of `source`), both by dotted key, in source order.

  Starts at `base_config` and follows every `NAME.key = _function()` into that function, so a section
  nested in another (estimate.price_per_hour) gets dotted keys too."""
  source = inspect.getsource(defaults) if source is None else source
  tree = ast.parse(source)
  functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
  comments, alone = _comments(source)
  sections: dict[str, str] = {}
  keys: dict[str, Doc] = {}

  def comment_of(stmt: ast.stmt) -> str:
    above, line = [], stmt.lineno - 1
    while line in alone:
      above.insert(0, comments[line])
      line -= 1
    trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and n not in alone]
    return ' '.join(above + trailing)

  def walk(function: ast.FunctionDef, prefix: str) -> None:
    for stmt in function.body:
      if not isinstance(stmt, ast.Assign):
        continue
      for target in stmt.targets:
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)):
          continue
        key = prefix + target.attr
        value = stmt.value
        called = value.func.id if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) else None
        if called in functions:
          sections[key] = _clean_doc(ast.get_docstring(functions[called]))
          keys[key] = Doc(comment_of(stmt), '', sections[key])
          walk(functions[called], key + '.')
        else:
          keys[key] = Doc(comment_of(stmt), ast.get_source_segment(source, value) or '')

  walk(functions['base_config'], '')
  return sections, keys


def source_keys() -> dict[str, str]:
  """Description of each key of a named source, from the docstring of `jaxtrain.data.sources.source`."""
  from jaxtrain.data import sources  # Deferred: the data package imports numpy and more.

  names = set(sources.source(''))
  out: dict[str, str] = {}
  current, indent = None, 0
  for line in (sources.source.__doc__ or '').splitlines():
    m = re.match(r'(\s*)(\w+)\s{2,}(\S.*)$', line)
    if m and m.group(2) in names:
      current, indent = m.group(2), len(m.group(1))
      out[current] = m.group(3).strip()
    elif current and line.strip() and len(line) - len(line.lstrip()) > indent:  # a continuation line
      out[current] += ' ' + line.strip()
    else:
      current = None
  return out


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """Every dotted key of `cfg` with its value, sections included (before their keys)."""
  out = {}
  for key in cfg.keys():
    value = cfg[key]
    out[prefix + key] = value
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_keys(value, prefix + key + '.'))
  return out


def undocumented() -> list[str]:
  """Keys of base_config() and of a named source that have no comment (an empty list when all do).

  A named source among the defaults (data.sources.NAME) needs a comment of its own; its keys are described by
  the docstring of `jaxtrain.data.sources.source`, like every named source's."""
  from jaxtrain.data import sources

  _, docs = describe()
  described = source_keys()
  missing = []
  for key in flat_keys(defaults.base_config()):
    parts = key.split('.')
    if len(parts) == 4 and parts[:2] == ['data', 'sources']:
      documented = bool(described.get(parts[3]))
    else:
      documented = key in docs and bool(docs[key].text)
    if not documented:
      missing.append(key)
  missing += [f'{SOURCE_KEY}.{k}' for k in sources.source('') if not described.get(k)]
  return missing


def _cell(text: str) -> str:
  """Text for a table cell: pipes escaped everywhere; *, ~ and <tag escaped outside `code`."""
  parts = text.split('`')
  for i in range(0, len(parts), 2):  # outside code spans
    parts[i] = re.sub(r'<(?=[A-Za-z/])', '&lt;', parts[i].replace('*', r'\*').replace('~', r'\~'))
  return '`'.join(parts).replace('|', r'\|')


def _code(text: str) -> str:
  return '`' + text.replace('|', r'\|') + '`' if text else ''


def markdown() -> str:
  """The generated block, markers excluded: one table per section, one row per key, in defaults.py's order."""
  sections, docs = describe()
  values = flat_keys(defaults.base_config())
  lines = ['<!-- Generated from jaxtrain/config/defaults.py by `python docs/config_table.py --write`: edit the '
           'comments there, not this table. -->']
  for section in [k for k in docs if '.' not in k]:
    lines += ['', f'**`{section}`**: {_cell(sections[section])}', '', '| key | default | what it is |',
              '|---|---|---|']
    for key, doc in docs.items():
      if not key.startswith(section + '.'):
        continue
      value = values[key]
      if isinstance(value, ml_collections.ConfigDict):
        default = '' if value else '`{}`'
      elif value is None:  # an unset placeholder: its source text is a call
        default = _code('None')
      else:
        default = _code(doc.default)
      lines.append(f'| `{key}` | {default} | {_cell(doc.text)} |')
      if key == 'data.sources':
        lines += _source_rows()
  return '\n'.join(lines) + '\n'


def _source_rows() -> list[str]:
  from jaxtrain.data import sources

  described = source_keys()
  rows = []
  for key, value in sources.source('').items():
    default = '(required)' if key == 'path' else _code(repr(value))
    rows.append(f'| `{SOURCE_KEY}.{key}` | {default} | {_cell(described.get(key, ""))} |')
  return rows


def _split(readme: str) -> tuple[str, str, str]:
  """README text before the block (through START), the block, and the rest (from END)."""
  start, end = readme.find(START), readme.find(END)
  if start < 0 or end < start:
    raise ValueError(f'README has no {START} ... {END} block')
  start += len(START)
  return readme[:start], readme[start:end], readme[end:]


def readme_block(path: str = README) -> str:
  with open(path, encoding='utf-8') as f:
    return _split(f.read())[1]


def expected_block() -> str:
  return '\n' + markdown()


def write(path: str = README) -> bool:
  """Rewrites the README block; True when it changed."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  head, block, tail = _split(text)
  new = expected_block()
  if block == new:
    return False
  with open(path, 'w', encoding='utf-8') as f:
    f.write(head + new + tail)
  return True
