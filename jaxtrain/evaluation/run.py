"""`evaluate(workdir, ...)`: what `jaxtrain eval` does.

Everything a user can get wrong (no such run, no such step, a StackWise run, a malformed --data, a glob that
matches nothing, data that does not read) raises its one-line EvalError (or DataError) before anything is
written. Then the sets are read once, the score function compiles once, and each chosen checkpoint is restored
and scored on every set: RUN/eval/STEP.json and .md per step, curve.json/.png with --all-steps.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxtrain import data
from jaxtrain.evaluation import EvalError, report, sets as sets_lib
from jaxtrain.evaluation.score import Scorer
from jaxtrain.evaluation.stats import Tally, macro
from jaxtrain.train import export, metrics, rundir

DEFINITIONS = {
    'loss': 'nats per loss token: cross-entropy x training loss weight, summed, / summed weights',
    'bits_per_byte': 'total nats / ln 2 / UTF-8 bytes of the loss-weighted target tokens (special tokens: 0 bytes)',
    'positions': 'mean loss of the target tokens at each position within their document piece',
    'top_tokens': 'target tokens of largest total loss',
    'chat': 'loss on loss-masked (assistant) tokens vs the other tokens of the documents (chat sets only)',
    'micro': 'all sets\' tokens together', 'macro': 'unweighted mean over sets',
}


def evaluate(workdir: str, *, step: int | None = None, all_steps: bool = False, extra: Sequence[str] = (),
             batches: int | None = None, say: Callable[[str], Any] = print) -> list[dict]:
  """Scores checkpoint `step` (default: the newest) of the run in `workdir`, or every kept checkpoint with
  `all_steps`, on its sources' eval splits and the `extra` sets ('NAME=GLOB'), up to `batches` batches per set
  (default: the run's train.eval_batches; 0: every batch of each set). Writes RUN/eval/ and returns the
  records (one per step, as in STEP.json)."""
  t0 = time.perf_counter()
  pairs = sets_lib.parse_data(extra)
  if step is not None and all_steps:
    raise EvalError(f'--step={step} and --all-steps', valid='choose one: a checkpoint, or all of them')
  if batches is not None and batches < 0:
    raise EvalError('--batches', batches, 'expected a number of batches per set (0: every batch of each set)')
  config = rundir.load_config(workdir, EvalError)
  if config.stackwise.num_stacks:
    raise EvalError(f'--workdir={workdir} is a StackWise run', valid='evaluating racks (and their ELBO) comes '
                    'later; plain, LoRA and QLoRA runs evaluate now')
  chosen = _steps(workdir, step, all_steps)
  tokenizer = rundir.load_tokenizer(config, workdir)
  specs = sets_lib.run_sets(config, tokenizer)
  specs += sets_lib.extra_sets(config, tokenizer, pairs, [s.name for s in specs])
  eval_batches = int(config.train.eval_batches)
  budget = eval_batches if batches is None else batches
  logged = _logged_eval(workdir)
  scorer = Scorer(config, tokenizer, workdir)
  t = time.perf_counter()
  read = [sets_lib.read(s, tokenizer, rows=scorer.rows, seed=config.train.seed, max_batches=budget) for s in specs]
  reference = None  # the run's own eval stream (every source mixed), to compare with metrics.jsonl
  if len(specs) - len(pairs) > 1 and any(at in logged for at in chosen):
    mixture = sets_lib.SetSpec('mixture of the sources', 'in-run', 'the run\'s eval stream', False, config.data,
                               [src for s in specs if s.kind == 'source' for src in s.srcs])
    reference = sets_lib.read(mixture, tokenizer, rows=scorer.rows, seed=config.train.seed, max_batches=eval_batches)
  read_s = time.perf_counter() - t
  token_bytes = tokenizer.token_bytes()
  records = []
  with jax.set_mesh(scorer.mesh):
    for at in chosen:
      record = score_step(scorer, at, read, token_bytes, tokenizer, reference=reference, logged=logged.get(at),
                          eval_batches=eval_batches, budget=budget)
      record['timings']['read_s'] = read_s
      record['timings']['total_s'] = time.perf_counter() - t0
      written = report.write_step(workdir, record)
      say(report.console(record))
      say('wrote ' + ', '.join(written))
      records.append(record)
  if all_steps:
    say('wrote ' + ', '.join(report.write_curve(workdir, records)))
  return records


def _steps(workdir: str, step: int | None, all_steps: bool) -> list[int]:
  steps = export.checkpoint_steps(workdir)
  if not steps:
    raise EvalError(f'--workdir={workdir} holds no complete checkpoint in {workdir}/checkpoints; train first')
  if all_steps:
    return steps
  if step is not None and step not in steps:
    raise EvalError('--step', step, f'no such checkpoint in {workdir}/checkpoints; available: '
                    f'{", ".join(map(str, steps))}')
  return [steps[-1] if step is None else step]


def _logged_eval(workdir: str) -> dict[int, float]:
  """eval_loss by step from metrics.jsonl (the last record of a step: a resumed run logs it again)."""
  return {int(r['step']): float(r['eval_loss']) for r in metrics.read_metrics(workdir) if 'eval_loss' in r}


def score_sets(scorer: Scorer, weights: dict, evsets: Sequence[sets_lib.EvalSet], token_bytes: Any
               ) -> list[tuple[Tally, float]]:
  """(tally, seconds) per set. The next batch is dispatched before the last one's outputs are fetched."""
  out = []
  for evset in evsets:
    t = time.perf_counter()
    tally = Tally(token_bytes, scorer.seq_len)
    pending: collections.deque = collections.deque()
    for batch in evset.batches:
      pending.append((scorer(weights, batch), batch['positions']))
      if len(pending) > 1:
        result, positions = pending.popleft()
        tally.add(jax.device_get(result), positions)
    for result, positions in pending:
      tally.add(jax.device_get(result), positions)
    out.append((tally, time.perf_counter() - t))
  return out


def score_step(scorer: Scorer, step: int, evsets: Sequence[sets_lib.EvalSet], token_bytes: Any,
               tokenizer: data.Tokenizer, *, reference: sets_lib.EvalSet | None, logged: float | None,
               eval_batches: int, budget: int) -> dict:
  """The record of checkpoint `step` scored on `evsets` (what STEP.json holds)."""
  t = time.perf_counter()
  first = scorer.compiles == 0  # this step's scoring compiles the score function
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
      'step': step, 'run': scorer.run_name, 'workdir': scorer.workdir, 'model': scorer.description,
      'checkpoint': f'{scorer.workdir}/checkpoints/{step}', 'rows': scorer.rows, 'seq_len': scorer.seq_len,
      'max_batches': budget, 'definitions': DEFINITIONS, 'sets': per_set,
      'micro': {**micro.metrics(), 'positions': micro.positions()},
      'macro': macro([per_set[e.name] for e in evsets]),
      'in_run': _in_run(evsets, reference, ref_tally, scored, logged, eval_batches, budget),
      'timings': {'restore_s': restore_s, 'compile_s': scorer.compile_s if first else 0.0, 'score_s': score_s,
                  'positions_per_s': positions / score_s if score_s else None, 'compiles': scorer.compiles},
  }


def _in_run(evsets: Sequence[sets_lib.EvalSet], reference: sets_lib.EvalSet | None, ref_tally: Tally | None,
            scored: list[tuple[Tally, float]], logged: float | None, eval_batches: int, budget: int) -> dict | None:
  """This evaluation beside the run's own eval_loss at the step: the same numbers when the batches are the
  same (a one-source run scored with train.eval_batches batches, or the mixture of a run's sources), and no
  piece came round twice (the run's eval repeats a set smaller than its batches; this one does not)."""
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
  loss = tally.metrics()['loss']
  return {'set': evset.name, 'loss': loss, 'batches': len(evset.batches), 'logged_eval_loss': logged,
          'difference': None if logged is None else abs(loss - logged), 'comparable': not why, 'why': why}
