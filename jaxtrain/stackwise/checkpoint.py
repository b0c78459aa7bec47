"""Per-part, content-addressed saving of a StackWise rack: only parts that changed since a save are written.

A rack is a dict of named parts (`{'shared': ..., 'stack0': ..., 'stack1': ...}`), each a pytree of arrays.
Under the checkpointer's directory:

  blobs/<hash>/       one part, an orbax checkpoint (uncompressed arrays, sharded arrays restore straight
                      into target shardings); <hash> is a BLAKE2b digest of the part's contents
  stage_<k>.json      the manifest: {'stage', 'parts': {name: hash}, 'bytes': {name: nbytes},
                      'leaves': {name: {key path: [shape, dtype]}}, 'meta'}

The hash covers every leaf's key path, dtype, shape and exact bytes (C order, independent of sharding), so a
part frozen through a stage hashes the same and its blob is reused; a part changed in one element or cast to
another dtype gets a new blob. Crash safety: a blob is written to `blobs/<hash>.tmp-<pid>` and renamed when
orbax has finished it, and the manifest is written (temp file + `os.replace`) only after every blob of the
stage is in place, so a manifest never names a half-written blob. An interrupted save leaves at most
complete-but-unreferenced blobs (reused by the next save) and `*.tmp-*` directories, which `gc()` removes.

Saves are synchronous: stage ends are rare and the next stage should not start training against a rack that
is still being written.

Multi-process: each leaf is brought to every host in turn (`process_allgather`, one leaf at a time, so host
memory stays near the largest leaf), so every process computes the same hash without a further exchange; the
cost is moving the whole rack over the network at each save. Process 0 decides which blobs exist and
broadcasts that, all processes take part in the (collective) orbax writes and restores, and process 0 alone
renames blobs, writes manifests and deletes files. The directory must be on storage every process sees.
Only the single-process path is exercised by the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxtrain.errors import UserError
from jaxtrain.train.checkpoint import _state_handler, drained_event_loops

_MANIFEST = re.compile(r'stage_(\d+)\.json')
_HASH_PREFIX = b'jaxtrain-stack-part-v1\0'  # bump if the hashed encoding ever changes


class StackCheckpointError(UserError):
  """A stage, part or blob that is missing, or an abstract that does not match what was saved."""


@dataclasses.dataclass(frozen=True)
class SaveReport:
  """What one `save` did: parts written as new blobs vs reused, and the bytes that cost."""
  stage: int
  hashes: dict[str, str]
  written: list[str]
  reused: list[str]
  bytes_written: int  # sum of leaf nbytes over the written parts
  disk_bytes: int  # size on disk of the blobs this save wrote (orbax metadata included)
  part_bytes: dict[str, int]  # leaf nbytes of every part, written or not

  @property
  def total_bytes(self) -> int:
    """Bytes a save of the whole rack would have written."""
    return sum(self.part_bytes.values())


def saved_stages(directory: str) -> list[int]:
  """Stages with a complete manifest in `directory`, ascending; reads only (a reader that must not create the
  directory, as a `StackCheckpointer` does, asks this first)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(m.group(1)) for n in names if (m := _MANIFEST.fullmatch(n)))


def _host_leaf(leaf: Any) -> np.ndarray:
  """The whole leaf as a host array; a leaf spread over processes is gathered (collective)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def part_hash(tree: Any) -> tuple[str, int, dict[str, list]]:
  """(hex digest, leaf nbytes, {key path: [shape, dtype]}) of a part; leaves are fetched one at a time."""
  h = hashlib.blake2b(_HASH_PREFIX, digest_size=20)
  nbytes, leaves = 0, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(_host_leaf(leaf), order='C')  # not ascontiguousarray: it makes 0-d arrays 1-d
    key = jax.tree_util.keystr(path)
    # A length-prefixed header keeps (path, dtype, shape) from running into the bytes of the previous leaf.
    header = json.dumps([key, str(arr.dtype), list(arr.shape)]).encode()
    h.update(len(header).to_bytes(8, 'little') + header)
    h.update(arr.reshape(-1).view(np.uint8))
    nbytes += arr.nbytes
    leaves[key] = [list(arr.shape), str(arr.dtype)]
    del arr  # drop the host copy before fetching the next leaf
  return h.hexdigest(), nbytes, leaves


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _agree(flags: list[bool]) -> list[bool]:
  """Process 0's view of `flags`, on every process (all must then make the same collective calls)."""
  if jax.process_count() == 1 or not flags:
    return flags
  return [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(flags, dtype=np.bool_))]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _to_abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  """A restore target: ShapeDtypeStructs keep their sharding; arrays lend theirs; none means device 0."""
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


class StackCheckpointer:
  """Saves racks stage by stage into `directory`, writing only parts whose contents are new."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self.blob_dir = os.path.join(self.directory, 'blobs')
    if jax.process_index() == 0:
      os.makedirs(self.blob_dir, exist_ok=True)
    _sync('jaxtrain-stack-ckpt-init')
    self._orbax = ocp.Checkpointer(_state_handler(compress=False))

  # -- manifests ---------------------------------------------------------------------------------------------

  def _manifest_path(self, stage: int) -> str:
    return os.path.join(self.directory, f'stage_{stage}.json')

  def stages(self) -> list[int]:
    """Stages with a complete manifest, ascending (temp files of an interrupted write are not counted)."""
    return saved_stages(self.directory)

  def latest(self) -> int | None:
    """The newest stage with a complete manifest, or None."""
    stages = self.stages()
    return stages[-1] if stages else None

  def manifest(self, stage: int) -> dict:
    """The manifest of `stage` as saved."""
    path = self._manifest_path(stage)
    if not os.path.exists(path):
      raise StackCheckpointError(f'stage {stage}: no manifest {path}; saved stages are {self.stages()}')
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise StackCheckpointError(f'stage {stage}: manifest {path} is unreadable ({type(e).__name__}: {e})') from e

  def _write_manifest(self, stage: int, manifest: dict) -> None:
    path = self._manifest_path(stage)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(self.directory)

  # -- save --------------------------------------------------------------------------------------------------

  def save(self, stage: int, parts: dict[str, Any], meta: dict | None = None) -> SaveReport:
    """Writes the parts whose contents have no blob yet, then the manifest of `stage` (replacing any).

    Parts with identical contents (in this save or an earlier one) share one blob. Must be called on every
    process with the same arguments.
    """
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
      raise StackCheckpointError(f'stage must be an int >= 0, got {stage!r}')
    bad = [n for n in parts if not isinstance(n, str)]
    if bad or not parts:
      raise StackCheckpointError(f'stage {stage}: parts must be a non-empty dict with str names, got keys '
                                 f'{list(parts)!r}')
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise StackCheckpointError(f'stage {stage}: meta is not JSON-serialisable ({e})') from e

    hashes, part_bytes, leaves = {}, {}, {}
    for name, tree in parts.items():
      hashes[name], part_bytes[name], leaves[name] = part_hash(tree)

    # The first part with a given hash writes it, unless a blob is already there (decided by process 0).
    firsts = {h: n for n, h in reversed(list(hashes.items()))}
    new = sorted(firsts.values(), key=list(parts).index)
    present = _agree([os.path.isdir(self._blob(hashes[n])) for n in new])
    to_write = [n for n, p in zip(new, present, strict=True) if not p]
    disk = 0
    for name in to_write:
      disk += self._write_blob(hashes[name], parts[name])

    manifest = {'stage': stage, 'parts': hashes, 'bytes': part_bytes, 'leaves': leaves, 'meta': meta}
    if jax.process_index() == 0:
      self._write_manifest(stage, manifest)
    _sync(f'jaxtrain-stack-manifest-{stage}')
    return SaveReport(stage=stage, hashes=hashes, written=to_write,
                      reused=[n for n in parts if n not in to_write],
                      bytes_written=sum(part_bytes[n] for n in to_write), disk_bytes=disk, part_bytes=part_bytes)

  def _blob(self, digest: str) -> str:
    return os.path.join(self.blob_dir, digest)

  def _write_blob(self, digest: str, tree: Any) -> int:
    """Writes one blob under a temp name and renames it into place; returns its size on disk."""
    # Every process must name the same temp directory: process 0's pid.
    pid = int(multihost_utils.broadcast_one_to_all(np.int64(os.getpid()))) if jax.process_count() > 1 \
        else os.getpid()
    final, tmp = self._blob(digest), f'{self._blob(digest)}.tmp-{pid}'
    if jax.process_index() == 0 and os.path.exists(tmp):
      shutil.rmtree(tmp)  # left by an earlier crash of a process that had the same pid
    _sync(f'jaxtrain-stack-blob-start-{digest}')
    try:
      self._orbax.save(tmp, args=ocp.args.StandardSave(tree))
    except BaseException:
      if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
      raise
    size = 0
    if jax.process_index() == 0:
      size = _dir_bytes(tmp)
      os.rename(tmp, final)
      _fsync_dir(self.blob_dir)
    _sync(f'jaxtrain-stack-blob-done-{digest}')
    return size

  # -- restore -----------------------------------------------------------------------------------------------

  def restore(self, stage: int | None, abstract: dict[str, Any], *, verify: bool = True) -> dict[str, Any]:
    """The parts named in `abstract`, from `stage` (None: the latest), each in the abstract's shardings.

    `abstract` maps part names to pytrees of ShapeDtypeStructs (with `.sharding`) or arrays (their sharding is
    taken); a subset of the saved parts may be asked for. With `verify`, each restored part is hashed again
    and must match the manifest.
    """
    if stage is None:
      stage = self.latest()
      if stage is None:
        raise StackCheckpointError(f'no saved stage in {self.directory}: expected a stage_<k>.json manifest')
    manifest = self.manifest(stage)
    out = {}
    for name, tree in abstract.items():
      if name not in manifest['parts']:
        raise StackCheckpointError(f'stage {stage}: part {name!r} is not in the manifest; saved parts are '
                                   f'{sorted(manifest["parts"])}')
      digest = manifest['parts'][name]
      path = self._blob(digest)
      if not os.path.isdir(path):
        raise StackCheckpointError(f'stage {stage}: blob {path} of part {name!r} is missing')
      target = jax.tree.map(_to_abstract, tree)
      self._check_abstract(stage, name, target, manifest.get('leaves', {}).get(name))
      try:
        with drained_event_loops():  # a corrupt blob must fail in one line, with no asyncio noise at exit
          restored = self._orbax.restore(path, args=ocp.args.StandardRestore(target))
      except Exception as e:  # noqa: BLE001 -- orbax raises many kinds; name the part and blob in one line
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
        raise StackCheckpointError(f'stage {stage}: part {name!r} failed to restore from {path} ({reason})') from e
      if verify and (got := part_hash(restored)[0]) != digest:
        raise StackCheckpointError(f'stage {stage}: part {name!r} restored with hash {got}, expected {digest}')
      out[name] = restored
    return out

  @staticmethod
  def _check_abstract(stage: int, name: str, target: Any, saved: dict[str, list] | None) -> None:
    """Same key paths, shapes and dtypes as saved; orbax would otherwise cast or fail with a long message."""
    if saved is None:
      return
    want = {jax.tree_util.keystr(p): [list(x.shape), str(np.dtype(x.dtype))]
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key in sorted(set(want) | set(saved)):
      if key not in want:
        raise StackCheckpointError(f'stage {stage}: part {name!r} leaf {key} is saved {saved[key]} but missing '
                                   'from the abstract')
      if key not in saved:
        raise StackCheckpointError(f'stage {stage}: part {name!r} leaf {key} is not in the saved part; saved '
                                   f'leaves are {sorted(saved)[:8]}')
      if want[key] != saved[key]:
        raise StackCheckpointError(f'stage {stage}: part {name!r} leaf {key} has shape/dtype {want[key]} in the '
                                   f'abstract, expected {saved[key]}')

  # -- gc ----------------------------------------------------------------------------------------------------

  def gc(self, keep_stages: list[int] | None = None) -> list[str]:
    """Deletes blobs no kept manifest references and temp files of interrupted saves; returns removed names.

    `keep_stages=None` keeps every manifest; a list also deletes the manifests of the other stages first.
    Call it while no save is in progress (it removes `*.tmp-*` entries regardless of who is writing them).
    """
    stages = self.stages()
    if keep_stages is not None and (missing := sorted(set(keep_stages) - set(stages))):
      raise StackCheckpointError(f'gc: keep_stages {missing} have no manifest; saved stages are {stages}')
    keep = stages if keep_stages is None else sorted(set(keep_stages))
    referenced = {h for s in keep for h in self.manifest(s)['parts'].values()}
    removed = []
    if jax.process_index() == 0:
      for s in stages:
        if s not in keep:
          os.remove(self._manifest_path(s))
          removed.append(f'stage_{s}.json')
      for n in os.listdir(self.directory):
        if '.tmp-' in n and n.startswith('stage_'):
          os.remove(os.path.join(self.directory, n))
          removed.append(n)
      for n in sorted(os.listdir(self.blob_dir)):
        if n not in referenced:
          shutil.rmtree(os.path.join(self.blob_dir, n), ignore_errors=True)
          removed.append(f'blobs/{n}')
    _sync('jaxtrain-stack-gc')
    return removed


def _fsync_dir(path: str) -> None:
  """Makes a rename in `path` durable (a no-op where directories cannot be opened, e.g. some platforms)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
