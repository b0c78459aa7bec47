"""Entry point: `python -m jaxtrain.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.KEY=VALUE]`.

Kept short on purpose: everything it calls is a library function usable from a notebook.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)), e.g. configs/tiny.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics). Default: runs/<config>.')
_PREFLIGHT = flags.DEFINE_bool('preflight', False, 'Print the `jaxtrain check` report (tokenization preview, '
                                'parameters, memory per device) before training.')


def default_workdir(config_flag: str) -> str:
  """runs/<config file stem>[_<arg>] for `--config=configs/llama.py:size=cpu` -> runs/llama_size-cpu."""
  path, _, arg = config_flag.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + ('_' + re.sub(r'[^A-Za-z0-9.-]+', '-', arg) if arg else ''))


def _text(error: BaseException) -> str:
  if len(error.args) > 1 and all(isinstance(a, str) for a in error.args):  # ('Non-boolean argument ...', 'maybe')
    text = ': '.join(error.args)
  else:
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  if 'Traceback (most recent call last)' in text:  # keep only the exception line of an embedded traceback
    text = [line for line in text.splitlines() if line.strip()][-1]
  return ' '.join(text.split()).rstrip(':') or type(error).__name__


def _one_line(error: BaseException) -> str:
  """The flag at fault and the root cause on one line (config_flags wraps the real reason, sometimes
  with a whole traceback, in a generic message)."""
  root = error.__cause__ or error.__context__  # one level down holds the specific reason
  if root is None:
    return _text(error)
  flag = re.match(r'(flag --\S+?): ', str(error))
  reason = _text(root)
  if isinstance(root, KeyError):
    reason = f'unknown config key {reason}'
  return f'{flag.group(1)}: {reason}' if flag else reason


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad flag, config file or override into one line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # config_flags defers some load errors (a missing file) to the first use.
    return rest
  except (flags.Error, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)


def init_distributed(cfg) -> None:
  """Joins a multi-process run. `config.distributed` wins; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID fill what it leaves empty; `distributed.auto` (or JAXTRAIN_DISTRIBUTED=auto) lets JAX
  detect the cluster (SLURM, TPU pods, ...). CPU processes talk over gloo."""
  import jax
  env = os.environ
  address = cfg.coordinator or env.get('JAX_COORDINATOR_ADDRESS', '')
  auto = cfg.auto or env.get('JAXTRAIN_DISTRIBUTED') == 'auto'
  if not address and not auto:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if not address:
    jax.distributed.initialize()
    return
  try:
    count = cfg.num_processes or int(env['JAX_NUM_PROCESSES'])
    index = cfg.process_id if cfg.process_id >= 0 else int(env['JAX_PROCESS_ID'])
  except (KeyError, ValueError):
    print(f'error: distributed coordinator {address!r} needs the process count and this process\'s id: set '
          'config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID (integers; got '
          f"{env.get('JAX_NUM_PROCESSES')!r}, {env.get('JAX_PROCESS_ID')!r})", file=sys.stderr)
    sys.exit(2)
  if not 0 <= index < count:
    print(f'error: process id {index} is not in [0, {count}) for {count} processes', file=sys.stderr)
    sys.exit(2)
  jax.distributed.initialize(address, num_processes=count, process_id=index)


def setup(argv: list[str]) -> tuple[Any, str]:
  """The start shared by `jaxtrain train` and `jaxtrain check`: argument checks, log level, distributed
  initialisation and the workdir. Returns (config, workdir)."""
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}; pass settings as --config.KEY=VALUE', file=sys.stderr)
    sys.exit(2)
  if _CONFIG.value is None:
    print('error: --config is required, e.g. --config=configs/tiny.py', file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing logs at INFO; keep the console for results.
  config = _CONFIG.value
  init_distributed(config.distributed)
  return config, _WORKDIR.value or default_workdir(flags.FLAGS['config'].serialize().split('=', 1)[1])


def main(argv: list[str]) -> None:
  config, workdir = setup(argv)
  # Imported here so that `--help` and flag errors answer without initialising JAX.
  import jax
  from jaxtrain.cli import check
  from jaxtrain.train import checkpoint, loop as train
  from jaxtrain.config import validate as config_lib
  from jaxtrain import data
  from jaxtrain.adapters import lora
  from jaxtrain.hf import config as hf_config, peft as peft_io
  from jaxtrain.stackwise import checkpoint as stack_checkpoint

  try:
    config_lib.validate(config, workdir, jax.device_count())
    if _PREFLIGHT.value:
      check.preflight(config)
    if config.stackwise.num_stacks:
      from jaxtrain.stackwise import job as stackwise_run  # the StackWise job: a rack trained stage by stage
      stackwise_run.run(config, workdir)
    else:
      train.run(config, workdir)
  except (config_lib.ConfigError, data.DataError, checkpoint.TopologyError, hf_config.HfError, lora.LoraError,
          peft_io.PeftError, stack_checkpoint.StackCheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def run_main() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
