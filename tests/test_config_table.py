"""The README's config table is generated from jaxtrain/config/defaults.py, and every key there has a comment."""

import ml_collections

from jaxtrain.config import defaults, table
from jaxtrain.data import sources


def test_readme_table_matches_defaults():
  assert table.readme_block() == table.expected_block(), (
      'the config table in README.md differs from jaxtrain/config/defaults.py: '
      'run `python docs/config_table.py --write`')


def test_every_key_has_a_comment():
  missing = table.undocumented()
  assert not missing, (f'keys without a comment in jaxtrain/config/defaults.py (or, for data.sources.NAME.*, in the '
                       f'docstring of jaxtrain.data.sources.source): {missing}')


def test_the_parse_sees_every_key():
  """Every key of base_config() and of a named source gets a row; the parse invents none."""
  _, docs = table.describe()
  assert list(docs) != [] and set(docs) == set(table.flat_keys(defaults.base_config()))
  assert set(table.source_keys()) == set(sources.source(''))
  text = table.markdown()
  for key in docs:
    assert (f'**`{key}`**: ' if '.' not in key else f'| `{key}` |') in text
  for key in sources.source(''):
    assert f'| `{table.SOURCE_KEY}.{key}` |' in text


def test_default_nested_sources_are_documented(monkeypatch):
  """A named source added to the defaults needs a comment; its keys, and every named source's, need a line in the
  docstring of sources.source."""
  original = defaults._data

  def with_source() -> ml_collections.ConfigDict:
    data = original()
    data.sources.web = sources.source('web/*.jsonl')
    return data

  monkeypatch.setattr(defaults, '_data', with_source)
  assert table.undocumented() == ['data.sources.web']  # its keys are described by sources.source's docstring
  monkeypatch.setattr(sources.source, '__doc__', sources.source.__doc__.replace('    weight', '    heavy'))
  assert table.undocumented() == ['data.sources.web', 'data.sources.web.weight', 'data.sources.NAME.weight']


def test_comment_rules():
  source = '''
def base_config():
  config = ml_collections.ConfigDict()
  config.part = _part()
  return config


def _part():
  """A section."""
  part = ml_collections.ConfigDict()
  # about the next lines, not a key

  part.a = 1  # trailing
  # above
  # two lines
  part.b = (1,
            2)  # and trailing
  part.c = 0
  return part
'''
  sections, docs = table.describe(source)
  assert sections == {'part': 'A section.'}
  assert docs['part'].text == 'A section.'
  assert docs['part.a'] == table.Doc('trailing', '1')
  assert docs['part.b'].comment == 'above two lines and trailing'
  assert docs['part.c'].comment == ''


def test_cells_escape_markdown():
  assert table._cell('a | b * c <name> `x|y*z`') == r'a \| b \* c &lt;name> `x\|y*z`'
