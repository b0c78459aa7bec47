"""The one module that knows about mesh axes.

Models name logical axes (`embed`, `heads`, ...); `RULES` maps each to a mesh axis. Parameters whose
dimension a mesh axis does not divide stay replicated along that dimension, so any model runs on any mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtrain.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axis (None: replicated). Parameters shard over fsdp (their embed dim) and tensor;
# activations shard their batch over data x fsdp and their head / mlp / vocab dims over tensor.
RULES: dict[str, Any] = {
    'batch': BATCH_AXES,
    'seq': None,
    'act_embed': None,
    'act_vocab': 'tensor',
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'latent': None,  # MLA's compressed query / key-value width: small, replicated
    'layers': None,
    'norm': None,
    'positions': None,  # rows of a learned position table (GPT-2): small, replicated
}


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves the configured axis sizes (one may be -1) against the device count. Raises ValueError."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  named = dict(zip(MESH_AXES, sizes, strict=True))
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes {named} are invalid: use positive sizes and at most one -1')
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {named} does not divide the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {named} uses {math.prod(sizes)} devices but {num_devices} are present: make the '
                     'product equal the device count or set one axis to -1')
  return tuple(sizes)  # type: ignore[return-value]


def check(mesh_cfg: Mapping[str, int], batch_size: int, accum_steps: int, num_devices: int) -> None:
  """The `mesh` section against the device count, and the batch (data.batch_size split into
  train.accum_steps micro-batches) against the data-parallel size. Raises ConfigError."""
  try:
    shape = mesh_shape(mesh_cfg, num_devices)
  except ValueError as e:
    raise ConfigError('mesh', dict(mesh_cfg), str(e)) from None
  dp = shape[0] * shape[1]
  b, accum = batch_size, accum_steps
  if b % accum:
    raise ConfigError('data.batch_size', b, f'must be divisible by train.accum_steps={accum}')
  if (b // accum) % dp:
    raise ConfigError('data.batch_size', b, f'micro-batch {b // accum} (batch_size / train.accum_steps) must be '
                      f'divisible by the data-parallel size {dp} (mesh data={shape[0]} x fsdp={shape[1]})')


def make_mesh(mesh_cfg: Mapping[str, int], devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (or `devices`)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """Mesh PartitionSpec for an array with the given logical axes, replicating dims the mesh cannot divide."""
  out = []
  for name, dim in zip(logical, shape, strict=True):
    target = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise KeyError(f'logical axis {name!r} has no sharding rule; known: {sorted(RULES)}')
    names = (target,) if isinstance(target, str) else (target or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(target if target is not None and dim % size == 0 else None)
  return P(*out)


def param_shardings(logical_specs: Any, shapes: Any, mesh: Mesh) -> Any:
  """NamedShardings for a parameter tree, from its logical PartitionSpecs (see `nnx.get_partition_spec`)."""
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh)),
                      logical_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def _dict_path(path: tuple) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def shardings_like(tree: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves mirror parameters (optimizer moments): a leaf takes the sharding of
  the parameter whose path is a suffix of its own and whose shape matches; everything else is replicated."""
  by_path = {}
  for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh), strict=True):
    by_path[_dict_path(path)] = (x.shape, sh)
  replicated = NamedSharding(mesh, P())

  def pick(path: tuple, x: Any) -> NamedSharding:
    keys = _dict_path(path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit and hit[0] == x.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Rows of a batch are split over the data-parallel axes; sequence and features are whole. `stacked`:
  batches stacked on a leading axis (K, B, ...), rows still split the same way."""
  return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, stacked: bool = False) -> dict[str, jax.Array]:
  """Places this process's rows of a batch (or of stacked batches, rows on axis 1) as slices of global
  arrays (works on one or many hosts)."""
  sh = batch_sharding(mesh, stacked)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def constrain(x: jax.Array, logical: tuple[str, ...]) -> jax.Array:
  """Activation sharding hint by logical axes; a no-op outside a mesh context (e.g. single-device use)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh))


def per_batch_shard(fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], out_ndim: int) -> jax.Array:
  """fn(*args) run by each batch shard of the current mesh on its own rows (`shard_map` over the batch axes),
  for functions XLA cannot partition itself (a custom call); every arg and the result lead with the batch.
  Outside a mesh, or when the mesh's batch axes do not divide the batch, fn runs on whole arrays."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or args[0].shape[0] % data_parallel_size(mesh) or data_parallel_size(mesh) == 1:
    return fn(*args)
  spec = lambda ndim: P(BATCH_AXES, *(None,) * (ndim - 1))  # noqa: E731
  # check_vma off: a custom call's results carry no record of the mesh axes they vary over.
  return jax.shard_map(fn, in_specs=tuple(spec(a.ndim) for a in args), out_specs=spec(out_ndim),
                       check_vma=False)(*args)


def describe(tree_sh: Any, params: Any, pattern: str = '.*') -> dict[str, P]:
  """{'path/to/param': PartitionSpec} for parameters matching `pattern`: handy in tests and logs."""
  out = {}
  for (path, _), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(tree_sh), strict=True):
    name = '/'.join(_dict_path(path))
    if re.search(pattern, name):
      out[name] = sh.spec
  return out
