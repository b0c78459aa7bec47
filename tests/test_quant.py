"""QLoRA base quantizer: error bounds, exact cases, stacking under scan, the custom VJP and its memory, the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models
from jaxtrain.adapters import quant
from tests.helpers import packed_batch, tiny

GAP = {'nf4': quant.NF4_MAX_GAP, 'int8': 1 / quant.INT8_MAX}


def blocks_absmax(w: np.ndarray, block: int, batch_dims: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference blocking in numpy: (*lead, nblocks, block) padded weight and (*lead, nblocks) absmax."""
  lead = w.shape[:batch_dims]
  flat = w.reshape(*lead, -1)
  flat = np.pad(flat, [(0, 0)] * batch_dims + [(0, -flat.shape[-1] % block)])
  blocks = flat.reshape(*lead, -1, block)
  return blocks, np.abs(blocks).max(-1)


def error_bound(w: np.ndarray, kind: str, block: int, double_quant: bool, batch_dims: int) -> np.ndarray:
  """Per-element bound: a * g / 2, plus s2 / 2 with double quantisation (s2 = group (max a - min a) / 254)."""
  blocks, a = blocks_absmax(w, block, batch_dims)
  bound = np.broadcast_to((a * GAP[kind] / 2)[..., None], blocks.shape).copy()
  if double_quant:
    n = a.shape[-1]
    groups = -(-n // quant.SCALE_GROUP)
    padded = np.pad(a, [(0, 0)] * batch_dims + [(0, groups * quant.SCALE_GROUP - n)], mode='edge')
    padded = padded.reshape(*a.shape[:-1], groups, quant.SCALE_GROUP)
    s2 = (padded.max(-1) - padded.min(-1)) / (2 * quant.INT8_MAX)
    bound += np.repeat(s2, quant.SCALE_GROUP, axis=-1)[..., :n, None] / 2
  lead = w.shape[:batch_dims]
  return bound.reshape(*lead, -1)[..., :int(np.prod(w.shape[batch_dims:]))].reshape(w.shape)


def varied_weight(shape, seed=0) -> np.ndarray:
  """Normal weights whose rows differ in scale by orders of magnitude, so block absmax values vary."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape[:-1] + (1,)))).astype(np.float32)


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
@pytest.mark.parametrize('double_quant', [False, True])
def test_round_trip_error_within_bound(kind, double_quant):
  # 300 * 70 = 21000 per layer: 329 blocks of 64 (last one padded by 56), two groups of second-level scales.
  w = varied_weight((2, 300, 70))
  q = quant.quantize(jnp.asarray(w), kind, 64, double_quant, batch_dims=1)
  assert q.padding == 56 and q.scales.shape == (2, 329)
  err = np.abs(np.asarray(q.dequantize()) - w)
  bound = error_bound(w, kind, 64, double_quant, batch_dims=1)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-30), float((err / bound).max())
  assert (err / bound).max() > 0.5  # and the bound is not vacuous


def test_nf4_levels_and_gap():
  assert quant.NF4_LEVELS.shape == (16,) and quant.NF4_LEVELS[7] == 0 and abs(quant.NF4_LEVELS).max() == 1
  assert np.isclose(quant.NF4_MAX_GAP, 1 - 0.6961928009986877)
  # Nearest-level rounding: every level maps to itself and a point just off a midpoint goes to its side.
  mids = (quant.NF4_LEVELS[1:] + quant.NF4_LEVELS[:-1]) / 2
  x = np.concatenate([quant.NF4_LEVELS, mids - 1e-4, mids + 1e-4, [1.0, -1.0]]).astype(np.float32)
  x = np.pad(x, (0, -x.size % 64))
  x[-1] = 1.0  # absmax 1 in the last block too, so levels are the values themselves
  deq = np.asarray(quant.quantize(jnp.asarray(x), 'nf4', 64, double_quant=False).dequantize())
  nearest = quant.NF4_LEVELS[np.abs(x[:, None] - quant.NF4_LEVELS[None]).argmin(-1)]
  np.testing.assert_array_equal(deq, nearest)


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_zero_and_constant_blocks_exact(kind):
  w = np.zeros((4, 64), np.float32)
  w[1] = 0.37
  w[2] = -2.5
  w[3] = np.random.default_rng(0).standard_normal(64)
  exact = quant.quantize(jnp.asarray(w), kind, 64, double_quant=False).dequantize()
  np.testing.assert_array_equal(np.asarray(exact)[:3], w[:3])
  # Double quantisation rounds the scales: zero blocks stay exact; constant ones only if all scales agree.
  dq = quant.quantize(jnp.asarray(w), kind, 64, double_quant=True).dequantize()
  np.testing.assert_array_equal(np.asarray(dq)[0], 0)
  const = np.full((3, 50, 64), -0.123, np.float32)
  np.testing.assert_array_equal(quant.quantize(jnp.asarray(const), kind, 64, True, batch_dims=1).dequantize(), const)


def test_shapes_padding_dtypes_and_errors():
  w = jnp.asarray(varied_weight((5, 7))).astype(jnp.bfloat16)
  q = quant.quantize(w, 'nf4', 64)
  assert q.shape == (5, 7) and q.trailing_shape == (5, 7) and q.padding == 29 and q.dtype == 'bfloat16'
  assert q.codes.shape == (32,) and q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.int8
  assert q.scale_scales.shape == q.scale_offsets.shape == (1,) and q.scale_scales.dtype == jnp.float32
  assert q.dequantize().dtype == jnp.bfloat16 and q.dequantize(jnp.float32).dtype == jnp.float32
  q8 = quant.quantize(w, 'int8', 16, double_quant=False)
  assert q8.codes.shape == (48,) and q8.codes.dtype == jnp.int8 and q8.scales.dtype == jnp.float32
  assert q8.scale_scales is None and q8.padding == 13
  np.testing.assert_allclose(q8.dequantize(jnp.float32), w.astype(jnp.float32), atol=0.05 * float(jnp.abs(w).max()))
  with pytest.raises(ValueError, match='kind=.int4.'):
    quant.quantize(w, 'int4')
  with pytest.raises(ValueError, match='block=33'):
    quant.quantize(w, 'nf4', 33)
  with pytest.raises(ValueError, match='batch_dims=2'):
    quant.quantize(w, batch_dims=2)


def test_stacked_quantized_under_scan():
  w = jnp.asarray(varied_weight((3, 24, 40)))
  q = quant.quantize(w, 'nf4', 64, True, batch_dims=1)
  assert q.shape == (3, 24, 40) and q.trailing_shape == (24, 40)

  def body(carry, layer):
    assert isinstance(layer, quant.Quantized) and layer.shape == (24, 40)  # static metadata holds no L
    return carry, layer.dequantize()

  _, per_layer = jax.jit(lambda q: jax.lax.scan(body, 0, q))(q)
  # Jitted and eager code may round the scale code * step + offset differently (XLA CPU contracts it to an
  # FMA): an ulp of the offset, so compare against the weight's magnitude, not each element's.
  close = dict(rtol=1e-6, atol=1e-6 * float(jnp.abs(w).max()))
  np.testing.assert_allclose(per_layer, q.dequantize(), **close)
  # Stacking quantizes each layer on its own: the same codes as quantizing the layers separately.
  for i in range(3):
    alone = quant.quantize(w[i], 'nf4', 64, True)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a, i=i: a[i], q), alone)
  np.testing.assert_allclose(jax.tree.map(lambda a: a[1], q).dequantize(), per_layer[1], **close)


@pytest.mark.parametrize('x_dtype,out_dtype', [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_einsum_gradient_matches_dequantized(x_dtype, out_dtype):
  spec = 'btd,dnh->btnh'
  q = quant.quantize(0.2 * jax.random.normal(jax.random.PRNGKey(1), (32, 4, 8)), 'nf4', 64)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32), x_dtype)

  def loss(x, w):
    y = w.einsum(spec, x, out_dtype) if isinstance(w, quant.Quantized) else jnp.einsum(
        spec, x, w, preferred_element_type=out_dtype)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  value, grad = jax.jit(jax.value_and_grad(loss))(x, q)
  ref_value, ref_grad = jax.jit(jax.value_and_grad(loss))(x, q.dequantize(x_dtype))
  tol = 1e-5 if x_dtype == jnp.float32 else 1e-2
  assert grad.dtype == x_dtype
  np.testing.assert_allclose(value, ref_value, rtol=tol)
  np.testing.assert_allclose(grad.astype(np.float32), ref_grad.astype(np.float32), rtol=tol, atol=tol)
  # The frozen base gets zero cotangents: float0 for the codes, zeros for float scales.
  _, dq = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, q)
  assert dq.codes.dtype == jax.dtypes.float0 and not np.any(dq.scale_scales)


def test_backward_keeps_codes_not_dequantized_weights():
  layers, d = 8, 512
  q = quant.quantize(jnp.asarray(varied_weight((layers, d, d))), 'nf4', 64, True, batch_dims=1)
  x = jnp.ones((8, d), jnp.float32)

  def loss(x, q, custom):
    def body(h, layer):
      y = layer.einsum('bd,de->be', h) if custom else jnp.einsum('bd,de->be', h, layer.dequantize(h.dtype))
      return jnp.tanh(y), None
    return jnp.sum(jax.lax.scan(body, x, q)[0])

  def temp_bytes(custom):
    return jax.jit(jax.grad(loss), static_argnums=2).lower(x, q, custom).compile().memory_analysis().temp_size_in_bytes

  weight_bytes = layers * d * d * 4
  custom, plain = temp_bytes(True), temp_bytes(False)
  print(f'temp bytes: custom_vjp {custom}, dequantize-then-einsum {plain}, {layers} f32 weights {weight_bytes}')
  assert plain >= weight_bytes  # autodiff saves every layer's dequantized weight for the backward pass
  assert custom < weight_bytes / 4  # the custom VJP saves x-side residuals and re-dequantizes
  g = jax.jit(jax.grad(loss), static_argnums=2)
  np.testing.assert_allclose(g(x, q, True), g(x, q, False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kind,double_quant,expected', [
    ('nf4', True, 0.5 + 1 / 64 + 8 / (64 * 256)), ('nf4', False, 0.5 + 4 / 64),
    ('int8', True, 1 + 1 / 64 + 8 / (64 * 256)), ('int8', False, 1 + 4 / 64)])
def test_bytes_per_param(kind, double_quant, expected):
  params = {'blocks': {'w': jnp.zeros((2, 128, 256))}, 'norm': jnp.ones((128,))}
  tree = quant.quantize_tree(params, 'blocks/', kind, 64, double_quant)
  assert quant.bytes_per_param(tree) == pytest.approx(expected)
  if kind == 'nf4' and double_quant:
    assert quant.bytes_per_param(tree) * 8 == pytest.approx(4.129, abs=1e-3)
  with pytest.raises(ValueError, match='no Quantized leaves'):
    quant.bytes_per_param(params)


@pytest.fixture(scope='module')
def model():
  cfg = tiny()
  graphdef, _, _ = models.describe(cfg)
  return cfg, graphdef, jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))


def test_quantize_tree_selects_by_path_and_rank(model):
  _, _, params = model
  tree = quant.quantize_tree(params, r'blocks/(attn|mlp)/|norm', 'nf4')
  assert isinstance(tree['blocks']['attn']['q'], quant.Quantized)
  assert tree['blocks']['attn']['q'].shape == (2, 32, 4, 8) and tree['blocks']['attn']['q'].trailing_shape == (32, 4, 8)
  assert isinstance(tree['blocks']['mlp']['down'], quant.Quantized)
  assert tree['blocks']['attn_norm']['scale'] is params['blocks']['attn_norm']['scale']  # (L, D): 1-D per layer
  assert tree['final_norm']['scale'] is params['final_norm']['scale'] and tree['embed'] is params['embed']
  back = quant.dequantize_tree(tree)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, back, params)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_model_apply_with_quantized_leaves(model, scan_layers):
  cfg, _, params = model
  cfg = dataclasses.replace(cfg, remat='full')
  graphdef, _, _ = models.describe(cfg, models.Execution(scan_layers=scan_layers))
  tree = quant.quantize_tree(params, r'blocks/(attn|mlp)/', 'nf4')
  deq = quant.dequantize_tree(tree)
  batch = packed_batch([[10, 6], [16]], 16)

  def loss(norm, p):
    logits = models.apply(graphdef, {**p, 'final_norm': {'scale': norm}}, batch)
    return jnp.mean(logits ** 2), logits

  # One compile per tree structure: logits, and the gradient for a trainable leaf through the frozen base.
  f = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, logits), grad = f(params['final_norm']['scale'], tree)
  (_, ref_logits), ref_grad = f(params['final_norm']['scale'], deq)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
  (_, float_logits), _ = f(params['final_norm']['scale'], params)  # same structure as deq: no recompile
  assert np.abs(logits - float_logits).max() > 1e-4  # it really ran on the 4-bit weights
