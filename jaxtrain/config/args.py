"""Parsing of the `:key=value,key=value` argument that config files receive in `get_config(arg)`."""

from __future__ import annotations


def parse(arg: str | None, defaults: dict[str, str], choices: dict[str, tuple[str, ...]] | None = None) -> dict:
  """`'size=125m'` -> {'size': '125m', ...defaults}. Unknown keys or values raise ValueError naming them."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'config argument {item!r}: expected key=value with key in {sorted(defaults)}')
    if choices and key in choices and value not in choices[key]:
      raise ValueError(f'config argument {key}={value!r}: valid values are {", ".join(choices[key])}')
    out[key] = value
  return out
