"""A thin wrapper over orbax's CheckpointManager for the train state pytree plus the grain iterator.

Each checkpoint directory `WORKDIR/checkpoints/<step>/` holds `state/` (the pytree, restored straight into
the target shardings) and `data/` (the data iterator position, one file per process); its orbax
`_CHECKPOINT_METADATA` records the jaxtrain checkpoint format (`FORMAT`; checkpoints without the record are
format 1). Before a restore, the saved tree (paths, shapes, dtypes, read from orbax's metadata without reading
arrays) is compared with the run's: a checkpoint of another model or optimizer is refused (`ResumeError`),
never mistaken for a corrupt one. Saves are
asynchronous; `close()` waits for the last one so no checkpoint is left half written. Arrays are stored
uncompressed by default: zstd saves ~8% of the bytes of float32 weights and moments but is most of the
writer's CPU time, which an async save takes from the train step on a host with few cores
(benchmarks/checkpoint_blocking.py). Either kind restores with either setting.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jaxtrain.errors import UserError



# The layout of a checkpoint directory that this jaxtrain writes and reads. Bump it when a change means an older
# jaxtrain would misread new checkpoints; a checkpoint of a newer format than this is refused.
FORMAT = 1
_FORMAT_KEY = 'jaxtrain_format'  # in the custom metadata of orbax's <step>/_CHECKPOINT_METADATA


class TopologyError(UserError):
  """A checkpoint that is intact but cannot be resumed with this many processes."""


class ResumeError(UserError):
  """Intact checkpoints that this run cannot resume: another config, state layout or a newer format."""


HOW_TO_PROCEED = ('pass another --workdir, or --start_over to move the old checkpoints aside and train from '
                  'step 0')


def step_dirs(directory: str) -> list[int]:
  """The finished checkpoint steps under `directory`, newest first (orbax finishes a step by renaming its
  temporary directory to the bare step number); reads the listing only."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def checkpoint_format(step_dir: str) -> int:
  """The jaxtrain format a checkpoint was written in: 1 when it has no record (written before the record)."""
  try:
    with open(os.path.join(step_dir, '_CHECKPOINT_METADATA'), encoding='utf-8') as f:
      custom = json.load(f).get('custom_metadata') or {}
  except (OSError, ValueError, AttributeError):
    return 1
  return int(custom.get(_FORMAT_KEY, 1))


def check_format(step_dir: str) -> None:
  """ResumeError when the checkpoint in `step_dir` is of a newer format than this jaxtrain reads."""
  found = checkpoint_format(step_dir)
  if found > FORMAT:
    raise ResumeError(f'checkpoint {step_dir}', valid=f'is in jaxtrain checkpoint format {found}, newer than '
                      f'format {FORMAT} that this jaxtrain reads: resume with the newer jaxtrain that wrote it, or '
                      + HOW_TO_PROCEED)


def _path_text(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def saved_tree(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]] | None:
  """{leaf path: (shape, dtype)} of the state saved in `step_dir`, from orbax's metadata (no array is read);
  None when that metadata cannot be read (a truncated or incomplete checkpoint)."""
  try:
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / 'state')
    leaves = jax.tree_util.tree_flatten_with_path(meta)[0]
    return {_path_text(p): (tuple(x.shape), np.dtype(x.dtype).name) for p, x in leaves}
  except Exception:  # noqa: BLE001 -- unreadable metadata: the restore decides (corrupt, moved aside)
    return None


def tree_difference(saved: dict[str, tuple[tuple[int, ...], str]], abstract: Any) -> str | None:
  """The first difference between a saved tree (`saved_tree`) and the run's abstract state, in words; None
  when they match."""
  want = {_path_text(p): (tuple(x.shape), np.dtype(x.dtype).name)
          for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for path, (shape, dtype) in want.items():
    if path not in saved:
      return f'{path} is in this run\'s state but not in the checkpoint'
    if saved[path] != (shape, dtype):
      return (f'{path} is {dtype}{list(shape)} in this run and {saved[path][1]}{list(saved[path][0])} in the '
              'checkpoint')
  extra = next((p for p in saved if p not in want), None)
  return None if extra is None else f'{extra} is in the checkpoint but not in this run\'s state'


def check_state(step_dir: str, abstract: Any) -> bool:
  """Whether the checkpoint's saved tree could be read (False: leave it to the restore); ResumeError when it
  was read and differs from `abstract`, or when the checkpoint is of a newer format."""
  check_format(step_dir)
  saved = saved_tree(step_dir)
  if saved is None:
    return False
  diff = tree_difference(saved, abstract)
  if diff is not None:
    raise ResumeError(f'checkpoint {step_dir}', valid=f'holds another train state: {diff}; ' + HOW_TO_PROCEED)
  return True


def _state_handler(compress: bool) -> ocp.StandardCheckpointHandler:
  """orbax's StandardCheckpointHandler with two settings of the PyTreeCheckpointHandler it delegates to.

  Compression is optional (its constructor does not take `use_compression`; the delegate does, and writes the
  same format: a checkpoint restores with either setting). And in a one-process run arrays are saved without
  replica-parallel slicing: orbax splits a replicated array into a slice per replica (an eager slice op each)
  so that hosts share the writes, but with one process every slice goes to the same writer. On the tiny test
  configs over 8 CPU devices that slicing was 1.2 s of every save's blocking time. Should a later orbax keep
  its delegate elsewhere, orbax's defaults stay in place rather than anything failing.
  """
  handler = ocp.StandardCheckpointHandler()
  if isinstance(getattr(handler, '_impl', None), ocp.PyTreeCheckpointHandler):
    handler._impl = ocp.PyTreeCheckpointHandler(  # pylint: disable=protected-access
        use_compression=compress, save_concurrent_gb=96, restore_concurrent_gb=96,
        type_handler_registry=_type_handlers(replica_parallel=jax.process_count() > 1))
  return handler


def _type_handlers(replica_parallel: bool) -> Any:
  """orbax's default handlers for the leaf types a train state holds, jax.Array's with `replica_parallel`."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  arrays = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=replica_parallel,
      array_metadata_store=getattr(default, '_array_metadata_store', None))  # keep orbax's per-array metadata
  others = [(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)]
  return ocp.type_handlers.create_type_handler_registry(*others, (jax.Array, arrays))


class Checkpointer:
  """Saves every `every` steps (on demand too), keeps the newest `keep`.

  `shared_data_state=True` (data.process_split='rows': every process holds the same global iterator
  position) stores that position once, as JSON, so any number of processes can resume from it; otherwise
  each process stores its own position and a resume needs the same process count.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True,
               shared_data_state: bool = False, compress: bool = False):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.shared_data_state = shared_data_state
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # We decide when to save (`should_save`); orbax should not second-guess the interval.
        save_interval_steps=1)
    handlers = {'state': _state_handler(compress)}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'),
                                       item_handlers=handlers)

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
    if data_iter is not None and self.shared_data_state:
      items['data'] = ocp.args.JsonSave(data_iter.get_state())  # written by process 0 only
    elif data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True, custom_metadata={_FORMAT_KEY: FORMAT})

  def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None) -> Any:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`);
    the data iterator is restored in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      self._check_topology(step)
      items['data'] = (ocp.args.JsonRestore() if self.shared_data_state
                       else grain.checkpoint.CheckpointRestore(data_iter))
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and self.shared_data_state:
      data_iter.set_state(restored['data'])
    return restored['state']

  def _check_topology(self, step: int) -> None:
    """Per-process iterator files name the process count that wrote them; another count cannot resume."""
    names = os.listdir(os.path.join(self.directory, str(step), 'data')) if os.path.isdir(
        os.path.join(self.directory, str(step), 'data')) else []
    per_process = sorted(n for n in names if n.startswith('process_'))
    if self.shared_data_state or not per_process:
      return
    written_by = int(per_process[0].rsplit('-of-', 1)[1].split('.')[0])
    if written_by != jax.process_count():
      raise TopologyError(
          f'checkpoint {self.directory}/{step} was written by {written_by} processes with '
          f"data.process_split='documents' and cannot resume with {jax.process_count()}: run with "
          f"{written_by} processes, or train with data.process_split='rows' to move between process counts")

  def restore_latest(self, abstract_state: Any, data_iter: grain.DatasetIterator | None,
                     say: Callable[[str], None] = print) -> tuple[int, Any]:
    """(step, state) from the newest checkpoint that restores; (0, None) when there is none.

    A checkpoint that fails to restore (truncated or missing files) is reported in one line and moved
    aside to `<step>.corrupt-<time>` (never deleted: it may still be worth a look), so the previous one is
    used and a later save of the same step does not collide with it. An intact checkpoint of another train
    state or a newer format raises `ResumeError` before anything is read or moved (`check_state`).
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        check_state(os.path.join(self.directory, str(step)), abstract_state)
        return step, self.restore(step, abstract_state, data_iter)
      except (TopologyError, ResumeError):
        raise
      except Exception as e:  # noqa: BLE001 -- any failure to read means: not usable, try the previous
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
        aside = f'{self.directory}/{step}.corrupt-{int(time.time())}'
        if jax.process_index() == 0:
          os.rename(os.path.join(self.directory, str(step)), aside)
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices(f'jaxtrain-aside-{step}')
        say(f'checkpoint {self.directory}/{step} is incomplete or corrupt ({reason}); moved to {aside}, '
            'trying the previous one')
        self._mngr.reload()
    return 0, None

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
