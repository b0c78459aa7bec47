"""The training loop: build a sharded state, resume if a checkpoint exists, step, log, evaluate, save."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import data, losses, metrics, models, optim, sharding, steps
from jaxtrain.checkpoint import Checkpointer, abstract_with_shardings
from jaxtrain.config import ConfigError


def make_loss_fn(graphdef: Any, z_loss: float) -> steps.LossFn:
  """Next-token cross-entropy of the decoder (rng unused: the model has no dropout)."""
  def loss_fn(params: Any, batch: steps.Batch, rng: jax.Array):
    del rng
    return losses.causal_lm_loss(models.apply(graphdef, params, batch), batch, z_loss)
  return loss_fn


def state_factory(mc: models.ModelConfig, tx: Any, seed: int,
                  mesh: jax.sharding.Mesh) -> tuple[Any, dict, dict, Callable[[], dict]]:
  """(graphdef, abstract state, state shardings, create): nothing is allocated until `create()` runs,
  which builds parameters and optimizer state already sharded. A resume restores into the abstract state
  instead, so the model never exists twice in memory."""
  graphdef, specs, shapes = models.describe(mc)
  param_sh = sharding.param_shardings(specs, shapes, mesh)

  def create_fn(key: jax.Array) -> dict:
    params = models.init_params(mc, key)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32), 'rng': key}

  key = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(create_fn, key)
  replicated = NamedSharding(mesh, P())
  state_sh = {'params': param_sh, 'opt_state': sharding.shardings_like(abstract['opt_state'], shapes, param_sh, mesh),
              'step': replicated, 'rng': replicated}
  create = jax.jit(create_fn, out_shardings=state_sh)
  return graphdef, abstract_with_shardings(abstract, state_sh), state_sh, lambda: create(key)


def init_state(mc: models.ModelConfig, tx: Any, seed: int, mesh: jax.sharding.Mesh) -> tuple[Any, dict, dict]:
  """(graphdef, freshly initialised sharded state, state shardings)."""
  graphdef, _, state_sh, create = state_factory(mc, tx, seed, mesh)
  return graphdef, create(), state_sh


def evaluate(eval_step: Any, state: dict, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss and perplexity over the first `train.eval_batches` batches of the held-out split (same packing
  as training; the same batches every time)."""
  ds = data.make_dataset(config.data, tokenizer, split='eval', seed=config.train.seed,
                         batch_size=config.data.batch_size // jax.process_count(),
                         process_index=jax.process_index(), process_count=jax.process_count())
  it = iter(ds)
  loss_sum, tokens = 0.0, 0.0
  for _ in range(config.train.eval_batches):
    sums = jax.device_get(eval_step(state, sharding.to_global(next(it), mesh)))
    loss_sum += float(sums['loss_sum'])
    tokens += float(sums['tokens'])
  loss = loss_sum / max(tokens, 1.0)
  return {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50.0)), 'eval_tokens': tokens}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its newest complete checkpoint.

  Returns a summary: {'start_step', 'losses' {step: loss} for the steps run now, 'eval', 'compiles'}.
  """
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = data.load_tokenizer(config.data)
  if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError('model.vocab_size', config.model.vocab_size,
                      f'must be >= the tokenizer vocabulary ({tokenizer.vocab_size}) or 0 to derive it')
  mc = models.model_config(config.model, tokenizer.vocab_size)
  total = config.train.steps
  tx, schedule = optim.make_optimizer(config.optim, total)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  with jax.set_mesh(mesh):
    graphdef, abstract_state, state_sh, create_state = state_factory(mc, tx, config.train.seed, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    loss_fn = make_loss_fn(graphdef, config.train.z_loss)
    train_step = jax.jit(
        steps.make_train_step(loss_fn, tx, schedule=schedule, accum_steps=config.train.accum_steps),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=0)
    eval_step = jax.jit(steps.make_eval_step(loss_fn), in_shardings=(state_sh, batch_sh), out_shardings=replicated)

    train_data = data.make_dataset(config.data, tokenizer, split='train', seed=config.train.seed,
                                   batch_size=config.data.batch_size // jax.process_count(),
                                   process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(train_data)
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), every=config.checkpoint.every,
                        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    state = ckpt.restore(start, abstract_state, data_iter) if start else create_state()

    n_params = models.count_params(state['params'])
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_token = metrics.flops_per_token(mc, config.data.seq_len)
    peak, peak_source = metrics.device_peak_flops()
    logger = metrics.Logger(workdir, config.log, total, start, config.to_dict(), enabled=primary)
    logger.write(f'jaxtrain: {n_params / 1e6:.2f}M params, {jax.device_count()} devices, mesh '
                 f'{dict(mesh.shape)}, {tokens_per_step} tokens/step, {flops_token / 1e6:.1f} MFLOPs/token, '
                 f'peak {peak / 1e9:.0f} GFLOP/s/device [{peak_source}]')
    if start:
      logger.write(f'resumed from {ckpt.directory}/{start}')

    summary: dict[str, Any] = {'start_step': start, 'losses': {}, 'eval': None}
    last_time = time.perf_counter()

    def emit(step: int, device_metrics: dict, data_wait: float) -> None:
      nonlocal last_time
      values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      values.update(step_time=step_time, data_wait_s=data_wait, tokens_per_s=tokens_per_step / step_time,
                    mfu=flops_token * tokens_per_step / step_time / (peak * jax.device_count()))
      summary['losses'][step] = values['loss']
      if step % config.log.every == 0 or step == total:
        logger.log(step, values)
      logger.advance()

    pending = None
    for step in range(start, total):
      t0 = time.perf_counter()
      host_batch = next(data_iter)
      data_wait = time.perf_counter() - t0
      state, step_metrics = train_step(state, sharding.to_global(host_batch, mesh))
      if pending is not None:  # fetch the previous step's metrics while this one runs
        emit(*pending)
      pending = (step + 1, step_metrics, data_wait)
      done = step + 1
      if ckpt.should_save(done) or done == total:
        ckpt.save(done, state, data_iter)
      if config.train.eval_every and done % config.train.eval_every == 0 and done != total:
        emit(*pending)
        pending = None
        logger.log(done, evaluate(eval_step, state, config, tokenizer, mesh))
        last_time = time.perf_counter()
    if pending is not None:
      emit(*pending)

    summary['eval'] = evaluate(eval_step, state, config, tokenizer, mesh)
    logger.log(total, summary['eval'])
    ckpt.close()
    saved = ckpt.latest_step()
    summary['compiles'] = train_step._cache_size()  # pylint: disable=protected-access
    logger.close()
  if primary:
    if config.log.plot:
      metrics.plot_losses(workdir)
    print(_summary_line(summary, workdir, f'{ckpt.directory}/{saved}', total), flush=True)
  return summary


def _summary_line(summary: dict[str, Any], workdir: str, checkpoint: str, total: int) -> str:
  losses, ev = summary['losses'], summary['eval']
  if not losses:
    return (f"nothing to train: {workdir} already holds step {summary['start_step']} of {total}; "
            f"eval loss {ev['eval_loss']:.4f}")
  first, last = min(losses), max(losses)
  return (f"steps {first}..{last}: loss {losses[first]:.4f} -> {losses[last]:.4f}; "
          f"eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f}); checkpoint {checkpoint}")
