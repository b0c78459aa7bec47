"""Write a checkpoint of a run as a Hugging Face model, or a LoRA run's adapters as PEFT adapters:
`jaxtrain export --workdir=RUN --out=DIR [--step=N | --best] [--format=hf|peft] [--dtype=float32|bfloat16]`
(`jaxtrain.train.export`). A StackWise run trained with objective=clm exports its rack (the last saved stage,
or --stage=K) as the Hugging Face decoder it computes (`jaxtrain.stackwise.export`); other objectives are
refused in one line."""

from __future__ import annotations

import logging
import sys

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory holding config.json and checkpoints/.', required=True)
  flags.DEFINE_string('out', None, 'Output directory (must not exist or be empty).', required=True, flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the newest).', flag_values=fv)
  flags.DEFINE_bool('best', False, "Export the best checkpoint by the run's train.early_stop.metric (kept whatever "
                    'checkpoint.keep says).', flag_values=fv)
  flags.DEFINE_integer('stage', None, 'StackWise run (a causal rack, objective=clm): the stage whose rack exports '
                       '(default: the last saved).', flag_values=fv)
  flags.DEFINE_enum('format', 'hf', ('hf', 'peft'), 'hf: a transformers model directory; peft: the LoRA adapters '
                    'as a PEFT adapter directory.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'), 'hf: dtype of the weights.', flag_values=fv)
  flags.DEFINE_integer('max_shard_mb', 2048, 'hf: largest safetensors file in MiB (0: one file).', flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.train import export

  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax warns about metadata a numpy restore does not need
  shard = fv['max_shard_mb'].value * 2 ** 20 if fv['max_shard_mb'].value > 0 else sys.maxsize
  workdir, out, step, stage = fv['workdir'].value, fv['out'].value, fv['step'].value, fv['stage'].value
  config = export.load_run_config(workdir)
  if config.stackwise.num_stacks and fv['best'].value:  # a stage's best checkpoint is not a rack
    raise export.ExportError(f'--best: {workdir} is a StackWise run, whose racks are saved per stage; choose the '
                             'rack with --stage=K (default: the last saved)')
  if config.stackwise.num_stacks:  # a rack: the causal decoder its stacks compute (jaxtrain.stackwise.export)
    from jaxtrain.stackwise import export as rack_export
    print(rack_export.export(workdir, out, step, stage, fv['format'].value, fv['dtype'].value, shard, config),
          flush=True)
    return
  if stage is not None:
    raise export.ExportError(f'--stage={stage}: {workdir} is a plain run, not a StackWise run; choose its '
                             'checkpoint with --step=N (default: the newest)')
  print(export.export(workdir, out, step, fv['format'].value, fv['dtype'].value, shard, best=fv['best'].value),
        flush=True)
