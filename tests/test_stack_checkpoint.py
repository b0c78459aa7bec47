"""Per-part content-addressed rack saving: reuse of unchanged parts, exact restore, shardings, crash safety."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtrain.stackwise.checkpoint import StackCheckpointError, StackCheckpointer, part_hash


def stack(seed, d=8):
  k = jax.random.split(jax.random.key(seed), 2)
  return {'blocks': [{'w': jax.random.normal(k[0], (d, d)), 'b': jnp.zeros(d)},
                     {'w': jax.random.normal(k[1], (d, d)), 'b': jnp.ones(d)}]}


def shared(seed):
  return {'embed': jax.random.normal(jax.random.key(100 + seed), (16, 8)),
          'norm': jnp.ones(8, jnp.bfloat16), 'step': jnp.int32(seed)}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def blobs(ckpt):
  return sorted(os.listdir(ckpt.blob_dir))


@pytest.fixture
def two_stages(tmp_path):
  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  rack0 = {'shared': shared(0), 'stack0': stack(0)}
  r0 = ckpt.save(0, rack0, meta={'curriculum': 'append'})
  rack1 = {'shared': shared(1), 'stack0': rack0['stack0'], 'stack1': stack(1)}
  r1 = ckpt.save(1, rack1)
  return ckpt, rack0, rack1, r0, r1


def test_unchanged_parts_are_reused_and_both_stages_restore(two_stages):
  ckpt, rack0, rack1, r0, r1 = two_stages
  assert r0.written == ['shared', 'stack0'] and r0.reused == []
  assert r1.written == ['shared', 'stack1'] and r1.reused == ['stack0']
  assert r1.hashes['stack0'] == r0.hashes['stack0']
  assert r1.bytes_written == r1.part_bytes['shared'] + r1.part_bytes['stack1'] < r1.total_bytes
  assert r1.part_bytes['stack0'] == 2 * (8 * 8 + 8) * 4
  assert r1.disk_bytes > 0
  assert len(blobs(ckpt)) == 4  # shared x2, stack0, stack1
  assert ckpt.stages() == [0, 1] and ckpt.latest() == 1
  m = ckpt.manifest(0)
  assert m['stage'] == 0 and m['meta'] == {'curriculum': 'append'} and set(m['parts']) == {'shared', 'stack0'}

  got1 = ckpt.restore(None, {k: abstract(v) for k, v in rack1.items()})
  for k in rack1:
    assert_bitwise_equal(got1[k], rack1[k])
  got0 = ckpt.restore(0, {k: abstract(v) for k, v in rack0.items()})
  for k in rack0:
    assert_bitwise_equal(got0[k], rack0[k])
  # A subset, with arrays (not ShapeDtypeStructs) as the target.
  only = ckpt.restore(1, {'stack1': rack1['stack1']})
  assert list(only) == ['stack1']
  assert_bitwise_equal(only['stack1'], rack1['stack1'])


def test_identical_parts_in_one_save_share_a_blob(tmp_path):
  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  r = ckpt.save(0, {'a': stack(3), 'b': stack(3)})
  assert r.written == ['a'] and r.reused == ['b'] and r.bytes_written == r.part_bytes['a']
  assert len(blobs(ckpt)) == 1


def test_one_element_or_dtype_change_changes_the_hash(tmp_path):
  base = stack(0)
  h0 = part_hash(base)[0]
  assert part_hash(stack(0))[0] == h0  # deterministic
  tweaked = jax.tree.map(lambda x: x, base)
  tweaked['blocks'][1]['b'] = tweaked['blocks'][1]['b'].at[3].set(1.0 + 2.0 ** -20)
  assert part_hash(tweaked)[0] != h0
  assert part_hash(jax.tree.map(lambda x: x.astype(jnp.bfloat16), base))[0] != h0
  # Same bytes under another dtype, or under another key, are different contents too.
  assert part_hash({'x': jnp.zeros(4, jnp.float32)})[0] != part_hash({'x': jnp.zeros(4, jnp.int32)})[0]
  assert part_hash({'x': jnp.zeros(4)})[0] != part_hash({'y': jnp.zeros(4)})[0]

  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  ckpt.save(0, {'s': base})
  r = ckpt.save(1, {'s': tweaked})
  assert r.written == ['s']
  r = ckpt.save(2, {'s': jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)})
  assert r.written == ['s'] and r.bytes_written == r.part_bytes['s'] == 2 * (8 * 8 + 8) * 2
  assert len(blobs(ckpt)) == 3


def test_restore_into_sharded_targets(tmp_path):
  mesh = jax.make_mesh((8,), ('x',))
  rows = jax.sharding.NamedSharding(mesh, jax.P('x'))
  repl = jax.sharding.NamedSharding(mesh, jax.P())
  # Saved sharded one way, restored another: the hash (and the verify) must not depend on the layout.
  part = {'w': jax.device_put(jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8), rows),
          'b': jax.device_put(jnp.arange(8.0), repl)}
  assert part_hash(part)[0] == part_hash(jax.device_get(part))[0]
  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  ckpt.save(0, {'stack0': part})
  cols = jax.sharding.NamedSharding(mesh, jax.P(None, 'x'))
  target = {'w': jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=cols),
            'b': jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rows)}
  got = ckpt.restore(0, {'stack0': target})['stack0']
  assert got['w'].sharding == cols and got['b'].sharding == rows
  assert_bitwise_equal(got, part)


def test_failed_blob_write_leaves_previous_stage_latest(tmp_path, monkeypatch):
  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  rack0 = {'shared': shared(0), 'stack0': stack(0)}
  ckpt.save(0, rack0)
  before = blobs(ckpt)

  real_save, calls = ocp.Checkpointer.save, []

  def flaky_save(self, directory, *args, **kwargs):
    calls.append(directory)
    if len(calls) == 2:  # the second blob of the stage: write part of it, then fail
      real_save(self, directory, *args, **kwargs)
      raise OSError('simulated: disk full while writing')
    return real_save(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.Checkpointer, 'save', flaky_save)
  rack1 = {'shared': shared(1), 'stack0': rack0['stack0'], 'stack1': stack(1)}
  with pytest.raises(OSError, match='disk full'):
    ckpt.save(1, rack1)
  assert ckpt.stages() == [0] and ckpt.latest() == 0
  assert not os.path.exists(os.path.join(ckpt.directory, 'stage_1.json'))
  stack1_hash = part_hash(rack1['stack1'])[0]
  assert stack1_hash not in blobs(ckpt)
  assert not [n for n in blobs(ckpt) if '.tmp-' in n]  # the failed temp blob was cleaned up
  assert len(blobs(ckpt)) == len(before) + 1  # the new 'shared' blob finished before the failure

  monkeypatch.setattr(ocp.Checkpointer, 'save', real_save)
  r = ckpt.save(1, rack1)
  assert r.written == ['stack1'] and r.reused == ['shared', 'stack0']  # the finished blob is reused
  assert ckpt.latest() == 1
  assert_bitwise_equal(ckpt.restore(1, {'stack1': abstract(rack1['stack1'])})['stack1'], rack1['stack1'])


def test_errors_name_the_stage_and_part(two_stages):
  ckpt, rack0, rack1, _, r1 = two_stages
  with pytest.raises(StackCheckpointError, match=r'stage 7: no manifest .*saved stages are \[0, 1\]'):
    ckpt.restore(7, {'shared': abstract(rack1['shared'])})
  with pytest.raises(StackCheckpointError, match=r"stage 0: part 'stack1' is not in the manifest"):
    ckpt.restore(0, {'stack1': abstract(rack1['stack1'])})

  bad = abstract(rack1['stack1'])
  bad['blocks'][0]['w'] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=bad['blocks'][0]['w'].sharding)
  with pytest.raises(StackCheckpointError,
                     match=r"stage 1: part 'stack1' leaf \['blocks'\]\[0\]\['w'\] has shape/dtype \[\[8, 4\]"):
    ckpt.restore(1, {'stack1': bad})
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), rack1['stack1'])
  with pytest.raises(StackCheckpointError, match=r"part 'stack1' leaf .* expected \[\[8(, 8)?\], 'float32'\]"):
    ckpt.restore(1, {'stack1': abstract(as_bf16)})
  extra = dict(abstract(rack1['shared']), extra=jax.ShapeDtypeStruct((2,), jnp.float32))
  with pytest.raises(StackCheckpointError, match=r"part 'shared' leaf \['extra'\] is not in the saved part"):
    ckpt.restore(1, {'shared': extra})

  shutil.rmtree(os.path.join(ckpt.blob_dir, r1.hashes['stack1']))
  with pytest.raises(StackCheckpointError, match=rf"stage 1: blob .*{r1.hashes['stack1']} of part 'stack1' is "
                                                 'missing'):
    ckpt.restore(1, {'stack1': abstract(rack1['stack1'])})
  assert ckpt.restore(1, {'stack0': abstract(rack1['stack0'])})  # the other parts still restore

  with pytest.raises(StackCheckpointError, match='meta is not JSON-serialisable'):
    ckpt.save(2, {'x': stack(0)}, meta={'f': object()})
  with pytest.raises(StackCheckpointError, match=r'stage must be an int >= 0, got -1'):
    ckpt.save(-1, {'x': stack(0)})
  empty = StackCheckpointer(os.path.join(ckpt.directory, 'empty'))
  with pytest.raises(StackCheckpointError, match='no saved stage'):
    empty.restore(None, {'x': abstract(stack(0))})


def test_verify_catches_a_corrupted_blob(tmp_path):
  ckpt = StackCheckpointer(str(tmp_path / 'rack'))
  part = {'w': jax.random.normal(jax.random.key(0), (64, 64))}  # large enough to sit in a raw data file
  digest = ckpt.save(0, {'s': part}).hashes['s']
  # Flip one bit of the stored weight: shapes still match and the file still parses, only the hash can tell.
  needle = np.asarray(part['w']).tobytes()[:32]
  hits = []
  for root, _, files in os.walk(os.path.join(ckpt.blob_dir, digest)):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        if (at := fh.read().find(needle)) >= 0:
          hits.append((os.path.join(root, f), at))
  assert len(hits) == 1, hits
  path, at = hits[0]
  with open(path, 'r+b') as fh:
    fh.seek(at + 5)
    byte = fh.read(1)[0]
    fh.seek(at + 5)
    fh.write(bytes([byte ^ 1]))
  with pytest.raises(StackCheckpointError, match=rf"stage 0: part 's' restored with hash \w+, expected {digest}"):
    ckpt.restore(0, {'s': abstract(part)})
  got = ckpt.restore(0, {'s': abstract(part)}, verify=False)['s']
  assert np.asarray(got['w']).tobytes() != np.asarray(part['w']).tobytes()


def test_gc_removes_only_unreferenced_blobs(two_stages):
  ckpt, rack0, rack1, r0, r1 = two_stages
  # Leftovers of a hard crash: a temp blob and a temp manifest, ignored by stages() and removed by gc.
  os.makedirs(os.path.join(ckpt.blob_dir, 'deadbeef.tmp-99999'))
  open(os.path.join(ckpt.directory, 'stage_2.json.tmp-99999'), 'w').close()
  orphan = os.path.join(ckpt.blob_dir, 'f' * 40)
  os.makedirs(orphan)
  assert ckpt.stages() == [0, 1]

  removed = ckpt.gc()
  assert sorted(removed) == sorted(['blobs/deadbeef.tmp-99999', 'stage_2.json.tmp-99999', f'blobs/{"f" * 40}'])
  assert blobs(ckpt) == sorted({*r0.hashes.values(), *r1.hashes.values()})

  with pytest.raises(StackCheckpointError, match=r'keep_stages \[5\] have no manifest'):
    ckpt.gc(keep_stages=[5])
  removed = ckpt.gc(keep_stages=[1])
  assert sorted(removed) == sorted(['stage_0.json', f'blobs/{r0.hashes["shared"]}'])
  assert ckpt.stages() == [1] and blobs(ckpt) == sorted(set(r1.hashes.values()))
  got = ckpt.restore(1, {k: abstract(v) for k, v in rack1.items()})
  for k in rack1:
    assert_bitwise_equal(got[k], rack1[k])
