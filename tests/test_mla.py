"""Multi-head latent attention and KV-cache decoding: relative positions, equivalence with standard attention
at full rank, decode == full forward, LoRA on MLA projections, validation.

Parameters are drawn with numpy on `describe`'s shapes rather than by `init_params`, which compiles a random
draw per distinct shape (seconds per MLA config on CPU) and uses a std too small for attention to matter.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.config import validate as config_lib
from jaxtrain.adapters import lora
from jaxtrain import models
from jaxtrain.hf import config as hf_config, weights as hf_weights
from jaxtrain.config.defaults import base_config
from jaxtrain.models import mla
from jaxtrain.models.transformer import Attention
from tests.helpers import packed_batch, tiny

MLA = dict(attention='mla', mla_q_rank=16, mla_kv_rank=12, mla_nope_dim=8, mla_rope_dim=4, mla_v_dim=6)


def fill(shapes, seed: int, std: float = 0.3):
  """Random values for a tree of ShapeDtypeStructs; norm scales near 1."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    noise = rng.standard_normal(s.shape).astype(np.float32)
    scale = 'scale' in jax.tree_util.keystr(path)
    return jnp.asarray(1 + 0.1 * noise if scale else std * noise, s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_params(cfg, seed: int = 0, std: float = 0.3) -> dict:
  return fill(models.describe(cfg)[2], seed, std)


def module(cls, cfg, seed: int = 0):
  """(jitted call(params, x, segment_ids, positions), random params) of one attention module."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, nnx.Rngs(0))))
  params = fill(nnx.to_pure_dict(state), seed)
  return jax.jit(lambda p, x, s, pos: nnx.merge(graphdef, p)(x, s, pos)), params


def inputs(batch: int = 2, seq: int = 12, seed: int = 1, unit_rms: bool = False):
  x = np.random.default_rng(seed).standard_normal((batch, seq, 32)).astype(np.float32)
  if unit_rms:
    x /= np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
  return jnp.asarray(x), jnp.ones((batch, seq), jnp.int32), jnp.asarray(positions)


@pytest.mark.parametrize('cls,cfg', [(Attention, tiny()), (mla.MLA, tiny(**MLA))], ids=['gqa', 'mla'])
def test_attention_depends_only_on_relative_positions(cls, cfg):
  call, params = module(cls, cfg)
  x, seg, pos = inputs()
  out = call(params, x, seg, pos)
  np.testing.assert_allclose(call(params, x, seg, pos + 37), out, atol=1e-5)
  gap = pos.at[:, 6:].add(3)  # relative positions change: the output must too (RoPE is really applied)
  assert np.abs(call(params, x, seg, gap) - out).max() > 1e-3


def test_uncompressed_mla_without_rope_equals_mha():
  """q_rank = kv_rank = rope_dim = 0, nope = v = head_dim: MLA is multi-head attention with per-head k/v."""
  std_cfg = tiny(positions='learned', max_positions=16, num_kv_heads=4)
  mla_cfg = dataclasses.replace(std_cfg, attention='mla', mla_nope_dim=8, mla_rope_dim=0, mla_v_dim=8)
  std_call, p = module(Attention, std_cfg)
  mla_call, mp = module(mla.MLA, mla_cfg)
  assert set(mp) == {'q', 'k', 'v', 'o'}
  mp = dict(q=p['q'], k=p['k'], v=p['v'], o=p['o'])
  x, _, pos = inputs()
  seg = jnp.asarray(packed_batch([[5, 7], [12]], 12)['segment_ids'])
  np.testing.assert_allclose(mla_call(mp, x, seg, pos), std_call(p, x, seg, pos), atol=1e-5)


def test_rope_only_mla_equals_mqa():
  """nope = 0, rope = head_dim, kv_rank = 0: one rotated key shared by the heads is MQA's single k head, and
  per-head values that all take MQA's v weight are its shared value head."""
  std_cfg = tiny(num_kv_heads=1)
  mla_cfg = dataclasses.replace(std_cfg, attention='mla', mla_nope_dim=0, mla_rope_dim=8)
  std_call, p = module(Attention, std_cfg)
  mla_call, mp = module(mla.MLA, mla_cfg)
  assert set(mp) == {'q', 'k_rope', 'v', 'o'}
  mp = dict(q=p['q'], k_rope=p['k'][:, 0], v=jnp.broadcast_to(p['v'], (32, 4, 8)), o=p['o'])
  x, seg, pos = inputs()
  pos = pos + 11
  np.testing.assert_allclose(mla_call(mp, x, seg, pos), std_call(p, x, seg, pos), atol=1e-5)


def test_full_rank_compression_equals_mha():
  """q_rank = kv_rank = d_model with identity down-projections: the latents are RMSNorm(x) instead of x.
  For inputs of unit RMS that norm is x / sqrt(1 + eps) * scale, so a scale of sqrt(1 + eps) makes it x
  exactly, and k_up / v_up / q_up then play MHA's k / v / q."""
  std_cfg = tiny(positions='learned', max_positions=16, num_kv_heads=4)
  mla_cfg = dataclasses.replace(std_cfg, attention='mla', mla_q_rank=32, mla_kv_rank=32, mla_nope_dim=8,
                                mla_rope_dim=0)
  std_call, p = module(Attention, std_cfg)
  mla_call, mp = module(mla.MLA, mla_cfg)
  eye, undo_eps = jnp.eye(32), jnp.full((32,), np.sqrt(1 + std_cfg.norm_eps), jnp.float32)
  mp = dict(q_down=eye, q_norm={'scale': undo_eps}, q_up=p['q'], kv_down=eye, kv_norm={'scale': undo_eps},
            k_up=p['k'], v_up=p['v'], o=p['o'])
  x, seg, pos = inputs(unit_rms=True)
  np.testing.assert_allclose(mla_call(mp, x, seg, pos), std_call(p, x, seg, pos), atol=1e-5)


DECODE_CASES = {
    'gqa': tiny(),
    'gqa_window': tiny(sliding_window=3),
    'mla': tiny(**MLA),
    'mla_kv_rank0': tiny(**dict(MLA, mla_kv_rank=0, mla_q_rank=0)),
}


DECODE_BATCH = packed_batch([[10], [10]], 10, seed=5)


@functools.cache
def full_forward(name: str) -> np.ndarray:
  """Logits of one causal forward (scanned; test_transformer checks scan == unrolled) of case `name`."""
  cfg = DECODE_CASES[name]
  graphdef, _, _ = models.describe(cfg, models.Execution(scan_layers=True))
  return np.asarray(jax.jit(lambda p, b: models.apply(graphdef, p, b))(random_params(cfg), DECODE_BATCH))


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.parametrize('name', list(DECODE_CASES))
def test_prefill_then_steps_match_full_forward(name, scan):
  """Prefill 4 prompt tokens, decode the other 6 one at a time into a cache of 12 rows: the logits equal
  those of one causal forward over all 10, and every step reuses one compiled program."""
  cfg = DECODE_CASES[name]
  params = random_params(cfg)
  graphdef, _, _ = models.describe(cfg, models.Execution(scan_layers=scan))
  batch = DECODE_BATCH
  full = full_forward(name)
  traces = []

  @jax.jit
  def decode(p, tokens, positions, cache, index):
    traces.append(tokens.shape)
    return models.decode(graphdef, p, tokens, positions, cache, index)

  tokens, positions = jnp.asarray(batch['tokens']), jnp.asarray(batch['positions'])
  cache = models.init_cache(cfg, batch=2, max_len=12)
  logits, cache = decode(params, tokens[:, :4], positions[:, :4], cache, jnp.int32(0))
  steps = [logits]
  for i in range(4, 10):
    logits, cache = decode(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache, jnp.int32(i))
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)
  assert got.shape == full.shape and got.dtype == jnp.float32
  assert np.abs(got - full).max() <= 1e-4
  assert len(traces) == 2  # the prompt's shape and the step's
  assert np.abs(np.asarray(cache[next(iter(cache))])[:, :, 10:]).max() == 0  # rows past the text untouched


def test_mla_caches_the_latent_and_shared_rope_key():
  cache = models.init_cache(tiny(**MLA), batch=3, max_len=7)
  assert {k: v.shape for k, v in cache.items()} == {'c_kv': (2, 3, 7, 12), 'k_rope': (2, 3, 7, 4)}
  uncompressed = models.init_cache(tiny(**dict(MLA, mla_kv_rank=0)), batch=3, max_len=7)
  assert {k: v.shape for k, v in uncompressed.items()} == {
      'k': (2, 3, 7, 4, 8), 'v': (2, 3, 7, 4, 6), 'k_rope': (2, 3, 7, 4)}
  gqa = models.init_cache(tiny(), batch=3, max_len=7, execution=models.Execution(compute_dtype='bfloat16'))
  assert gqa['k'].shape == (2, 3, 7, 2, 8) and gqa['v'].dtype == jnp.bfloat16


def test_lora_adapts_mla_projections():
  cfg = tiny(**MLA)
  params = random_params(cfg)
  graphdef, _, _ = models.describe(cfg)
  pattern = r'attn/(q_down|q_up|kv_down|k_up|v_up|k_rope|o)$'
  # Shapes from lora.init, values from numpy (b nonzero so the adapters matter): nothing compiles eagerly.
  adapters = fill(jax.eval_shape(lambda: lora.init(params, pattern, 4, jax.random.PRNGKey(0))), seed=2, std=0.1)
  assert sorted(p[-1] for p in lora.adapter_paths(adapters)) == ['k_rope', 'k_up', 'kv_down', 'o', 'q_down',
                                                                 'q_up', 'v_up']
  batch = packed_batch([[5, 7], [12]], 12)
  merged = jax.jit(lambda p, a, scale, b: models.apply(graphdef, lora.apply(p, a, scale, 'merged'), b))
  factored = jax.jit(lambda p, a, b: models.apply(graphdef, lora.apply(p, a, 2.0, 'factored'), b))
  np.testing.assert_allclose(factored(params, adapters, batch), merged(params, adapters, 2.0, batch), atol=1e-5)
  base = merged(params, adapters, 0.0, batch)  # the same program: a traced scale of 0 adds nothing
  assert np.abs(merged(params, adapters, 2.0, batch) - base).max() > 1e-2


def test_flops_count_every_mla_projection():
  cfg = tiny(**MLA)
  shapes = models.describe(cfg)[2]
  from jaxtrain.models import flops
  for path, (times, fan_in, fan_out) in flops.weight_matrices(cfg).items():
    if path.startswith('blocks/attn/'):
      shape = shapes['blocks']['attn'][path.split('/')[-1]].shape
      assert times == shape[0] and fan_in * fan_out == np.prod(shape[1:]), path
  names = {p.split('/')[-1] for p in flops.weight_matrices(cfg) if p.startswith('blocks/attn/')}
  assert names == {k for k, v in shapes['blocks']['attn'].items() if not isinstance(v, dict)}


@pytest.mark.parametrize('overrides,key', [
    ({'mla_rope_dim': 5}, 'mla_rope_dim'),
    ({'mla_rope_dim': 0, 'mla_nope_dim': 0}, 'mla_nope_dim'),
    ({'positions': 'learned', 'max_positions': 256}, 'mla_rope_dim'),
    ({'qk_norm': True}, 'qk_norm'),
    ({'mla_kv_rank': -1}, 'mla_kv_rank'),
])
def test_config_rejects_impossible_mla(overrides, key):
  c = base_config()
  c.model.attention = 'mla'
  config_lib.check_values(c, 8)  # the defaults are a working MLA
  c.model.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=f'model.{key}='):
    config_lib.check_values(c, 8)
  with pytest.raises(ValueError, match=key):  # built directly, the model refuses it too
    models.describe(models.model_config(c.model, 64))


@pytest.mark.parametrize('overrides', [MLA, {'residual_gain': 1.0}])
def test_hf_export_refuses_mla_and_residual_gain(overrides):
  with pytest.raises(hf_config.HfError, match='attention=.*residual_gain'):
    hf_weights.export_target(tiny(**overrides))
