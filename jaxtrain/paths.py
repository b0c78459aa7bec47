"""Where jaxtrain keeps things: the cache root, and the layout of a run directory (the one place that
knows it).

  WORKDIR/config.json            the resolved config the run trained with
  WORKDIR/tokenizer/             the tokenizer the run trained with (a Hugging Face tokenizer directory)
  WORKDIR/metrics.jsonl          one JSON object per logged step; loss.png beside it
  WORKDIR/checkpoints/N/         orbax checkpoints (state + data-iterator position)
  WORKDIR/checkpoints/early_stop.json  the best checkpoint by train.early_stop.metric, and an early stop
  WORKDIR/source_tokens.json     tokens per data source at each kept checkpoint
  WORKDIR/samples/               the sample ids of every row of every step
  WORKDIR/spikes/                loss-spike dumps
  WORKDIR/nonfinite_steps.json   the samples of a non-finite streak that stopped the run
  WORKDIR/STOP                   touch it to stop the run at the next step (saved, resumable; StackWise too)
  WORKDIR/stages/K/              a StackWise stage: a run directory of its own (stopped by WORKDIR/STOP)
  WORKDIR/rack/                  the StackWise rack after each stage (per-stack content-hash saves)
  WORKDIR/eval/                  `jaxtrain eval`: STEP.json, STEP.md, STEP_positions.png, curve.json/png
  WORKDIR/eval/harness/          `jaxtrain eval --harness`: STEP-TASKS.json, STEP-TASKS_samples.jsonl
  WORKDIR/run.json               status of the run (running, done, stopped, early-stopped, failed), pid, host
  WORKDIR/exports.jsonl          one line per `jaxtrain export` made from the run (`jaxtrain runs` lists both)
  WORKDIR/generate/              `jaxtrain generate`: <time>.json and <time>.md per command
  WORKDIR/old-<time>/            what --start_over moved aside (the names in HISTORY / STACKWISE_HISTORY)
"""

from __future__ import annotations

import os

CONFIG = 'config.json'
TOKENIZER = 'tokenizer'
METRICS = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
SOURCE_TOKENS = 'source_tokens.json'
SAMPLES = 'samples'
SPIKES = 'spikes'
NONFINITE = 'nonfinite_steps.json'
STOP = 'STOP'
STAGES = 'stages'
RACK = 'rack'
LOSS_PLOT = 'loss.png'
EVAL = 'eval'
EARLY_STOP = 'early_stop.json'  # in CHECKPOINTS/: moves aside with them (--start_over)
RUN = 'run.json'
EXPORTS = 'exports.jsonl'
GENERATE = 'generate'
# What a run's history is: --start_over moves these aside together, so a fresh start leaves no rows, samples
# or spikes of the old run mixed with its own, and old-<time>/ keeps the config.json and tokenizer/ its
# checkpoints were trained with (a run directory that eval, export and generate read); the new run writes its own.
HISTORY = (CHECKPOINTS, METRICS, LOSS_PLOT, SOURCE_TOKENS, SAMPLES, SPIKES, NONFINITE, EVAL, CONFIG, TOKENIZER, RUN,
           EXPORTS, GENERATE)
# A StackWise run's: each stage's metrics, samples, ... (and its own run.json) live in its stage dir.
STACKWISE_HISTORY = (RACK, STAGES, CONFIG, TOKENIZER, RUN, EXPORTS, GENERATE)


def cache_root() -> str:
  """Root of jaxtrain's on-disk caches: $JAXTRAIN_CACHE, else ~/.cache/jaxtrain."""
  return os.environ.get('JAXTRAIN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxtrain')


def in_run(workdir: str, name: str) -> str:
  """WORKDIR/name for one of the names above."""
  return os.path.join(workdir, name)


def stage_dir(workdir: str, stage: int) -> str:
  """WORKDIR/stages/K: the run directory of StackWise stage K."""
  return os.path.join(workdir, STAGES, str(stage))
