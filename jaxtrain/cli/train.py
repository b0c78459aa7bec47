"""Train a model: `jaxtrain train --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.KEY=VALUE]`.

`python -m jaxtrain.main ...` is the same command. Kept short on purpose: the job is one library function,
`jaxtrain.run(config, workdir)`, usable from a notebook.
"""

from __future__ import annotations

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_config(fv)
  common.define_workdir(fv)
  flags.DEFINE_bool('preflight', False, 'Print the `jaxtrain check` report (tokenization preview, parameters, memory '
                    'per device) before training.', flag_values=fv)
  flags.DEFINE_bool('start_over', False, 'Move the run directory\'s old checkpoints, metrics, samples and spikes '
                    '(with their config.json and tokenizer) into WORKDIR/old-<time>/ and train from step 0 (e.g. '
                    'after an incompatible config change).',
                    flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  config, workdir = common.config_and_workdir(fv)
  # jaxtrain.run validates (`jaxtrain.config.validate.prepare`) before it writes anything; the preflight report
  # needs the prepared config first (preparing again in the run is cheap and idempotent).
  if fv['preflight'].value:
    # Imported here so that `--help` and flag errors answer without initialising JAX.
    from jaxtrain.cli import check
    from jaxtrain.config import validate
    check.preflight(validate.prepare(config, workdir))
  import jaxtrain
  from jaxtrain.train import runstatus
  with runstatus.launched(fv['config'].serialize().split('=', 1)[1]):  # WORKDIR/run.json names the config
    jaxtrain.run(config, workdir, start_over=fv['start_over'].value)
