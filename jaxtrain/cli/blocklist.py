"""Loss-spike dumps of a run -> a blocklist file of their documents, for `--config.data.exclude=FILE`:
`jaxtrain blocklist --workdir=RUN [--out=FILE] [--min-count=N]` (`jaxtrain.train.recorder.write_blocklist`)."""

from __future__ import annotations

import os

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory holding spikes/ (or stages/*/spikes/).', required=True)
  flags.DEFINE_string('out', None, 'Blocklist file to write (default: WORKDIR/blocklist.txt).', flag_values=fv)
  flags.DEFINE_integer('min-count', 1, 'Keep documents seen in at least this many dumps.', flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.train import recorder

  workdir = fv['workdir'].value
  print(recorder.write_blocklist(workdir, fv['out'].value or os.path.join(workdir, 'blocklist.txt'),
                                 fv['min-count'].value), flush=True)
