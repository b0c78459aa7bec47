"""Wall-clock timing and child processes shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], n: int, warmup: int = 1) -> list[float]:
  """Seconds of each of `n` calls of `fn` after `warmup` untimed calls (compilation, caches)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def run_json_child(cmd: list[str], env: dict[str, str] | None = None) -> dict | str:
  """The JSON object a child process prints as its last `{...}` line, or the last line of its stderr (at
  most 200 characters) when it fails or prints none."""
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode or not lines:
    return (proc.stderr.strip().splitlines() or ['no output'])[-1][:200]
  return json.loads(lines[-1])
