"""The notebooks import jaxtrain and run against the current API (executed with a shortened run)."""

import ast
import json
import os

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  with open(os.path.join(REPO, 'colab', 'quickstart.ipynb')) as f:
    nb = json.load(f)
  code = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
  for src in code:
    ast.parse(src)
  namespace: dict = {}
  for src in code[:2]:  # install (skipped off Colab), imports and config
    exec(compile(src, 'quickstart', 'exec'), namespace)
  namespace['config'].train.steps = 4
  namespace['config'].train.eval_every = 0
  src = code[2].replace("'/tmp/jaxtrain-quickstart'", repr(str(tmp_path)))
  exec(compile(src, 'quickstart', 'exec'), namespace)
  assert set(namespace['summary'].losses) == {1, 2, 3, 4}
  assert "metrics.plot_losses('/tmp/jaxtrain-quickstart')" in code[3]  # needs IPython: checked by parse only
  assert os.path.exists(namespace['metrics'].plot_losses(str(tmp_path)))
