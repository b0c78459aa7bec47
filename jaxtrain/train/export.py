"""Export a run's checkpoint: `jaxtrain export --workdir=DIR [--step=N | --best] --format=hf|peft --out=OUT`.

  jaxtrain export --workdir=runs/llama --out=/tmp/llama-hf     # then transformers' from_pretrained(OUT)

`hf` writes a transformers checkpoint (config.json, sharded safetensors, tokenizer) of the full model;
a LoRA run's adapters are merged into its base first. `peft` writes a LoRA run's adapters as a PEFT
adapter directory. The run's resolved WORKDIR/config.json says what the model is; the checkpoint is
restored into host numpy arrays, so any device count and mesh can export. User mistakes (no such workdir,
no checkpoint, an unknown step, an output directory that is not empty) exit 2 with one line and write
nothing. A StackWise run's rack (objective=clm) exports through `jaxtrain.stackwise.export`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from jaxtrain import paths
from jaxtrain.errors import UserError
from jaxtrain.train import earlystop, rundir, runstatus


class ExportError(UserError):
  """A user mistake: the message is one line for the console."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json, completely (`rundir.load_config`); a missing run raises ExportError."""
  return rundir.load_config(workdir, ExportError)


def checkpoint_steps(workdir: str) -> list[int]:
  """Complete checkpoint steps of a run, oldest first (orbax skips unfinished temporary directories)."""
  import orbax.checkpoint as ocp

  directory = paths.in_run(os.path.abspath(workdir), paths.CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  return sorted(ocp.CheckpointManager(directory, options=options).all_steps())


def restore_state(workdir: str, step: int) -> dict:
  """{'params': ...} of checkpoint `step` as host numpy arrays (no target tree or mesh needed): the trainable
  parameters only (a LoRA run's adapters; its frozen base is never checkpointed). The optimizer moments, the
  step and the rng stay on disk: what eval, generate and export read is a third of a full-parameter AdamW
  state (orbax's partial restore reads only the arrays asked for)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from jaxtrain.train.checkpoint import drained_event_loops

  path = os.path.join(os.path.abspath(workdir), paths.CHECKPOINTS, str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    with drained_event_loops():  # a corrupt checkpoint fails in one line, with no asyncio noise at exit
      wanted = {'params': checkpointer.metadata(path).item_metadata.tree['params']}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
      return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                                    partial_restore=True))
  except Exception as e:  # orbax and TensorStore raise many types for a damaged file
    saved = checkpoint_steps(workdir)
    if step not in saved:  # deleted while being read: a run still training keeps only its newest checkpoints
      raise ExportError(f'checkpoint {step} of {workdir} was deleted while it was read (a run still training '
                        'keeps only its newest checkpoint.keep); rerun, or choose a kept one with --step (saved '
                        f'now: {", ".join(map(str, saved)) or "none"})') from None
    reason = ' '.join(str(e).split())[:200] or type(e).__name__
    raise ExportError(f'checkpoint {step} of {workdir} cannot be read ({reason}); choose another with --step '
                      f'(saved: {", ".join(map(str, saved))})') from e


def model_params_for_export(config: ml_collections.ConfigDict, state: dict, tokenizer: Any = None) -> dict:
  """The full model parameters of a restored state: `state['params']`, or for a LoRA run (lora.rank > 0 or
  init.lora_from set) the unquantized base (rebuilt from init.from_hf or the seed) with the adapters merged.
  `tokenizer`: the run's (its vocabulary sizes the base); default `config.data`'s."""
  if config.lora.rank == 0 and not config.init.lora_from:
    return state['params']
  from jaxtrain import data, models
  from jaxtrain.train import state as state_lib  # LoRA runs only

  vocab = config.model.vocab_size or (tokenizer or data.load_tokenizer(config.data)).vocab_size
  return state_lib.merged_params(config, models.model_config(config.model, vocab), state)


def check_out(out: str) -> None:
  """Refuses an output path that exists and is not an empty directory (ExportError)."""
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ExportError(f'--out={out} exists and is not an empty directory; choose a new one')


def export(workdir: str, out: str, step: int | None = None, fmt: str = 'hf', dtype: str = 'float32',
           max_shard_bytes: int = 2 * 2 ** 30, best: bool = False) -> str:
  """Exports checkpoint `step` (default: newest; `best`: the best by the run's train.early_stop.metric,
  `earlystop.best_checkpoint`) of the plain run in `workdir` to `out`; returns a one-line
  summary. Raises ExportError (and hf_config.HfError) for user mistakes, before writing anything. A
  StackWise run's rack exports through `jaxtrain.stackwise.export` (which `jaxtrain export` calls for it)."""
  config = load_run_config(workdir)
  if config.stackwise.num_stacks:
    raise ExportError(f'--workdir={workdir} is a StackWise run: its rack exports with '
                      'jaxtrain.stackwise.export.export (what `jaxtrain export` runs for it)')
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ExportError(f'--workdir={workdir} holds no complete checkpoint in {workdir}/checkpoints; train first')
  if best and step is not None:
    raise ExportError(f'--best and --step={step}: choose one, the best checkpoint or a step')
  if best:
    step = earlystop.best_checkpoint(workdir, steps)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ExportError(f'--step={step}: no such checkpoint in {workdir}/checkpoints; available: '
                      f'{", ".join(map(str, steps))}')
  check_out(out)
  state = restore_state(workdir, step)
  from jaxtrain.hf import weights as hf_weights
  # Exactly the tokenizer the run trained with (its copy in WORKDIR/tokenizer/), with its chat template.
  tokenizer = rundir.load_tokenizer(config, workdir)
  if fmt == 'peft':
    from jaxtrain.hf import peft as peft_io  # written for LoRA runs only
    peft_io.save_adapters(config, state, out)
    hf_weights.save_tokenizer(tokenizer, out)
    runstatus.record_export(workdir, out, fmt, None, step)  # `jaxtrain runs` lists it (the adapters' own dtype)
    return f'exported the LoRA adapters of step {step} of {workdir} to {out} (PEFT format, tokenizer {tokenizer.path})'
  params = model_params_for_export(config, state, tokenizer)
  files = hf_weights.save(params, config.model, tokenizer, out, max_shard_bytes=max_shard_bytes, dtype=dtype)
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    architecture = json.load(f)['architectures'][0]
  runstatus.record_export(workdir, out, fmt, dtype, step)
  return (f'exported step {step} of {workdir} to {out} as {architecture} ({dtype}, {len(files)} safetensors '
          f'file{"s" if len(files) > 1 else ""}, tokenizer {tokenizer.path})')
