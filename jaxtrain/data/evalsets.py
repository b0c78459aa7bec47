"""Named held-out sets: `data.eval_sets = 'NAME=GLOBS;NAME=GLOBS'`, and the one way a set of files becomes a data
section that the pipeline reads.

A named set is read as a source of the run would read it: the files whole (no split), in the format of the run's
first source (its text field; a chat run's messages field and chat template, so chat files get the run's template
and assistant-only loss mask), tokenized by the run's tokenizer and packed as its eval split. The training loop
evaluates each set every train.eval_every steps and logs it as `eval_loss/NAME` (`jaxtrain.train.heldout.evaluate`);
`jaxtrain eval --data=NAME=GLOB` reads its extra sets through `set_config` too, so both score the same rows.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from typing import Any

from jaxtrain.data import pipeline, sources
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.errors import ConfigError, UserError

NAME = re.compile(r'[A-Za-z0-9_-]+')
KEY = 'data.eval_sets'
EXAMPLE = "e.g. 'wiki=data/wiki/*.jsonl;code=data/a.jsonl,data/b.jsonl'"


def parse(value: str) -> list[tuple[str, str]]:
  """`data.eval_sets` -> [(name, comma-separated globs)] in order; ConfigError for a malformed entry, a bad or
  repeated name, or a glob that matches no file. '' -> []."""
  out: list[tuple[str, str]] = []
  for entry in (e.strip() for e in value.split(';')):
    if not entry:
      continue
    name, sep, pattern = (p.strip() for p in entry.partition('='))
    if not sep or not name or not pattern:
      raise ConfigError(KEY, value, f'entry {entry!r} is not NAME=GLOBS; expected NAME=GLOBS entries separated by '
                        f'; ({EXAMPLE})')
    if not NAME.fullmatch(name):
      raise ConfigError(KEY, value, f'the set name {name!r} may hold only letters, digits, - and _')
    if name in (n for n, _ in out):
      raise ConfigError(KEY, value, f'names the set {name!r} twice; give each set its own name')
    globs = [p.strip() for p in pattern.split(',') if p.strip()]
    if not globs:
      raise ConfigError(KEY, value, f'set {name!r} names no file (its globs {pattern!r} are empty); {EXAMPLE}')
    for one in globs:
      if not any(os.path.isfile(m) for m in glob.glob(os.path.expanduser(one), recursive=True)):
        raise ConfigError(KEY, value, f'the glob {one!r} of set {name!r} matches no file')
    out.append((name, pattern))
  return out


def set_config(d: Any, name: str, pattern: str) -> Any:
  """A copy of the data section `d` whose one source, `name`, is the files of `pattern` (comma-separated globs)
  read whole as an eval split, in the format of `d`'s first source. No blocklist: data.exclude names the run's
  training documents, not these."""
  import ml_collections  # Deferred, as in `sources.source`: the data package itself does not need it.

  first = sources.source_specs(d)[0]
  fields = {'chat': {'messages_field': first.field}, 'sharegpt': {'messages_field': first.field},
            'text': {'text_field': first.field}}.get(first.format, {})
  section = sources.source(pattern, eval=pattern, format=first.format, template=first.template or 'chatml', **fields)
  cfg = copy.deepcopy(d)
  with cfg.unlocked():
    cfg.sources = ml_collections.ConfigDict({name: section})
    cfg.exclude = ''
  return cfg


def load(d: Any, tokenizer: Tokenizer) -> list[tuple[str, Any, list[pipeline.Source]]]:
  """Every set of `d.eval_sets`: (name, its data section (`set_config`), its eval split's sources), tokenized
  through the prepare cache; a set that does not read raises a one-line UserError naming the set."""
  out = []
  for name, pattern in parse(d.eval_sets):
    cfg = set_config(d, name, pattern)
    try:
      out.append((name, cfg, pipeline.load_sources(cfg, tokenizer, 'eval')))
    except UserError as e:  # said of the set the user named, not of the source section it is read as
      raise UserError(f'{KEY} set {name!r}', valid=_of_the_set(e.line(), name)) from None
  return out


def _of_the_set(line: str, name: str) -> str:
  """A source's one-line error about set `name` (read as `data.sources.NAME`, a section the user never wrote)
  in the words of data.eval_sets: its globs, read in the format of the run's first source."""
  line = line.replace(f'data.sources.{name}.eval=', '', 1)
  return line.replace(f'data.sources.{name}.', "the run's first source's ")
