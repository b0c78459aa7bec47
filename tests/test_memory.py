"""`check.estimate_memory` against XLA's own accounting of the compiled train step (no step is run)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.cli import check
from jaxtrain import models, sharding
from jaxtrain.train import execution, loop as train, optim, steps
from jaxtrain.config.defaults import base_config

TOLERANCE = 0.15
BIG = dict(d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=768)  # configs/llama.py:size=cpu
SMALL = dict(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=384)
DATA8 = {'data': 8}
MIXED = {'data': 2, 'fsdp': 2, 'tensor': 2}
# (model, vocab, seq_len, remat, mesh): every remat mode on both meshes, both model sizes.
CASES = {
    'cpu-none-data8': (BIG, 4096, 256, 'none', DATA8),
    'small-none-2x2x2': (SMALL, 512, 128, 'none', MIXED),
    'cpu-full-data8': (BIG, 4096, 256, 'full', DATA8),
    'small-full-2x2x2': (SMALL, 512, 128, 'full', MIXED),
    'cpu-save_dots-2x2x2': (BIG, 4096, 256, 'save_dots', MIXED),
    'small-save_dots-data8': (SMALL, 512, 128, 'save_dots', DATA8),
}


def make_config(model: dict, seq_len: int, remat: str, mesh: dict):
  c = base_config()
  c.model.update(model)
  c.model.remat = remat
  c.data.seq_len, c.data.batch_size = seq_len, 8
  c.mesh.update(mesh)
  return c


def compiled_memory(config, mc: models.ModelConfig, mesh: jax.sharding.Mesh, ex: models.Execution) -> Any:
  """`memory_analysis()` of the train step built as `train.run` builds it, compiled on abstract inputs."""
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  with jax.set_mesh(mesh):
    graphdef, abstract_state, state_sh, _ = train.state_factory(mc, tx, config.train.seed, mesh, execution=ex)
    batch_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        steps.make_train_step(train.make_loss_fn(graphdef, config.train.z_loss), tx, schedule=schedule,
                              accum_steps=config.train.accum_steps),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    rows = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32, sharding=batch_sh)
    batch = {k: rows for k in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
    return step.lower(abstract_state, batch).compile().memory_analysis()


def peak_bytes(ma: Any) -> int:
  """Per-device peak: the donated state is written over the old (aliased), so those bytes count once."""
  return ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes


@pytest.fixture(scope='module')
def measured() -> dict[str, tuple[check.MemoryEstimate, Any]]:
  """(estimate, XLA's memory analysis) per case, compiled once for the module."""
  out = {}
  for name, (model, vocab, seq_len, remat, mesh_cfg) in CASES.items():
    config = make_config(model, seq_len, remat, mesh_cfg)
    mc = models.model_config(config.model, vocab)
    mesh = sharding.make_mesh(config.mesh)
    ex = execution.plan(config, mc)  # as train.run resolves it: the fused kernel on CPU
    out[name] = check.estimate_memory(config, mc, mesh, ex), compiled_memory(config, mc, mesh, ex)
  return out


@pytest.mark.parametrize('name', list(CASES))
def test_estimate_within_tolerance_of_compiled_step(measured, name):
  est, ma = measured[name]
  xla = peak_bytes(ma)
  error = (est.total - xla) / xla
  assert abs(error) <= TOLERANCE, (
      f'{name}: estimate {est.total:,} (params {est.params:,}, grads {est.grads:,}, opt {est.opt_state:,}, '
      f'activations {est.activations:,}) vs XLA {xla:,}: {error:+.1%}')


def test_state_part_of_estimate_matches_donated_arguments(measured):
  """Params + optimizer state are exact: they are what the step's donated arguments hold per device."""
  for name, (est, ma) in measured.items():
    state = est.params + est.opt_state
    # The arguments also hold the batch rows, the step counter and the rng key: a few KiB.
    assert state <= ma.argument_size_in_bytes <= state + 64 * 1024, name
