"""The training loop: build a sharded state, resume if a checkpoint exists, step, log, evaluate, save."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.train import curriculum, losses, metrics, optim, steps, stopping
from jaxtrain import data, models, sharding
from jaxtrain.models import flops
from jaxtrain.train.checkpoint import Checkpointer
from jaxtrain.train.recorder import Recorder
from jaxtrain.errors import NonFiniteError
from jaxtrain.config.validate import check_vocab, resolve_init
from jaxtrain.train.state import Built, build, checkpointed, init_state, state_factory

__all__ = ['run', 'fit', 'Job', 'evaluate', 'make_loss_fn', 'state_factory', 'init_state', 'NonFiniteError']


def make_loss_fn(graphdef: Any, z_loss: float) -> steps.LossFn:
  """Next-token cross-entropy of the decoder (rng unused: the model has no dropout)."""
  def loss_fn(params: Any, batch: steps.Batch, rng: jax.Array | None):
    del rng
    return losses.causal_lm_loss(models.apply(graphdef, params, batch), batch, z_loss)
  return loss_fn


def steps_per_call(config: ml_collections.ConfigDict) -> int:
  """`train.steps_per_call` resolved: 0 (auto) is 4 on CPU, 1 on accelerators (see defaults.py)."""
  return config.train.steps_per_call or (4 if jax.default_backend() == 'cpu' else 1)


def jit_steps(config: ml_collections.ConfigDict, built: Built, tx: Any, schedule: Any,
              mesh: jax.sharding.Mesh, loss_fn: steps.LossFn | None = None) -> tuple[Any, Any]:
  """The run's jitted (train_step, eval_step) for `loss_fn` (default: the decoder's next-token loss): state
  and batch shardings fixed, the state donated, metrics replicated, so the step compiles once. With
  `steps_per_call` K > 1 the train step is `steps.make_multi_step`'s (state, K stacked batches, active);
  `run_steps` calls either kind and `step_args` gives either's abstract inputs."""
  batch_sh = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  loss_fn = loss_fn or make_loss_fn(built.graphdef, config.train.z_loss)
  step = steps.make_train_step(loss_fn, tx, schedule=schedule, accum_steps=config.train.accum_steps,
                               param_transform=built.transform)
  train_step = jit_train_step(step, steps_per_call(config), built.shardings, mesh)
  eval_step = jax.jit(steps.make_eval_step(loss_fn, built.transform), in_shardings=(built.shardings, batch_sh),
                      out_shardings=replicated)
  return train_step, eval_step


def jit_train_step(step: Any, k: int, state_sh: Any, mesh: jax.sharding.Mesh) -> Any:
  """`step` (a pure train step) jitted with the state donated and metrics replicated: as it is for k == 1,
  else as `steps.make_multi_step`'s k steps per call."""
  replicated = NamedSharding(mesh, P())
  if k > 1:
    return jax.jit(steps.make_multi_step(step), donate_argnums=0,
                   in_shardings=(state_sh, sharding.batch_sharding(mesh, stacked=True), replicated),
                   out_shardings=(state_sh, replicated))
  return jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)), out_shardings=(state_sh, replicated),
                 donate_argnums=0)


def run_steps(train_step: Any, state: dict, host_batches: list[dict[str, Any]], k: int,
              mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
  """One call of a `jit_steps` train step built for `k` steps per call on 1..k host batches: (state,
  metrics), the metrics stacked (k,) when k > 1 (slots past len(host_batches) ran nothing)."""
  if not 1 <= len(host_batches) <= k:
    raise ValueError(f'{len(host_batches)} batches for a call of {k} steps: give 1..{k}')
  if k == 1:
    return train_step(state, sharding.to_global(host_batches[0], mesh))
  filled = host_batches + host_batches[-1:] * (k - len(host_batches))  # inactive slots: copies, never run
  stacked = {key: np.stack([b[key] for b in filled]) for key in host_batches[0]}
  return train_step(state, sharding.to_global(stacked, mesh, stacked=True), np.arange(k) < len(host_batches))


def step_args(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch: dict[str, Any]) -> tuple:
  """The abstract arguments after the state of `jit_steps`' train step, for `batch`: {key:
  ShapeDtypeStruct (B, ...)} of one step. With K steps per call: the batch stacked K times and the mask."""
  k = steps_per_call(config)
  if k == 1:
    return (batch,)
  sh = sharding.batch_sharding(mesh, stacked=True)
  stacked = {key: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=sh) for key, x in batch.items()}
  return stacked, jax.ShapeDtypeStruct((k,), np.bool_)


def evaluate(eval_step: Any, state: dict, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer,
             mesh: jax.sharding.Mesh, srcs: Any = None) -> dict[str, float]:
  """Loss and perplexity over the first `train.eval_batches` batches of the held-out split (same packing
  as training; the same batches every time), plus eval_X for every further sum `X_sum` the loss reports.
  `srcs`: the eval split's `data.pipeline.load_sources`, when the caller has loaded it already."""
  ds = data.make_dataset(config.data, tokenizer, split='eval', seed=config.train.seed,
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


@dataclasses.dataclass(frozen=True)
class Job:
  """One training loop's worth of work: the state, its jitted steps, how long and on which data order.

  `train.run` builds one for the config; StackWise builds one per stage. `keep_keys` are provenance keys
  (doc_ids, doc_chunks) that the step needs as inputs, e.g. to draw masks keyed by sample id; the rest of the
  provenance stays on the host. `flops_per_token` / `eval_flops_per_token` count what the step computes.
  """

  built: Built
  train_step: Any
  eval_step: Any
  steps: int
  seed: int
  flops_per_token: float
  eval_flops_per_token: float
  keep_keys: tuple[str, ...] = ()
  label: str = ''


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its newest complete checkpoint (see `fit`)."""
  resolve_init(config)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = data.load_tokenizer(config.data)
  check_vocab(config, tokenizer.vocab_size)
  mc = models.model_config(config.model, tokenizer.vocab_size)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  write_config(config, workdir)
  with jax.set_mesh(mesh):
    built = build(config, mc, tx, mesh)
    train_step, eval_step = jit_steps(config, built, tx, schedule, mesh)
    # Training and evaluation FLOPs differ (backward; a frozen LoRA base needs no weight gradients).
    trains = flops.LoraFlops.of(built.abstract['params']) if 'frozen' in built.shardings else None
    if curriculum.enabled(config):  # one jitted step per attention window; the full window's is train_step
      train_step = curriculum.variants(config, mc, train_step, lambda m: jit_steps(
          config, built, tx, schedule, mesh, make_loss_fn(models.describe(m)[0], config.train.z_loss))[0],
          lambda m: flops.flops_per_token(m, config.data.seq_len, lora=trains))
    job = Job(built, train_step, eval_step, config.train.steps, config.train.seed,
              flops.flops_per_token(mc, config.data.seq_len, lora=trains),
              flops.flops_per_token(mc, config.data.seq_len, False, trains))
    return fit(config, job, workdir, mesh, tokenizer)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json (process 0), so a run directory says how it was made."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def fit(config: ml_collections.ConfigDict, job: Job, workdir: str, mesh: jax.sharding.Mesh,
        tokenizer: data.Tokenizer) -> dict[str, Any]:
  """The loop: resume from WORKDIR/checkpoints if possible, step, log, evaluate, save; call under the mesh.

  Returns a summary: {'start_step', 'losses' {step: loss} for the steps run now, 'eval', 'compiles', 'flops'
  {'train', 'eval'}: model FLOPs spent now by each (flops.flops_per_token)}. Train records log `mfu` (of
  what trains: LoRA-aware) and `train_flops_total` (all steps since step 0); eval records log `eval_flops`
  (that evaluation) and `eval_tflops_per_s`. When `job.train_step` is a `curriculum.Variants`, each step runs
  its window's step, FLOPs follow the window and train records log `attn_window`.
  """
  built, train_step, eval_step, total = job.built, job.train_step, job.eval_step, job.steps
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  srcs = data.pipeline.load_sources(config.data, tokenizer, 'train')
  train_data = data.make_dataset(config.data, tokenizer, split='train', seed=job.seed,
                                 batch_size=config.data.batch_size // jax.process_count(),
                                 process_index=jax.process_index(), process_count=jax.process_count(), srcs=srcs)
  data_iter = iter(train_data)
  seen = data.pipeline.SourceTokens(srcs, jax.process_count())
  eval_srcs = data.pipeline.load_sources(config.data, tokenizer, 'eval')  # once, not at every evaluation
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), every=config.checkpoint.every,
                      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                      shared_data_state=config.data.process_split == 'rows')
  start, state = ckpt.restore_latest(built.abstract, data_iter)
  state = built.complete(state) if start else built.create()
  recorder = Recorder(config, workdir, start, tokenizer)  # sample ids per step, loss-spike dumps
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_token = job.flops_per_token
  eval_flops = job.eval_flops_per_token * tokens_per_step * config.train.eval_batches  # padding included
  peak, peak_source = flops.device_peak_flops(config.log.peak_flops)
  calls = steps_per_call(config)  # train steps per call of the jitted step
  logger = metrics.Logger(workdir, config.log, total, start, config.to_dict(), enabled=primary)
  logger.write(f'jaxtrain{" " + job.label if job.label else ""}: {built.description}, {jax.device_count()} '
               f'devices, mesh {dict(mesh.shape)}, {tokens_per_step} tokens/step, {flops_token / 1e6:.1f} '
               f'MFLOPs/token train, {job.eval_flops_per_token / 1e6:.1f} eval, '
               f'peak {peak / 1e9:.0f} GFLOP/s/device [{peak_source}]'
               + (f', {calls} steps per call' if calls > 1 else ''))
  for line in data.pipeline.source_report(srcs):
    logger.write(f'data {line}')
  if start:
    logger.write(f'resumed from {ckpt.directory}/{start}')
    seen.restore(_load_source_tokens(workdir, start))

  summary: dict[str, Any] = {'start_step': start, 'losses': {}, 'eval': None, 'stopped': None,
                             'flops': {'train': 0.0, 'eval': 0.0}}
  last_time = time.perf_counter()
  bad: list[tuple[int, dict]] = []  # the current streak of non-finite steps: (step, provenance of its rows)
  tripped: list[tuple[int, dict]] = []  # the first streak that reached max_bad_steps
  max_bad = config.train.max_bad_steps
  variants = train_step if isinstance(train_step, curriculum.Variants) else None  # a context-length curriculum

  def emit(call: tuple[dict, list[tuple]]) -> None:
    """Logs the steps of a finished call: (its metrics on device, one (step, data_wait, provenance,
    sources_seen) per step it ran); they share the call's time equally."""
    nonlocal last_time
    fetched = jax.device_get(call[0])
    now = time.perf_counter()
    step_time, last_time = (now - last_time) / len(call[1]), now
    for i, (step, data_wait, provenance, sources_seen) in enumerate(call[1]):
      values = {k: float(v[i] if calls > 1 else v) for k, v in fetched.items()}
      values.update(sources_seen)
      flops_step, flops_so_far = flops_token, flops_token * step  # per token: this step, steps 0..step-1
      if variants is not None:  # the attention window, and with it the FLOPs, follow the step
        flops_step, flops_so_far = variants.flops_per_token(step - 1), variants.flops_total(step)
        values['attn_window'] = variants.window(step - 1)
      values.update(step_time=step_time, data_wait_s=data_wait, tokens_per_s=tokens_per_step / step_time,
                    mfu=flops_step * tokens_per_step / step_time / (peak * jax.device_count()),
                    train_flops_total=flops_so_far * tokens_per_step)
      summary['flops']['train'] += flops_step * tokens_per_step
      summary['losses'][step] = values['loss']
      note = recorder.observe(step, values)
      if note:
        logger.write(note)
      if values['skipped']:
        bad.append((step, provenance))
        if len(bad) == max_bad:
          tripped[:] = bad  # the streak to stop for, even if the steps already run after it recover
        logger.write(f"step {step}: non-finite loss ({values['loss']}) or gradients (norm {values['grad_norm']}); "
                     'update skipped')
      else:
        bad.clear()
      if step % config.log.every == 0 or step == total or values['skipped']:
        logger.log(step, values)
      logger.advance()

  def run_eval() -> tuple[dict, dict]:
    """(eval metrics, their cost): the cost is logged but kept out of summary['eval'], which is reproducible."""
    t = time.perf_counter()
    values = evaluate(eval_step, state, config, tokenizer, mesh, eval_srcs)
    summary['flops']['eval'] += eval_flops
    return values, {'eval_flops': eval_flops, 'eval_tflops_per_s': eval_flops / (time.perf_counter() - t) / 1e12}

  def save_and_wait(step: int) -> str:
    recorder.flush()
    if step not in ckpt.all_steps():
      ckpt.save(step, checkpointed(state), data_iter)
      _save_source_tokens(workdir, step, seen.state(), ckpt.all_steps())
    ckpt.wait()
    return f'{ckpt.directory}/{step}'

  def call_end(step: int) -> int:
    """Where the call starting after `step` completed steps ends: at most `calls` steps, never past a
    checkpoint, an evaluation or a change of attention window; one step inside a non-finite streak."""
    end = min(total, step + (1 if bad else calls))
    for every in (ckpt.every, config.train.eval_every):
      if every:
        end = min(end, (step // every + 1) * every)
    return min(end, variants.segment_end(step)) if variants is not None else end

  def flush() -> None:
    nonlocal pending
    if pending is not None:
      emit(pending)
      pending = None

  pending = None  # the last call, logged while the next one runs
  done, data_ended = start, False
  with stopping.StopRequests(workdir) as stop:
    while done < total and not data_ended:
      step, host_batches, records = done, [], []
      for s in range(step, call_end(step)):
        t0 = time.perf_counter()
        try:
          host_batch = next(data_iter)
        except StopIteration:  # a source with on_end='stop' ran out (or every source was dropped)
          data_ended = True
          break
        # Provenance (which documents fill each row) stays on the host unless the step asks for it.
        provenance = {k: host_batch[k] if k in job.keep_keys else host_batch.pop(k)
                      for k in list(host_batch) if k.startswith('doc_')}
        data_wait = time.perf_counter() - t0
        seen.add(provenance['doc_ids'])  # counted now, so a checkpoint saved after this step includes it
        recorder.record(s + 1, host_batch, provenance)  # before to_global: the dump decodes these tokens
        host_batches.append(host_batch)
        records.append((s + 1, data_wait, provenance, seen.metrics()))
      if host_batches:
        step_fn = variants.at(step) if variants is not None else train_step
        state, step_metrics = run_steps(step_fn, state, host_batches, calls, mesh)
        flush()  # the previous call's metrics, fetched while this one runs
        pending = (step_metrics, records)
        done = step + len(host_batches)
      if bad or tripped:  # inside a non-finite streak, look at each call at once: the state stays known
        flush()
      if tripped:
        streak = bad if bad and bad[0][0] == tripped[0][0] else tripped  # all of it, if still going on
        raise NonFiniteError(_nonfinite_message(streak, done, save_and_wait(done), config, workdir))
      if data_ended:
        flush()
        summary['data_ended'] = done
        logger.write(f'the training data ended after step {done} (a source with on_end=stop ran out, or every '
                     f'source was dropped); saving and evaluating')
        if done and done not in ckpt.all_steps():
          ckpt.save(done, checkpointed(state), data_iter)
          _save_source_tokens(workdir, done, seen.state(), ckpt.all_steps())
        break
      reason = stop.reason()
      if reason:
        flush()
        summary['stopped'] = (reason, save_and_wait(done))
        break
      if ckpt.should_save(done) or done == total:
        recorder.flush()  # the sidecar holds every step a checkpoint covers, so a resume loses none
        ckpt.save(done, checkpointed(state), data_iter)
        _save_source_tokens(workdir, done, seen.state(), ckpt.all_steps())
      if config.train.eval_every and done % config.train.eval_every == 0 and done != total:
        flush()
        values, cost = run_eval()
        logger.log(done, values | cost)
        last_time = time.perf_counter()
    flush()
    if not summary['stopped']:
      summary['eval'], cost = run_eval()
      logger.log(total, summary['eval'] | cost)
    recorder.close()
    ckpt.close()
  saved = ckpt.latest_step()
  summary['compiles'] = train_step._cache_size()  # pylint: disable=protected-access
  summary['state'] = state
  logger.close()
  if primary:
    if config.log.plot:
      metrics.plot_losses(workdir)
    print(_summary_line(summary, workdir, f'{ckpt.directory}/{saved}', total, job.label), flush=True)
  return summary


def _load_source_tokens(workdir: str, step: int) -> dict[str, int]:
  """Tokens per source trained on up to checkpoint `step` (empty if that run did not record them)."""
  try:
    with open(os.path.join(workdir, 'source_tokens.json'), encoding='utf-8') as f:
      return json.load(f).get(str(step), {})
  except (OSError, ValueError):
    return {}


def _save_source_tokens(workdir: str, step: int, counts: dict[str, int], steps: list[int]) -> None:
  """WORKDIR/source_tokens.json: the per-source token counts at each kept checkpoint step (process 0)."""
  if jax.process_index():
    return
  path = os.path.join(workdir, 'source_tokens.json')
  try:
    with open(path, encoding='utf-8') as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  keep = {str(s) for s in steps} | {str(step)}
  table = {k: v for k, v in table.items() if k in keep} | {str(step): counts}
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(table, f)
  os.replace(path + '.tmp', path)


def _nonfinite_message(bad: list[tuple[int, dict]], done: int, checkpoint: str, config: ml_collections.ConfigDict,
                       workdir: str) -> str:
  """One paragraph for the user, plus WORKDIR/nonfinite_steps.json with every sample id of the bad steps.
  `done`: the steps run when the streak was seen (later than its end when steps ran before the check)."""
  records = []
  for step, provenance in bad:
    names = data.sample_ids(config.data, 'train', provenance) if provenance else []
    records.append({'step': step, 'samples': sorted({n for row in names for n in row})})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'nonfinite_steps.json'), 'w') as f:
      json.dump(records, f, indent=1)
  first, last = bad[0][0], bad[-1][0]
  shown = ', '.join(records[-1]['samples'][:6]) or 'unknown'
  held = (f'so {checkpoint} holds the parameters and optimizer state from before step {first}' if done == last else
          f'but steps {last + 1}..{done} had already run when the streak was read (train.steps_per_call='
          f'{steps_per_call(config)}), so {checkpoint} holds the state after step {done}')
  return (f'stopping: {len(bad)} consecutive steps ({first}..{last}) had a non-finite loss or gradients '
          f'(train.max_bad_steps={config.train.max_bad_steps}). Their updates were skipped, {held}. Samples of '
          f'step {last}: {shown}; all samples of the bad steps are in {workdir}/nonfinite_steps.json.')


def _summary_line(summary: dict[str, Any], workdir: str, checkpoint: str, total: int, label: str = '') -> str:
  prefix = f'{label}: ' if label else ''
  return prefix + _summary_text(summary, workdir, checkpoint, total)


def _summary_text(summary: dict[str, Any], workdir: str, checkpoint: str, total: int) -> str:
  losses, ev = summary['losses'], summary['eval']
  if summary['stopped']:
    reason, where = summary['stopped']
    return f'stopped by {reason} after step {max(losses, default=summary["start_step"])}: checkpoint saved to ' \
           f'{where}; run the same command to resume'
  if not losses:
    return (f"nothing to train: {workdir} already holds step {summary['start_step']} of {total}; "
            f"eval loss {ev['eval_loss']:.4f}")
  first, last = min(losses), max(losses)
  return (f"steps {first}..{last}: loss {losses[first]:.4f} -> {losses[last]:.4f}; "
          f"eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f}); checkpoint {checkpoint}")
