"""`evaluate(workdir, ...)`: what `jaxtrain eval` does.

Everything a user can get wrong (no such run, no such step or stage, a --step for a StackWise run or a
--stage for a plain one, a malformed --data, a glob that matches nothing, data that does not read) raises its
one-line EvalError (or DataError) before anything is written. Then the sets are read once, the score function
compiles once (a StackWise run's: once per stage, the stages differ in depth), and each chosen checkpoint, or
stage's rack, is restored and scored on every set: RUN/eval/STEP.json and .md per step (stage_K.json and .md
per stage), curve.json/.png with --all-steps.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxtrain import data, paths
from jaxtrain.evaluation import EvalError, report, sets as sets_lib
from jaxtrain.evaluation.score import make_scorer
from jaxtrain.evaluation.stats import Tally, macro
from jaxtrain.stackwise import plan
from jaxtrain.stackwise.checkpoint import saved_stages
from jaxtrain.train import earlystop, export, metrics, rundir

DEFINITIONS = {
    'loss': 'nats per loss token: cross-entropy x training loss weight, summed, / summed weights',
    'bits_per_byte': 'total nats / ln 2 / UTF-8 bytes of the loss-weighted target tokens (special tokens: 0 bytes)',
    'positions': 'mean loss of the target tokens at each position within their document piece',
    'top_tokens': 'target tokens of largest total loss',
    'chat': 'loss on loss-masked (assistant) tokens vs the other tokens of the documents (chat sets only)',
    'micro': 'all sets\' tokens together', 'macro': 'unweighted mean over sets',
}
# A masked rack's loss is its objective's (`stats`): what replaces the next-token definitions.
MASKED_DEFINITIONS = {
    'diffusion': {
        'loss': 'the masked-diffusion ELBO per token: cross-entropy of the tokens masked at ratio t x 1/t, summed, / '
                'every maskable (real, loss-masked) token; an upper bound on nats per token (exp: on perplexity). t '
                "per document piece and the masks are the run's eval draws (a hash of the piece and position), so "
                "the numbers are the run's own eval loss on the same batches",
        'bits_per_byte': 'total ELBO nats / ln 2 / UTF-8 bytes of the maskable tokens: an upper bound',
        'masked_ce': 'unweighted mean cross-entropy of the masked tokens (the job\'s eval mCE)',
        'positions': 'ELBO nats per maskable token at each position within its document piece',
        'top_tokens': 'tokens of largest total ELBO nats'},
    'mlm': {
        'loss': 'mean cross-entropy of the masked tokens (masked at the run\'s objective.mlm_ratio, the run\'s eval '
                'masks): no likelihood, so no perplexity bound and no bits per byte',
        'bits_per_byte': 'not defined for a masked LM (n/a)',
        'masked_ce': 'the same as loss',
        'positions': 'mean cross-entropy of the masked tokens at each position within their document piece',
        'top_tokens': 'masked tokens of largest total cross-entropy'},
}


# Batches dispatched ahead of the one being tallied: their per-token outputs (a few (rows, seq_len) arrays
# each) wait on the devices; 1 left the devices idle between a tiny model's batches (docs/benchmarks.md).
IN_FLIGHT = 4


def definitions(objective: str) -> dict[str, str]:
  """What the numbers of a record mean for a model trained with `objective` (clm, diffusion, mlm)."""
  out = dict(DEFINITIONS, **MASKED_DEFINITIONS.get(objective, {}))
  if objective != 'clm':
    del out['chat']
  return out


def evaluate(workdir: str, *, step: int | None = None, all_steps: bool = False, extra: Sequence[str] = (),
             batches: int | None = None, say: Callable[[str], Any] = print, best: bool = False,
             stage: int | None = None) -> list[dict]:
  """Scores checkpoint `step` (default: the newest) of the run in `workdir`, or every kept checkpoint with
  `all_steps`, on its sources' eval splits and the `extra` sets ('NAME=GLOB'), up to `batches` batches per set
  (default: the run's train.eval_batches; 0: every batch of each set). `best`: the best checkpoint by the run's
  train.early_stop.metric instead. A StackWise run scores the rack of `stage` (default: the last saved; every
  saved stage with `all_steps`) by its objective. Writes RUN/eval/ and returns the records (one per step or
  stage, as in STEP.json / stage_K.json)."""
  t0 = time.perf_counter()
  pairs = sets_lib.parse_data(extra)
  if step is not None and all_steps:
    raise EvalError(f'--step={step} and --all-steps', valid='choose one: a checkpoint, or all of them')
  if best and (step is not None or all_steps):
    raise EvalError(f'--best and {"--all-steps" if all_steps else f"--step={step}"}', valid='choose one: the best '
                    'checkpoint, a step, or all of them')
  if batches is not None and batches < 0:
    raise EvalError('--batches', batches, 'expected a number of batches per set (0: every batch of each set)')
  if stage is not None and all_steps:
    raise EvalError(f'--stage={stage} and --all-steps', valid='choose one: a stage\'s rack, or every saved stage')
  config = rundir.load_config(workdir, EvalError)
  if config.stackwise.num_stacks:
    chosen = _stages(workdir, config, stage, step, all_steps, best)
    logged = _logged_stages(workdir)
  else:
    if stage is not None:
      raise EvalError(f'--stage={stage}: {workdir} is a plain run, not a StackWise run', valid='choose its '
                      'checkpoint with --step=N (default: the newest)')
    chosen = _steps(workdir, step, all_steps, best)
    logged = _logged_eval(workdir)
  tokenizer = rundir.load_tokenizer(config, workdir)
  specs = sets_lib.run_sets(config, tokenizer)
  specs += sets_lib.extra_sets(config, tokenizer, pairs, [s.name for s in specs])
  eval_batches = int(config.train.eval_batches)
  budget = eval_batches if batches is None else batches
  scorer = make_scorer(config, tokenizer, workdir)
  t = time.perf_counter()
  read = [sets_lib.read(s, tokenizer, rows=scorer.rows, seed=config.train.seed, max_batches=budget) for s in specs]
  reference = None  # the run's own eval stream (every source mixed), to compare with metrics.jsonl
  if sum(s.kind == 'source' for s in specs) > 1 and any(at in logged for at in chosen):
    mixture = sets_lib.SetSpec('mixture of the sources', 'in-run', 'the run\'s eval stream', False, config.data,
                               [src for s in specs if s.kind == 'source' for src in s.srcs])
    reference = sets_lib.read(mixture, tokenizer, rows=scorer.rows, seed=config.train.seed, max_batches=eval_batches)
  read_s = time.perf_counter() - t
  token_bytes = tokenizer.token_bytes()
  records = []
  with jax.set_mesh(scorer.mesh):
    for at in chosen:
      try:
        record = score_step(scorer, at, read, token_bytes, tokenizer, reference=reference, logged=logged.get(at),
                            eval_batches=eval_batches, budget=budget)
      except export.ExportError:
        # --all-steps on a run still training: checkpoint.keep deleted this one since the listing. The others
        # are still worth scoring (a lone --step, or every checkpoint gone, stays the one-line error).
        if not all_steps or scorer.unit != 'step' or at in export.checkpoint_steps(workdir) or (
            at == chosen[-1] and not records):
          raise
        print(f'note: checkpoint {at} of {workdir} was deleted while this ran (the run is still training and keeps '
              'only its newest checkpoint.keep); skipped', file=sys.stderr, flush=True)
        continue
      record['timings']['read_s'] = read_s
      record['timings']['total_s'] = time.perf_counter() - t0
      written = report.write_step(workdir, record)
      say(report.console(record))
      say('wrote ' + ', '.join(written))
      records.append(record)
  if all_steps:
    say('wrote ' + ', '.join(report.write_curve(workdir, records)))
  return records


def _steps(workdir: str, step: int | None, all_steps: bool, best: bool = False) -> list[int]:
  steps = export.checkpoint_steps(workdir)
  if not steps:
    raise EvalError(f'--workdir={workdir} holds no complete checkpoint in {workdir}/checkpoints; train first')
  if all_steps:
    return steps
  if best:
    return [earlystop.best_checkpoint(workdir, steps)]
  if step is not None and step not in steps:
    raise EvalError('--step', step, f'no such checkpoint in {workdir}/checkpoints; available: '
                    f'{", ".join(map(str, steps))}')
  return [steps[-1] if step is None else step]


def _stages(workdir: str, config: Any, stage: int | None, step: int | None, all_steps: bool, best: bool) -> list[int]:
  """The stages of a StackWise run to score: `stage` (default: the last saved, as `jaxtrain generate` chooses)
  or every saved one; EvalError for a stage with no rack and for the plain runs' --step and --best."""
  if step is not None:
    raise EvalError(f'--step={step}: a StackWise run saves its rack per stage, not per step', valid='choose one '
                    'with --stage=K (default: the last saved)')
  if best:
    raise EvalError('--best: a StackWise run keeps the rack of each stage, not a best checkpoint', valid='choose '
                    'one with --stage=K (default: the last saved), or every saved stage with --all-steps')
  directory = paths.in_run(workdir, paths.RACK)
  saved = [s for s in saved_stages(directory) if s < len(plan.plan(config))]
  if not saved:
    raise EvalError(f'--workdir={workdir}: no stage of this StackWise run has finished ({directory} holds no '
                    'stage_<k>.json); rerun its training command to resume it')
  if all_steps:
    return saved
  if stage is not None and stage not in saved:
    raise EvalError('--stage', stage, f'no rack of that stage in {directory}; saved stages: '
                    f'{", ".join(map(str, saved))}')
  return [saved[-1] if stage is None else stage]


def _logged_eval(workdir: str) -> dict[int, dict]:
  """The run's own eval_loss by step from metrics.jsonl (the last record of a step: a resumed run logs it
  again)."""
  return {int(r['step']): {'eval_loss': float(r['eval_loss']), 'where': 'metrics.jsonl'}
          for r in metrics.read_metrics(workdir) if 'eval_loss' in r}


def _logged_stages(workdir: str) -> dict[int, dict]:
  """The StackWise job's own evaluation of each saved stage's rack (the stage's final eval, kept in the rack's
  manifest RUN/rack/stage_K.json): eval_loss and, for masked objectives, eval_masked_ce."""
  directory = paths.in_run(workdir, paths.RACK)
  out = {}
  for k in saved_stages(directory):
    try:
      with open(os.path.join(directory, f'stage_{k}.json'), encoding='utf-8') as f:
        meta = json.load(f).get('meta') or {}
    except (OSError, ValueError):
      continue  # unreadable: the restore reports it
    if meta.get('eval_loss') is not None:
      out[k] = {'eval_loss': float(meta['eval_loss']), 'eval_masked_ce': meta.get('eval_masked_ce'),
                'where': f'{paths.RACK}/stage_{k}.json'}
  return out


def score_sets(scorer: Any, weights: dict, evsets: Sequence[sets_lib.EvalSet], token_bytes: Any
               ) -> list[tuple[Tally, float]]:
  """(tally, seconds) per set. Up to `IN_FLIGHT` batches are dispatched before the oldest one's outputs are
  fetched and tallied, so the devices never wait for the host."""
  out = []
  for evset in evsets:
    t = time.perf_counter()
    tally = Tally(token_bytes, scorer.seq_len, scorer.objective)
    pending: collections.deque = collections.deque()
    for batch in evset.batches:
      pending.append((scorer(weights, batch), batch['positions']))
      if len(pending) > IN_FLIGHT:
        result, positions = pending.popleft()
        tally.add(jax.device_get(result), positions)
    for result, positions in pending:
      tally.add(jax.device_get(result), positions)
    out.append((tally, time.perf_counter() - t))
  return out


def score_step(scorer: Any, step: int, evsets: Sequence[sets_lib.EvalSet], token_bytes: Any,
               tokenizer: data.Tokenizer, *, reference: sets_lib.EvalSet | None, logged: dict | None,
               eval_batches: int, budget: int) -> dict:
  """The record of checkpoint `step` (a StackWise run: of the rack of stage `step`) scored on `evsets` (what
  STEP.json or stage_K.json holds). `logged`: the run's own evaluation there (`_logged_eval`)."""
  t = time.perf_counter()
  compile_s = scorer.compile_s  # what this step's scoring adds is its compile (the first step, or a new stage)
  weights = scorer.weights(step)
  restore_s = time.perf_counter() - t
  scored = score_sets(scorer, weights, list(evsets) + ([reference] if reference else []), token_bytes)
  ref_tally = scored.pop()[0] if reference else None
  per_set = {}
  for evset, (tally, seconds) in zip(evsets, scored, strict=True):
    per_set[evset.name] = {
        'kind': evset.kind, 'where': evset.where, **tally.metrics(), 'batches': len(evset.batches),
        'pieces': evset.pieces, 'pieces_scored': evset.pieces_scored, 'complete': evset.complete,
        'repeats_skipped': evset.repeats, 'set_tokens': evset.set_tokens, 'chat': tally.chat(),
        'positions': tally.positions(), 'top_tokens': tally.top_tokens(tokenizer.decode), 'score_s': seconds}
  micro = Tally.merged([t for t, _ in scored])
  score_s = sum(s for _, s in scored)
  positions = sum(len(e.batches) for e in evsets) * scorer.rows * scorer.seq_len
  return {
      scorer.unit: step, 'run': scorer.run_name, 'workdir': scorer.workdir,
      'model': scorer.describe(step), 'objective': scorer.objective, 'checkpoint': scorer.checkpoint(step),
      'rows': scorer.rows, 'seq_len': scorer.seq_len, 'max_batches': budget,
      'definitions': definitions(scorer.objective), 'sets': per_set,
      'micro': {**micro.metrics(), 'positions': micro.positions()},
      'macro': macro([per_set[e.name] for e in evsets]),
      'in_run': _in_run(evsets, reference, ref_tally, scored, logged, eval_batches, budget),
      'timings': {'restore_s': restore_s, 'compile_s': scorer.compile_s - compile_s, 'score_s': score_s,
                  'positions_per_s': positions / score_s if score_s else None, 'compiles': scorer.compiles},
  }


def _in_run(evsets: Sequence[sets_lib.EvalSet], reference: sets_lib.EvalSet | None, ref_tally: Tally | None,
            scored: list[tuple[Tally, float]], logged: dict | None, eval_batches: int, budget: int) -> dict | None:
  """This evaluation beside the run's own eval_loss at the step (or stage): the same numbers when the batches
  are the same (a one-source run scored with train.eval_batches batches, or the mixture of a run's sources),
  and no piece came round twice (the run's eval repeats a set smaller than its batches; this one does not)."""
  sources = [(e, t) for e, (t, _) in zip(evsets, scored, strict=False) if e.kind == 'source']
  if reference is not None:
    evset, tally, why = reference, ref_tally, ''
  elif len(sources) == 1:
    (evset, tally), why = sources[0], ''
    if budget != eval_batches:
      why = f'--batches={budget}; the run evaluates train.eval_batches={eval_batches}'
  else:
    return None
  if not why and (len(evset.batches) < eval_batches or evset.repeats):
    why = f'the set holds fewer than {eval_batches} batches: the run\'s eval repeats its pieces, this one does not'
  m = tally.metrics()
  logged = logged or {}
  out = {'set': evset.name, 'loss': m['loss'], 'batches': len(evset.batches),
         'logged_eval_loss': logged.get('eval_loss'), 'logged_in': logged.get('where'),
         'difference': None if not logged else abs(m['loss'] - logged['eval_loss']), 'comparable': not why,
         'why': why}
  if 'masked_ce' in m:  # masked racks: the job's eval mCE beside this one
    out['masked_ce'], out['logged_eval_masked_ce'] = m['masked_ce'], logged.get('eval_masked_ce')
  return out
