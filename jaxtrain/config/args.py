"""Parsing of the `:key=value,key=value` argument that config files receive in `get_config(arg)`.

Every config file parses its argument here, also one that takes none (`parse(arg, {})`), so a mistyped or
unsupported argument is a one-line ConfigArgError (exit 2 on the command line), never silently ignored."""

from __future__ import annotations

from jaxtrain.errors import UserError


class ConfigArgError(UserError):
  """A config file's argument (`--config=FILE:key=value`) it does not take, or a value it does not accept."""


def parse(arg: str | None, defaults: dict[str, str], choices: dict[str, tuple[str, ...]] | None = None) -> dict:
  """`'size=125m'` -> {'size': '125m', ...defaults}. Unknown keys or values raise ConfigArgError naming them
  and the valid ones."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      valid = (f'expected key=value with key one of {", ".join(sorted(defaults))}' if defaults else
               'this config file takes no arguments (valid: none)')
      raise ConfigArgError(f'config argument {item!r}', valid=valid)
    if choices and key in choices and value not in choices[key]:
      raise ConfigArgError(f'config argument {key}', value, f'valid values are {", ".join(choices[key])}')
    out[key] = value
  return out
