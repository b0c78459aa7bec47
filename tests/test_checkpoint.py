"""Checkpoint round trip of the sharded state and the data iterator; keep-N; restore onto another mesh."""

import time

import jax
import numpy as np
import optax
import pytest

from jaxtrain import data, sharding
from jaxtrain.train import loop as train
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
