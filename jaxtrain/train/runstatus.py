"""What a run is doing, written by the run itself, and what was made from it; read back by `jaxtrain runs`.

WORKDIR/run.json (schema 1) is written by process 0 when `fit` (or the StackWise job) starts and when it ends:

  {"schema": 1, "kind": "plain" | "stackwise",
   "status": "running" | "done" | "stopped" | "early-stopped" | "failed",
   "reason": one line or null (the stop request, the early-stop reason, the error; the data ending on 'done'),
   "config": the --config it was trained from ("configs/tiny.py:ARG") or null (a library call),
   "pid": int, "host": str, "started": ISO 8601 local time, "ended": ISO 8601 or null,
   "steps": steps planned, "step": steps done when it ended (null while running),
   "best": {"metric", "value", "step"} of early stopping, or null,
   StackWise only: "stage_steps": [steps of each stage], "stage": the stage running (or that ran last)}

A run killed by SIGKILL (or a lost machine) never writes its end: it stays "running", and `describe` reads it
as "failed (died)" when its pid is gone on this host. WORKDIR/exports.jsonl gets one line per `jaxtrain export`:
{"out", "format", "dtype", "step", "stage", "time"}. Both move into old-<time>/ with --start_over (`paths.HISTORY`).
`describe`/`scan` give the records of `jaxtrain runs --json` (the schema is in jaxtrain/cli/runs.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from jaxtrain import paths
from jaxtrain.errors import NonFiniteError, UserError
from jaxtrain.train import earlystop

SCHEMA = 1
# A run on another host cannot be asked whether its process lives: without a run.json or metrics update for this
# long it reads "running?" (a compile, a long evaluation or a checkpoint save of a large model can take minutes).
STALE_MINUTES = 30
# Folders inside a run that hold no other run: `scan` does not walk them (checkpoints hold thousands of files).
_INSIDE = {paths.CHECKPOINTS, paths.SAMPLES, paths.SPIKES, paths.STAGES, paths.RACK, paths.TOKENIZER, paths.EVAL,
           paths.GENERATE}
_TAIL_BLOCK = 1 << 16

# The --config a command trains from (`launched`): a run records it in run.json; a library call has none.
_CONFIG: contextvars.ContextVar[str | None] = contextvars.ContextVar('jaxtrain_config', default=None)


@contextlib.contextmanager
def launched(config_flag: str | None) -> Iterator[None]:
  """Runs started inside record `config_flag` (the --config value, e.g. 'configs/tiny.py:ARG') as their config."""
  token = _CONFIG.set(config_flag)
  try:
    yield
  finally:
    _CONFIG.reset(token)


def now() -> str:
  """This moment as ISO 8601 local time with its offset, to the second."""
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def _write(workdir: str, record: dict) -> None:
  """run.json replaced atomically: a reader never sees half a file."""
  path = paths.in_run(workdir, paths.RUN)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def read(workdir: str) -> dict | None:
  """WORKDIR/run.json, or None when there is none (or it cannot be read)."""
  try:
    with open(paths.in_run(workdir, paths.RUN), encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def one_line(error: BaseException) -> str:
  """An error as one line for run.json: a UserError's own line; a non-finite stop's first sentence."""
  if isinstance(error, UserError):
    return error.line()
  text = ' '.join(str(error).split())
  if isinstance(error, NonFiniteError):
    return text.split('. ', 1)[0][:300]
  return (f'{type(error).__name__}: {text}' if text else type(error).__name__)[:300]  # Ctrl-C: KeyboardInterrupt


class Recording:
  """`with Recording(workdir, steps) as status:` writes run.json 'running' on enter; `status.end(...)` (or
  `fit_ended(result)`) writes the end. An exception out of the block writes 'failed' with its one line and goes
  on; a UserError instead puts back the run.json there was (a user mistake touches nothing). `enabled`: process
  0 only. `extra`: further fields (StackWise: stage_steps)."""

  def __init__(self, workdir: str, steps: int, *, kind: str = 'plain', enabled: bool = True,
               extra: dict | None = None):
    self.workdir, self.enabled = workdir, enabled
    self.record = {'schema': SCHEMA, 'kind': kind, 'status': 'running', 'reason': None, 'config': _CONFIG.get(),
                   'pid': os.getpid(), 'host': socket.gethostname(), 'started': now(), 'ended': None,
                   'steps': steps, 'step': None, 'best': None, **(extra or {})}
    self.ended = False
    self._before: str | None = None

  def __enter__(self) -> Recording:
    if self.enabled:
      os.makedirs(self.workdir, exist_ok=True)
      with contextlib.suppress(OSError):
        with open(paths.in_run(self.workdir, paths.RUN), encoding='utf-8') as f:
          self._before = f.read()
      _write(self.workdir, self.record)
    return self

  def update(self, **fields: Any) -> None:
    """Rewrites run.json with `fields` changed (a StackWise job's current stage)."""
    self.record.update(fields)
    if self.enabled:
      _write(self.workdir, self.record)

  def end(self, status: str, step: int | None, reason: str | None = None, best: dict | None = None) -> None:
    self.ended = True
    self.update(status=status, step=step, reason=reason, best=best, ended=now())

  def fit_ended(self, result: Any) -> Any:
    """Records the end a `loop.RunResult` describes (done, stopped, early-stopped) and returns the result."""
    step = max(result.losses, default=result.start_step)
    best = result.best  # the best evaluation by train.early_stop.metric, whichever way the run ended
    if result.stopped:
      self.end('stopped', step, f'stopped by {result.stopped[0]}; rerun the same command to resume', best)
    elif result.early_stop:
      self.end('early-stopped', step, result.early_stop, best)
    else:
      ended = (f'the training data ended after step {result.data_ended}' if result.data_ended is not None
               else None)
      self.end('done', step, ended, best)
    return result

  def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
    if error is None or self.ended or not self.enabled:
      return
    if isinstance(error, UserError):  # a user mistake writes nothing: the run.json before it stays
      path = paths.in_run(self.workdir, paths.RUN)
      if self._before is None:
        with contextlib.suppress(OSError):
          os.remove(path)
      else:
        with open(path, 'w', encoding='utf-8') as f:
          f.write(self._before)
      return
    self.end('failed', None, one_line(error))


def record_export(workdir: str, out: str, fmt: str, dtype: str | None, step: int | None = None,
                  stage: int | None = None) -> bool:
  """Appends what `jaxtrain export` wrote to WORKDIR/exports.jsonl; False (and the export stands) when the run
  directory cannot be written (a run of someone else's, read-only)."""
  line = {'out': os.path.abspath(out), 'format': fmt, 'dtype': dtype, 'step': step, 'stage': stage, 'time': now()}
  try:
    with open(paths.in_run(workdir, paths.EXPORTS), 'a', encoding='utf-8') as f:
      f.write(json.dumps(line) + '\n')
  except OSError:
    return False
  return True


# ----------------------------------------------------------------------------- reading runs back


def is_run(directory: str) -> bool:
  """Whether `directory` holds a jaxtrain run: a config.json with train and model sections (a Hugging Face
  model directory also has a config.json)."""
  config = _json(os.path.join(directory, paths.CONFIG))
  return isinstance(config, dict) and 'train' in config and 'model' in config


def scan(root: str) -> list[str]:
  """The run directories under `root` (itself included), sorted; a run's own folders (checkpoints, stages, ...)
  are not walked, its other folders are (old-<time>/ is an earlier run of its own)."""
  found = []
  for directory, subdirs, _ in os.walk(root):
    if is_run(directory):
      found.append(directory)
      subdirs[:] = [d for d in subdirs if d not in _INSIDE]
    subdirs.sort()
  return sorted(found)


def _json(path: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _mtime(path: str) -> float | None:
  try:
    return os.path.getmtime(path)
  except OSError:
    return None


def last_metrics(workdir: str) -> tuple[dict | None, dict | None]:
  """(the last train record, the last eval record) of WORKDIR/metrics.jsonl, read from its end backwards
  (a long run's file is large; the newest rows are what is asked for)."""
  train = evaluation = None
  try:
    f = open(paths.in_run(workdir, paths.METRICS), 'rb')
  except OSError:
    return None, None
  with f:
    end = f.seek(0, os.SEEK_END)
    rest = b''
    while end > 0 and (train is None or evaluation is None):
      start = max(0, end - _TAIL_BLOCK)
      f.seek(start)
      lines = (f.read(end - start) + rest).split(b'\n')
      rest = lines.pop(0) if start > 0 else b''  # maybe the tail of a line that starts in the block before
      end = start
      for line in reversed(lines):
        try:
          row = json.loads(line)
        except ValueError:  # blank, or half a line being written
          continue
        if not isinstance(row, dict) or 'step' not in row:
          continue
        if train is None and 'loss' in row:
          train = row
        if evaluation is None and 'eval_loss' in row:
          evaluation = row
  return train, evaluation


def pid_alive(pid: int, started: str | None) -> bool:
  """Whether process `pid` of this host lives and is the one that wrote run.json at `started` (a pid reused by
  a later process, whose start is after it, is not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it lives
    pass
  except OSError:
    return False
  if _zombie(pid):  # killed, not yet reaped by its parent: it no longer runs (and never writes its end)
    return False
  began = _process_start(pid)
  written = _epoch(started)
  return began is None or written is None or began <= written + 1.0


def _zombie(pid: int) -> bool:
  """Whether process `pid` has exited but is still in the process table (state Z in /proc on Linux): signal 0
  reaches it, yet it runs nothing."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'  # field 3 (state), after the command name
  except (OSError, IndexError):
    return False


def _process_start(pid: int) -> float | None:
  """When process `pid` started (seconds since the epoch), from /proc on Linux; None elsewhere."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22 (starttime), after the command name
    with open('/proc/stat', encoding='utf-8') as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith('btime '))
    return boot + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def _epoch(iso: str | None) -> float | None:
  try:
    return datetime.datetime.fromisoformat(iso).timestamp() if iso else None
  except (TypeError, ValueError):
    return None


def _iso(epoch: float | None) -> str | None:
  if epoch is None:
    return None
  return datetime.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec='seconds')


def _progress(workdir: str) -> dict:
  """steps done (the last logged train step), the latest losses and the newest file time of one run dir."""
  train, evaluation = last_metrics(workdir)
  return {'step': int(train['step']) if train else None,
          'loss': train['loss'] if train else None, 'loss_step': int(train['step']) if train else None,
          'eval_loss': evaluation['eval_loss'] if evaluation else None,
          'eval_step': int(evaluation['step']) if evaluation else None,
          'mtime': max(filter(None, (_mtime(paths.in_run(workdir, n)) for n in (paths.RUN, paths.METRICS))),
                       default=None)}


def _stackwise_progress(workdir: str, record: dict | None) -> dict:
  """A StackWise run's progress over its stages (each a run directory stages/K with its own metrics and
  run.json): steps done = the planned steps of the stages before the current one + the current one's."""
  stage_steps = (record or {}).get('stage_steps')
  stages_dir = paths.in_run(workdir, paths.STAGES)
  try:
    ran = sorted(int(d) for d in os.listdir(stages_dir) if d.isdigit())
  except OSError:
    ran = []
  current = (record or {}).get('stage')
  if current is None:  # no stage recorded (an older run, or nothing left to train): the last that ran
    current = ran[-1] if ran else None
  out = _progress(paths.stage_dir(workdir, current)) if current is not None else _progress(workdir)
  done = out['step'] or 0
  inner = read(paths.stage_dir(workdir, current)) if current is not None else None
  if inner and inner.get('step') is not None:
    done = max(done, inner['step'])
  if stage_steps and current is not None:  # a stage that stopped early ran fewer steps than planned: its end says
    done += sum(_stage_step(workdir, k, planned) for k, planned in enumerate(stage_steps[:current]))
  elif current:  # no record of the plan: the stages before, by what they logged
    done += sum(_progress(paths.stage_dir(workdir, k))['step'] or 0 for k in ran if k < current)
  out['mtime'] = max(filter(None, (out['mtime'], _mtime(paths.in_run(workdir, paths.RUN)))), default=None)
  out.update(step=done if (out['step'] is not None or current) else None, stage=current,
             stages=len(stage_steps) if stage_steps else None)
  return out


def _stage_step(workdir: str, stage: int, planned: int) -> int:
  """The steps stage `stage` of a StackWise run ran: its run.json's end (fewer than `planned` when
  train.early_stop ended it), else `planned` (a stage from before run.json)."""
  inner = read(paths.stage_dir(workdir, stage))
  if inner and inner.get('status') != 'running' and isinstance(inner.get('step'), int):
    return inner['step']
  return planned


def _early_stages(workdir: str) -> str | None:
  """One line naming the stages of a StackWise run that train.early_stop ended (each handed its rack on)."""
  try:
    ran = sorted(int(d) for d in os.listdir(paths.in_run(workdir, paths.STAGES)) if d.isdigit())
  except OSError:
    return None
  early = [(k, r) for k in ran if (r := read(paths.stage_dir(workdir, k))) and r.get('status') == 'early-stopped']
  if not early:
    return None
  return 'train.early_stop ended ' + ', '.join(f'stage {k} at step {r.get("step")} of {r.get("steps")}'
                                               for k, r in early)


def exports(workdir: str) -> list[dict]:
  """The exports recorded in WORKDIR/exports.jsonl, oldest first, each with `exists` (its directory is there)."""
  out = []
  try:
    with open(paths.in_run(workdir, paths.EXPORTS), encoding='utf-8') as f:
      lines = f.readlines()
  except OSError:
    return out
  for line in lines:
    try:
      entry = json.loads(line)
    except ValueError:
      continue
    if isinstance(entry, dict) and 'out' in entry:
      out.append(dict(entry, exists=os.path.isdir(entry['out'])))
  return out


def describe(workdir: str, root: str, now_epoch: float | None = None, host: str | None = None) -> dict:
  """One run as `jaxtrain runs --json` lists it (the schema in jaxtrain/cli/runs.py); `root`: what its path is
  relative to. `now_epoch`, `host`: this moment and this host (tests pass others)."""
  import time

  now_epoch = time.time() if now_epoch is None else now_epoch
  host = socket.gethostname() if host is None else host
  config = _json(paths.in_run(workdir, paths.CONFIG)) or {}
  record = read(workdir)
  stackwise = bool((config.get('stackwise') or {}).get('num_stacks')) or (record or {}).get('kind') == 'stackwise'
  progress = _stackwise_progress(workdir, record) if stackwise else _progress(workdir)
  planned = (record or {}).get('steps')
  if planned is None and not stackwise:
    planned = (config.get('train') or {}).get('steps')
  step = progress['step']
  if record and record.get('step') is not None and not (stackwise and step is not None):  # a rack: over its stages
    step = max(step or 0, record['step'])
  status, reason = _status(record, progress, planned, now_epoch, host, stackwise)
  if stackwise and status == 'done' and reason is None:
    reason = _early_stages(workdir)
  rel = os.path.relpath(workdir, root)
  return {'path': rel, 'config': (record or {}).get('config'), 'kind': 'stackwise' if stackwise else 'plain',
          'status': status, 'reason': reason, 'step': step, 'steps': planned,
          'stage': progress.get('stage'), 'stages': progress.get('stages'),
          'loss': progress['loss'], 'loss_step': progress['loss_step'],
          'eval_loss': progress['eval_loss'], 'eval_step': progress['eval_step'],
          'best': (record or {}).get('best') or (earlystop.read(workdir) or {}).get('best'),  # so far, if running
          'exports': exports(workdir),
          'pid': (record or {}).get('pid'), 'host': (record or {}).get('host'),
          'started': (record or {}).get('started'), 'ended': (record or {}).get('ended'),
          'updated': _iso(progress['mtime'])}


def _status(record: dict | None, progress: dict, planned: int | None, now_epoch: float, host: str,
            stackwise: bool) -> tuple[str, str | None]:
  """(status, reason) of a run: its run.json's, a 'running' one checked against its process; without run.json
  (a run from before jaxtrain wrote one) what its metrics show, said as a guess."""
  if record is None:
    if stackwise:
      return 'unknown', 'no run.json (a run from an older jaxtrain); stages in stages/'
    done = (progress['eval_step'] is not None and planned is not None and progress['eval_step'] >= planned
            and (progress['step'] or 0) >= planned)
    if done:
      return 'done?', 'no run.json (a run from an older jaxtrain); its final evaluation is logged'
    return 'unknown', 'no run.json (a run from an older jaxtrain); it never logged a final evaluation'
  status = record.get('status') or 'unknown'
  if status != 'running':
    return status, record.get('reason')
  pid, where = record.get('pid'), record.get('host')
  if where == host and isinstance(pid, int):
    if pid_alive(pid, record.get('started')):
      return 'running', None
    return 'failed (died)', (f'pid {pid} on {where} is gone without writing its end (killed, e.g. SIGKILL or out '
                             'of memory); rerun the same command to resume from its last checkpoint')
  idle = (now_epoch - progress['mtime']) / 60 if progress['mtime'] else None
  if idle is not None and idle < STALE_MINUTES:
    return 'running', f'pid {pid} on {where}'
  return 'running?', (f'pid {pid} on {where} (another host: not checked) has logged nothing for '
                      f'{idle:.0f} minutes' if idle is not None else f'pid {pid} on {where} (another host)')
