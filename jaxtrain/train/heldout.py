"""The training loop's evaluation: loss and perplexity over the run's held-out split and over each named set of
data.eval_sets (`jaxtrain.data.evalsets`), in the run's batch shape, the same batches at every evaluation."""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from jaxtrain import data, sharding


def evaluate(eval_step: Any, state: dict, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer,
             mesh: jax.sharding.Mesh, srcs: Any = None, sets: Any = ()) -> dict[str, float]:
  """Loss and perplexity over the first `train.eval_batches` batches of the held-out split (same packing
  as training; the same batches every time), plus eval_X for every further sum `X_sum` the loss reports.
  `srcs`: the eval split's `data.pipeline.load_sources`, when the caller has loaded it already. `sets`: the
  named sets of data.eval_sets (`data.evalsets.load`), each scored alike and logged as eval_X/NAME."""
  out = _evaluate_split(eval_step, state, config, config.data, tokenizer, mesh, srcs)
  for name, cfg, set_srcs in sets:
    out.update({f'{k}/{name}': v for k, v in _evaluate_split(eval_step, state, config, cfg, tokenizer, mesh,
                                                             set_srcs).items()})
  return out


def _evaluate_split(eval_step: Any, state: dict, config: ml_collections.ConfigDict, data_cfg: Any,
                    tokenizer: data.Tokenizer, mesh: jax.sharding.Mesh, srcs: Any) -> dict[str, float]:
  """`evaluate`'s figures over the eval split of `data_cfg` (the run's, or a named set's)."""
  ds = data.make_dataset(data_cfg, tokenizer, split='eval', seed=config.train.seed,
                         batch_size=config.data.batch_size // jax.process_count(),
                         process_index=jax.process_index(), process_count=jax.process_count(), srcs=srcs)
  it = iter(ds)
  totals: dict[str, float] = {}
  for _ in range(config.train.eval_batches):
    sums = jax.device_get(eval_step(state, sharding.to_global(next(it), mesh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  tokens = totals['tokens']
  loss = totals['loss_sum'] / max(tokens, 1.0)
  out = {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50.0)), 'eval_tokens': tokens}
  out.update({f'eval_{k[:-len("_sum")]}': v / max(tokens, 1.0) for k, v in totals.items()
              if k.endswith('_sum') and k not in ('loss_sum', 'z_loss_sum')})
  return out
