"""Architecture vs execution: jobs that only describe, load, export or merge a model never touch the fused CPU
attention kernel (no build, no warning, even with no C++ compiler); runs resolve their execution at the edge."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import pytest

from jaxtrain import models
from jaxtrain.adapters import lora
from jaxtrain.hf import merge
from jaxtrain.config.defaults import base_config
from jaxtrain.hf import config as hf_config, peft as peft_io, weights as hf_weights
from jaxtrain.kernels import cpu_attention
from jaxtrain.train import execution
from tests.helpers import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_only_path(tmp_path) -> str:
  """A PATH holding only this Python (no g++, no c++)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('python', 'python3'):
    os.symlink(sys.executable, bin_dir / name)
  return str(bin_dir)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
  """CXX=false, PATH without a compiler, and the kernel's build and probe replaced by spies that fail the
  test if anything calls them; yields the list of calls. Warnings turn into errors."""
  monkeypatch.setenv('CXX', 'false')
  monkeypatch.setenv('PATH', python_only_path(tmp_path))
  calls: list[str] = []
  monkeypatch.setattr(cpu_attention, '_build', lambda: calls.append('_build'))
  monkeypatch.setattr(cpu_attention, 'unavailable', lambda: calls.append('unavailable'))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield calls
  assert calls == []


def test_the_model_config_is_the_architecture_only():
  mc = models.model_config(base_config().model, 100)
  for field in ('attention_impl', 'attention_block', 'scan_layers', 'compute_dtype'):
    assert not hasattr(mc, field) and hasattr(models.Execution(), field)
  assert models.ModelConfig is models.config.ModelConfig
  assert models.execution.default(backend='gpu') == models.Execution(compute_dtype='bfloat16')


def test_export_import_peft_and_merge_never_touch_the_kernel(no_compiler, tmp_path):
  mc = tiny()
  params = models.init_params(mc, jax.random.PRNGKey(0))
  base = str(tmp_path / 'base')
  hf_weights.save(params, mc, None, base)  # export
  back = hf_config.model_config(base)  # import
  loaded = hf_weights.load_params(base, back)
  shapes = models.describe(back)[2]
  dirs = []
  for seed in (1, 2):  # PEFT save and load
    adapters = lora.init(shapes, r'attn/(q|v)$', 2, jax.random.PRNGKey(seed))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    dirs.append(str(tmp_path / f'adapter{seed}'))
    peft_io.save_adapter_dir(adapters, dirs[-1], rank=2, alpha=2.0, model_type=hf_config.read_config(base)[
        'model_type'])
    got, _ = peft_io.load_adapters(dirs[-1], loaded, hf_config.read_config(base)['model_type'])
    assert jax.tree.structure(got) == jax.tree.structure(adapters)
  assert 'merged' in merge.merge(dirs, [0.5, 0.5], str(tmp_path / 'merged'), base=base)
  assert 'merged' in merge.merge(dirs, [0.5, 0.5], str(tmp_path / 'adapter'))


def test_check_report_never_touches_the_kernel(no_compiler):
  from jaxtrain.cli import check
  from tests.test_check import load_config
  lines = check.report(load_config('tiny.py'))
  assert any('compute float32' in line for line in lines)


def test_check_command_without_a_compiler_prints_no_warning(tmp_path):
  env = dict(os.environ, CXX='false', PATH=python_only_path(tmp_path), JAXTRAIN_CACHE=str(tmp_path / 'cache'))
  proc = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'check', '--config=configs/tiny.py'], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'warn' not in proc.stderr.lower() and 'kernel' not in proc.stderr.lower(), proc.stderr[-2000:]
  assert not (tmp_path / 'cache' / 'kernels').exists()


def test_plan_resolves_the_run_execution_and_steps_per_call():
  config = base_config()
  config.model.attention_impl = 'xla'
  assert execution.plan(config) == models.Execution(attention_impl='xla', attention_block=128, scan_layers=False,
                                                    compute_dtype='float32')  # tests run on CPU
  assert execution.plan(config, backend='gpu') == models.Execution(compute_dtype='bfloat16')
  config.model.update(compute_dtype='bfloat16', attention_block=0, scan_layers=True)
  assert execution.plan(config) == models.Execution(compute_dtype='bfloat16')
  assert execution.steps_per_call(config) == 4 and execution.steps_per_call(config, backend='gpu') == 1
  config.train.steps_per_call = 2
  assert execution.steps_per_call(config) == 2


def test_the_fallback_warning_is_one_line(monkeypatch):
  """`jaxtrain train` on a CPU without a compiler says why it uses XLA attention in ONE line: the reason folded
  (a compiler's message spans lines) and no source line printed under it."""
  monkeypatch.setattr(execution, '_warned', set())
  monkeypatch.setattr(cpu_attention, 'unavailable', lambda: 'g++ failed:\n  error: one\n  error: two')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    assert execution.plan(base_config()).attention_impl == 'xla'
  assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
  w = caught[0]
  shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
  assert shown.count('\n') == 1 and 'g++ failed: error: one error: two' in shown, shown
