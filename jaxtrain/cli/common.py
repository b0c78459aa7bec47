"""What every `jaxtrain` command shares: its flags, its setup and the one error handler.

A command is a module of this package with
  define(fv)  defining its flags on `fv` (`define_config` / `define_workdir` below for the shared ones),
  main(fv)    doing the job with the parsed flags; returns None (exit 0) or an exit status,
and optionally normalize(argv) rewriting its arguments before absl parses them. `run` parses the arguments
on a fresh `absl.flags.FlagValues` (so commands never see each other's flags, and a test can call
`jaxtrain.cli.main` repeatedly in one process), answers --help, sets the log level and calls main under
`errors()`. Exit status: 0 done; 1 stopped by non-finite steps (or, for `estimate` and `check`, nothing fits the
memory budget); 2 a user mistake (a bad, unknown or missing flag, a stray argument, a bad config, bad
data...), always one line `error: ...` on stderr.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from jaxtrain.errors import NonFiniteError, UserError

HELP_FLAGS = ('-h', '-help', '--help', '--helpfull', '--helpshort', '-?')


# ----------------------------------------------------------------------------- the shared flags


# The arguments `run` is parsing: config_flags finds the --config.KEY overrides in them (by default it reads
# sys.argv, which is not what an in-process `jaxtrain.cli.main([...])` parses).
_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar('argv', default=None)


def define_config(fv: flags.FlagValues) -> None:
  """--config=FILE[:ARG] (a `get_config(arg)` file), locked so that a mistyped --config.KEY is an error."""
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)), e.g. configs/tiny.py; override '
                                  'its keys with --config.KEY=VALUE.', flag_values=fv, lock_config=True,
                                  sys_argv=_ARGV.get())


def define_workdir(fv: flags.FlagValues, help: str = 'Run directory (checkpoints, metrics). Default: '
                   'runs/<config>.', required: bool = False) -> None:
  flags.DEFINE_string('workdir', None, help, flag_values=fv, required=required)


def define_memory_budget(fv: flags.FlagValues) -> None:
  """--memory-budget (check, estimate): overrides config.estimate.memory_budget, the one budget both compare their
  memory figure with (`jaxtrain.train.budget.resolve`)."""
  flags.DEFINE_string('memory-budget', None, 'Memory per device, e.g. 80GB (10^9 bytes) or 80GiB (2^30); '
                      'overrides config.estimate.memory_budget (default: the device\'s own limit, where it reports '
                      'one).', flag_values=fv)


def memory_budget(fv: flags.FlagValues) -> str | None:
  """The --memory-budget value (None when not given), refused in one line naming the flag when it is no size."""
  from jaxtrain.train import budget  # light: no JAX

  value = fv['memory-budget'].value
  if value:
    try:
      budget.parse_bytes(value)
    except ValueError as e:
      raise UserError('--memory-budget', value, f'{e.args[0].split(" ", 1)[1]} (or leave the flag out: the '
                      "device's own limit, where it reports one)") from None
  return value


def _define_logging(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer('verbosity', None, 'Log level: -1 warning (the default), 0 info, 1 debug.', short_name='v',
                       flag_values=fv)


def default_workdir(config_flag: str) -> str:
  """runs/<config file stem>[_<arg>] for `--config=configs/llama.py:size=cpu` -> runs/llama_size-cpu."""
  path, _, arg = config_flag.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', name + ('_' + re.sub(r'[^A-Za-z0-9.-]+', '-', arg) if arg else ''))


# ----------------------------------------------------------------------------- parsing


def _text(error: BaseException) -> str:
  if len(error.args) > 1 and all(isinstance(a, str) for a in error.args):  # ('Non-boolean argument ...', 'maybe')
    text = ': '.join(error.args)
  else:
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  if 'Traceback (most recent call last)' in text:  # keep only the exception line of an embedded traceback
    text = [line for line in text.splitlines() if line.strip()][-1]
  return ' '.join(text.split()).rstrip(':') or type(error).__name__


def _user_error(error: BaseException) -> UserError | None:
  """The innermost UserError in the chain of causes under `error`: what get_config raised (config_flags
  re-raises it as `type(e)(message with the whole traceback)`)."""
  seen, found = set(), None
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _unknown_key(error: KeyError, argv: Sequence[str]) -> str:
  """`--config.train.stepz: unknown config key 'train.stepz' (did you mean 'train.steps'?)`: config_flags
  names only the last key and not the flag, so the override is found among the arguments."""
  text = _text(error)
  named = re.match(r"'([^']+)'", text)
  key = named.group(1) if named else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv:
    path = arg.split('=', 1)[0].removeprefix('--config.')
    parts = path.split('.')
    if arg.startswith('--config.') and key in parts:
      section = '.'.join(parts[:parts.index(key)])
      where = f'{section} has no key {key!r}' if section else f'the config has no section or key {key!r}'
      if section == 'data.sources':
        where += " (a source is defined in the config file: c.data.sources.NAME = source('files', ...))"
      elif hint:
        where += f"; did you mean {'.'.join([*parts[:parts.index(key)], hint.group(1)])!r}?"
      return f'--config.{path}: unknown config key {path!r}: {where}'
  return f'unknown config key {key!r}' + (f'; did you mean {hint.group(1)!r}?' if hint else '')


def one_line(error: BaseException, argv: Sequence[str] = ()) -> str:
  """The flag at fault and the root cause on one line (config_flags wraps the real reason, sometimes
  with a whole traceback, in a generic message)."""
  missing = re.match(r'flag --(\S+)=None: Flag --\S+ must have a value other than None', str(error))
  if missing:
    return f'--{missing.group(1)} is required'
  root = error.__cause__ or error.__context__  # one level down holds the specific reason
  if root is None:
    return _text(error)
  if isinstance(root, FileNotFoundError) or 'No such file or directory' in str(root):
    config = next((a for a in argv if a.startswith('--config=')), '--config')
    return f'{config}: no such config file (valid: a get_config(arg) file such as configs/tiny.py)'
  flag = re.match(r'(flag --\S+?): ', str(error))
  user = _user_error(error)  # a config file's own UserError (a bad `:key=value` argument): its one line
  if user is not None:
    return f'{flag.group(1)}: {user.line()}' if flag else user.line()
  if isinstance(root, KeyError):
    return _unknown_key(root, argv)
  reason = _text(root)
  return f'{flag.group(1)}: {reason}' if flag else reason


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """absl parsing of argv (argv[0]: the program) into `fv`; a bad, unknown or missing flag, a config file or
  override that does not load, or a stray positional argument raises UserError with one line."""
  try:
    rest = fv(list(argv))
    if 'config' in fv and fv['config'].value is not None:
      fv['config'].value.keys()  # config_flags defers some load errors (a missing file) to the first use.
  except (flags.Error, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
    raise UserError(one_line(e, argv)) from e
  if rest[1:]:
    raise UserError(f'unexpected arguments {rest[1:]}', valid='give every setting as a --flag' +
                    (' or --config.KEY=VALUE' if 'config' in fv else ''))


def usage(name: str, command: ModuleType, fv: flags.FlagValues) -> str:
  summary = (command.__doc__ or '').strip()
  return f'usage: jaxtrain {name} [flags]\n\n{summary}\n\nflags:\n{fv.get_help(include_special_flags=False)}'


# ----------------------------------------------------------------------------- setup


def init_distributed(cfg: Any) -> None:
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
    raise UserError(f'distributed coordinator {address!r} needs the process count and this process\'s id: set '
                    'config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID (integers; '
                    f"got {env.get('JAX_NUM_PROCESSES')!r}, {env.get('JAX_PROCESS_ID')!r})") from None
  if not 0 <= index < count:
    raise UserError(f'process id {index} is not in [0, {count}) for {count} processes')
  jax.distributed.initialize(address, num_processes=count, process_id=index)


def config_and_workdir(fv: flags.FlagValues) -> tuple[Any, str]:
  """The setup of a command that takes --config: the config, after joining a distributed run, and the
  workdir (--workdir, or runs/<config>)."""
  config = fv['config'].value
  if config is None:
    raise UserError('--config is required, e.g. --config=configs/tiny.py')
  init_distributed(config.distributed)
  return config, fv['workdir'].value or default_workdir(fv['config'].serialize().split('=', 1)[1])


# ----------------------------------------------------------------------------- the error handler


@contextlib.contextmanager
def errors() -> Iterator[None]:
  """THE error handler of every command: a UserError prints `error: <one line>` on stderr and exits 2; a run
  stopped by non-finite steps prints why and where its last good state is, and exits 1."""
  try:
    yield
  except UserError as e:
    print(f'error: {e.line()}', file=sys.stderr, flush=True)
    sys.exit(2)
  except NonFiniteError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def run(name: str, command: ModuleType, argv: Sequence[str]) -> None:
  """`jaxtrain NAME argv[1:]`: parses the flags `command.define` declares, then calls `command.main(flags)`.
  Returns when the command succeeds; exits with its status otherwise (see the module docstring)."""
  argv = [f'jaxtrain {name}', *argv[1:]]
  if hasattr(command, 'normalize'):
    argv = command.normalize(argv)
  fv = flags.FlagValues()
  _define_logging(fv)
  token = _ARGV.set(argv)
  try:
    command.define(fv)
  finally:
    _ARGV.reset(token)
  given = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  if any(a in HELP_FLAGS for a in given):
    print(usage(name, command, fv))
    sys.exit(0)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging reads its own flags' defaults (else it warns once on stderr)
  logging.use_absl_handler()
  with errors():
    parse(fv, argv)
    # JAX's backend probing logs at INFO; keep the console for results unless asked.
    logging.set_verbosity(logging.WARNING if fv['verbosity'].value is None else fv['verbosity'].value)
    status = command.main(fv)
  if status:
    sys.exit(status)
