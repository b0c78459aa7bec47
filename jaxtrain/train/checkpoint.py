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

Two things keep orbax's internals off the user's terminal. Reads run under `drained_event_loops()`: orbax runs
each read in a fresh asyncio loop and, when one array fails (a truncated file), closes that loop with its other
reads still pending; their TensorStore callbacks then hit the closed loop ("Event loop is closed") and their
abandoned coroutines print tracebacks when collected, some at interpreter exit. And a save interrupted by a
kill leaves `<step>.orbax-checkpoint-tmp`, which orbax removes with a warning only when that step is saved
again; `restore_latest` discards it itself and says so in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jaxtrain.data import mixing
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


# What orbax leaves of a save that never finished: `<step>.orbax-checkpoint-tmp` (orbax 0.12; older versions
# appended `-<timestamp>`). A finished step is renamed to the bare number, so these names are never a checkpoint.
_INTERRUPTED = re.compile(r'(\d+)\.orbax-checkpoint-tmp(-\d+)?')

# How long closing a read's event loop waits for the reads still in flight (each is one array's shard; they
# end within the time of a whole restore) before cancelling what remains.
_DRAIN_S = 600.0


def step_dirs(directory: str) -> list[int]:
  """The finished checkpoint steps under `directory`, newest first (orbax finishes a step by renaming its
  temporary directory to the bare step number); reads the listing only."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def interrupted_saves(directory: str) -> list[int]:
  """Steps whose save was interrupted (a kill, a crash) and left an orbax temporary directory, ascending."""
  if not os.path.isdir(directory):
    return []
  found = (_INTERRUPTED.fullmatch(n) for n in os.listdir(directory))
  return sorted({int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(directory, m.group(0)))})


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that, closed with tasks still pending, first lets them finish (as `asyncio.run` does).

  orbax's `run_sync` closes its loop as soon as the awaited coroutine raises; the sibling reads of an
  `asyncio.gather` are then left pending on a closed loop. Letting them end here, and retrieving their
  exceptions, leaves nothing for TensorStore's callbacks or the garbage collector to report later.
  """

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      self._drain()
    super().close()

  def _drain(self) -> None:
    # Not cancelled first: a cancelled read's TensorStore callback could still fire after the close. Repeated:
    # a task that ends may have started others (a gather of its own reads).
    deadline, seen = time.monotonic() + _DRAIN_S, set()
    while pending := [t for t in asyncio.all_tasks(self) if not t.done()]:
      seen.update(pending)
      if (left := deadline - time.monotonic()) <= 0:
        for t in pending:
          t.cancel()
        self.run_until_complete(asyncio.wait(pending, timeout=5))
        break
      self.run_until_complete(asyncio.wait(pending, timeout=left))
    for t in seen:
      if t.done() and not t.cancelled():
        t.exception()  # retrieved: the restore already raised the first failure
    self.run_until_complete(self.shutdown_asyncgens())


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  """asyncio's default policy whose new loops drain before closing (Python 3.14 deprecates policies; orbax
  creates its loops with `asyncio.new_event_loop`, which this hooks on the Pythons jaxtrain supports)."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingLoop()


@contextlib.contextmanager
def drained_event_loops() -> Iterator[None]:
  """Around orbax reads: every event loop created meanwhile finishes its pending tasks before it closes
  (`_DrainingLoop`), so a failed restore leaves no asyncio or TensorStore noise behind. The policy is
  process-wide while it is set; loops made by other threads meanwhile only gain the same orderly close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


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


def _data_files(step_dir: str) -> list[str]:
  """The data-iterator files of a checkpoint: `process_<i>-of-<n>.json` per process (process_split
  'documents'), or orbax's JSON `metadata` of the one shared position ('rows')."""
  data = os.path.join(step_dir, 'data')
  names = sorted(os.listdir(data)) if os.path.isdir(data) else []
  return [os.path.join(data, n) for n in names if n.startswith('process_') or n == 'metadata']


def check_topology(step_dir: str) -> None:
  """TopologyError when per-process iterator files name another process count than this run's: such a
  position (process_split 'documents') cannot be continued by another count. Reads the listing only."""
  per_process = [os.path.basename(f) for f in _data_files(step_dir) if os.path.basename(f).startswith('process_')]
  if not per_process:
    return
  written_by = int(per_process[0].rsplit('-of-', 1)[1].split('.')[0])
  if written_by != jax.process_count():
    raise TopologyError(
        f'checkpoint {step_dir} was written by {written_by} processes with '
        f"data.process_split='documents' and cannot resume with {jax.process_count()}: run with "
        f"{written_by} processes, or train with data.process_split='rows' to move between process counts")


def check_data_state(step_dir: str) -> None:
  """Before anything is written: TopologyError for another process count (`check_topology`), ResumeError
  for a data-iterator position this jaxtrain's pipeline cannot continue (one written before each source was
  packed on its own). An unreadable file is left to the restore (corrupt: moved aside)."""
  check_topology(step_dir)
  for path in _data_files(step_dir)[:1]:
    try:
      with open(path, encoding='utf-8') as f:
        state = json.load(f)
    except (OSError, ValueError):
      return
    if not mixing.is_state(state):
      raise ResumeError(f'checkpoint {step_dir}', valid='holds the data position of an older jaxtrain, which '
                        'this one cannot continue: resume with the version that wrote it, or ' + HOW_TO_PROCEED)


def _path_text(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def saved_tree(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]] | None:
  """{leaf path: (shape, dtype)} of the state saved in `step_dir`, from orbax's metadata (no array is read);
  None when that metadata cannot be read (a truncated or incomplete checkpoint)."""
  try:
    with drained_event_loops():
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


class _KeepAlso:
  """An orbax preservation policy keeping the checkpoint of the step `step()` names now (None: none): the best
  checkpoint by the run's early-stop metric, which moves as evaluations improve (read at each save)."""

  def __init__(self, step: Callable[[], int | None]):
    self.step = step

  def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
    del context
    keep = self.step()
    return [c.step == keep for c in checkpoints]


class Checkpointer:
  """Saves every `every` steps (on demand too), keeps the newest `keep`, and the step `keep_also()` names (the
  best checkpoint: `jaxtrain.train.earlystop`).

  `shared_data_state=True` (data.process_split='rows': every process holds the same global iterator
  position) stores that position once, as JSON, so any number of processes can resume from it; otherwise
  each process stores its own position and a resume needs the same process count.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True,
               shared_data_state: bool = False, compress: bool = False,
               keep_also: Callable[[], int | None] = lambda: None):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.keep, self.keep_also = keep, keep_also
    self.shared_data_state = shared_data_state
    self._saved = False  # whether this checkpointer started a save (its temporary directory is then its own)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(keep),
                                                            _KeepAlso(keep_also)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
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
    self._saved = True
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True, custom_metadata={_FORMAT_KEY: FORMAT})

  def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None) -> Any:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`);
    the data iterator is restored in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      self._check_topology(step)
      items['data'] = (ocp.args.JsonRestore() if self.shared_data_state
                       else grain.checkpoint.CheckpointRestore(data_iter))
    with drained_event_loops():
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and self.shared_data_state:
      data_iter.set_state(restored['data'])
    return restored['state']

  def _check_topology(self, step: int) -> None:
    if not self.shared_data_state:
      check_topology(os.path.join(self.directory, str(step)))

  def restore_latest(self, abstract_state: Any, data_iter: grain.DatasetIterator | None,
                     say: Callable[[str], None] = print) -> tuple[int, Any]:
    """(step, state) from the newest checkpoint that restores; (0, None) when there is none.

    A checkpoint that fails to restore (truncated or missing files) is reported in one line and moved
    aside to `<step>.corrupt-<time>` (never deleted: it may still be worth a look), so the previous one is
    used and a later save of the same step does not collide with it. An intact checkpoint of another train
    state or a newer format raises `ResumeError` before anything is read or moved (`check_state`); any other
    UserError of the restore (another process count, a data-iterator state this pipeline refuses) is raised
    as it is, with nothing moved.

    A save interrupted by a kill left a temporary directory: once a step is restored (or none is found) it is
    discarded and reported in one line ("resuming from step N; the interrupted save of step M was discarded").
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        check_state(os.path.join(self.directory, str(step)), abstract_state)
        state = self.restore(step, abstract_state, data_iter)
      except UserError:  # an intact checkpoint this run cannot use (topology, state, data pipeline): refuse
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
      else:  # outside the `try`: a failure to discard must not make this good checkpoint look corrupt
        self._discard_interrupted(step, say)
        return step, state
    self._discard_interrupted(0, say)
    return 0, None

  def _discard_interrupted(self, resumed: int, say: Callable[[str], None]) -> None:
    """Removes the temporary directories of interrupted saves (never a finished step: those are bare numbers)
    and says so. Not once this checkpointer has saved: a temporary directory may then be its own save's."""
    if self._saved:
      return
    steps = []  # process 0 decides; the others wait for it (each process may list before or after its removal)
    if jax.process_index() == 0:
      steps = interrupted_saves(self.directory)
      for name in os.listdir(self.directory) if steps else ():
        if _INTERRUPTED.fullmatch(name) and not os.path.islink(path := os.path.join(self.directory, name)):
          shutil.rmtree(path, ignore_errors=True)  # what stays, orbax removes when it saves that step again
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('jaxtrain-discard-interrupted')
    if steps:
      saves = (f'save of step {steps[0]} was' if len(steps) == 1
               else f'saves of steps {", ".join(map(str, steps))} were')
      say(f'{"resuming from step" if resumed else "training from step"} {resumed}; the interrupted {saves} '
          'discarded')

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; re-raises their errors."""
    self._mngr.wait_until_finished()
    self._mngr.check_for_errors()

  def close(self) -> None:
    self.wait()
    self._prune()
    self._mngr.close()

  def _prune(self) -> None:
    """Deletes what the policy no longer keeps (orbax applies it at each save only): a best checkpoint that an
    evaluation after the last save superseded would otherwise stay as one more than checkpoint.keep."""
    steps = sorted(self.all_steps())
    kept = set(steps[-self.keep:]) | {self.keep_also()}
    for step in steps:
      if step not in kept:
        self._mngr.delete(step)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
