"""Requests to stop a run cleanly: SIGTERM, SIGINT, SIGUSR1 or a `WORKDIR/STOP` file.

The loop asks `StopRequests.reason()` once per step; when it answers, the loop finishes the step, saves a
checkpoint, waits for it and exits 0. Further signals while that happens are noted and ignored, so a
second Ctrl-C cannot interrupt a save half way.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxtrain import paths

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequests:
  """Installs the handlers on enter and restores the previous ones on exit (main thread only)."""

  def __init__(self, workdir: str, stop_file: str | None = None):
    """Watches `stop_file`, by default WORKDIR/STOP (a StackWise stage watches its run's STOP, not its own)."""
    self.stop_file = stop_file or paths.in_run(workdir, paths.STOP)
    self._reason: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: object) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self._reason is None:
      self._reason = signal.Signals(signum).name

  def reason(self) -> str | None:
    """Why to stop now, or None. The STOP file is consumed so that rerunning the command resumes.

    With several processes they agree: if any one was asked to stop, all stop after the same step.
    """
    if self._reason is None and os.path.exists(self.stop_file):
      self._reason = f'{self.stop_file} file'
      if jax.process_index() == 0:
        os.remove(self.stop_file)
    if jax.process_count() > 1:
      anyone = multihost_utils.process_allgather(np.int32(self._reason is not None)).max()
      if anyone and self._reason is None:
        self._reason = 'a stop request on another process'
    return self._reason
