"""The fused CPU attention kernel against the einsum reference: values and gradients under every mask the
model uses, GQA, odd lengths, dtype casting, meshes, and how `model.attention_impl` resolves."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import models, sharding
from jaxtrain.errors import ConfigError
from jaxtrain.config.defaults import base_config
from jaxtrain.kernels import cpu_attention
from jaxtrain.models import Execution, transformer
from jaxtrain.train import execution
from tests.helpers import packed_loss_and_grads, tiny


@pytest.fixture(autouse=True, scope='module')
def kernel():
  assert cpu_attention.unavailable() is None  # the test machines have g++


def reference(q, k, v, seg, causal, window):
  mask = transformer.attention_mask(seg, causal, window=window)
  return transformer.dot_product_attention(q, k, v, mask, library=False)


def operands(b, t, n, kv, h, docs, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)))
  if docs:  # documents of random lengths, then padding (segment 0)
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
    seg[:, t - t // 9:] = 0
  else:
    seg = np.ones((b, t), np.int32)
  return q, k, v, g, jnp.asarray(seg, jnp.int32)


CASES = {  # name: (batch, length, query heads, kv heads, head dim, causal, window, documents)
    'causal GQA, length not a multiple of the tile': (2, 100, 4, 2, 64, True, 0, False),
    'causal, packed documents and padding': (2, 130, 4, 4, 32, True, 0, True),
    'bidirectional MQA, documents (diffusion objectives)': (1, 200, 2, 1, 64, False, 0, True),
    'causal sliding window across tiles': (2, 150, 4, 2, 64, True, 37, True),
    'bidirectional window, head dim not a multiple of 16': (1, 70, 2, 2, 24, False, 20, False),
}


@pytest.mark.parametrize('case', CASES)
def test_matches_reference_values_and_gradients(case):
  b, t, n, kv, h, causal, window, docs = CASES[case]
  q, k, v, g, seg = operands(b, t, n, kv, h, docs)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.vdot(fn(q, k, v, seg, causal, window), g), (0, 1, 2)))

  out = jax.jit(cpu_attention.attention, static_argnums=(4, 5))(q, k, v, seg, causal, window)
  np.testing.assert_allclose(out, reference(q, k, v, seg, causal, window), atol=3e-6)
  (val, grads), (ref_val, ref_grads) = loss(cpu_attention.attention)(q, k, v), loss(reference)(q, k, v)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for got, want in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()))


def test_other_documents_and_future_tokens_have_no_influence():
  """Changing the keys of document 2 leaves document 1's outputs bitwise equal; changing a later token of
  document 2 leaves its earlier positions equal (causal)."""
  q, k, v, _, _ = operands(1, 96, 2, 2, 32, False)
  seg = jnp.asarray(np.r_[np.ones(40), np.full(56, 2)][None], jnp.int32)
  out = cpu_attention.attention(q, k, v, seg, True)
  k2 = k.at[0, 70].add(1.0)
  out2 = cpu_attention.attention(q, k2, v.at[0, 70].add(1.0), seg, True)
  np.testing.assert_array_equal(out[0, :70], out2[0, :70])
  assert float(jnp.abs(out[0, 70:] - out2[0, 70:]).max()) > 1e-3


def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16():
  q, k, v, _, seg = operands(1, 64, 2, 2, 32, True)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = cpu_attention.attention(*bf, seg, True)
  assert out.dtype == jnp.bfloat16
  want = reference(*[x.astype(jnp.float32) for x in bf], seg, True, 0)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)


def test_each_batch_shard_runs_its_own_rows_under_a_mesh():
  """Inside jit under a data x fsdp mesh the kernel runs per batch shard (shard_map) and gives the
  single-device values and gradients; the compiled step keeps the batch sharded instead of gathering it."""
  q, k, v, g, seg = operands(8, 64, 4, 2, 32, True)
  f = jax.value_and_grad(lambda q, k, v: jnp.vdot(cpu_attention.attention(q, k, v, seg, True), g), (0, 1, 2))
  want_val, want_grads = jax.jit(f)(q, k, v)
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  with jax.set_mesh(mesh):
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    args = [jax.device_put(x, spec) for x in (q, k, v)]
    lowered = jax.jit(f).lower(*args)
    val, grads = lowered.compile()(*args)
  assert 'all-gather' not in lowered.compile().as_text()
  np.testing.assert_allclose(val, want_val, rtol=1e-6)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rejects_cross_attention_and_unequal_head_dims():
  q, k, v, _, seg = operands(1, 32, 2, 2, 16, False)
  with pytest.raises(ValueError, match='equal head dims'):
    cpu_attention.attention(q, k, v[..., :8], seg, True)
  with pytest.raises(ValueError, match='self-attention'):
    cpu_attention.attention(q, k[:, :16], v[:, :16], seg, True)


@pytest.mark.parametrize('causal,window', [(True, 0), (False, 0), (True, 5)])
def test_model_with_fused_attention_matches_xla_attention(causal, window):
  """The decoder's logits and parameter gradients with `attention_impl='cpu_fused'` equal the XLA path's
  (packed documents, padding, causal or bidirectional, sliding window)."""
  base = tiny(causal=causal, sliding_window=window)
  ref_val, ref_grad = packed_loss_and_grads(base, Execution())
  val, grad = packed_loss_and_grads(base, Execution(attention_impl='cpu_fused'))
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_resolves_to_the_kernel_on_cpu_and_xla_for_mla():
  config = base_config()
  m = config.model
  assert execution.plan(config).attention_impl == 'cpu_fused'  # tests run on CPU with g++
  assert models.execution.default().attention_impl == 'xla'  # what describing/exporting uses: never the kernel
  m.attention_impl = 'xla'
  assert execution.plan(config).attention_impl == 'xla'
  m.attention_impl, m.attention = 'auto', 'mla'
  assert execution.plan(config).attention_impl == 'xla'  # value heads narrower than keys: einsum path
  m.attention_impl = 'cpu_fused'
  with pytest.raises(ConfigError, match='needs the CPU backend and GQA attention'):
    execution.plan(config)


def test_without_a_compiler_auto_falls_back_and_cpu_fused_is_a_config_error(monkeypatch, tmp_path):
  monkeypatch.setenv('CXX', 'no-such-compiler')
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path))  # nothing built here yet
  cpu_attention.unavailable.cache_clear()
  try:
    assert 'no-such-compiler' in cpu_attention.unavailable()
    config = base_config()
    with pytest.warns(UserWarning, match='does not build here'):
      assert execution.plan(config).attention_impl == 'xla'
    config.model.attention_impl = 'cpu_fused'
    with pytest.raises(ConfigError, match="model.attention_impl.*no C\\+\\+ compiler 'no-such-compiler'"):
      execution.plan(config)
  finally:
    monkeypatch.undo()
    cpu_attention.unavailable.cache_clear()
    assert cpu_attention.unavailable() is None  # registers the (cached) kernel again


def fake_compiler(tmp_path, name: str, version: str, body: str = 'exit 1') -> str:
  """A shell script standing in for g++: prints `version` for --version, else runs `body`."""
  path = tmp_path / name
  path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n{body}\n')
  path.chmod(0o755)
  return str(path)


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
  """An empty kernel cache, nothing loaded, no reason warned yet; the real kernel registered again after."""
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(cpu_attention, '_loaded', None)
  monkeypatch.setattr(execution, '_warned', set())
  cpu_attention.unavailable.cache_clear()
  yield
  monkeypatch.undo()
  cpu_attention.unavailable.cache_clear()
  assert cpu_attention.unavailable() is None


def test_a_hanging_compiler_times_out_as_unavailable(monkeypatch, tmp_path, fresh_kernel_state):
  monkeypatch.setenv('CXX', fake_compiler(tmp_path, 'slow-g++', 'slow 1.0', 'exec sleep 30'))
  monkeypatch.setattr(cpu_attention, 'BUILD_TIMEOUT_S', 0.3)
  why = cpu_attention.unavailable()
  assert 'took over 0.3 s' in why
  config = base_config()
  with pytest.warns(UserWarning, match='took over') as caught:
    assert execution.plan(config).attention_impl == 'xla'
    assert execution.plan(config).attention_impl == 'xla'
  assert len(caught) == 1  # one warning per reason and process, however many jobs plan


@pytest.mark.parametrize('library', ['lacks the symbol', 'not a library'])
def test_a_library_that_does_not_load_falls_back_or_is_a_one_line_config_error(monkeypatch, tmp_path, library,
                                                                                 fresh_kernel_state):
  import ctypes.util
  if library == 'lacks the symbol':
    path = ctypes.util.find_library('m')  # libm: a shared object without JaxtrainAttentionForward
  else:
    path = tmp_path / 'cpu_attention-garbage.so'
    path.write_bytes(b'not an ELF file')
  monkeypatch.setattr(cpu_attention, '_build', lambda: pathlib.Path(path))
  assert 'does not load as the kernel' in cpu_attention.unavailable()
  config = base_config()
  with pytest.warns(UserWarning, match='does not load as the kernel'):
    assert execution.plan(config).attention_impl == 'xla'
  config.model.attention_impl = 'cpu_fused'
  with pytest.raises(ConfigError, match='does not load as the kernel') as e:
    execution.plan(config)
  assert '\n' not in str(e.value)


def test_the_cache_key_holds_the_machine_and_the_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path))
  cxx = fake_compiler(tmp_path, 'g++', 'g++ 13.2')
  assert 'flags' in cpu_attention.cpu_identity() or 'Features' in cpu_attention.cpu_identity()
  monkeypatch.setattr(cpu_attention, 'cpu_identity', lambda: 'model name : CPU A\nflags : sse2 avx2')
  a = cpu_attention.cache_path(cxx)
  assert a == cpu_attention.cache_path(cxx)  # stable
  monkeypatch.setattr(cpu_attention, 'cpu_identity', lambda: 'model name : CPU B\nflags : sse2 avx2 avx512f')
  b = cpu_attention.cache_path(cxx)
  (tmp_path / 'other').mkdir()
  newer = cpu_attention.cache_path(fake_compiler(tmp_path / 'other', 'g++', 'g++ 14.1'))
  assert len({a, b, newer}) == 3 and a.parent == b.parent == tmp_path / 'kernels'
