"""LoRA as tree transforms: merged == factored, merge never mutates, only adapters train, resume."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.adapters import lora
from jaxtrain import models, sharding
from jaxtrain.train import loop as train, state, steps
from tests.helpers import packed_batch, tiny
from tests.test_train import tiny_config

ALL = r'attn/(q|k|v|o)$|mlp/(gate|up|down)$|lm_head$'
MC = tiny(tie_embeddings=False)


@pytest.fixture(scope='module')
def model():
  graphdef, specs, shapes = models.describe(MC)
  base = models.init_params(MC, jax.random.PRNGKey(0))
  adapters = lora.init(shapes, ALL, 4, jax.random.PRNGKey(1))
  # Non-zero b so the adapters change the function (b starts at zero, as in PEFT).
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
  batch = {k: jnp.asarray(v) for k, v in packed_batch([[10, 6], [16]], 16).items()}
  return graphdef, specs, base, adapters, batch


def test_init_shapes_and_scaling(model):
  _, specs, base, adapters, _ = model
  q = adapters['blocks']['attn']['q']
  assert q['a'].shape == (2, 32, 4) and q['b'].shape == (2, 4, 4, 8)
  o = adapters['blocks']['attn']['o']
  assert o['a'].shape == (2, 4, 8, 4) and o['b'].shape == (2, 4, 32)
  assert adapters['lm_head']['a'].shape == (32, 4)
  fresh = lora.init(base, ALL, 4, jax.random.PRNGKey(1))
  assert all(float(jnp.abs(ad['b']).max()) == 0 for ad in jax.tree.leaves(fresh, is_leaf=lambda x: 'b' in x))
  assert float(jnp.abs(fresh['blocks']['attn']['q']['a']).max()) <= 32 ** -0.5
  assert len(lora.adapter_paths(adapters)) == 8
  sp = lora.specs(specs, adapters)['blocks']['attn']['o']
  assert tuple(sp['a']) == ('layers', 'heads', 'head_dim', None) and tuple(sp['b']) == ('layers', None, 'embed')
  assert lora.scaling(16, 4) == 4.0 and lora.scaling(16, 4, rslora=True) == 8.0


def test_targets_must_match_projections(model):
  _, _, base, _, _ = model
  with pytest.raises(lora.LoraError, match='matches no parameter'):
    lora.init(base, r'nothing_here', 4, jax.random.PRNGKey(0))
  with pytest.raises(lora.LoraError, match='attn_norm/scale.*cannot adapt'):
    lora.init(base, r'attn_norm', 4, jax.random.PRNGKey(0))
  with pytest.raises(lora.LoraError, match='rank=0'):
    lora.init(base, ALL, 0, jax.random.PRNGKey(0))


def test_merged_equals_factored_and_adapters_matter(model):
  graphdef, _, base, adapters, batch = model
  plain = models.apply(graphdef, base, batch)
  merged = models.apply(graphdef, lora.apply(base, adapters, 2.0, 'merged'), batch)
  factored = models.apply(graphdef, lora.apply(base, adapters, 2.0, 'factored'), batch)
  # float32 throughout; the two differ only in summation order.
  np.testing.assert_allclose(merged, factored, atol=2e-5, rtol=1e-5)
  assert float(jnp.abs(merged - plain).max()) > 0.1  # a non-zero adapter changes predictions
  assert not np.array_equal(np.argmax(merged, -1), np.argmax(plain, -1))


def test_gradients_agree_between_modes(model):
  graphdef, _, base, adapters, batch = model

  def loss(ad, mode):
    return models.apply(graphdef, lora.apply(base, ad, 2.0, mode), batch).std()

  gm, gf = jax.grad(loss)(adapters, 'merged'), jax.grad(loss)(adapters, 'factored')
  for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(gf), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_merge_never_mutates_and_zero_adapters_are_identity(model):
  _, _, base, adapters, _ = model
  before = jax.tree.map(np.array, base)
  merged = lora.merge(base, adapters, 2.0)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base), strict=True):
    assert np.array_equal(a, b)  # the base is untouched
  assert not np.array_equal(merged['blocks']['attn']['q'], base['blocks']['attn']['q'])
  assert merged['embed'] is base['embed']  # leaves without adapters are shared, not copied
  zero = jax.tree.map(jnp.zeros_like, adapters)
  for a, b in zip(jax.tree.leaves(lora.merge(base, zero, 2.0)), jax.tree.leaves(base), strict=True):
    assert np.array_equal(a, b)  # W + 0 is W bit for bit


def test_dropout_only_with_a_key(model):
  graphdef, _, base, adapters, batch = model
  clean = models.apply(graphdef, lora.apply(base, adapters, 2.0, 'factored'), batch)
  no_key = models.apply(graphdef, lora.apply(base, adapters, 2.0, 'factored', 0.5, None), batch)
  dropped = models.apply(graphdef, lora.apply(base, adapters, 2.0, 'factored', 0.5, jax.random.PRNGKey(3)), batch)
  assert np.array_equal(clean, no_key)  # evaluation passes no key: no dropout
  assert float(jnp.abs(dropped - clean).max()) > 1e-3
  with pytest.raises(lora.LoraError, match='factored'):
    lora.apply(base, adapters, 2.0, 'merged', 0.5, jax.random.PRNGKey(3))


@pytest.fixture(scope='module')
def lora_steps():
  """Two LoRA train steps on a 2x2 mesh through state.build (the path train.run takes)."""
  config = tiny_config(**{'lora.rank': 4, 'lora.targets': ALL, 'model.tie_embeddings': False,
                          'model.vocab_size': 64})
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 1}, jax.devices()[:4])
  mc = models.model_config(config.model, 64)
  tx = optax.adam(1e-2)
  with jax.set_mesh(mesh):
    built = state.build(config, mc, tx, mesh)
    step = jax.jit(steps.make_train_step(train.make_loss_fn(built.graphdef, 0.0), tx,
                                         param_transform=built.transform), donate_argnums=0)
    grad_fn = jax.jit(steps.make_grad_fn(train.make_loss_fn(built.graphdef, 0.0), built.transform))
    s = built.create()
    base_before = jax.tree.map(np.array, s['frozen'])
    batch = sharding.to_global(packed_batch([[20, 12], [32], [8, 8, 8], [30]], 32), mesh)
    first_grads, _ = grad_fn(s['params'], s['frozen'], batch, jax.random.PRNGKey(0))
    s, _ = step(s, batch)
    s, _ = step(s, batch)
    second_grads, _ = grad_fn(s['params'], s['frozen'], batch, jax.random.PRNGKey(0))
  return built, s, base_before, first_grads, second_grads, mc


def test_only_adapters_train(lora_steps):
  built, s, base_before, first, second, mc = lora_steps
  # The optimizer state mirrors the adapters only: nothing base-shaped in it.
  ad_shapes = {x.shape for x in jax.tree.leaves(s['params'])}
  assert {x.shape for x in jax.tree.leaves(s['opt_state']) if x.ndim} <= ad_shapes
  assert models.count_params(s['opt_state']) <= 2 * lora.count(s['params']) + 8
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(s['frozen']), strict=True):
    assert np.array_equal(a, np.asarray(b))  # the frozen base is bitwise unchanged
  # b starts at zero, so at the first step only b moves; after it every factor of every layer learns.
  assert all(float(jnp.abs(ad['b']).max()) > 0 for ad in jax.tree.leaves(first, is_leaf=lambda x: 'b' in x))
  for path in lora.adapter_paths(second):
    ad = lora.lookup(second, path)
    for name in ('a', 'b'):
      g = np.asarray(ad[name])
      per_layer = np.abs(g.reshape(g.shape[0], -1)).max(-1) if path[0] == 'blocks' else [np.abs(g).max()]
      assert min(per_layer) > 0, (path, name)
  assert 'LoRA params (rank 4' in built.description


@pytest.mark.slow
def test_lora_run_resumes_bitwise_without_saving_the_base(tmp_path):
  overrides = {'lora.rank': 4, 'lora.alpha': 8.0, 'train.steps': 6, 'checkpoint.every': 3, 'train.eval_every': 0,
               'optim.lr': 3e-2}
  workdir = str(tmp_path / 'run')
  first = train.run(tiny_config(**overrides), workdir)
  assert first.losses[6] < first.losses[1]
  saved = os.path.join(workdir, 'checkpoints', '6', 'state')
  assert not any('frozen' in name for _, dirs, files in os.walk(saved) for name in dirs + files)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  again = train.run(tiny_config(**overrides), workdir)
  assert again.start_step == 3
  assert [again.losses[k] for k in (4, 5, 6)] == [first.losses[k] for k in (4, 5, 6)]
  assert again.eval == first.eval


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_qlora_trains_adapters_over_a_quantized_base(kind):
  config = tiny_config(**{'lora.rank': 4, 'lora.quantize': kind, 'model.vocab_size': 64})
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1}, jax.devices()[:2])
  mc = models.model_config(config.model, 64)
  tx = optax.adam(1e-2)
  with jax.set_mesh(mesh):
    built = state.build(config, mc, tx, mesh)
    step = jax.jit(steps.make_train_step(train.make_loss_fn(built.graphdef, 0.0), tx,
                                         param_transform=built.transform))
    s = built.create()
    q = s['frozen']['blocks']['attn']['q']
    assert type(q).__name__ == 'Quantized' and q.kind == kind
    assert s['frozen']['embed'].dtype == jnp.float32  # embeddings, norms and head stay full precision
    codes = np.asarray(q.codes)
    batch = sharding.to_global(packed_batch([[20, 12], [32]], 32), mesh)
    losses = []
    for _ in range(6):
      s, m = step(s, batch)
      losses.append(float(m['loss']))
  assert np.array_equal(codes, np.asarray(s['frozen']['blocks']['attn']['q'].codes))
  assert losses[-1] < losses[0] - 0.05, losses
  assert kind in built.description


@pytest.mark.slow
def test_qlora_run_exports_merged_into_the_unquantized_base(tmp_path):
  """A QLoRA run exported to transformers (adapters merged into the original float base) and to PEFT (loaded
  over that base) gives the logits of base + adapters; the quantized base would differ."""
  import torch
  import transformers
  from peft import PeftModel

  from jaxtrain import data
  from jaxtrain.hf import weights as hf_weights
  from jaxtrain.train import export

  overrides = {'lora.rank': 4, 'lora.quantize': 'nf4', 'lora.targets': ALL, 'train.steps': 3, 'optim.lr': 5e-2,
               'optim.warmup_steps': 0, 'train.eval_every': 0, 'checkpoint.every': 0}
  config = tiny_config(**overrides)
  workdir = str(tmp_path / 'run')
  train.run(config, workdir)
  export.export(workdir, f'{tmp_path}/hf', fmt='hf')
  export.export(workdir, f'{tmp_path}/peft', fmt='peft')

  tok = data.load_tokenizer(config.data)
  mc = models.model_config(config.model, tok.vocab_size)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  restored = jax.tree.map(jnp.asarray, export.restore_state(workdir, 3))
  with jax.set_mesh(mesh):
    float_cfg = tiny_config(**dict(overrides, **{'lora.quantize': 'none'}))
    plain = state.build(float_cfg, mc, optax.adam(0.0), mesh)
    quantized = state.build(config, mc, optax.adam(0.0), mesh)
  tokens = np.random.default_rng(0).integers(1, tok.vocab_size, (2, 24)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.tile(np.arange(24), (2, 1))}
  with jax.set_mesh(mesh):
    full = plain.complete(restored)
    expected = np.asarray(models.apply(plain.graphdef, plain.transform(full['params'], full['frozen'], None), batch))
    q = quantized.complete(restored)
    through_quantized = np.asarray(models.apply(quantized.graphdef, quantized.transform(q['params'], q['frozen'], None),
                                                batch))
  assert np.abs(through_quantized - expected).max() > 1e-3  # NF4 rounding is visible at this size

  def torch_logits(model):
    with torch.no_grad():
      return model(torch.tensor(tokens, dtype=torch.long)).logits[..., :mc.vocab_size].numpy()

  merged = transformers.AutoModelForCausalLM.from_pretrained(f'{tmp_path}/hf', dtype=torch.float32)
  assert np.abs(torch_logits(merged) - expected).max() < 1e-4
  hf_weights.save(jax.device_get(full['frozen']), mc, tok, f'{tmp_path}/base')
  base = transformers.AutoModelForCausalLM.from_pretrained(f'{tmp_path}/base', dtype=torch.float32)
  with_adapter = PeftModel.from_pretrained(base, f'{tmp_path}/peft')
  assert np.abs(torch_logits(with_adapter) - expected).max() < 1e-4
  # The PEFT dir is also a starting point: init.lora_from takes its rank and alpha and its values.
  again = tiny_config(**dict(overrides, **{'lora.quantize': 'none', 'lora.rank': 0, 'lora.alpha': 1.0,
                                           'init.lora_from': f'{tmp_path}/peft'}))
  with jax.set_mesh(mesh):
    resumed = state.build(again, mc, optax.adam(0.0), mesh)
    start = resumed.create()
  assert resumed.description == plain.description
  for a, b in zip(jax.tree.leaves(start['params']), jax.tree.leaves(restored['params']), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
