"""Block-wise NF4 / int8 quantisation of a frozen base (QLoRA), as pure functions over parameter trees.

A `Quantized` value is a pytree of arrays (packed codes, absmax scales, optionally double-quantised) plus
static metadata, so it sits in the parameter tree where the float weight was, passes through `jax.jit`,
`lax.scan` and `nnx.merge` unchanged, and the model's `transformer.project` calls `Quantized.einsum`. That
product dequantizes inside the step and its custom VJP recomputes the dequantized weight in the backward
pass, so the only residuals are the codes (which are parameters anyway) and never a float copy of the weight.

Storage (per base parameter, block 64): NF4 0.5625 bytes, NF4 + double quantisation 0.5161 bytes (4.129
bits: 4 + 8/64 + 64/(64*256)), int8 1.0625, int8 + double quantisation 1.0161.

Error bounds, per element, with a = absmax of the element's block and g the largest gap between adjacent
levels (1/127 for int8, 0.30381 for NF4, between -1 and -0.6962):
  without double quantisation  |w - deq| <= a * g / 2
  with double quantisation     |w - deq| <= a * g / 2 + s2 / 2,  s2 = (max a - min a) / 254 over the group
of 256 blocks that shares a second-level scale. Codes are chosen against the *dequantized* scale, so a scale
rounded down clips by at most s2 / 2 and one rounded up widens the levels by at most s2 / 2 * g / 2. Blocks of
zeros are exact; constant blocks are exact without double quantisation (and with it when the whole group of
scales is constant).

Why not qwix (0.1.8, read from its wheel): qwix quantizes by intercepting `jnp.einsum` / `dot_general`
inside a model wrapped by `qwix.quantize_model`, storing `QArray`s tiled per axis (not flat blocks with a
padded tail); it has NF4 but no double quantisation, and its PTQ product has no custom VJP, so autodiff keeps
the dequantized weight of every layer as a residual. Our design (a plain pytree leaf the model already
knows how to multiply by, re-dequantized in the backward pass) would use only its 16-entry NF4 table, so
the quantizer is written here instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, appendix E), as in bitsandbytes.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], np.float32)
NF4_MAX_GAP = float(np.max(np.diff(NF4_LEVELS)))  # 0.30381, between -1 and -0.6962
INT8_MAX = 127
SCALE_GROUP = 256  # blocks per second-level scale and offset (QLoRA's double-quantisation block size)
KINDS = ('nf4', 'int8')


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['codes', 'scales', 'scale_scales', 'scale_offsets'],
                   meta_fields=['kind', 'block', 'trailing_shape', 'dtype'])
@dataclasses.dataclass(frozen=True)
class Quantized:
  """A weight of shape `lead + trailing_shape` quantized block-wise over the flattened trailing dims.

  Leaves (all with the leading dims first, so `lax.scan` / indexing on axis 0 gives a valid per-layer value):
    codes:          (*lead, n / 2) uint8, two NF4 codes per byte (low nibble first), or (*lead, n) int8,
                    where n = trailing size padded to a multiple of `block`.
    scales:         (*lead, n / block) float32 absmax per block, or int8 codes with double quantisation.
    scale_scales:   (*lead, ceil(blocks / 256)) float32 second-level step per group, or None.
    scale_offsets:  (*lead, ceil(blocks / 256)) float32 centre of the group's absmax values, or None.
  Static metadata holds no leading dims: they are read from the leaves when dequantizing.
  """

  codes: Array
  scales: Array
  scale_scales: Array | None
  scale_offsets: Array | None
  kind: str
  block: int
  trailing_shape: tuple[int, ...]
  dtype: str  # of the original weight; the default of `dequantize`

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-1])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.lead_shape + tuple(self.trailing_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Number of base parameters represented (not of stored bytes; see `nbytes`)."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes, scales and second-level scales, padding included."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

  @property
  def padding(self) -> int:
    """Zeros appended to the flattened trailing dims to fill the last block."""
    return -math.prod(self.trailing_shape) % self.block

  def absmax(self) -> Array:
    """(*lead, blocks) float32 per-block scales, dequantized from the second level when double-quantised."""
    if self.scale_scales is None:
      return self.scales
    return _dequantize_scales(self.scales, self.scale_scales, self.scale_offsets)

  def dequantize(self, dtype: Any = None) -> Array:
    """The weight, shape `lead + trailing_shape`, in `dtype` (default: the original dtype). Pure jnp."""
    lead, n = self.lead_shape, math.prod(self.trailing_shape)
    if self.kind == 'nf4':
      packed = self.codes
      codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*lead, -1)  # (*lead, n_padded)
      levels = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    else:
      # (code / 127) * scale, not code * (scale / 127): +-127 then gives the scale exactly.
      levels = self.codes.astype(jnp.float32) / INT8_MAX
    w = levels.reshape(*lead, -1, self.block) * self.absmax()[..., None]
    w = w.reshape(*lead, -1)[..., :n].reshape(self.shape)
    return w.astype(jnp.dtype(self.dtype if dtype is None else dtype))

  def einsum(self, spec: str, x: Array, out_dtype: Any = None) -> Array:
    """`einsum(spec, x, self.dequantize(x.dtype))`; gradient for x only, re-dequantizing in the backward."""
    return _einsum(spec, out_dtype, jax.ShapeDtypeStruct(x.shape, x.dtype), x, self)


def _dequantize_scales(codes: Array, step: Array, offset: Array) -> Array:
  """(*lead, blocks) float32 absmax from int8 codes and per-group (*lead, groups) step and offset."""
  blocks = codes.shape[-1]
  step = jnp.repeat(step, SCALE_GROUP, axis=-1)[..., :blocks]
  offset = jnp.repeat(offset, SCALE_GROUP, axis=-1)[..., :blocks]
  return codes.astype(jnp.float32) * step + offset


def _quantize_scales(absmax: Array) -> tuple[Array, Array, Array]:
  """Second-level quantisation of (*lead, blocks) absmax: int8 codes, per-group step and offset.

  The offset is the group's midrange rather than bitsandbytes' mean: it minimises the largest centred value,
  hence the step (and the error bound), and a group of equal scales comes back exactly.
  """
  blocks = absmax.shape[-1]
  groups = -(-blocks // SCALE_GROUP)
  # Edge padding repeats the last scale, so it changes no group's min or max.
  padded = jnp.pad(absmax, [(0, 0)] * (absmax.ndim - 1) + [(0, groups * SCALE_GROUP - blocks)], mode='edge')
  grouped = padded.reshape(*absmax.shape[:-1], groups, SCALE_GROUP)
  hi, lo = grouped.max(-1), grouped.min(-1)
  offset = lo + (hi - lo) / 2
  step = (hi - lo) / (2 * INT8_MAX)
  safe = jnp.where(step > 0, step, 1.0)
  codes = jnp.clip(jnp.round((grouped - offset[..., None]) / safe[..., None]), -INT8_MAX, INT8_MAX)
  codes = codes.astype(jnp.int8).reshape(*absmax.shape[:-1], -1)[..., :blocks]
  return codes, step, offset


def quantize(w: Array, kind: str = 'nf4', block: int = 64, double_quant: bool = True,
             batch_dims: int = 0) -> Quantized:
  """Quantize `w` block-wise over its trailing `w.shape[batch_dims:]`, separately for each leading index.

  Blocks cut the flattened trailing dims into `block`-sized groups, zero-padding the last. NF4 rounds
  w / absmax to the nearest of the 16 NormalFloat levels; int8 rounds w / absmax * 127 to the nearest
  integer. With `double_quant`, the float32 absmax values are themselves quantized to int8 per group of 256
  (QLoRA), and the codes are computed against those dequantized scales. Jitted (arguments after `w` static).
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}: expected one of {KINDS}')
  if block <= 0 or (kind == 'nf4' and block % 2):
    raise ValueError(f'block={block}: expected a positive size, even for nf4 (two codes per byte)')
  if not 0 <= batch_dims < w.ndim:
    raise ValueError(f'batch_dims={batch_dims} for a weight of shape {w.shape}: expected 0 <= batch_dims < '
                     f'{w.ndim} (at least one trailing dim to quantize)')
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f'quantize expects a floating-point weight, got dtype {w.dtype}')
  return _quantize(w, kind, block, double_quant, batch_dims)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w: Array, kind: str, block: int, double_quant: bool, batch_dims: int) -> Quantized:
  # Jitted: eager, each of these ops would compile on its own (seconds for one weight on CPU).
  lead, trailing = tuple(w.shape[:batch_dims]), tuple(w.shape[batch_dims:])
  n = math.prod(trailing)
  flat = w.astype(jnp.float32).reshape(*lead, n)
  flat = jnp.pad(flat, [(0, 0)] * batch_dims + [(0, -n % block)])
  blocks = flat.reshape(*lead, -1, block)  # (*lead, nblocks, block)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  scale_scales = scale_offsets = None
  scales = absmax
  if double_quant:
    scales, scale_scales, scale_offsets = _quantize_scales(absmax)
    absmax = _dequantize_scales(scales, scale_scales, scale_offsets)
  # A zero scale means a zero block, or (double quantisation) absmax <= s2 / 2, within the bound: deq is 0.
  y = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  if kind == 'nf4':
    # Nearest level = number of midpoints below y: 15 compares that fuse into one pass, no (..., 15) temporary.
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = sum((y > m).astype(jnp.uint8) for m in midpoints).reshape(*lead, -1)
    codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
  else:
    codes = jnp.clip(jnp.round(y * INT8_MAX), -INT8_MAX, INT8_MAX).astype(jnp.int8).reshape(*lead, -1)
  return Quantized(codes=codes, scales=scales, scale_scales=scale_scales, scale_offsets=scale_offsets,
                   kind=kind, block=block, trailing_shape=trailing, dtype=jnp.dtype(w.dtype).name)


# --- The product, with a backward pass that keeps no float weight ---------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum(spec: str, out_dtype: Any, x_type: jax.ShapeDtypeStruct, x: Array, q: Quantized) -> Array:
  return jnp.einsum(spec, x, q.dequantize(x.dtype), preferred_element_type=out_dtype)


def _einsum_fwd(spec: str, out_dtype: Any, x_type: jax.ShapeDtypeStruct, x: Array,
                q: Quantized) -> tuple[Array, Quantized]:
  # The residual is the quantized weight itself (codes and scales), never its dequantized float copy.
  return _einsum(spec, out_dtype, x_type, x, q), q


def _einsum_bwd(spec: str, out_dtype: Any, x_type: jax.ShapeDtypeStruct, q: Quantized,
                g: Array) -> tuple[Array, None]:
  w = q.dequantize(x_type.dtype)
  # The product is linear in x, so its transpose needs only x's shape and dtype, not x.
  (dx,) = jax.linear_transpose(lambda x: jnp.einsum(spec, x, w, preferred_element_type=out_dtype), x_type)(g)
  return dx, None  # the base is frozen: no cotangent for codes or scales


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


# --- Trees --------------------------------------------------------------------------------------------------


def _is_quantized(x: Any) -> bool:
  return isinstance(x, Quantized)


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: tuple[Any, ...]) -> str:
  """'/'-joined names of a `jax.tree_util` key path, e.g. 'blocks/attn/q'."""
  return '/'.join(_key_name(k) for k in path)


def quantize_tree(params: Any, pattern: str, kind: str = 'nf4', block: int = 64, double_quant: bool = True,
                  stacked_prefix: str = 'blocks') -> Any:
  """`params` with every leaf whose '/'-joined path matches `pattern` (`re.search`) replaced by `Quantized`.

  Leaves under the top-level `stacked_prefix` key are stacked per layer and quantized with batch_dims=1;
  only leaves whose per-layer weight has two or more dims are quantized (norm scales and biases stay). The
  model must read a quantized weight through `transformer.project` (the embedding table is indexed instead,
  so it cannot be quantized; an untied `lm_head` can).
  """
  regex = re.compile(pattern)

  def one(path: tuple[Any, ...], x: Any) -> Any:
    name = path_name(path)
    if _is_quantized(x) or not regex.search(name):
      return x
    batch_dims = 1 if path and _key_name(path[0]) == stacked_prefix else 0
    if x.ndim - batch_dims < 2:
      return x
    return quantize(x, kind, block, double_quant, batch_dims)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_quantized)


@functools.partial(jax.jit, static_argnums=1)
def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
  """`tree` with every `Quantized` leaf dequantized (to `dtype`, default each one's original dtype). Jitted."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if _is_quantized(x) else x, tree, is_leaf=_is_quantized)


def bytes_per_param(tree: Any) -> float:
  """Stored bytes per quantized base parameter, over all `Quantized` leaves of `tree`."""
  qs = [x for x in jax.tree.leaves(tree, is_leaf=_is_quantized) if _is_quantized(x)]
  if not qs:
    raise ValueError('bytes_per_param: the tree holds no Quantized leaves (did quantize_tree match nothing?)')
  return sum(q.nbytes for q in qs) / sum(q.size for q in qs)
