"""jaxtrain: a small JAX/Flax training stack for language models.

The library's entry point is `jaxtrain.run(config, workdir)`: it validates `config` exactly as
`jaxtrain train` does (a mistake raises `jaxtrain.errors.UserError` with the same one line), then trains a
plain decoder (`jaxtrain.train.loop.run`) or, with `stackwise.num_stacks > 0`, a StackWise rack
(`jaxtrain.stackwise.job.run`), resuming from the newest checkpoint in `workdir`. The parts a run is made
of are importable on their own: `jaxtrain.train.steps.make_train_step`, `jaxtrain.train.loop.fit`,
`jaxtrain.models`, `jaxtrain.data`, `jaxtrain.adapters.lora`, `jaxtrain.hf`.
"""

from __future__ import annotations

from typing import Any


def run(config: Any, workdir: str, *, start_over: bool = False) -> Any:
  """Trains the job `config` describes in `workdir`; returns its typed result (`train.loop.RunResult`, or
  the StackWise job's). `start_over` moves checkpoints of an incompatible config aside instead of refusing."""
  # Imported here: `import jaxtrain` (and every `jaxtrain.X` import) stays free of JAX until a run starts.
  if config.stackwise.num_stacks:
    from jaxtrain.stackwise import job  # the StackWise job: a rack trained stage by stage
    return job.run(config, workdir, start_over=start_over)
  from jaxtrain.train import loop
  return loop.run(config, workdir, start_over=start_over)
