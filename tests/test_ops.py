"""The hand-differentiated pieces: gradients equal autodiff's, and the layouts XLA CPU gets from them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.models import ops


@pytest.mark.parametrize('spec,x_shape,w_shape', [
    ('btd,dnh->btnh', (2, 16, 8), (8, 2, 4)),  # q projection: x and dy the same width
    ('btnh,nhd->btd', (2, 16, 2, 4), (2, 4, 8)),  # output projection
    ('btf,fd->btd', (2, 16, 24), (24, 8)),  # MLP down: the cotangent is the smaller operand
    ('btd,vd->btv', (2, 16, 8), (64, 8)),  # tied LM head: the cotangent (B*T, V) is the larger
])
def test_linear_grads_equal_autodiff(spec, x_shape, w_shape):
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, w_shape))
  ct = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
  got = jax.grad(lambda x, w: (ops.linear(spec, x, w) * ct).sum(), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: (jnp.einsum(spec, x, w) * ct).sum(), argnums=(0, 1))(x, w)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_linear_does_not_transpose_the_large_logits_gradient():
  """For a tied LM head XLA CPU would write the (V, B*T) logits cotangent transposed for the embedding's
  gradient; linear transposes the (D, B*T) activations instead."""
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32), jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(2, 16, 64)), jnp.float32)

  def hlo(f):
    grad = jax.jit(jax.grad(lambda x, w: (f('btd,vd->btv', x, w) * ct).sum(), argnums=(0, 1)))
    return grad.lower(x, w).compile().as_text()

  assert 'f32[64,32]' in hlo(jnp.einsum)  # autodiff: the cotangent, transposed (what this guards against)
  assert 'f32[64,32]' not in hlo(ops.linear) and 'f32[8,32]' in hlo(ops.linear)


def test_softmax_matches_jax_values_and_gradient_including_masked_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 9)).astype(np.float32) * 4
  x[0, 1, 5:] = -0.7 * np.finfo(np.float32).max  # masked keys, as attention's masking writes them
  x[1, 2, :] = -0.7 * np.finfo(np.float32).max  # a row with every key masked (padding attending padding)
  cot = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  y, vjp = jax.vjp(ops.softmax, jnp.asarray(x))
  ref, ref_vjp = jax.vjp(lambda a: jax.nn.softmax(a, axis=-1), jnp.asarray(x))
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(vjp(cot)[0], ref_vjp(cot)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[1, 2], np.full(9, 1 / 9), rtol=1e-6)  # finite and uniform, not NaN
