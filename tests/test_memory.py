"""`jaxtrain check`'s memory prediction (`train.memory.predict`) against XLA's own accounting of the compiled train
step (no step is run): full training, LoRA and QLoRA."""

from __future__ import annotations

import jax
import pytest

from jaxtrain import models, sharding
from jaxtrain.adapters import quant
from jaxtrain.cli import estimate
from jaxtrain.train import memory, state
from jaxtrain.config.defaults import base_config

TOLERANCE = 0.15
BIG = dict(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=768)  # configs/llama.py:size=cpu
SMALL = dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=384)
DATA8 = {'data': 8}
MIXED = {'data': 2, 'fsdp': 2, 'tensor': 2}
LORA = {'rank': 4}
QLORA = {'rank': 4, 'quantize': 'nf4'}
# (model, vocab, seq_len, remat, mesh, lora): every remat mode on both meshes, both model sizes; LoRA with unrolled
# layers (remat none) and QLoRA with scanned ones (remat full).
CASES = {
    'cpu-none-data8': (BIG, 4096, 256, 'none', DATA8, {}),
    'small-none-2x2x2': (SMALL, 512, 128, 'none', MIXED, {}),
    'cpu-full-data8': (BIG, 4096, 256, 'full', DATA8, {}),
    'small-full-2x2x2': (SMALL, 512, 128, 'full', MIXED, {}),
    'cpu-save_dots-2x2x2': (BIG, 4096, 256, 'save_dots', MIXED, {}),
    'small-save_dots-data8': (SMALL, 512, 128, 'save_dots', DATA8, {}),
    'small-lora-none-data8': (SMALL, 512, 128, 'none', DATA8, LORA),
    'small-qlora-full-2x2x2': (SMALL, 512, 128, 'full', MIXED, QLORA),
}


def make_config(model: dict, seq_len: int, remat: str, mesh: dict, lora: dict):
  c = base_config()
  c.model.update(model)
  c.model.remat = remat
  c.data.seq_len, c.data.batch_size = seq_len, 8
  c.mesh.update(mesh)
  c.lora.update(lora)
  # One step per call (an accelerator's default): the formula models one step; CPU's default of 4 per call scans
  # them, and XLA then assigns buffers differently (cpu-none-data8: 104 MB instead of 113 MB).
  c.train.steps_per_call = 1
  return c


@pytest.fixture(scope='module')
def measured() -> dict[str, tuple[memory.Prediction, memory.Measured]]:
  """(prediction, XLA's memory analysis of training's own step, `train.jit_steps`) per case, compiled once."""
  out = {}
  for name, (model, vocab, seq_len, remat, mesh_cfg, lora) in CASES.items():
    config = make_config(model, seq_len, remat, mesh_cfg, lora)
    mc = models.model_config(config.model, vocab)
    sm = estimate.StepMemory(config, mc, sharding.make_mesh(config.mesh))  # the execution train.run picks
    rows = config.data.batch_size // sm.dp
    out[name] = memory.predict(sm.ss, rows, seq_len, config.train.accum_steps), sm(rows)
  return out


@pytest.mark.parametrize('name', list(CASES))
def test_prediction_within_tolerance_of_compiled_step(measured, name):
  p, m = measured[name]
  error = (p.total - m.total) / m.total
  assert abs(error) <= TOLERANCE, (
      f'{name}: predicted {p.total:,} (state {p.state.total:,}, gradients {p.gradients:,}, activations '
      f'{p.activations:,}, workspace {p.workspace:,}) vs XLA {m.total:,} (temporaries {m.temp:,}): {error:+.1%}')


def test_state_part_of_prediction_matches_donated_arguments(measured):
  """The state is exact: it is what the step's donated arguments hold per device (adapters, a quantized base and
  optimizer state for the adapters only, with LoRA); the parts of the compiled peak add up to it."""
  for name, (p, m) in measured.items():
    b = p.state
    # The arguments also hold the batch rows (steps_per_call of them on CPU): a few KiB.
    assert b.total <= m.argument <= b.total + 64 * 1024, name
    assert sum(n for _, n in memory.parts(m, b)) == m.total, name
    if CASES[name][5]:
      assert b.lora and 0 < b.adapters < b.weights / 4 and b.optimizer == 2 * b.adapters + 4, name
      assert p.gradients == b.adapters
    else:
      assert not b.lora and b.adapters == 0 and p.gradients == b.weights, name
  # QLoRA's base: NF4 codes and scales of the block projections (replicated: state.build does not split them),
  # the embedding and norms in float32.
  q = measured['small-qlora-full-2x2x2'][0].state
  model, vocab, seq_len, remat, mesh_cfg, lora = CASES['small-qlora-full-2x2x2']
  mc = models.model_config(make_config(model, seq_len, remat, mesh_cfg, lora).model, vocab)
  quantized = jax.eval_shape(lambda p: quant.quantize_tree(p, state.QUANTIZED, 'nf4'), models.describe(mc)[2])
  assert q.quantize == 'nf4' and q.weights == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(quantized))
  assert q.frozen_params == models.count_params(models.describe(mc)[2])
