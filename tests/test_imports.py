"""The package's shape: no import cycles between jaxtrain modules, and lower layers never import higher ones.

The graph is read from the source with `ast`, so imports inside functions (deferred ones) count too. A
`from jaxtrain.pkg import mod` is an edge to the package's __init__ as well as to the module, as at run time."""

from __future__ import annotations

import ast
import os

from tests.conftest import REPO

PACKAGE = os.path.join(REPO, 'jaxtrain')

# What each lower layer must never import (module-name prefixes). The layers, bottom up: errors, paths,
# sharding, config.defaults/args -> kernels -> models | data -> adapters -> hf -> train -> stackwise ->
# config.validate (calls every feature's check) -> cli. train.run and stackwise.job validate the config they
# are given, so they are the only modules below cli that import config.validate. The capabilities that judge
# what train makes (evaluation) sit above train and stackwise, below cli.
JOBS = ('jaxtrain.cli', 'jaxtrain.main', 'jaxtrain.__main__')
VALIDATION = ('jaxtrain.config.validate', 'jaxtrain.config.schema', 'jaxtrain.config.resolve')
CAPABILITIES = ('jaxtrain.evaluation',)
ABOVE_MODELS = ('jaxtrain.train', 'jaxtrain.stackwise', 'jaxtrain.hf', 'jaxtrain.adapters') + VALIDATION + \
    CAPABILITIES + JOBS
FORBIDDEN = {
    'jaxtrain.errors': ('jaxtrain.',),
    'jaxtrain.paths': ('jaxtrain.',),
    'jaxtrain.config.defaults': ('jaxtrain.',),
    'jaxtrain.kernels': ('jaxtrain.models', 'jaxtrain.data') + ABOVE_MODELS,
    'jaxtrain.models': ('jaxtrain.data',) + ABOVE_MODELS,
    'jaxtrain.data': ('jaxtrain.models', 'jaxtrain.kernels') + ABOVE_MODELS,
    'jaxtrain.adapters': ('jaxtrain.data', 'jaxtrain.train', 'jaxtrain.stackwise', 'jaxtrain.hf') + VALIDATION +
    CAPABILITIES + JOBS,
    'jaxtrain.hf': ('jaxtrain.train', 'jaxtrain.stackwise') + VALIDATION + CAPABILITIES + JOBS,
    'jaxtrain.sampling': ('jaxtrain.data', 'jaxtrain.train', 'jaxtrain.stackwise', 'jaxtrain.hf') + VALIDATION +
    CAPABILITIES + JOBS,
    'jaxtrain.train': ('jaxtrain.stackwise',) + CAPABILITIES + JOBS,
    'jaxtrain.stackwise': CAPABILITIES + JOBS,
    'jaxtrain.config': CAPABILITIES + JOBS,
    'jaxtrain.evaluation': VALIDATION + JOBS,
}
# The job entry points that validate their config (the library path validates like the command line).
MAY_VALIDATE = ('jaxtrain.train.loop', 'jaxtrain.stackwise.job')


def modules() -> dict[str, str]:
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = path
  return out


def imports_of(name: str, path: str, known: dict[str, str]) -> set[str]:
  """The jaxtrain modules `name` imports anywhere in its source (packages' __init__ included)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = name.split('.') if path.endswith('__init__.py') else name.split('.')[:-1]
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
      else:
        base = node.module or ''
      out.add(base)
      out.update(f'{base}.{a.name}' for a in node.names)
  # A module's own ancestors' __init__ run before it anyway: no edge.
  return {m for m in out if m in known and m != name and not name.startswith(m + '.')}


def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        found.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return found


def test_no_import_cycles():
  assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + '.') or (prefix.endswith('.') and name.startswith(prefix))


def test_lower_layers_never_import_higher_ones():
  bad = []
  for name, deps in graph().items():
    for layer, forbidden in FORBIDDEN.items():
      if not under(name, layer):
        continue
      for dep in deps:
        if under(dep, layer) or (name in MAY_VALIDATE and any(under(dep, v) for v in VALIDATION)):
          continue
        if any(under(dep, f) for f in forbidden):
          bad.append(f'{name} imports {dep}')
  assert bad == []


def test_the_concepts_are_folders():
  folders = {d for d in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, d, '__init__.py'))}
  assert {'config', 'models', 'kernels', 'train', 'data', 'adapters', 'hf', 'stackwise', 'evaluation', 'cli'} <= folders
  loose = {f for f in os.listdir(PACKAGE) if f.endswith('.py')}
  assert loose <= {'__init__.py', '__main__.py', 'main.py', 'errors.py', 'paths.py', 'sharding.py', 'sampling.py'}
