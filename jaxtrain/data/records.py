"""What one record of a data file must look like, per format, and the tally of the records that do not.

`to_document` turns a parsed JSON record into a document (a text, or a list of chat messages for the chat
formats: alpaca's instruction/input/output, ShareGPT's conversations) or says why it cannot be one;
`BadRecords` counts the skipped records by reason for the run's report and `data.max_bad_fraction`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                   'tool': 'tool', 'function_call': 'assistant', 'observation': 'tool'}


@dataclasses.dataclass
class BadRecords:
  """Records of a source that indexing skipped, by reason, with the first few places for the report.

  `read` counts every record of the files indexed (usable, bad and empty): the denominator of the bad
  fraction, the same for the train and eval split of a held-out source (they read the same files)."""
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)
  empty: int = 0  # empty documents: skipped and reported, but not counted against data.max_bad_fraction
  read: int = 0

  def add(self, reason: str, where: str) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    if len(self.examples) < 3:
      self.examples.append(f'{reason} at {where}')

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merged(self, other: BadRecords) -> BadRecords:
    counts = dict(self.counts)
    for k, v in other.counts.items():
      counts[k] = counts.get(k, 0) + v
    return BadRecords(counts, (self.examples + other.examples)[:3], self.empty + other.empty, self.read + other.read)


def _type_problem(field: str, value: Any, expected: str = 'a string') -> str:
  return f'field {field!r} holds a {type(value).__name__} where {expected} was expected'


def _missing(field: str, record: Any) -> str:
  present = sorted(record)[:8] if isinstance(record, dict) else f'a JSON {type(record).__name__}'
  return f'no field {field!r} (present: {present})'


def _alpaca_messages(record: Any) -> tuple[Any, str | None]:
  """Alpaca's instruction / input / output (and an optional system prompt) as a user and an assistant turn."""
  for key in ('instruction', 'output'):
    if not isinstance(record, dict) or key not in record:
      return None, _missing(key, record)
  parts = {}
  for key in ('system', 'instruction', 'input', 'output'):
    value = record.get(key)
    if value is None:
      value = ''
    if not isinstance(value, str):
      return None, _type_problem(key, value)
    parts[key] = value
  if not parts['output']:
    return [], None  # nothing to train on: an empty record
  user = parts['instruction'] + ('\n\n' + parts['input'] if parts['input'] else '')
  messages = [{'role': 'system', 'content': parts['system']}] if parts['system'] else []
  return messages + [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': parts['output']}], None


def _sharegpt_messages(record: Any, field: str) -> tuple[Any, str | None]:
  """ShareGPT's `conversations` ({from: system|human|gpt, value}, or role/content) as messages."""
  if not isinstance(record, dict) or field not in record:
    return None, _missing(field, record)
  turns = record[field]
  if not isinstance(turns, list):
    return None, _type_problem(field, turns, 'a list of turns')
  messages = []
  for k, turn in enumerate(turns):
    if not isinstance(turn, dict):
      return None, f'turn {k} of {field!r} is a {type(turn).__name__}; expected an object with from and value'
    speaker = turn.get('from', turn.get('role'))
    value = turn.get('value', turn.get('content'))
    if speaker not in _SHAREGPT_ROLES:
      return None, f'turn {k} of {field!r} is from {speaker!r}; expected one of {sorted(_SHAREGPT_ROLES)}'
    if not isinstance(value, str):
      return None, f'turn {k} of {field!r} has a value of type {type(value).__name__}; expected a string'
    messages.append({'role': _SHAREGPT_ROLES[speaker], 'content': value})
  return messages, None


def _unusable_text(value: Any) -> str | None:
  """Why the strings in `value` cannot be tokenized (a lone UTF-16 surrogate, a NUL character), else None."""
  if isinstance(value, str):
    if '\x00' in value:
      return 'a NUL character'
    try:
      value.encode('utf-8')
    except UnicodeEncodeError:
      return 'a lone surrogate (not valid Unicode)'
    return None
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, list):
    for item in value:
      why = _unusable_text(item)
      if why:
        return why
  return None


def to_document(record: Any, field: str, fmt: str, *, check_text: bool = True) -> tuple[Any, str | None]:
  """(document, None) of a parsed JSON record for format `fmt` - the text of `field`, a messages list for the
  chat formats - or (None, why it cannot be one). An empty document comes back as '' or []."""
  if fmt == 'alpaca':
    doc, problem = _alpaca_messages(record)
  elif fmt == 'sharegpt':
    doc, problem = _sharegpt_messages(record, field)
  elif not isinstance(record, dict) or field not in record:
    doc, problem = None, _missing(field, record)
  else:
    doc, problem = record[field], None
    if fmt == 'chat':
      if not isinstance(doc, list) or not all(isinstance(m, dict) for m in doc):
        problem = _type_problem(field, doc, 'a list of messages')
    elif not isinstance(doc, str):
      problem = _type_problem(field, doc)
  if problem is None and check_text:
    why = _unusable_text(doc)
    if why:
      problem = f'text holding {why}'
  return (None, problem) if problem else (doc, None)
