"""The decoder: shapes, masking (documents, causality, padding), RoPE, variants, scan vs unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models
from jaxtrain.models import Execution, transformer
from tests.helpers import packed_batch, packed_loss_and_grads, tiny


def logits_fn(cfg, seed=0, execution=None):
  graphdef, _, _ = models.describe(cfg, execution)
  params = models.init_params(cfg, jax.random.PRNGKey(seed))
  return params, jax.jit(lambda p, b: models.apply(graphdef, p, b))


@pytest.fixture(scope='module')
def base():
  return logits_fn(tiny())


def test_shapes_and_dtypes(base):
  params, f = base
  batch = packed_batch([[10, 6], [16]], 16)
  out = f(params, batch)
  assert out.shape == (2, 16, 64) and out.dtype == jnp.float32
  assert params['blocks']['attn']['q'].shape == (2, 32, 4, 8)  # (L, D, N, H): layers stacked
  assert params['blocks']['attn']['k'].shape == (2, 32, 2, 8)  # GQA: 2 kv heads
  assert 'lm_head' not in params  # tied by default


def test_bf16_compute_keeps_f32_params_and_logits():
  params, f = logits_fn(tiny(), execution=Execution(compute_dtype='bfloat16'))
  out = f(params, packed_batch([[16]], 16))
  assert params['embed'].dtype == jnp.float32 and out.dtype == jnp.float32
  ref_params, ref = logits_fn(tiny())
  np.testing.assert_allclose(out, ref(ref_params, packed_batch([[16]], 16)), atol=0.1)


def test_other_document_in_row_does_not_change_logits(base):
  params, f = base
  batch = packed_batch([[7, 9]], 16)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, 7:] = (changed['tokens'][0, 7:] + 5) % 64  # rewrite document 2 only
  a, b = f(params, batch), f(params, changed)
  np.testing.assert_array_equal(a[0, :7], b[0, :7])
  assert np.abs(a[0, 7:] - b[0, 7:]).max() > 1e-3
  # And document 2 cannot see document 1 either.
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, :7] = (changed['tokens'][0, :7] + 5) % 64
  np.testing.assert_array_equal(f(params, batch)[0, 7:], f(params, changed)[0, 7:])


def test_later_token_does_not_change_earlier_logits(base):
  params, f = base
  batch = packed_batch([[16]], 16)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, 11] = (changed['tokens'][0, 11] + 1) % 64
  a, b = f(params, batch), f(params, changed)
  np.testing.assert_array_equal(a[0, :11], b[0, :11])
  assert np.abs(a[0, 11:] - b[0, 11:]).max() > 1e-4


def test_padding_is_invisible(base):
  params, f = base
  batch = packed_batch([[10]], 16)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, 10:] = 33  # padding tokens (segment 0) change
  np.testing.assert_array_equal(f(params, batch)[0, :10], f(params, changed)[0, :10])


def test_packed_document_matches_document_alone(base):
  """Positions restart per document, so a document packed after another gives the logits it has alone."""
  params, f = base
  packed = packed_batch([[5, 8]], 16, seed=3)
  alone = {k: np.zeros_like(v) for k, v in packed.items()}
  for k in alone:
    alone[k][0, :8] = packed[k][0, 5:13]
  alone['segment_ids'][0, :8] = 1
  np.testing.assert_allclose(f(params, packed)[0, 5:13], f(params, alone)[0, :8], atol=2e-5)


def test_rope_scores_depend_only_on_relative_position(base):
  params, f = base
  batch = packed_batch([[16]], 16)
  shifted = dict(batch, positions=batch['positions'] + 1000)
  np.testing.assert_allclose(f(params, batch), f(params, shifted), atol=5e-4)


def test_rope_tables_are_computed_once_outside_the_rotation():
  """rope's cos/sin are evaluated once per (B,T,H/2) in their own computation, not inside the loops that
  rotate (B,T,N,H) values forward and backward; values and gradients are those of the plain formula."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32)
  pos = jnp.asarray(rng.integers(0, 3000, (2, 16)), jnp.int32)

  def plain(x):
    freqs = 1e4 ** (-jnp.arange(4, dtype=jnp.float32) / 4)
    ang = pos[..., None].astype(jnp.float32) * freqs
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = x[..., :4], x[..., 4:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  loss = jax.jit(jax.value_and_grad(lambda x: (transformer.rope(x, pos, 1e4) * ct).sum()))
  ref = jax.value_and_grad(lambda x: (plain(x) * ct).sum())(x)
  for got, want in zip(loss(x), ref, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  hlo = loss.lower(x).compile().as_text()
  with_cos = [c for c in hlo.split('\n\n') if 'cosine(' in c]
  assert with_cos and all('f32[2,16,4,8]' not in c.split('\n')[0] for c in with_cos), with_cos


@pytest.mark.parametrize('overrides', [
    dict(num_kv_heads=4),  # MHA
    dict(num_kv_heads=1),  # MQA
    dict(qkv_bias=True, qk_norm=True, tie_embeddings=False, rope_theta=500000.0),
])
def test_variants_build_and_mask(overrides):
  cfg = tiny(**overrides)
  params, f = logits_fn(cfg)
  batch = packed_batch([[6, 10]], 16)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, 6:] = (changed['tokens'][0, 6:] + 1) % 64
  np.testing.assert_array_equal(f(params, batch)[0, :6], f(params, changed)[0, :6])
  assert params['blocks']['attn']['k'].shape[2] == cfg.num_kv_heads
  if overrides.get('qkv_bias'):
    assert params['blocks']['attn']['q_bias'].shape == (2, 4, 8)
    assert params['blocks']['attn']['q_norm']['scale'].shape == (2, 8)
    assert params['lm_head'].shape == (32, 64)


@pytest.mark.parametrize('remat', ['none', 'full', 'save_dots'])
def test_scan_unrolled_and_remat_agree(remat):
  batch = packed_batch([[9, 7], [16]], 16)
  params = models.init_params(tiny(), jax.random.PRNGKey(1))

  def loss(cfg, ex):
    graphdef, _, _ = models.describe(cfg, ex)
    return jax.jit(jax.value_and_grad(lambda p: models.apply(graphdef, p, batch).std()))(params)

  ref_val, ref_grad = loss(tiny(), Execution(scan_layers=True))
  val, grad = loss(tiny(remat=remat), Execution(scan_layers=False))
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('block', [4, 5, 16])
def test_blocked_causal_attention_equals_one_call(block):
  """Query blocks that skip the masked upper triangle give the single call's logits and gradients, with
  several documents and padding in a row and a block size that does not divide it."""
  ref_val, ref_grad = packed_loss_and_grads(tiny(), Execution(attention_block=0))
  val, grad = packed_loss_and_grads(tiny(), Execution(attention_block=block))
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_blocked_attention_keeps_document_and_causal_masks():
  params, f = logits_fn(tiny(), execution=Execution(attention_block=4))
  batch = packed_batch([[7, 9]], 16)
  changed = {k: v.copy() for k, v in batch.items()}
  changed['tokens'][0, 12] = (changed['tokens'][0, 12] + 1) % 64  # a later token of document 2
  a, b = f(params, batch), f(params, changed)
  np.testing.assert_array_equal(a[0, :12], b[0, :12])
  assert np.abs(a[0, 12:] - b[0, 12:]).max() > 1e-4


def test_attention_block_auto_is_blocked_on_cpu():
  from jaxtrain.config.defaults import base_config
  assert models.execution.from_model(base_config().model).attention_block == 128  # tests run on CPU
  assert models.execution.default().attention_block == 128
  assert models.execution.default(backend='gpu').attention_block == 0


TINY_PATHS = {
    "['blocks']['attn']['k']": (2, 32, 2, 8), "['blocks']['attn']['o']": (2, 4, 8, 32),
    "['blocks']['attn']['q']": (2, 32, 4, 8), "['blocks']['attn']['v']": (2, 32, 2, 8),
    "['blocks']['attn_norm']['scale']": (2, 32), "['blocks']['mlp']['down']": (2, 64, 32),
    "['blocks']['mlp']['gate']": (2, 32, 64), "['blocks']['mlp']['up']": (2, 32, 64),
    "['blocks']['mlp_norm']['scale']": (2, 32), "['embed']": (64, 32), "['final_norm']['scale']": (32,),
}


def _paths(tree) -> dict:
  return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_residual_gain_off_keeps_the_parameter_tree_and_on_adds_two_scalars_per_block(base):
  from jaxtrain import sharding
  params, _ = base
  assert _paths(params) == TINY_PATHS
  cfg = tiny(residual_gain=0.5)
  _, specs, shapes = models.describe(cfg)
  assert _paths(shapes) == {**TINY_PATHS, "['blocks']['attn_gain']": (2,), "['blocks']['mlp_gain']": (2,)}
  assert tuple(specs['blocks']['attn_gain']) == ('layers',) == tuple(specs['blocks']['mlp_gain'])
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert sharding.param_shardings(specs, shapes, mesh)['blocks']['mlp_gain'].spec == jax.sharding.PartitionSpec(None)
  gained = models.init_params(cfg, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(gained['blocks'].pop('attn_gain'), [0.5, 0.5])
  np.testing.assert_array_equal(gained['blocks'].pop('mlp_gain'), [0.5, 0.5])
  for a, b in zip(jax.tree.leaves(gained), jax.tree.leaves(params), strict=True):  # the gains draw nothing
    np.testing.assert_array_equal(a, b)


def test_residual_gain_scales_its_branch():
  """block(x) - x is gain times the branch: linear in each gain, and nothing at all with gain 0."""
  from flax import nnx

  from jaxtrain.models.transformer import Block
  cfg = tiny(residual_gain=1.0)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), nnx.to_pure_dict(state))
  batch = packed_batch([[5, 7]], 12)
  x = jnp.asarray(rng.standard_normal((1, 12, 32)), jnp.float32)
  call = jax.jit(lambda p: nnx.merge(graphdef, p)(x, batch['segment_ids'], batch['positions']) - x)
  for gain, other in (('attn_gain', 'mlp_gain'), ('mlp_gain', 'attn_gain')):
    branch = {g: call({**params, gain: jnp.float32(g), other: jnp.float32(0)}) for g in (0.0, 1.0, 2.5)}
    np.testing.assert_array_equal(branch[0.0], 0)
    assert np.abs(branch[1.0]).max() > 1e-2
    np.testing.assert_allclose(branch[2.5], 2.5 * branch[1.0], rtol=1e-5, atol=1e-6)


def test_zero_gains_reduce_the_model_to_embedding_and_head():
  cfg = tiny(residual_gain=1.0)
  graphdef, _, _ = models.describe(cfg)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  params['blocks']['attn_gain'] = params['blocks']['mlp_gain'] = jnp.zeros(2)
  batch = packed_batch([[16]], 16)
  x = np.asarray(params['embed'])[batch['tokens']]
  x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * np.asarray(params['final_norm']['scale'])
  logits = jax.jit(lambda p, b: models.apply(graphdef, p, b))(params, batch)
  np.testing.assert_allclose(logits, x @ np.asarray(params['embed']).T, atol=1e-5)


def _autodiff_swiglu(x, gate, up, down):
  return jnp.einsum('btf,fd->btd', jax.nn.silu(jnp.einsum('btd,df->btf', x, gate)) * jnp.einsum('btd,df->btf', x, up),
                    down)


def _autodiff_rope(x, positions, theta):
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_hand_written_backward_passes_equal_autodiff():
  """The SwiGLU MLP and RoPE carry their own VJPs (faster on XLA CPU): values and gradients must be the
  autodiff ones, for a random cotangent (not a sum, whose cotangent of ones would hide a transposed term)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  gate, up = (jnp.asarray(rng.normal(size=(16, 24)) * 0.3, jnp.float32) for _ in range(2))
  down = jnp.asarray(rng.normal(size=(24, 16)) * 0.3, jnp.float32)
  dy = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  ours, vjp = jax.vjp(transformer.swiglu, x, gate, up, down)
  ref, ref_vjp = jax.vjp(_autodiff_swiglu, x, gate, up, down)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  for a, b in zip(vjp(dy), ref_vjp(dy), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  q = jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 50, (2, 7)), jnp.int32)
  dq = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  ours, vjp = jax.vjp(lambda q: transformer.rope(q, positions, 1e4), q)
  ref, ref_vjp = jax.vjp(lambda q: _autodiff_rope(q, positions, 1e4), q)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(dq)[0], ref_vjp(dq)[0], rtol=1e-5, atol=1e-6)


def test_mlp_takes_the_hand_written_backward_only_for_plain_weights(monkeypatch):
  """LoRA/quantized weights compute their own products, biases are outside the fused form: those keep
  autodiff; a plain SwiGLU MLP calls `swiglu`."""
  calls = []
  monkeypatch.setattr(transformer, 'swiglu', lambda *a: calls.append(1) or _autodiff_swiglu(*a))
  batch = packed_batch([[8]], 8)
  for cfg, expected in [(tiny(), True), (tiny(mlp_bias=True), False), (tiny(mlp='gelu'), False)]:
    calls.clear()
    graphdef, _, _ = models.describe(cfg)
    models.apply(graphdef, models.init_params(cfg, jax.random.PRNGKey(0)), batch)
    assert bool(calls) == expected, cfg


def test_scan_layers_unset_unrolls_on_cpu_unless_remat():
  from jaxtrain.config.defaults import base_config
  model = base_config().model
  plan = models.execution.from_model
  assert model.scan_layers is None and plan(model).scan_layers is False  # tests run on CPU
  assert plan(model).compute_dtype == 'float32' and plan(model, backend='gpu').compute_dtype == 'bfloat16'
  model.remat = 'full'
  assert plan(model).scan_layers is True  # remat keeps the scan's memory bound
  assert models.execution.default(models.model_config(model, 100)).scan_layers is True
  model.scan_layers = False
  assert plan(model).scan_layers is False  # set explicitly: as given


@pytest.mark.parametrize('kv_heads', [4, 2, 1])
def test_einsum_attention_core_equals_the_library_call(kv_heads):
  """The einsum core (the blocks' path) against jax.nn.dot_product_attention for MHA, GQA and MQA, with a
  document mask: outputs and the q, k, v gradients under a random cotangent."""
  rng = np.random.default_rng(1)
  b, t, n, h = 2, 12, 4, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, h)).astype(np.float32)) for _ in range(2))
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
  mask = transformer.attention_mask(segments, True)
  cot = jnp.asarray(rng.normal(size=(b, t, n, h)).astype(np.float32))

  def run(library):
    out, vjp = jax.vjp(lambda q, k, v: transformer.dot_product_attention(q, k, v, mask, library=library), q, k, v)
    return out, vjp(cot)

  out, grads = run(False)
  ref, ref_grads = run(True)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
