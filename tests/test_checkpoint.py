"""Checkpoint round trip of the sharded state and the data iterator; keep-N; restore onto another mesh; a failed
read leaves no asyncio work behind; what an interrupted save leaves is discarded, never a finished step."""

import asyncio
import gc
import logging
import os
import time

import jax
import numpy as np
import optax
import pytest

from jaxtrain import data, sharding
from jaxtrain.train import loop as train
from jaxtrain.train import checkpoint
from jaxtrain.train.checkpoint import Checkpointer, abstract_with_shardings
from jaxtrain.config.defaults import base_config
from tests.helpers import tiny


def tiny_data():
  d = base_config().data
  d.max_files, d.tokenizer_vocab_size, d.seq_len, d.eval_fraction = 12, 300, 32, 0.2
  return d


def make_state(mesh_cfg, seed=0):
  mesh = sharding.make_mesh(mesh_cfg)
  with jax.set_mesh(mesh):
    _, state, state_sh = train.init_state(tiny(), optax.adamw(1e-3), seed, mesh)
  return mesh, state, state_sh


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_and_iterator(tmp_path):
  cfg = tiny_data()
  tok = data.load_tokenizer(cfg)
  it = iter(data.make_dataset(cfg, tok, split='train', seed=1, batch_size=4))
  for _ in range(3):
    next(it)
  _, state, state_sh = make_state({'data': -1, 'fsdp': 1, 'tensor': 1})
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), every=3, keep=2)
  ckpt.save(3, state, it)
  ckpt.wait()
  expected = [next(it) for _ in range(2)]

  _, fresh, _ = make_state({'data': -1, 'fsdp': 1, 'tensor': 1}, seed=7)  # different values, same shapes
  fresh_it = iter(data.make_dataset(cfg, tok, split='train', seed=1, batch_size=4))
  reader = Checkpointer(str(tmp_path / 'ckpt'), every=3, keep=2)
  assert reader.latest_step() == 3
  restored = reader.restore(3, abstract_with_shardings(fresh, state_sh), fresh_it)
  assert_trees_equal(restored, state)
  for want in expected:
    got = next(fresh_it)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  reader.close()
  ckpt.close()


def test_keeps_newest_n(tmp_path):
  _, state, _ = make_state({'data': -1, 'fsdp': 1, 'tensor': 1})
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, state, None)
  ckpt.close()
  assert ckpt.all_steps() == [3, 4]
  assert ckpt.should_save(2) and not Checkpointer(str(tmp_path), every=0, keep=1).should_save(2)


def test_restore_onto_a_different_mesh(tmp_path):
  _, state, _ = make_state({'data': -1, 'fsdp': 1, 'tensor': 1})
  ckpt = Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, state, None)
  ckpt.close()
  _, target, target_sh = make_state({'data': 2, 'fsdp': 2, 'tensor': 2}, seed=5)
  restored = Checkpointer(str(tmp_path), every=1, keep=1).restore(1, abstract_with_shardings(target, target_sh), None)
  assert_trees_equal(restored, state)
  assert restored['params']['blocks']['mlp']['up'].sharding.spec == target_sh['params']['blocks']['mlp']['up'].spec


class _FailingWrite:
  """A background write that fails, as a full disk or a lost mount would."""

  def result(self, timeout=None):
    del timeout
    time.sleep(0.2)  # fail after save() has returned: a truly asynchronous error
    raise OSError(28, 'No space left on device (injected)')


def test_async_save_errors_surface(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  original = ocp.StandardCheckpointHandler.async_save

  async def failing(self, *args, **kwargs):
    futures = await original(self, *args, **kwargs)
    return list(futures or []) + [_FailingWrite()]

  _, state, _ = make_state({'data': -1, 'fsdp': 1, 'tensor': 1})
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2)
  ckpt.save(1, state, None)  # a good one first
  ckpt.wait()
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', failing)
  ckpt.save(2, state, None)  # returns at once; the write fails in the background
  with pytest.raises(Exception, match='No space left on device'):
    ckpt.wait()
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'async_save', original)
  assert Checkpointer(str(tmp_path), every=1, keep=2).latest_step() == 1  # the failed one never counts


def _count_host_copies(monkeypatch, array_type) -> list[int]:
  calls = [0]
  original = array_type.copy_to_host_async

  def counted(self):
    calls[0] += 1
    return original(self)

  monkeypatch.setattr(array_type, 'copy_to_host_async', counted)
  return calls


def test_one_process_copies_each_shard_once_and_reads_orbax_default_checkpoints(tmp_path, monkeypatch):
  """A one-process save starts one device-to-host copy per distinct shard (orbax's replica-parallel default
  copies a slice from every replica of a replicated array), and the checkpoints read both ways with orbax's
  default handler."""
  import orbax.checkpoint as ocp

  _, state, state_sh = make_state({'data': -1, 'fsdp': 1, 'tensor': 1})
  leaves = jax.tree.leaves(state)
  shards = sum(len({str(s.index) for s in x.addressable_shards}) for x in leaves)
  assert shards < sum(len(x.addressable_shards) for x in leaves)  # some leaves are replicated on 8 devices
  calls = _count_host_copies(monkeypatch, type(leaves[0]))
  ckpt = Checkpointer(str(tmp_path / 'ours'), every=1, keep=1)
  ckpt.save(1, state, None)
  ckpt.close()
  assert calls[0] == shards

  calls[0] = 0
  with ocp.StandardCheckpointer() as default:
    default.save(tmp_path / 'default' / '1' / 'state', state)
  assert calls[0] > shards  # what the one-process setting saves
  _, fresh, _ = make_state({'data': -1, 'fsdp': 1, 'tensor': 1}, seed=3)
  restored = Checkpointer(str(tmp_path / 'default'), every=1, keep=1).restore(
      1, abstract_with_shardings(fresh, state_sh), None)
  assert_trees_equal(restored, state)
  with ocp.StandardCheckpointer() as default:
    assert_trees_equal(default.restore(tmp_path / 'ours' / '1' / 'state', abstract_with_shardings(fresh, state_sh)),
                       state)


def test_a_failed_orbax_read_leaves_no_pending_tasks(capfd, caplog):
  """orbax runs a restore in a fresh event loop and closes it when one read fails, its sibling reads (an
  asyncio.gather) still pending: their TensorStore callbacks then hit the closed loop ("Event loop is closed")
  and their coroutines print tracebacks when collected. Under `drained_event_loops` they finish first."""
  from orbax.checkpoint._src import asyncio_utils  # the runner every orbax read goes through

  finished = []

  async def read(delay: float, fails: bool) -> None:
    await asyncio.sleep(delay)
    if fails:
      raise ValueError('OUT_OF_RANGE (a truncated file)')
    finished.append(delay)

  async def restore() -> None:
    await asyncio.gather(read(0, True), read(0.05, False), read(0.1, True), read(0.1, False))

  with checkpoint.drained_event_loops(), pytest.raises(ValueError, match='OUT_OF_RANGE'):
    asyncio_utils.run_sync(restore())
  assert sorted(finished) == [0.05, 0.1]  # without the drain: [] (abandoned on the closed loop)
  gc.collect()
  assert not [r for r in caplog.records if r.name == 'asyncio' and r.levelno >= logging.WARNING]
  assert capfd.readouterr().err == ''  # no "Task exception was never retrieved", no "Exception ignored"
  assert type(asyncio.get_event_loop_policy()) is not checkpoint._DrainingPolicy  # put back


def test_interrupted_saves_are_found_and_finished_steps_never_touched(tmp_path):
  """What `kill -9` during a save leaves (orbax's `<step>.orbax-checkpoint-tmp`, item directories inside it
  also suffixed) is discarded by `restore_latest` with one line; finished steps and other names stay."""
  state = {'step': jax.numpy.arange(3)}  # any pytree: the model's state would only add compile time
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
  ckpt.save(2, state, None)
  ckpt.close()
  for name in ('4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp', '3.orbax-checkpoint-tmp-1700000000',
               '2.corrupt-1700000000', 'notes.orbax-checkpoint-tmp'):
    os.makedirs(tmp_path / name)
  (tmp_path / '4.orbax-checkpoint-tmp' / '_CHECKPOINT_METADATA').write_text('{"commit_timestamp_nsecs": null}')
  assert checkpoint.interrupted_saves(str(tmp_path)) == [3, 4]
  said = []
  reader = Checkpointer(str(tmp_path), every=1, keep=3)
  step, restored = reader.restore_latest(abstract, None, say=said.append)
  reader.close()
  assert step == 2 and said == ['resuming from step 2; the interrupted saves of steps 3, 4 were discarded']
  assert_trees_equal(restored, state)
  assert sorted(os.listdir(tmp_path)) == ['2', '2.corrupt-1700000000', 'notes.orbax-checkpoint-tmp']
  said.clear()
  again = Checkpointer(str(tmp_path), every=1, keep=3)
  again.restore_latest(abstract, None, say=said.append)
  again.close()
  assert said == []  # nothing to discard: nothing said
