"""Small builders shared by tests: tiny model configs, hand-made packed batches, in-process commands."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtrain.models import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def tiny(**overrides) -> ModelConfig:
  return dataclasses.replace(TINY, **overrides)


def packed_loss_and_grads(cfg: ModelConfig, execution=None) -> tuple:
  """(value, parameter gradients) of the std of the real tokens' logits under `cfg` run as `execution`, for
  one packed batch (several documents and padding in a row) and one set of parameters: compares attention
  paths."""
  import jax

  from jaxtrain import models
  batch = packed_batch([[5, 8], [16], [3, 3, 3]], 16, seed=4)
  params = models.init_params(tiny(), jax.random.PRNGKey(2))
  graphdef, _, _ = models.describe(cfg, execution)
  real = batch['segment_ids'] > 0
  return jax.jit(jax.value_and_grad(lambda p: models.apply(graphdef, p, batch)[real].std()))(params)


def packed_batch(docs_per_row: list[list[int]], seq_len: int, vocab: int = 64, seed: int = 0) -> dict:
  """Rows packed from documents of the given lengths, random tokens, trailing padding (segment 0)."""
  rng = np.random.default_rng(seed)
  b = len(docs_per_row)
  out = {k: np.zeros((b, seq_len), np.int32) for k in ('tokens', 'segment_ids', 'positions', 'loss_mask')}
  for r, lengths in enumerate(docs_per_row):
    at = 0
    for s, n in enumerate(lengths, start=1):
      out['tokens'][r, at:at + n] = rng.integers(1, vocab, n)
      out['segment_ids'][r, at:at + n] = s
      out['positions'][r, at:at + n] = np.arange(n)
      out['loss_mask'][r, at:at + n] = 1
      at += n
    assert at <= seq_len
  return out


def run_command(capsys, *args: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `jaxtrain ARGS` run in this process (output before it is discarded)."""
  from jaxtrain import cli
  capsys.readouterr()
  try:
    cli.main(['jaxtrain', *args])
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def run_captured(*args: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `jaxtrain ARGS` in this process, captured without capsys (module
  fixtures have none)."""
  import contextlib
  import io

  from jaxtrain import cli
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.main(['jaxtrain', *args])
      code = 0
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()
