"""Entry point: `python -m jaxtrain.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.KEY=VALUE]`.

Kept short on purpose: everything it calls is a library function usable from a notebook.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)), e.g. configs/tiny.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics). Default: runs/<config>.')


def default_workdir(config_flag: str) -> str:
  """runs/<config file stem>[_<arg>] for `--config=configs/llama.py:size=cpu` -> runs/llama_size-cpu."""
  path, _, arg = config_flag.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + ('_' + re.sub(r'[^A-Za-z0-9.-]+', '-', arg) if arg else ''))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad flag or override into one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}; pass settings as --config.KEY=VALUE', file=sys.stderr)
    sys.exit(2)
  if _CONFIG.value is None:
    print('error: --config is required, e.g. --config=configs/tiny.py', file=sys.stderr)
    sys.exit(2)
  # Imported here so that `--help` and flag errors answer without initialising JAX.
  import jax
  from jaxtrain import config as config_lib, data, train

  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].serialize().split('=', 1)[1])
  try:
    config_lib.validate(config, workdir, jax.device_count())
    train.run(config, workdir)
  except (config_lib.ConfigError, data.DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run_main() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
