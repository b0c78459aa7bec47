"""A thin wrapper over orbax's CheckpointManager for the train state pytree plus the grain iterator.

Each checkpoint directory `WORKDIR/checkpoints/<step>/` holds `state/` (the pytree, restored straight into
the target shardings) and `data/` (the data iterator position, one file per process). Saves are
asynchronous; `close()` waits for the last one so no checkpoint is left half written.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and whenever `force=True`), keeps the newest `keep`."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # We decide when to save (`should_save`); orbax should not second-guess the interval.
        save_interval_steps=1)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    """Newest complete checkpoint (orbax ignores unfinished temporary directories)."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None) -> None:
    """Starts an (async) save of `state` and the iterator position at `step` completed steps."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None) -> Any:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`);
    the data iterator is restored in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._mngr.restore(step, args=ocp.args.Composite(**items))['state']

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; re-raises their errors."""
    self._mngr.wait_until_finished()
    self._mngr.check_for_errors()

  def close(self) -> None:
    self.wait()
    self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
