"""Score a run's checkpoint on its held-out sets: `jaxtrain eval --workdir=RUN [--step=N | --all-steps]
[--data=NAME=GLOB ...] [--batches=N]` (`jaxtrain.evaluation`).

Per set (each source's eval split, and each --data): loss, perplexity, bits per byte, loss by position, the
tokens of largest total loss, assistant vs other tokens for chat; micro and macro over sets. Writes
RUN/eval/STEP.json, STEP.md and STEP_positions.png; --all-steps scores every kept checkpoint and adds
RUN/eval/curve.json and curve.png.
"""

from __future__ import annotations

import logging

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory holding config.json and checkpoints/.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step to score (default: the newest).', flag_values=fv)
  flags.DEFINE_bool('all-steps', False, 'Score every kept checkpoint; adds RUN/eval/curve.json and curve.png.',
                    flag_values=fv)
  flags.DEFINE_multi_string('data', [], 'NAME=GLOB: a further set of files (comma-separated globs), read in the '
                            "format of the run's first source (a chat run's through its chat template); repeatable.",
                            flag_values=fv)
  flags.DEFINE_integer('batches', None, "Batches per set (default: the run's train.eval_batches; 0: every batch "
                       'of each set, until every piece is scored). Each piece is scored once; the "scored" column '
                       'says how much of each set the batches covered.', flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.evaluation import run

  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax warns about metadata a numpy restore does not need
  run.evaluate(fv['workdir'].value, step=fv['step'].value, all_steps=fv['all-steps'].value,
               extra=fv['data'].value, batches=fv['batches'].value, say=lambda line: print(line, flush=True))
