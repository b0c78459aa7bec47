"""Score a run's checkpoint on its held-out sets: `jaxtrain eval --workdir=RUN [--step=N | --all-steps | --best]
[--stage=K] [--data=NAME=GLOB ...] [--batches=N]` (`jaxtrain.evaluation`).

Per set (each source's eval split, and each --data): loss, perplexity, bits per byte, loss by position, the
tokens of largest total loss, assistant vs other tokens for chat; micro and macro over sets. Writes
RUN/eval/STEP.json, STEP.md and STEP_positions.png; --all-steps scores every kept checkpoint and adds
RUN/eval/curve.json and curve.png. A StackWise run scores the rack of its last saved stage (or --stage=K;
--all-steps: every saved stage) by its objective: next-token loss for clm, the ELBO for masked diffusion, the
masked-token loss for MLM; it writes RUN/eval/stage_K.json, .md and _positions.png.

lm-evaluation-harness tasks (`jaxtrain.evaluation.harness`; needs `pip install 'jaxtrain[eval]'`):
`jaxtrain eval --workdir=RUN --harness=TASKS [--step=N | --best] [--include-path=DIR ...] [--limit=N]
[--max-length=N]` writes RUN/eval/harness/STEP-TASKS.json (and _samples.jsonl); `--model-dir=DIR` instead of
--workdir scores a Hugging Face directory (`jaxtrain export` output) and writes DIR/eval/harness/TASKS.json.
"""

from __future__ import annotations

import logging

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory holding config.json and checkpoints/ (required, except for --harness '
                        'with --model-dir).')
  flags.DEFINE_integer('step', None, 'Checkpoint step to score (default: the newest).', flag_values=fv)
  flags.DEFINE_bool('all-steps', False, 'Score every kept checkpoint (a StackWise run: every saved stage); adds '
                    'RUN/eval/curve.json and curve.png.', flag_values=fv)
  flags.DEFINE_integer('stage', None, 'StackWise run: the stage whose rack to score (default: the last saved).',
                       flag_values=fv)
  flags.DEFINE_bool('best', False, "Score the best checkpoint by the run's train.early_stop.metric (kept whatever "
                    'checkpoint.keep says).', flag_values=fv)
  flags.DEFINE_multi_string('data', [], 'NAME=GLOB: a further set of files (comma-separated globs), read in the '
                            "format of the run's first source (a chat run's through its chat template); repeatable.",
                            flag_values=fv)
  flags.DEFINE_integer('batches', None, "Batches per set (default: the run's train.eval_batches; 0: every batch "
                       'of each set, until every piece is scored). Each piece is scored once; the "scored" column '
                       'says how much of each set the batches covered.', flag_values=fv)
  flags.DEFINE_string('harness', None, 'Comma-separated lm-evaluation-harness tasks (groups, tags) to run instead of '
                      'the held-out sets, e.g. jaxtrain_local (the two tasks jaxtrain ships); writes '
                      'RUN/eval/harness/STEP-TASKS.json.', flag_values=fv)
  flags.DEFINE_string('model-dir', None, '--harness: a Hugging Face model directory (`jaxtrain export` output) to '
                      'score instead of a run; results go to DIR/eval/harness/.', flag_values=fv)
  flags.DEFINE_multi_string('include-path', [], '--harness: a further folder of lm-eval task YAMLs (relative '
                            "data_files are read from each YAML's folder); repeatable.", flag_values=fv)
  flags.DEFINE_integer('limit', None, '--harness: at most this many examples per task.', flag_values=fv)
  flags.DEFINE_integer('max-length', None, "--harness: the model's window in tokens (default: the run's "
                       "data.seq_len, or the directory's max_position_embeddings).", flag_values=fv)

_HARNESS_ONLY = ('model-dir', 'include-path', 'limit', 'max-length')
_HELD_OUT_ONLY = ('all-steps', 'stage', 'data', 'batches')


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.errors import UserError

  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax warns about metadata a numpy restore does not need
  say = lambda line: print(line, flush=True)
  if fv['harness'].present:
    wrong = [f'--{k}' for k in _HELD_OUT_ONLY if fv[k].present]
    if wrong:
      raise UserError(f'{", ".join(wrong)} with --harness', valid='they choose held-out sets; --harness runs lm-eval '
                      'tasks (drop them, or drop --harness)')
    from jaxtrain.evaluation import harness
    harness.evaluate(workdir=fv['workdir'].value, model_dir=fv['model-dir'].value, tasks=fv['harness'].value,
                     step=fv['step'].value, best=fv['best'].value, include_paths=fv['include-path'].value,
                     limit=fv['limit'].value, max_length=fv['max-length'].value, say=say)
    return
  wrong = [f'--{k}' for k in _HARNESS_ONLY if fv[k].present]
  if wrong:
    raise UserError(f'{", ".join(wrong)} without --harness', valid='they set up lm-eval tasks: add --harness=TASKS')
  if fv['workdir'].value is None:
    raise UserError('--workdir is required', valid='the run directory to score (holding config.json)')
  from jaxtrain.evaluation import run

  run.evaluate(fv['workdir'].value, step=fv['step'].value, all_steps=fv['all-steps'].value,
               extra=fv['data'].value, batches=fv['batches'].value, say=say,
               best=fv['best'].value, stage=fv['stage'].value)
