"""FLOPs accounting, the device peak, and the logging sinks (metrics.jsonl, progress bar, wandb, plot)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from jaxtrain import paths




class Logger:
  """Writes metrics to WORKDIR/metrics.jsonl, progress to the terminal and (optionally) wandb.

  Progress (`cfg.progress`) is a bar when stdout and stderr are terminals, else one plain line per logged train
  step (step, loss, lr, tokens/s), so a file or CI log holds no carriage-return walls. A run that starts at
  `start_step` first drops the rows a crashed run logged past it (`truncate_metrics`), so each step is logged
  once. With `enabled=False` (processes other than the first of a multi-process run) it writes nothing."""

  def __init__(self, workdir: str, cfg: Any, total_steps: int, start_step: int, run_config: dict,
               enabled: bool = True):
    self.path = paths.in_run(workdir, paths.METRICS)
    self.enabled = enabled
    self.total_steps = total_steps
    if enabled:
      truncate_metrics(self.path, start_step, total_steps)
    self._file = open(self.path, 'a') if enabled else None
    self._bar = None
    self._plain = False
    if cfg.progress and enabled:
      if _is_terminal():
        import tqdm
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
      else:
        self._plain = True
    self._wandb = None
    if cfg.wandb != 'disabled' and enabled:
      self._wandb = _start_wandb(workdir, cfg, run_config, self.write)

  def log(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': step, **{k: float(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._wandb is not None:
      self._wandb.log(record, step=step)
    if 'loss' not in record:
      return
    if self._bar is not None:
      # Not drawn now: the loop advances the counter to this step next, and that draw shows both together
      # (drawn here, the bar showed step N's loss beside the counter of step N-1).
      self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                            refresh=False)
    elif self._plain:
      print(progress_line(record, self.total_steps), flush=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def write(self, line: str) -> None:
    """Prints a line without breaking the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._wandb is not None:
      self._wandb.finish()
    if self._file is not None:
      self._file.close()


def progress_line(record: dict[str, float], total_steps: int) -> str:
  """The plain progress line of a logged train step (progress without a terminal)."""
  return (f"step {record['step']}/{total_steps}: loss {record['loss']:.4f}, lr {record.get('lr', 0.0):.3g}, "
          f"{record.get('tokens_per_s', 0.0):,.0f} tokens/s")


def _is_terminal() -> bool:
  """Whether both stdout and stderr are terminals (the bar draws on stderr, log lines go to stdout)."""
  try:
    return sys.stdout.isatty() and sys.stderr.isatty()
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


def truncate_metrics(path: str, keep_through: int, total_steps: int) -> None:
  """Rewrites metrics.jsonl with only the rows of steps <= `keep_through` (the step a run resumes from, 0 for
  a fresh start): a run that died after its last checkpoint logged steps it now runs again, and consumers (the
  plot, compare, dashboards) must see each step once. Eval rows at `total_steps` go too: a run that is already
  complete logs its final evaluation again. A torn last line (a crash mid-write) is dropped."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      evaluation = any(k.startswith('eval_') for k in record)
      if step <= keep_through and not (evaluation and step == total_steps):
        kept.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if not dropped:
    return
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)


def _start_wandb(workdir: str, cfg: Any, run_config: dict, say: Any) -> Any:
  """A wandb run in WORKDIR/wandb. 'online' without credentials falls back to offline with a note rather
  than prompting or failing: a run must never wait on a login."""
  import wandb
  os.environ.setdefault('WANDB_SILENT', 'true')
  mode = cfg.wandb
  if mode == 'online' and not (os.environ.get('WANDB_API_KEY') or _has_netrc_login()):
    say('wandb: no login found (WANDB_API_KEY or ~/.netrc); logging offline instead, sync later with `wandb sync`')
    mode = 'offline'
  return wandb.init(project=cfg.wandb_project, dir=workdir, mode=mode, config=run_config, resume='allow',
                    id=_run_id(workdir), settings=wandb.Settings(console='off'))


def _has_netrc_login() -> bool:
  import netrc
  try:
    return any('wandb' in host for host in netrc.netrc().hosts)
  except (OSError, netrc.NetrcParseError):
    return False


def _run_id(workdir: str) -> str:
  """A stable wandb id per workdir so a resumed run continues the same wandb run."""
  import hashlib
  return hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:12]


def read_metrics(workdir: str) -> list[dict]:
  path = paths.in_run(workdir, paths.METRICS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str) -> str | None:
  """WORKDIR/loss.png: train loss per step (the last record for each step, so resumed runs plot once) and
  eval loss. Returns the path, or None when there is nothing to plot."""
  by_step: dict[int, dict] = {}
  for r in read_metrics(workdir):
    by_step.setdefault(r['step'], {}).update(r)
  train = sorted((s, r['loss']) for s, r in by_step.items() if 'loss' in r)
  evals = sorted((s, r['eval_loss']) for s, r in by_step.items() if 'eval_loss' in r)
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*train, strict=True), label='train loss', lw=1)
  if evals:
    ax.plot(*zip(*evals, strict=True), 'o-', label='eval loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.legend()
  ax.grid(alpha=0.3)
  path = os.path.join(workdir, paths.LOSS_PLOT)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path

