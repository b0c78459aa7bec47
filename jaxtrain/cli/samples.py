"""The sample ids of each row of one train step of a run: `jaxtrain samples --workdir=RUN --step=N`
(`jaxtrain.train.recorder.read_samples`, from WORKDIR/samples/)."""

from __future__ import annotations

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory holding samples/.', required=True)
  flags.DEFINE_integer('step', None, 'Train step, 1-based as in metrics.jsonl.', required=True, flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.train import recorder

  step = fv['step'].value
  for r, names in enumerate(recorder.read_samples(fv['workdir'].value, step)):
    print(f'step {step} row {r}: {" ".join(names)}')
