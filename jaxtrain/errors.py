"""The one error type of user mistakes, and the one of runs that stop on bad numbers.

Every mistake a user can make (a config key, a flag, a data file, a checkpoint, a model directory) raises a
subclass of `UserError` carrying what was wrong (a key or a path), the value and what would be valid. The
command line prints `error: <line>` and exits 2 (`jaxtrain.cli.common`); the library raises it unchanged, so a
notebook sees the same one line.
"""

from __future__ import annotations

from typing import Any


class _NoValue:
  def __repr__(self) -> str:
    return '<no value>'


NO_VALUE: Any = _NoValue()


class UserError(ValueError):
  """A user mistake: `what` (a config key, flag or path), its `value` and what would be `valid`.

  `UserError('data.train', 'x.jsonl', 'matches no file')` reads `data.train='x.jsonl': matches no file`;
  without a value, `what` and `valid` are joined (`UserError('the checkpoint in W', valid='is truncated')`),
  and a lone `what` is the whole line."""

  def __init__(self, what: str, value: Any = NO_VALUE, valid: str = ''):
    self.what, self.value, self.valid = what, value, valid
    super().__init__(self.line())

  def line(self) -> str:
    """The message on one line (embedded newlines folded), as the command line prints it."""
    if self.value is NO_VALUE:
      text = f'{self.what}: {self.valid}' if self.valid else self.what
    else:
      text = f'{self.what}={self.value!r}: {self.valid}'
    return ' '.join(text.split())

  def __reduce__(self):  # picklable across processes with its fields (grain workers, multiprocessing)
    return type(self), (self.what, self.value, self.valid)


class ConfigError(UserError):
  """A config key's value is wrong: `config.KEY=VALUE: what is valid`."""

  def __init__(self, key: str, value: Any, valid: str):
    self.key = key
    super().__init__(f'config.{key}', value, valid)

  def __reduce__(self):
    return type(self), (self.key, self.value, self.valid)


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps; the message says where the last good state was saved (exit 1)."""
