"""`jaxtrain check`: the preflight report from shapes alone, fast at any model size, nothing written."""

import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxtrain import data, models, sharding
from jaxtrain.train import memory, optim
from jaxtrain.data import sources
from tests.conftest import REPO
from tests.helpers import run_command


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f'config_{name}', os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# A child's ru_maxrss starts at its parent's RSS (exec keeps the high-water mark of the address space it
# replaces), so a test worker that has grown to 3 GiB would pass that on. The child is started from this small
# launcher instead, and the launcher reports the child's peak on its last stderr line.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f'peak_rss_kib={usage.ru_maxrss}', file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(module: str, *args: str, env: dict | None = None) -> tuple[int, str, str, float, int]:
  """(exit status, stdout, stderr, seconds, peak RSS in bytes) of `python -m module args` in the repo."""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', _LAUNCHER, sys.executable, '-m', module, *args], cwd=REPO,
                        capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  err, _, last = proc.stderr.rstrip('\n').rpartition('\n')
  peak = re.fullmatch(r'peak_rss_kib=(\d+)', last)
  assert peak, f'the launcher did not report a peak: {proc.stderr[-2000:]}'
  return proc.returncode, proc.stdout, err, seconds, int(peak.group(1)) * 1024


def printed_param_count(stdout: str) -> int:
  return int(re.search(r'^  parameters +([\d,]+)$', stdout, re.M).group(1).replace(',', ''))


def test_check_tiny_previews_tokens_counts_params_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  code, out, err, seconds, _ = run('jaxtrain.cli', 'check', '--config=configs/tiny.py', f'--workdir={workdir}')
  assert code == 0, err[-2000:]
  assert seconds < 30
  assert not workdir.exists()

  config = load_config('tiny.py')
  tokenizer = data.load_tokenizer(config.data)
  ids = tokenizer.encode(sources.load_documents(config.data, 'train')[0])
  for pos in (0, 1, 7):  # each row: position, token id, decoded piece, loss mask
    piece = repr(tokenizer.decode([ids[pos]]))
    assert re.search(rf'^ +{pos} +{ids[pos]}  {re.escape(piece)} +1$', out, re.M), (pos, ids[pos], piece, out)
  assert 'loss mask' in out and '(no template)' in out
  assert "data source 'stdlib', train split" in out and "data source 'stdlib', eval split" in out

  mc = models.model_config(config.model, tokenizer.vocab_size)
  assert printed_param_count(out) == models.count_params(models.init_params(mc, jax.random.PRNGKey(0)))
  for row in ('weights', 'adapters', 'optimizer state', 'gradients', 'activations', 'workspace', 'total'):
    assert re.search(rf'^  {row} +\d+\.\d+ GiB', out, re.M), row
  assert 'per token' in out and 'figures for cpu, float32 compute' in out and 'for a fits / does-not-fit' in out


def test_check_1b_takes_seconds_and_allocates_no_parameters(tmp_path):
  # The 32k tokenizer is built (and cached for the suite) here first: a BPE build has a footprint of its own,
  # and the process measured is the one that finds it cached.
  config = load_config('llama.py', 'size=1b')
  data.load_tokenizer(config.data)
  code, out, err, seconds, peak_rss = run('jaxtrain.cli', 'check', '--config=configs/llama.py:size=1b',
                                          f'--workdir={tmp_path}/run')
  assert code == 0, err[-2000:]
  assert seconds < 60
  m = config.model
  vocab, d, h, f = 32768, m.d_model, m.d_model // m.num_heads, m.mlp_dim
  block = d * h * (m.num_heads + 2 * m.num_kv_heads) + m.num_heads * h * d + 3 * d * f + 2 * d
  expected = 2 * vocab * d + m.num_layers * block + d  # untied embedding and head, final norm
  assert printed_param_count(out) == expected
  assert 1.0e9 < expected < 1.3e9
  assert peak_rss < 2 * 2**30, f'{peak_rss / 2**30:.1f} GiB peak: were the 4.4 GB of parameters allocated?'


@pytest.mark.slow
def test_preflight_prints_the_report_then_trains(tmp_path, capsys):
  from jaxtrain import cli
  cli.main(['jaxtrain', 'train', '--config=configs/tiny.py', '--config.train.steps=2',
            '--config.optim.warmup_steps=0', '--config.log.plot=false', '--preflight', f'--workdir={tmp_path}/run'])
  out = capsys.readouterr().out
  report, trained = out.index('memory per device'), out.index('steps 1..2: loss')
  assert report < trained
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '2')


def test_check_rejects_bad_configs_in_one_line(tmp_path, capsys):
  for args, needle in ((['--config.model.num_kv_heads=3'], 'model.num_kv_heads=3'),
                       # validate accepts it; the held-out split is empty, which only reading the data shows
                       (['--config.data.eval_fraction=0.0'], 'data.eval_fraction=0.0')):
    code, out, err = run_command(capsys, 'check', '--config=configs/tiny.py', *args, f'--workdir={tmp_path}/run')
    lines = [line for line in err.splitlines() if line.strip() and 'Warning' not in line]
    assert code == 2, (args, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], (args, lines)
    assert 'Traceback' not in err and not os.path.exists(tmp_path / 'run')


def test_memory_prediction_matches_eval_shape_bytes():
  config = load_config('tiny.py')
  mc = models.model_config(config.model, data.load_tokenizer(config.data).vocab_size)
  shapes = jax.eval_shape(lambda key: models.init_params(mc, key), jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  nbytes = lambda tree: sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  def predict(mesh_cfg: dict, devices=None) -> memory.Prediction:
    mesh = sharding.make_mesh(mesh_cfg, devices)
    rows = config.data.batch_size // config.train.accum_steps // sharding.data_parallel_size(mesh)
    return memory.predict(memory.StepState(config, mc, mesh), rows, config.data.seq_len, config.train.accum_steps)

  mem = predict({'data': 8, 'fsdp': 1, 'tensor': 1})
  assert mem.state.weights == nbytes(shapes) == 4 * models.count_params(shapes) == mem.state.trained
  assert mem.gradients == nbytes(shapes) and mem.state.adapters == 0
  assert mem.state.optimizer == nbytes(jax.eval_shape(tx.init, shapes))
  assert mem.rows == 1 and mem.total == (mem.state.total + mem.batch + mem.gradients + mem.activations
                                         + mem.workspace)

  # fsdp splits every parameter with an embed dimension 8 ways; norms stay whole.
  fsdp = predict({'data': 1, 'fsdp': 8, 'tensor': 1})
  norms = sum(math.prod(x.shape) * 4 for path, x in jax.tree_util.tree_leaves_with_path(shapes)
              if 'norm' in jax.tree_util.keystr(path))
  assert fsdp.state.weights == (mem.state.weights - norms) // 8 + norms

  config.train.accum_steps = 2  # a running gradient sum beside each micro-batch's gradient
  assert predict({'data': 4, 'fsdp': 1, 'tensor': 1}, jax.devices()[:4]).gradients == 2 * mem.gradients


def test_activation_estimate_orders_remat_policies():
  config = load_config('llama.py', 'size=1b')
  mc = models.model_config(config.model, 32768)
  by_policy = {p: memory.activation_bytes(dataclasses.replace(mc, remat=p), 4, 2048, 1)
               for p in ('none', 'save_dots', 'full')}
  assert by_policy['none'] > by_policy['save_dots'] > by_policy['full'] > 0
  assert memory.activation_bytes(mc, 4, 2048, 2) < by_policy['save_dots'] < memory.activation_bytes(mc, 8, 2048, 1)


# A model whose weights weigh next to its activations (the tiny one's do not).
SMALL = ['--config=configs/tiny.py', '--config.model.d_model=128', '--config.model.mlp_dim=384']


def _mib(out: str, row: str) -> float:
  """Bytes of a memory row of the report ('  weights   0.002 GiB   1.8 MiB ...'), to 0.05 MiB."""
  m = re.search(rf'^  {re.escape(row)} +[\d.]+ GiB +([\d,.]+) MiB', out, re.M)
  assert m, (row, out[-3000:])
  return float(m.group(1).replace(',', '')) * 2 ** 20


@pytest.mark.parametrize('quantize', ['none', 'nf4'])
def test_check_counts_lora_and_qlora_as_the_compiled_training_step_holds_them(quantize, tmp_path, capsys):
  # Issue 27: check printed full training's memory for LoRA and QLoRA runs (dense weights, their gradients and
  # optimizer state: 2.4x the compiled QLoRA step) and no adapter count. Its figures are now held against the
  # memory analysis of training's own step (`train.jit_steps`, compiled on abstract inputs).
  from jaxtrain import cli
  from jaxtrain.cli import estimate
  args = [*SMALL, '--config.lora.rank=4', f'--config.lora.quantize={quantize}', f'--workdir={tmp_path}/run']
  cli.main(['jaxtrain', 'check', *args, '--memory-budget=64MiB'])
  out = capsys.readouterr().out
  # Adapters of rank 4 on q, k, v, o, gate, up, down of 2 blocks (d 128, 4 heads and 2 kv heads of 32, mlp 384):
  # r x (inputs + outputs) each.
  d, kv, f = 128, 2 * 32, 384
  adapters = 2 * 4 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d))
  assert re.search(rf'^  trained params +{adapters:,d}  \(.*LoRA params \(rank 4', out, re.M), out[-3000:]
  assert ('nf4-quantized' in out) == (quantize == 'nf4')

  config = load_config('tiny.py')
  config.model.d_model, config.model.mlp_dim = 128, 384
  config.lora.rank, config.lora.quantize = 4, quantize
  mc = models.model_config(config.model, data.load_tokenizer(config.data).vocab_size)
  sm = estimate.StepMemory(config, mc, sharding.make_mesh(config.mesh))
  compiled = sm(1)  # 8 rows over 8 devices
  b = sm.ss.bytes
  assert b.adapters == 4 * adapters and b.trained_params == adapters  # float32, replicated over the data axis
  # The state rows are exact: they are the compiled step's arguments (with the batch, step and rng).
  state = sum(_mib(out, row) for row in ('weights', 'adapters', 'optimizer state', 'batch, step, rng'))
  assert state == pytest.approx(compiled.argument, abs=0.2 * 2 ** 20)
  assert _mib(out, 'weights') == pytest.approx(b.weights, abs=0.05 * 2 ** 20)
  assert _mib(out, 'gradients') == pytest.approx(4 * adapters, abs=0.05 * 2 ** 20)  # of the adapters only
  total = _mib(out, 'total')
  assert abs(total - compiled.total) <= 0.15 * compiled.total, (total, compiled)
  assert 'figures for cpu, float32 compute' in out and 'predicted peak of the compiled step' in out
  assert re.search(r'^  budget .* from estimate.memory_budget: the prediction fits the budget of 64.0 MiB', out, re.M)

  # The same figure against a budget it exceeds: the verdict, and exit status 1.
  with pytest.raises(SystemExit) as e:
    cli.main(['jaxtrain', 'check', *args, f'--memory-budget={int(total) // 2}B'])
  assert e.value.code == 1
  assert 'the prediction does not fit the budget' in capsys.readouterr().out
  assert not (tmp_path / 'run').exists()


def test_check_refuses_the_lora_targets_training_refuses(tmp_path, capsys):
  # Issue 27: `--config.lora.targets='blocks/attn/qq'` passed check (exit 0) and failed training. Both now build
  # the state the same way (`state.build`) and refuse it with the same line, before anything is written.
  import jaxtrain
  from jaxtrain import cli
  from jaxtrain.adapters import lora
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as e:
    cli.main(['jaxtrain', 'check', '--config=configs/tiny.py', '--config.lora.rank=4',
              '--config.lora.targets=blocks/attn/qq', f'--workdir={workdir}'])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert err[0].startswith("error: lora.targets='blocks/attn/qq' matches no parameter"), err
  config = load_config('tiny.py')
  config.lora.rank, config.lora.targets = 4, 'blocks/attn/qq'
  with pytest.raises(lora.LoraError) as trained:
    jaxtrain.run(config, str(workdir))
  assert err[0] == f'error: {trained.value.line()}'
  assert not workdir.exists()
