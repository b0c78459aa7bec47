"""Judging what a run trained: `jaxtrain eval` scores a run's checkpoints on named held-out sets.

  sets.py    the named sets: each source's eval split, and extra files (--data=NAME=GLOB), packed into rows
             as training packs them; every seq_len piece of a set is scored at most once
  score.py   a checkpoint's model (full, LoRA or QLoRA: the run's own param transform), or a StackWise stage's
             rack, and one jitted function giving per-token cross-entropy (and a masked rack's ELBO weights)
             of a fixed-shape batch [rows, seq_len]: one compile for every set and every step (per stage)
  stats.py   per-set tallies by objective: loss (next-token CE, the diffusion ELBO, masked-LM CE),
             perplexity, bits per byte, loss by position, the tokens of largest total loss, loss-masked
             (assistant) vs other tokens; micro and macro averages over sets
  report.py  RUN/eval/STEP.json, STEP.md, STEP_positions.png; curve.json and curve.png over steps; the console
  run.py     `evaluate(workdir, ...)`: what the command does

This package sits above train and stackwise (it reads a run through train/rundir.py, train/export.py and
stackwise/inference.py, and builds its state as train does); nothing below it imports it.
"""

from __future__ import annotations

from jaxtrain.errors import UserError


class EvalError(UserError):
  """A mistake in what `jaxtrain eval` was asked to score: one line naming the flag and what is valid."""
