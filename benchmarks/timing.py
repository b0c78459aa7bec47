"""Wall-clock timing shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

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
