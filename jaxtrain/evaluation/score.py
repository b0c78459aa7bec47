"""A run's model and one jitted function scoring a fixed-shape batch: per-token cross-entropy.

The state is built as `jaxtrain.train.state.build` builds it for training (full, LoRA, or QLoRA over a
quantized base), so the run's own param transform applies the adapters; a checkpoint's trainable params are
restored (`train.export.restore_state`, host arrays) and placed in the run's shardings, and the frozen base is
rebuilt once for every step. The score function is the run's eval step taken apart: the same
`models.apply`, `losses.next_token_targets` weights and `losses.token_cross_entropy`, but returning each
token's loss instead of their sum, for a batch of the run's shape [data.batch_size, data.seq_len]; it compiles
once for every set and every step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxtrain import data, models, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.evaluation import EvalError
from jaxtrain.evaluation.sets import KEYS
from jaxtrain.models.validate import check_vocab
from jaxtrain.train import execution, export, losses, optim, state as state_lib, steps


def make_score_fn(graphdef: Any, transform: steps.ParamTransform | None) -> Any:
  """`score(weights, batch) -> {'ce', 'weights', 'scored', 'targets'}`, each (B, T): the cross-entropy of
  every position's next token, the training loss weights (loss-masked predictions within a document), the
  predictions of tokens marked `scored` (whatever their loss mask) and the target ids. `weights`:
  {'params', 'frozen'?} as the run's state holds them."""
  def score(weights: dict, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    params = weights['params']
    if transform is not None:  # rng None: evaluation, adapter dropout off (as the run's eval step)
      params = transform(params, weights.get('frozen'), None)
    targets, loss_weights = losses.next_token_targets(batch)
    _, scored = losses.next_token_targets(dict(batch, loss_mask=batch['scored']))
    ce, _ = losses.token_cross_entropy(models.apply(graphdef, params, batch), targets)
    return {'ce': ce, 'weights': loss_weights, 'scored': scored, 'targets': targets}
  return score


def eval_mesh(mesh_cfg: Any, rows: int) -> jax.sharding.Mesh:
  """The run's mesh where it fits this machine's devices and the batch rows (then the run's own eval repeats
  to float rounding); else data parallelism over as many devices as divide the rows (a run trained elsewhere)."""
  devices = jax.devices()
  try:
    sharding.check(mesh_cfg, rows, 1, len(devices))
    return sharding.make_mesh(mesh_cfg)
  except ConfigError:
    n = max(k for k in range(1, len(devices) + 1) if rows % k == 0)
    return sharding.make_mesh({'data': n, 'fsdp': 1, 'tensor': 1}, devices[:n])


class Scorer:
  """The model of the run in `workdir` (per its config.json) under its mesh, and the jitted score function
  for batches of [rows, seq_len] = [data.batch_size, data.seq_len]. Call under `with jax.set_mesh(mesh)`."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, workdir: str):
    self.config, self.workdir = config, workdir
    self.run_name = os.path.basename(os.path.abspath(workdir))  # runs/<config> by default: the config's name
    check_vocab(config.model, tokenizer.vocab_size)
    self.mc = models.model_config(config.model, tokenizer.vocab_size)
    self.rows, self.seq_len = int(config.data.batch_size), int(config.data.seq_len)
    self.mesh = eval_mesh(config.mesh, self.rows)
    tx, _ = optim.make_optimizer(config.optim, config.train.steps)  # shapes only: its state is never made
    with jax.set_mesh(self.mesh):
      self.built = state_lib.build(config, self.mc, tx, self.mesh, execution.plan(config, self.mc))
    self._frozen: Any = None
    batch_sh = sharding.batch_sharding(self.mesh)
    weights_sh = {k: v for k, v in self.built.shardings.items() if k in ('params', 'frozen')}
    self.fn = jax.jit(make_score_fn(self.built.graphdef, self.built.transform),
                      in_shardings=(weights_sh, {k: batch_sh for k in KEYS}), out_shardings=batch_sh)
    self.compile_s = 0.0

  @property
  def description(self) -> str:
    return self.built.description

  def weights(self, step: int) -> dict:
    """{'params' (of checkpoint `step`), 'frozen' (a LoRA run's base)} on device, in the run's shardings."""
    params = export.restore_state(self.workdir, step)['params']
    want = self.built.abstract['params']
    got_shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    if got_shapes != jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), want):
      raise EvalError(f'checkpoint {self.workdir}/checkpoints/{step}', valid='does not hold the parameters its '
                      "run's config.json describes (another model or adapter layout was saved there)")
    out = {'params': jax.device_put(params, self.built.shardings['params'])}
    if 'frozen' in self.built.shardings:
      if self._frozen is None:  # rebuilt from the config (seed or init.from_hf) as the run did; the same for all steps
        self._frozen = self.built.complete({})['frozen']
      out['frozen'] = self._frozen
    return out

  def __call__(self, weights: dict, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The per-token outputs of one host batch, left on device (fetch them with `jax.device_get`)."""
    rows = batch['tokens'].shape[0]
    if rows != self.rows:
      raise ValueError(f'a batch of {rows} rows; the score function takes {self.rows}')
    inputs = sharding.to_global({k: batch[k] for k in KEYS}, self.mesh)
    if self.compiles == 0:  # the one compile, timed apart from scoring
      t = time.perf_counter()
      out = self.fn(weights, inputs)
      jax.block_until_ready(out)
      self.compile_s = time.perf_counter() - t
      return out
    return self.fn(weights, inputs)

  @property
  def compiles(self) -> int:
    """Programs compiled so far: 1 after the first call, whatever the sets and steps."""
    return self.fn._cache_size()  # pylint: disable=protected-access
