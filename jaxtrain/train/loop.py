"""The training loop: build a sharded state, resume if a checkpoint exists, step, log, evaluate, save."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import paths
from jaxtrain.train import (curriculum, execution, losses, metrics, optim, resume, rundir, runstatus, sourcecounts,
                            steps, stopping)
from jaxtrain import data, models, sharding
from jaxtrain.adapters import lora
from jaxtrain.models import flops
from jaxtrain.data import evalsets
from jaxtrain.train import earlystop
from jaxtrain.train.heldout import evaluate
from jaxtrain.train.checkpoint import Checkpointer
from jaxtrain.train.recorder import Recorder
from jaxtrain.errors import NonFiniteError
from jaxtrain.config import validate as config_validate  # a module: it imports this package's features lazily
from jaxtrain.models.validate import check_vocab
from jaxtrain.train.state import Built, build, checkpointed, init_state, state_factory

__all__ = ['run', 'fit', 'Job', 'RunResult', 'FixedStep', 'evaluate', 'make_loss_fn', 'state_factory', 'init_state',
           'NonFiniteError']


def make_loss_fn(graphdef: Any, z_loss: float) -> steps.LossFn:
  """Next-token cross-entropy of the decoder (rng unused: the model has no dropout)."""
  def loss_fn(params: Any, batch: steps.Batch, rng: jax.Array | None):
    del rng
    return losses.causal_lm_loss(models.apply(graphdef, params, batch), batch, z_loss)
  return loss_fn


def steps_per_call(config: ml_collections.ConfigDict) -> int:
  """`train.steps_per_call` resolved (`execution.steps_per_call`: 0 is 4 on CPU, 1 on accelerators)."""
  return execution.steps_per_call(config)


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
  return train_step(state, *step_inputs(host_batches, k, mesh))


def step_inputs(host_batches: list[dict[str, Any]], k: int, mesh: jax.sharding.Mesh) -> tuple:
  """The arguments after the state of one call of a `jit_steps` train step built for `k` steps per call on
  1..k host batches: (global batch,), or (K stacked global batches, active mask)."""
  if not 1 <= len(host_batches) <= k:
    raise ValueError(f'{len(host_batches)} batches for a call of {k} steps: give 1..{k}')
  if k == 1:
    return (sharding.to_global(host_batches[0], mesh),)
  filled = host_batches + host_batches[-1:] * (k - len(host_batches))  # inactive slots: copies, never run
  stacked = {key: np.stack([b[key] for b in filled]) for key in host_batches[0]}
  return sharding.to_global(stacked, mesh, stacked=True), np.arange(k) < len(host_batches)


def step_args(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch: dict[str, Any]) -> tuple:
  """The abstract arguments after the state of `jit_steps`' train step, for `batch`: {key:
  ShapeDtypeStruct (B, ...)} of one step. With K steps per call: the batch stacked K times and the mask."""
  k = steps_per_call(config)
  if k == 1:
    return (batch,)
  sh = sharding.batch_sharding(mesh, stacked=True)
  stacked = {key: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=sh) for key, x in batch.items()}
  return stacked, jax.ShapeDtypeStruct((k,), np.bool_)


class StepChoice(Protocol):
  """Which jitted train step runs each step of a job, and the model FLOPs per token it computes: `FixedStep`
  runs one step throughout; `curriculum.Variants` picks one per attention window. The loop asks only this."""

  def at(self, step: int) -> Any:
    """The jitted train step to run as step `step` (0-based)."""

  def segment_end(self, step: int) -> int:
    """The first step after `step` that runs another jitted step: a call never spans two."""

  def flops_per_token(self, step: int) -> float:
    """Model FLOPs per token of step `step`."""

  def flops_total(self, steps: int) -> float:
    """Model FLOPs per token-position summed over steps [0, steps)."""

  def step_metrics(self, step: int) -> dict[str, Any]:
    """Values logged with step `step` besides the step's own metrics (e.g. its attention window)."""

  def _cache_size(self) -> int:
    """Programs compiled so far, as `jax.jit`'s own."""


@dataclasses.dataclass(frozen=True)
class FixedStep:
  """The `StepChoice` of a job that runs one jitted `step` of `flops` model FLOPs per token throughout."""

  step: Any
  flops: float

  def at(self, step: int) -> Any:
    return self.step

  def segment_end(self, step: int) -> int:
    return sys.maxsize

  def flops_per_token(self, step: int) -> float:
    return self.flops

  def flops_total(self, steps: int) -> float:
    return self.flops * steps

  def step_metrics(self, step: int) -> dict[str, Any]:
    return {}

  def _cache_size(self) -> int:
    return self.step._cache_size()  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class Job:
  """One training loop's worth of work: the state, its jitted steps, how long and on which data order.

  `train.run` builds one for the config; StackWise builds one per stage. `train_step` chooses the jitted step
  of each step (`FixedStep`, or a curriculum's `Variants`). `keep_keys` are provenance keys (doc_ids,
  doc_chunks) that the step needs as inputs, e.g. to draw masks keyed by sample id; the rest of the provenance
  stays on the host. `flops_per_token` (of the full step, for the header line) / `eval_flops_per_token` count
  what the steps compute.
  """

  built: Built
  train_step: StepChoice
  eval_step: Any
  steps: int
  seed: int
  flops_per_token: float
  eval_flops_per_token: float
  keep_keys: tuple[str, ...] = ()
  label: str = ''


@dataclasses.dataclass(frozen=True)
class Flops:
  """Model FLOPs spent by this run (not counting steps before a resume): training and evaluation."""

  train: float = 0.0
  eval: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `fit` did. `losses`: {step: loss} of the steps run now; `eval`: the final evaluation (None when
  stopped); `stopped`: (reason, checkpoint) of a stop request; `data_ended`: the step after which the training
  data ran out; `compiles`: train-step programs compiled; `state`: the train state at the end; `skipped`: the
  non-finite steps whose updates were skipped; `early_stop`: why train.early_stop ended the run (one line; also
  when a rerun found it stopped already), else None; `best`: {'metric', 'value', 'step'} of the best evaluation
  by train.early_stop.metric (its checkpoint is kept), None when no metric is watched."""

  start_step: int
  losses: dict[int, float]
  eval: dict[str, float] | None
  stopped: tuple[str, str] | None
  data_ended: int | None
  compiles: int
  flops: Flops
  state: dict
  skipped: int = 0
  early_stop: str | None = None
  best: dict | None = None


def run(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> RunResult:
  """Trains per `config` in `workdir`, resuming from its newest complete checkpoint (see `fit`).

  Validates first (`jaxtrain.config.validate.prepare`, as the command line does: a bad config raises the
  same one-line ConfigError before anything is written) and trains the resolved config it returns. Before
  anything in `workdir` is written, checkpoints trained with another config or state raise
  `checkpoint.ResumeError` (`resume.check`); `start_over` moves them aside instead and trains from step 0."""
  config = config_validate.prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = data.load_tokenizer(config.data)
  check_vocab(config.model, tokenizer.vocab_size)
  check_data(config, tokenizer)
  mc = models.model_config(config.model, tokenizer.vocab_size)
  ex = execution.plan(config, mc)  # the attention kernel and layer scan for this backend; before any write
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  with jax.set_mesh(mesh):
    built = build(config, mc, tx, mesh, ex)
    if start_over:
      resume.start_over(workdir)
    resume.check(config, workdir, abstract=built.abstract)
    write_config(config, workdir, tokenizer)
    train_step, eval_step = jit_steps(config, built, tx, schedule, mesh)
    # Training and evaluation FLOPs differ (backward; a frozen LoRA base needs no weight gradients).
    trains = lora.flops_of(built.abstract['params']) if 'frozen' in built.shardings else None
    full = flops.flops_per_token(mc, config.data.seq_len, lora=trains)
    choice: StepChoice = FixedStep(train_step, full)
    if curriculum.enabled(config):  # one jitted step per attention window; the full window's is train_step
      choice = curriculum.variants(config, mc, train_step, lambda m: jit_steps(
          config, built, tx, schedule, mesh, make_loss_fn(models.describe(m, ex)[0], config.train.z_loss))[0],
          lambda m: flops.flops_per_token(m, config.data.seq_len, lora=trains))
    job = Job(built, choice, eval_step, config.train.steps, config.train.seed, full,
              flops.flops_per_token(mc, config.data.seq_len, False, trains))
    return fit(config, job, workdir, mesh, tokenizer)


def check_data(config: ml_collections.ConfigDict, tokenizer: data.Tokenizer) -> None:
  """Reads every source's train and eval split (through the prepare cache, which `fit` then opens in
  milliseconds), so that what validation cannot see without the documents (an eval split left empty, too many
  bad records) raises its one-line DataError before the run writes anything, not even config.json."""
  for split in ('train', 'eval'):
    data.pipeline.load_sources(config.data, tokenizer, split)
  evalsets.load(config.data, tokenizer)  # the named sets of data.eval_sets


def write_config(config: ml_collections.ConfigDict, workdir: str, tokenizer: data.Tokenizer | None = None) -> None:
  """WORKDIR/config.json and a copy of `tokenizer` (the run's) in WORKDIR/tokenizer/ (process 0), so a run
  directory says how it was made and exports without the corpus or the cache (`rundir`)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(paths.in_run(workdir, paths.CONFIG), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    if tokenizer is not None:
      rundir.save_tokenizer(config, tokenizer, workdir)


def fit(config: ml_collections.ConfigDict, job: Job, workdir: str, mesh: jax.sharding.Mesh,
        tokenizer: data.Tokenizer, stop_file: str | None = None) -> RunResult:
  """The loop: resume from WORKDIR/checkpoints if possible, step, log, evaluate, save; call under the mesh.

  `stop_file` is the file whose appearance stops the loop (default WORKDIR/STOP): a job that runs `fit` in a
  directory of its own (a StackWise stage in RUN/stages/K) passes its run's RUN/STOP.

  Train records log `mfu` (of what trains: LoRA-aware) and `train_flops_total` (all steps since step 0); eval
  records log `eval_flops` (that evaluation) and `eval_tflops_per_s`. Each call runs up to
  `train.steps_per_call` steps of one jitted step (`job.train_step.at`), ending at checkpoints, evaluations and
  where the job's step changes (`segment_end`; a curriculum's window, logged as `attn_window`).
  """
  os.makedirs(workdir, exist_ok=True)
  # WORKDIR/run.json: 'running' now, how it ended at the end ('failed' with the error if one escapes).
  with runstatus.Recording(workdir, job.steps, enabled=jax.process_index() == 0) as status:
    loop = _Loop(config, job, workdir, mesh, tokenizer)
    with stopping.StopRequests(workdir, stop_file=stop_file) as stop:
      while loop.done < job.steps and loop.data_ended is None and not loop.early_stop:
        loop.run_call()
        if loop.after_call(stop):
          break
      loop.finish()
    return status.fit_ended(loop.close())


class _Loop:
  """The mutable state of one `fit`: the train state, data iterator, checkpointer, logger, the non-finite
  streaks, and the last call, whose metrics are fetched while the next call runs."""

  def __init__(self, config: ml_collections.ConfigDict, job: Job, workdir: str, mesh: jax.sharding.Mesh,
               tokenizer: data.Tokenizer):
    self.config, self.job, self.workdir, self.mesh, self.tokenizer = config, job, workdir, mesh, tokenizer
    self.primary = jax.process_index() == 0
    srcs = data.pipeline.load_sources(config.data, tokenizer, 'train')
    self.data_iter = iter(data.make_dataset(config.data, tokenizer, split='train', seed=job.seed,
                                            batch_size=config.data.batch_size // jax.process_count(),
                                            process_index=jax.process_index(), process_count=jax.process_count(),
                                            srcs=srcs))
    self.seen = data.pipeline.SourceTokens(srcs)  # tokens per source, summed over processes when logged
    self.eval_srcs = data.pipeline.load_sources(config.data, tokenizer, 'eval')  # once, not at every evaluation
    self.eval_sets = evalsets.load(config.data, tokenizer)  # data.eval_sets, logged as eval_loss/NAME
    self.watch = earlystop.Watch(earlystop.Settings.from_config(config), workdir, self.primary)
    self.ckpt = Checkpointer(paths.in_run(workdir, paths.CHECKPOINTS), every=config.checkpoint.every,
                             keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                             shared_data_state=config.data.process_split == 'rows', keep_also=self.watch.keep)
    self.start, state = self.ckpt.restore_latest(job.built.abstract, self.data_iter)
    self.state = job.built.complete(state) if self.start else job.built.create()
    self.recorder = Recorder(config, workdir, self.start, tokenizer)  # sample ids per step, loss-spike dumps
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.eval_flops = (job.eval_flops_per_token * self.tokens_per_step * config.train.eval_batches  # padding in
                       * (1 + len(self.eval_sets)))
    self.peak, peak_source = flops.device_peak_flops(config.log.peak_flops)
    self.calls = steps_per_call(config)  # train steps per call of the jitted step
    # A rerun with fewer train.steps than the run holds evaluates again at the step it holds: that evaluation goes
    # (the history before it, the early-stopping rule replays, stays).
    self.logger = metrics.Logger(workdir, config.log, max(job.steps, self.start), self.start, config.to_dict(),
                                 enabled=self.primary)
    # After the Logger: metrics.jsonl then holds exactly the evaluations up to the step resumed from.
    self.early_stop = self.watch.resume(metrics.read_metrics(workdir) if self.primary else [], self.start, job.steps)
    self._header(srcs, peak_source)
    self.done = self.start
    self.losses: dict[int, float] = {}
    self.eval: dict[str, float] | None = None
    self.stopped: tuple[str, str] | None = None
    self.data_ended: int | None = None
    self.flops = Flops()
    self.last_time = time.perf_counter()
    self.bad: list[tuple[int, dict]] = []  # the current streak of non-finite steps: (step, provenance of its rows)
    self.tripped: list[tuple[int, dict]] = []  # the first streak that reached max_bad_steps
    self.skipped = 0  # non-finite steps skipped in this fit
    self.pending: tuple[dict, list[tuple]] | None = None  # the last call: its metrics on device, its steps
    self.compiled: list[Any] = []  # the jitted steps called so far (their first call compiles them)
    self.compile_s: dict[int, float] = {}  # first step of a call that compiled its step -> seconds, until logged
    self.unlogged: tuple[int, dict] | None = None  # the last step run, while log.every has not logged it

  def _header(self, srcs: Any, peak_source: str) -> None:
    job, calls = self.job, self.calls
    if peak_source.startswith('measured'):  # a probe of this process: it varies between identical runs
      peak_source += "; MFU is against this run's probe"
    self.logger.write(f'jaxtrain{" " + job.label if job.label else ""}: {job.built.description}, '
                      f'{execution.dtypes(self.config)}, '
                      f'{jax.device_count()} devices, mesh {dict(self.mesh.shape)}, {self.tokens_per_step} '
                      f'tokens/step, {job.flops_per_token / 1e6:.1f} MFLOPs/token train, '
                      f'{job.eval_flops_per_token / 1e6:.1f} eval, peak {self.peak / 1e9:.0f} GFLOP/s/device '
                      f'[{peak_source}]' + (f', {calls} steps per call' if calls > 1 else '')
                      + (', non-finite steps are skipped and never stop the run (train.max_bad_steps=0)'
                         if self.config.train.max_bad_steps == 0 else ''))
    note = optim.warmup_note(self.config.optim, job.steps)
    if note:
      self.logger.write(note)
    for line in data.pipeline.source_report(srcs, data.pipeline.blocklist(self.config.data)):
      self.logger.write(f'data {line}')
    if self.start:
      self.logger.write(f'resumed from {self.ckpt.directory}/{self.start}')
      self.seen.restore(sourcecounts.load(self.workdir, self.start))

  def call_end(self, step: int) -> int:
    """Where the call starting after `step` completed steps ends: at most `calls` steps, never past a
    checkpoint, an evaluation or a change of the job's step; one step inside a non-finite streak."""
    end = min(self.job.steps, step + (1 if self.bad else self.calls))
    for every in (self.ckpt.every, self.config.train.eval_every):
      if every:
        end = min(end, (step // every + 1) * every)
    return min(end, self.job.train_step.segment_end(step))

  def next_batches(self, step: int, end: int) -> tuple[list[dict], list[tuple]]:
    """The host batches of steps step+1..end (fewer if the data ends: then `data_ended` is set) and one
    (step, data_wait, provenance, this process's tokens per source so far) record per batch."""
    host_batches, records = [], []
    for s in range(step, end):
      t0 = time.perf_counter()
      try:
        host_batch = next(self.data_iter)
      except StopIteration:  # a source with on_end='stop' ran out (or every source was dropped)
        self.data_ended = step + len(host_batches)
        break
      # Provenance (which documents fill each row) stays on the host unless the step asks for it.
      provenance = {k: host_batch[k] if k in self.job.keep_keys else host_batch.pop(k)
                    for k in list(host_batch) if k.startswith('doc_')}
      data_wait = time.perf_counter() - t0
      self.seen.add(provenance['doc_ids'])  # counted now, so a checkpoint saved after this step includes it
      self.recorder.record(s + 1, host_batch, provenance)  # before to_global: the dump decodes these tokens
      host_batches.append(host_batch)
      records.append((s + 1, data_wait, provenance, self.seen.local()))
    return host_batches, records

  def run_call(self) -> None:
    """Runs the next call (its metrics stay on device; the previous call's are logged meanwhile)."""
    step = self.done
    host_batches, records = self.next_batches(step, self.call_end(step))
    if host_batches:
      train_step, args = self.job.train_step.at(step), step_inputs(host_batches, self.calls, self.mesh)
      if any(train_step is seen for seen in self.compiled):
        self.state, step_metrics = train_step(self.state, *args)
        self.flush()  # the previous call's metrics, fetched while this one runs
      else:
        self.state, step_metrics = self.compile_and_call(train_step, args, step)
      self.pending = (step_metrics, records)
      self.done = step + len(host_batches)

  def compile_and_call(self, train_step: Any, args: tuple, step: int) -> tuple[dict, dict]:
    """The first call of a jitted step: the previous call is logged first, so its time ends before this
    compile; the call itself (which traces and compiles, then dispatches the work asynchronously) is timed as
    the compile time, logged once and as `compile_s` of step `step` + 1, and kept out of every step time."""
    self.flush()
    t = time.perf_counter()
    out = train_step(self.state, *args)
    seconds = time.perf_counter() - t
    self.compiled.append(train_step)
    self.compile_s[step + 1] = seconds
    which = ', '.join(f'{k} {v}' for k, v in self.job.train_step.step_metrics(step).items())
    self.logger.write(f'compiled the train step{f" ({which})" if which else ""} in {seconds:.2f} s')
    self.last_time = time.perf_counter()
    return out

  def after_call(self, stop: stopping.StopRequests) -> bool:
    """What follows a call: the non-finite check, the end of the data, a stop request, a checkpoint, an
    evaluation. True when the loop ends here."""
    done = self.done
    if self.bad or self.tripped:  # inside a non-finite streak, look at each call at once: the state stays known
      self.flush()
    if self.tripped:
      streak = self.bad if self.bad and self.bad[0][0] == self.tripped[0][0] else self.tripped  # all, if ongoing
      raise NonFiniteError(_nonfinite_message(streak, done, self.save(done, wait=True), self.config, self.workdir))
    if self.data_ended is not None:
      self.flush()
      self.logger.write(f'the training data ended after step {done} (a source with on_end=stop ran out, or every '
                        f'source was dropped); saving and evaluating')
      self.save(done)
      return True
    reason = stop.reason()
    if reason:
      self.flush()
      self.stopped = (reason, self.save(done, wait=True))
      return True
    if self.ckpt.should_save(done) or done == self.job.steps:
      self.save(done)
    eval_every = self.config.train.eval_every
    if eval_every and done % eval_every == 0 and done != self.job.steps:
      self.flush()
      values, cost = self.evaluate()
      self.logger.log(done, values | cost)
      self.last_time = time.perf_counter()
      return self.judge(done, values)
    return False

  def judge(self, step: int, values: dict[str, float], final: bool = False) -> bool:
    """train.early_stop after the evaluation of step `step`: a new best gets a checkpoint (saved now if the
    schedule did not save this step; kept whatever checkpoint.keep says), and a stop (never at the `final`
    evaluation: the run ends there anyway) saves, waits and ends the loop: True."""
    tracker = self.watch.update(step, values)
    if tracker is None:
      return False
    if tracker.improved:
      self.save(step)
      self.watch.note()  # after the save started: the record names a checkpoint that is being written
    if tracker.reason is None or final:
      return False
    self.save(step, wait=True)
    self.watch.note(self.watch.stop_record(step, tracker.reason, self.job.steps))
    self.early_stop, self.eval = tracker.reason, values
    return True

  def save(self, step: int, wait: bool = False) -> str:
    """Saves checkpoint `step` (unless saved already, or step 0) with its sidecars: the sample ids of every step
    it covers (so a resume loses none) and the per-source token counts; `wait`: until it is on disk. The
    pending call is logged first: metrics.jsonl holds every step a checkpoint covers before the checkpoint
    exists, so a resume (which drops the rows past its step) never leaves a step unlogged."""
    self.flush()
    self.recorder.flush()
    if step and step not in self.ckpt.all_steps():
      self.ckpt.save(step, checkpointed(self.state), self.data_iter)
      local = sourcecounts.sum_over_processes(self.seen.local()[None], self.calls)[0]  # every process calls it
      sourcecounts.save(self.workdir, step, self.seen.state(self.seen.run_counts(local)), self.ckpt.all_steps())
    if wait:
      self.ckpt.wait()
    return f'{self.ckpt.directory}/{step}'

  def evaluate(self) -> tuple[dict, dict]:
    """(eval metrics, their cost): the cost is logged but kept out of the result's `eval`, which is reproducible."""
    t = time.perf_counter()
    values = evaluate(self.job.eval_step, self.state, self.config, self.tokenizer, self.mesh, self.eval_srcs,
                      self.eval_sets)
    self.flops = dataclasses.replace(self.flops, eval=self.flops.eval + self.eval_flops)
    return values, {'eval_flops': self.eval_flops,
                    'eval_tflops_per_s': self.eval_flops / (time.perf_counter() - t) / 1e12}

  def flush(self) -> None:
    """Logs the pending call, if any."""
    if self.pending is not None:
      self.emit(*self.pending)
      self.pending = None

  def emit(self, on_device: dict, records: list[tuple]) -> None:
    """Logs the steps of a finished call: its metrics on device and one (step, data_wait, provenance,
    local tokens per source) per step it ran; they share the call's time equally. Every process calls it at the
    same calls: the per-source counts are summed over processes here."""
    fetched = jax.device_get(on_device)
    now = time.perf_counter()
    step_time, self.last_time = (now - self.last_time) / len(records), now
    choice, tokens = self.job.train_step, self.tokens_per_step
    seen = self.seen.run_counts(sourcecounts.sum_over_processes(np.stack([r[3] for r in records]), self.calls))
    for i, (step, data_wait, provenance, _) in enumerate(records):
      values = {k: float(v[i] if self.calls > 1 else v) for k, v in fetched.items()}
      values.update(self.seen.metrics(seen[i]))
      values.update(choice.step_metrics(step - 1))
      if step in self.compile_s:
        values['compile_s'] = self.compile_s.pop(step)
      flops_step = choice.flops_per_token(step - 1)  # per token: this step; below, steps 0..step-1
      values.update(step_time=step_time, data_wait_s=data_wait, tokens_per_s=tokens / step_time,
                    mfu=flops_step * tokens / step_time / (self.peak * jax.device_count()),
                    train_flops_total=choice.flops_total(step) * tokens)
      self.flops = dataclasses.replace(self.flops, train=self.flops.train + flops_step * tokens)
      self.losses[step] = values['loss']
      self.observe(step, values, provenance)

  def observe(self, step: int, values: dict[str, Any], provenance: dict) -> None:
    """Spike notes, the non-finite streak and the log record of one step."""
    note = self.recorder.observe(step, values)
    if note:
      self.logger.write(note)
    if values['skipped']:
      self.skipped += 1
      self.bad.append((step, provenance))
      if len(self.bad) == self.config.train.max_bad_steps:
        self.tripped[:] = self.bad  # the streak to stop for, even if the steps already run after it recover
      self.logger.write(f"step {step}: non-finite loss ({values['loss']}) or gradients (norm "
                        f"{values['grad_norm']}); update skipped")
    else:
      self.bad.clear()
    if step % self.config.log.every == 0 or step == self.job.steps or values['skipped'] or 'compile_s' in values:
      self.logger.log(step, values)
      self.unlogged = None
    else:
      self.unlogged = (step, values)
    self.logger.advance()

  def finish(self) -> None:
    """Logs the last call, runs the final evaluation (unless stopped, or stopped early: that evaluation was
    the last) and waits for the last checkpoint. The last step run is logged whatever log.every says: a run
    that ends before train.steps (stopped, stopped early, out of data) shows where it ended."""
    self.flush()
    if self.unlogged is not None:
      self.logger.log(*self.unlogged)
      self.unlogged = None
    if self.early_stop and self.eval is None:  # a rerun that found the run stopped early: nothing ran
      self.eval = self.watch.logged
    elif not self.stopped and not self.early_stop:
      self.eval, cost = self.evaluate()
      # At train.steps, or at the step resumed from when a rerun asks for fewer steps than the run holds.
      self.logger.log(max(self.job.steps, self.done), self.eval | cost)
      self.judge(self.done, self.eval, final=True)
    self.recorder.close()
    self.ckpt.close()

  def close(self) -> RunResult:
    """Closes the log, prints the summary line (process 0) and returns the result."""
    saved = self.ckpt.latest_step()
    result = RunResult(self.start, self.losses, self.eval, self.stopped, self.data_ended,
                       self.job.train_step._cache_size(), self.flops, self.state,  # pylint: disable=protected-access
                       self.skipped, self.early_stop, self.watch.best())
    self.logger.close()
    if self.primary:
      if self.config.log.plot:
        metrics.plot_losses(self.workdir)
      print(_summary_line(result, self.workdir, f'{self.ckpt.directory}/{saved}', self.job.steps, self.job.label),
            flush=True)
    return result


def _nonfinite_message(bad: list[tuple[int, dict]], done: int, checkpoint: str, config: ml_collections.ConfigDict,
                       workdir: str) -> str:
  """One paragraph for the user, plus WORKDIR/nonfinite_steps.json with every sample id of the bad steps.
  `done`: the steps run when the streak was seen (later than its end when steps ran before the check)."""
  records = []
  for step, provenance in bad:
    names = data.sample_ids(config.data, 'train', provenance) if provenance else []
    records.append({'step': step, 'samples': sorted({n for row in names for n in row})})
  if jax.process_index() == 0:
    with open(paths.in_run(workdir, paths.NONFINITE), 'w') as f:
      json.dump(records, f, indent=1)
  first, last = bad[0][0], bad[-1][0]
  shown = ', '.join(records[-1]['samples'][:6]) or 'unknown'
  held = (f'so {checkpoint} holds the parameters and optimizer state from before step {first}' if done == last else
          f'but steps {last + 1}..{done} had already run when the streak was read (train.steps_per_call='
          f'{steps_per_call(config)}), so {checkpoint} holds the state after step {done}')
  return (f'stopping: {len(bad)} consecutive steps ({first}..{last}) had a non-finite loss or gradients '
          f'(train.max_bad_steps={config.train.max_bad_steps}). Their updates were skipped, {held}. Samples of '
          f'step {last}: {shown}; all samples of the bad steps are in {workdir}/nonfinite_steps.json.')


def _summary_line(result: RunResult, workdir: str, checkpoint: str, total: int, label: str = '') -> str:
  prefix = f'{label}: ' if label else ''
  return prefix + _summary_text(result, workdir, checkpoint, total)


def _summary_text(result: RunResult, workdir: str, checkpoint: str, total: int) -> str:
  losses, ev = result.losses, result.eval
  if result.stopped:
    reason, where = result.stopped
    return f'stopped by {reason} after step {max(losses, default=result.start_step)}: checkpoint saved to ' \
           f'{where}; run the same command to resume'
  best = result.best
  kept = (f"; best {best['metric']} {best['value']:.4f} at step {best['step']} (checkpoint "
          f"{os.path.dirname(checkpoint)}/{best['step']})") if best else ''
  if result.early_stop and not losses:
    return (f'already stopped early at step {result.start_step} of {total}: {result.early_stop}; nothing to train '
            f'(raise train.steps or change train.early_stop to train on){kept}')
  if not losses:
    return (f"nothing to train: {workdir} already holds step {result.start_step} of {total}; "
            f"eval loss {ev['eval_loss']:.4f}{kept}")
  first, last = min(losses), max(losses)
  skipped = f'; {result.skipped} of {len(losses)} steps skipped (non-finite)' if result.skipped else ''
  early = f'stopped early after step {last} of {total}: {result.early_stop}; ' if result.early_stop else ''
  return (f"{early}steps {first}..{last}: loss {losses[first]:.4f} -> {losses[last]:.4f}{skipped}; "
          f"eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.2f}){kept}; checkpoint {checkpoint}")
