"""List the runs under a directory: `jaxtrain runs [DIR] [--json]` (DIR defaults to runs/).

A run is a directory with a jaxtrain config.json (plain or StackWise), found at any depth; an old-<time>/ that
--start_over moved aside is a run of its own. Each gets its status from WORKDIR/run.json, which the run writes
when it starts and ends (`jaxtrain.train.runstatus`): running, done, stopped, early-stopped, failed; a run whose
process is gone without writing its end (SIGKILL, out of memory) reads "failed (died)", one on another host
that has logged nothing for 30 minutes "running?", and a run from before run.json existed "done?" or "unknown".
The table shows the config it was trained from, steps done/planned (a StackWise run's over all its stages, with
the stage), the latest train and eval loss, the best early-stopping metric, the exports `jaxtrain export` made,
and the last update; then one line per run with a reason (why it stopped or failed) and one per export.

`--json` prints one object (schema 1, stable: fields are only ever added):
  {"schema": 1, "dir": DIR, "runs": [{
     "path": the run's directory relative to DIR ("." for DIR itself), "config": "configs/NAME.py[:ARG]" or null,
     "kind": "plain" | "stackwise",
     "status": "running" | "running?" | "done" | "done?" | "stopped" | "early-stopped" | "failed" |
               "failed (died)" | "unknown",
     "reason": one line or null, "step": steps done or null, "steps": steps planned or null,
     "stage": the StackWise stage running or last run (0-based) or null, "stages": their number or null,
     "loss": the latest train loss, "loss_step": its step, "eval_loss": the latest eval loss, "eval_step": its step
       (numbers or null; a non-finite value as the string "nan", "inf" or "-inf": JSON has no NaN),
     "best": {"metric", "value", "step"} recorded by early stopping, or null,
     "exports": [{"out": absolute path, "format": "hf" | "peft", "dtype", "step", "stage", "time", "exists"}],
     "pid": the training process's id, "host": its host name (null without run.json),
     "started", "ended", "updated" (the newest of run.json and metrics.jsonl): ISO 8601 local times or null}]}
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from absl import flags

from jaxtrain.errors import UserError


def normalize(argv: list[str]) -> list[str]:
  """`jaxtrain runs DIR` -> `--dir=DIR`: the first positional argument is the directory to list (any further
  one, or one beside --dir, stays positional and is refused in one line)."""
  args = argv[1:]
  valued = ('-v', '--verbosity', '--dir')  # flags whose value may be the next argument
  positional = [i for i, a in enumerate(args) if not a.startswith('-') and (i == 0 or args[i - 1] not in valued)]
  if not positional or '--' in args or any(a == '--dir' or a.startswith('--dir=') for a in args):
    return argv
  i = positional[0]
  return [argv[0], f'--dir={args[i]}', *args[:i], *args[i + 1:]]


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('dir', 'runs', 'Directory to list the runs under (also the one positional argument).',
                      flag_values=fv)
  flags.DEFINE_bool('json', False, 'Print one JSON object (schema in `jaxtrain runs --help`) instead of a table.',
                    flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.train import runstatus

  root = fv['dir'].value
  if not os.path.isdir(root):
    what = 'is a file, not a directory' if os.path.exists(root) else 'does not exist'
    raise UserError(f'DIR {root!r} {what}; give the directory holding your runs (default: runs/, the '
                    'default workdir of jaxtrain train)')
  runs = [runstatus.describe(d, root) for d in runstatus.scan(root)]
  if fv['json'].value:
    _emit(json.dumps(_finite({'schema': runstatus.SCHEMA, 'dir': root, 'runs': runs}), indent=1, allow_nan=False))
  else:
    _emit(table(runs) if runs else f'no runs under {root}')


def _emit(text: str) -> None:
  """Prints `text`; a reader that stops early (`jaxtrain runs --json | head`) ends the command quietly."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail again


def _finite(tree: Any) -> Any:
  """`tree` with each non-finite float as the string 'nan', 'inf' or '-inf' (JSON has no NaN; a diverged run's
  loss is one)."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_finite(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return str(tree)
  return tree


def _num(x: float | None, fmt: str = '.4f') -> str:
  return '-' if x is None else format(x, fmt)


def _steps(run: dict) -> str:
  done = '?' if run['step'] is None else str(run['step'])
  text = f'{done}/{"?" if run["steps"] is None else run["steps"]}'
  if run['stage'] is not None:
    text += f' (stage {run["stage"]}' + (f' of {run["stages"]})' if run['stages'] else ')')
  return text


def _best(best: dict | None) -> str:
  if not best:
    return '-'
  return f'{best.get("metric")} {_num(best.get("value"))} @{best.get("step")}'


def _when(iso: str | None) -> str:
  return '-' if not iso else iso[:16].replace('T', ' ')  # minutes, local time


def table(runs: list[dict]) -> str:
  """A fixed-width table, then the reasons and the exports, one line each."""
  head = ('RUN', 'CONFIG', 'STATUS', 'STEPS', 'LOSS', 'EVAL', 'BEST', 'EXPORTS', 'UPDATED')
  rows = [(r['path'], r['config'] or '-', r['status'], _steps(r), _num(r['loss']), _num(r['eval_loss']),
           _best(r['best']), str(len(r['exports'])), _when(r['updated'])) for r in runs]
  widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
  right = {3, 4, 5, 7}  # numbers
  lines = ['  '.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
           .rstrip() for row in (head, *rows)]
  notes = [f'{r["path"]}: {r["reason"]}' for r in runs if r['reason']]
  if notes:
    lines += ['', *notes]
  made = [f'{r["path"]}: {_export(e)}' for r in runs for e in r['exports']]
  if made:
    lines += ['', 'exports:', *made]
  return '\n'.join(lines)


def _export(e: dict) -> str:
  at = f'stage {e["stage"]}' if e.get('stage') is not None else f'step {e.get("step")}'
  dtype = f' {e["dtype"]}' if e.get('dtype') else ''
  gone = '' if e.get('exists') else ' (gone)'
  return f'{at} -> {e["out"]} ({e.get("format")}{dtype}, {_when(e.get("time"))}){gone}'
