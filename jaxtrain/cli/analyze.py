"""Per-source data statistics: `jaxtrain analyze --config=configs/NAME.py [--out=DIR]`.

Lengths, duplicates, chat turns and a suggested data.seq_len for the train and eval splits of every configured
source (`jaxtrain.data.analyze`); plots and analysis.json go to --out (default WORKDIR/analysis).
"""

from __future__ import annotations

import os

from absl import flags

from jaxtrain.cli import common


def define(fv: flags.FlagValues) -> None:
  common.define_config(fv)
  common.define_workdir(fv)
  flags.DEFINE_string('out', None, 'Directory for the plots and analysis.json (default: WORKDIR/analysis).',
                      flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  import jax

  from jaxtrain.config import validate
  from jaxtrain.data import analyze

  config, workdir = common.config_and_workdir(fv)
  config = validate.prepare(config, workdir)
  lines, _ = analyze.analyze_config(config, fv['out'].value or os.path.join(workdir, 'analysis'))
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
