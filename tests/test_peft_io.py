"""PEFT adapter dirs <-> jaxtrain adapters: the same logits both ways, and one-line errors for what cannot map."""

import copy
import json
import os
import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
  Qwen2ForCausalLM  # noqa: E402

from jaxtrain.config import defaults  # noqa: E402
from jaxtrain.adapters import lora  # noqa: E402
from jaxtrain import models  # noqa: E402
from jaxtrain.hf import config as hf_config, peft as peft_io, weights as hf_weights  # noqa: E402

TOL = 1e-4
ALL = r'attn/(q|k|v|o)$|mlp/(gate|up|down)$|^lm_head$'
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, tie_word_embeddings=False)


class Base:
  """A tiny Hugging Face model saved to disk and the same model in jaxtrain (through hf_weights.load_params)."""

  def __init__(self, model, root):
    self.torch = model.eval()
    self.dir = str(root)
    model.save_pretrained(self.dir)
    self.mc = hf_config.model_config(self.dir)
    self.graphdef, _, self.shapes = models.describe(self.mc, models.Execution(compute_dtype='float32'))
    self.params = hf_weights.load_params(self.dir, self.mc)
    self.type = model.config.model_type
    tokens = np.random.default_rng(0).integers(0, 128, (2, 12))
    self.tokens = tokens
    self.batch = {'tokens': tokens.astype(np.int32), 'segment_ids': np.ones_like(tokens, np.int32),
                  'positions': np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)}

  def jax_logits(self, adapters, scale):
    return np.asarray(models.apply(self.graphdef, lora.apply(self.params, adapters, scale, 'factored'), self.batch))

  def torch_logits(self, model):
    with torch.no_grad():
      return model(torch.from_numpy(self.tokens)).logits.numpy()


def check(base, got, want):
  """Logits agree within TOL, and the adapters changed them by far more than that."""
  err, effect = float(np.max(np.abs(got - want))), float(np.max(np.abs(want - base.jax_logits({}, 1.0))))
  print(f'{base.type}: max |logit difference| {err:.1e}, adapter effect {effect:.2f}')
  assert err < TOL and effect > 100 * TOL, (err, effect)


def _make(cls, config, root, seed=0):
  torch.manual_seed(seed)
  model = cls(config)
  with torch.no_grad():  # transformers starts biases at zero, which would hide a misplaced one
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.normal_(0.0, 0.1)
  return Base(model, root)


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  return _make(LlamaForCausalLM, LlamaConfig(**LLAMA), tmp_path_factory.mktemp('llama'))


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
  config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
  return _make(GPT2LMHeadModel, config, tmp_path_factory.mktemp('gpt2'))


def random_adapters(base, targets, rank, seed, ranks=None):
  """jaxtrain adapters with non-zero b (lora.init starts b at 0); `ranks` overrides the rank of some weights."""
  adapters = lora.init(base.shapes, targets, rank, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  out = {}
  for path in lora.adapter_paths(adapters):
    node = adapters
    for k in path:
      node = node[k]
    r = (ranks or {}).get('/'.join(path), rank)
    a = np.asarray(node['a'])[..., :r]
    b_shape = list(node['b'].shape)
    b_shape[1 if path[0] == 'blocks' else 0] = r
    out[path] = {'a': a, 'b': rng.normal(0, 0.2, b_shape).astype(np.float32)}
  return lora.unflatten(out)


def load_exactly(base, adapter_dir):
  """PeftModel over a copy of the base with the adapter; fails on missing keys or tensors PEFT has no place for."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    model = PeftModel.from_pretrained(copy.deepcopy(base.torch), adapter_dir).eval()
  assert not [w for w in caught if 'missing adapter keys' in str(w.message)]
  state = model.state_dict()
  stored = load_file(os.path.join(adapter_dir, peft_io.WEIGHTS_FILE))
  for key, value in stored.items():
    np.testing.assert_array_equal(state[key.replace('.weight', '.default.weight')].numpy(), value)
  assert sum('lora_A.default' in k for k in state) == sum('lora_A' in k for k in stored)
  return model


def test_jaxtrain_to_peft_llama_rslora(llama, tmp_path):
  # rsLoRA, every projection and the head, and one weight of another rank (written as rank/alpha_pattern).
  adapters = random_adapters(llama, ALL, 4, seed=1, ranks={'blocks/mlp/down': 2})
  scale = lora.scaling(8.0, 4, rslora=True)
  out = str(tmp_path / 'ad')
  peft_io.save_adapter_dir(adapters, out, rank=4, alpha=8.0, rslora=True, dropout=0.05, model_type='llama',
                           base_model=llama.dir)
  with open(os.path.join(out, peft_io.CONFIG_FILE)) as f:
    config = json.load(f)
  assert config['rank_pattern'] == {'down_proj': 2} and config['use_rslora'] is True
  assert sorted(config['target_modules']) == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                                     'down_proj', 'lm_head'])
  want = llama.jax_logits(adapters, scale)
  got = llama.torch_logits(load_exactly(llama, out))
  check(llama, got, want)
  # And back: the same tensors, the same settings.
  again, settings = peft_io.load_adapters(out, llama.shapes, 'llama')
  assert jax.tree.all(jax.tree.map(np.array_equal, again, adapters))
  assert (settings['rank'], settings['alpha'], settings['rslora'], settings['dropout']) == (4, 8.0, True, 0.05)


def test_peft_to_jaxtrain_llama(llama, tmp_path):
  torch.manual_seed(3)
  config = LoraConfig(r=4, lora_alpha=16, target_modules=['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'],
                      rank_pattern={'o_proj': 2}, alpha_pattern={'o_proj': 3}, layers_to_transform=None,
                      init_lora_weights=False, task_type='CAUSAL_LM')
  model = get_peft_model(copy.deepcopy(llama.torch), config).eval()
  out = str(tmp_path / 'peft')
  model.save_pretrained(out)
  adapters, settings = peft_io.load_adapters(out, llama.shapes, 'llama')
  assert (settings['rank'], settings['alpha'], settings['rslora']) == (4, 16.0, False)
  adapted = {'/'.join(p) for p in lora.target_paths(llama.shapes, settings['targets'])}
  assert adapted == {'blocks/attn/q', 'blocks/attn/v', 'blocks/attn/o', 'blocks/mlp/up', 'blocks/mlp/down'}
  assert adapters['blocks']['attn']['o']['a'].shape == (2, 4, 8, 2)  # rank_pattern: o keeps rank 2
  want = llama.torch_logits(model)
  got = llama.jax_logits(adapters, lora.scaling(settings['alpha'], settings['rank'], settings['rslora']))
  check(llama, got, want)


def test_qwen2_with_bias_round_trip(tmp_path_factory, tmp_path):
  qwen = _make(Qwen2ForCausalLM, Qwen2Config(**LLAMA), tmp_path_factory.mktemp('qwen2'), seed=5)
  assert qwen.mc.qkv_bias
  adapters = random_adapters(qwen, r'attn/(q|k|v)$', 2, seed=6)
  out = str(tmp_path / 'qwen')
  peft_io.save_adapter_dir(adapters, out, rank=2, alpha=4.0, model_type='qwen2')
  got = qwen.torch_logits(load_exactly(qwen, out))
  want = qwen.jax_logits(adapters, 2.0)
  check(qwen, got, want)


def test_gpt2_independent_qkv_are_one_block_diagonal_c_attn(gpt2, tmp_path):
  adapters = random_adapters(gpt2, r'attn/(q|v|o)$|mlp/(up|down)$', 3, seed=7)
  out = str(tmp_path / 'gpt2')
  peft_io.save_adapter_dir(adapters, out, rank=3, alpha=6.0, model_type='gpt2')
  with open(os.path.join(out, peft_io.CONFIG_FILE)) as f:
    config = json.load(f)
  # q and v: rank 6 on c_attn, alpha doubled so the scale stays 6/3.
  assert config['rank_pattern'] == {'c_attn': 6} and config['alpha_pattern'] == {'c_attn': 12.0}
  assert config['fan_in_fan_out'] is True
  got = gpt2.torch_logits(load_exactly(gpt2, out))
  want = gpt2.jax_logits(adapters, 2.0)
  check(gpt2, got, want)
  # Read back at the original ranks (the zero blocks are dropped), k stays unadapted.
  again, _ = peft_io.load_adapters(out, gpt2.shapes, 'gpt2')
  assert jax.tree.all(jax.tree.map(np.array_equal, again, adapters))


def test_peft_c_attn_to_jaxtrain(gpt2, tmp_path):
  torch.manual_seed(8)
  config = LoraConfig(r=4, lora_alpha=8, target_modules=['c_attn', 'c_proj', 'c_fc'], init_lora_weights=False,
                      fan_in_fan_out=True, task_type='CAUSAL_LM')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    model = get_peft_model(copy.deepcopy(gpt2.torch), config).eval()
  out = str(tmp_path / 'peft')
  model.save_pretrained(out)
  adapters, settings = peft_io.load_adapters(out, gpt2.shapes, 'gpt2')
  assert set(adapters['blocks']['attn']) == {'q', 'k', 'v', 'o'} and set(adapters['blocks']['mlp']) == {'up', 'down'}
  got = gpt2.jax_logits(adapters, lora.scaling(settings['alpha'], settings['rank']))
  want = gpt2.torch_logits(model)
  check(gpt2, got, want)
  # q/k/v share `a`, so they are written back as the same rank-4 c_attn: the original file, tensor for tensor.
  back = str(tmp_path / 'back')
  peft_io.save_adapter_dir(adapters, back, rank=4, alpha=8.0, model_type='gpt2')
  original, again = (load_file(os.path.join(d, peft_io.WEIGHTS_FILE)) for d in (out, back))
  assert sorted(original) == sorted(again) and all(np.array_equal(original[k], again[k]) for k in original)


def test_save_adapters_from_a_run_config(llama, tmp_path):
  config = defaults.base_config()
  config.init.from_hf = llama.dir
  hf_config.apply_overrides(config)
  config.lora.rank, config.lora.alpha = 2, 4.0
  adapters = random_adapters(llama, config.lora.targets, 2, seed=9)
  peft_io.save_adapters(config, {'params': adapters, 'step': 0}, str(tmp_path / 'hf'))
  with open(tmp_path / 'hf' / peft_io.CONFIG_FILE) as f:
    assert json.load(f)['base_model_name_or_path'] == llama.dir
  got = llama.torch_logits(load_exactly(llama, str(tmp_path / 'hf')))
  check(llama, got, llama.jax_logits(adapters, 2.0))

  config.init.from_hf = ''  # a base jaxtrain initialised: no Hugging Face name to record
  peft_io.save_adapters(config, {'params': adapters}, str(tmp_path / 'own'))
  with open(tmp_path / 'own' / peft_io.CONFIG_FILE) as f:
    assert json.load(f)['base_model_name_or_path'] is None
  config.lora.rank = 0
  with pytest.raises(peft_io.PeftError, match='no LoRA adapters'):
    peft_io.save_adapters(config, {'params': adapters}, str(tmp_path / 'none'))


@pytest.fixture(scope='module')
def saved(llama, tmp_path_factory):
  """A valid adapter dir (jaxtrain-written) to break in the error tests."""
  out = str(tmp_path_factory.mktemp('valid') / 'ad')
  peft_io.save_adapter_dir(random_adapters(llama, r'attn/(q|o)$', 2, seed=2), out, rank=2, alpha=2.0)
  return out


def _copy(src, dst, config=None, tensors=None):
  os.makedirs(dst)
  with open(os.path.join(src, peft_io.CONFIG_FILE)) as f:
    c = json.load(f)
  c.update(config or {})
  with open(os.path.join(dst, peft_io.CONFIG_FILE), 'w') as f:
    json.dump(c, f)
  t = load_file(os.path.join(src, peft_io.WEIGHTS_FILE))
  save_file(tensors(t) if tensors else t, os.path.join(dst, peft_io.WEIGHTS_FILE))
  return str(dst)


Q0 = 'base_model.model.model.layers.0.self_attn.q_proj'


@pytest.mark.parametrize('config,tensors,message', [
    ({'peft_type': 'IA3'}, None, "peft_type='IA3'; jaxtrain reads LORA adapters only"),
    ({'use_dora': True}, None, 'DoRA'),
    ({'bias': 'all'}, None, "bias='all'"),
    ({'modules_to_save': ['lm_head']}, None, 'modules_to_save'),
    ({}, lambda t: {**t, 'base_model.model.model.layers.0.self_attn.rotary.lora_A.weight': t[f'{Q0}.lora_A.weight'],
                    'base_model.model.model.layers.0.self_attn.rotary.lora_B.weight': t[f'{Q0}.lora_B.weight']},
     'module model.layers.0.self_attn.rotary is not one jaxtrain can adapt'),
    ({}, lambda t: {**t, f'{Q0}.lora_A.weight': np.zeros((2, 48), np.float32)},
     f'{Q0}.lora_A.weight has shape (2, 48), expected (2, 32) for blocks/attn/q of shape (2, 32, 4, 8)'),
    ({}, lambda t: {**t, Q0.replace('layers.0', 'layers.5') + '.lora_A.weight': t[f'{Q0}.lora_A.weight'],
                    Q0.replace('layers.0', 'layers.5') + '.lora_B.weight': t[f'{Q0}.lora_B.weight']},
     'layer 5 does not exist; the base model has 2 layers'),
    ({'rank_pattern': {'layers.0.self_attn.q_proj': 1}}, None, 'expected (1, in) and (out, 1) for rank r=1'),
    ({'alpha_pattern': {'layers.0.self_attn.q_proj': 1}}, None, 'differs between the layers of blocks/attn/q'),
    ({}, lambda t: {k: v for k, v in t.items() if k != f'{Q0}.lora_B.weight'}, 'has lora_A but no lora_B'),
])
def test_errors(llama, saved, tmp_path, config, tensors, message):
  bad = _copy(saved, tmp_path / 'bad', config, tensors)
  with pytest.raises(peft_io.PeftError) as e:
    peft_io.load_adapters(bad, llama.shapes, 'llama')
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_missing_files_and_wrong_family(llama, saved, tmp_path):
  with pytest.raises(peft_io.PeftError, match='does not exist'):
    peft_io.load_adapters(str(tmp_path / 'nope'), llama.shapes)
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(peft_io.PeftError, match='no adapter_config.json'):
    peft_io.load_adapters(str(tmp_path / 'empty'), llama.shapes)
  only_config = _copy(saved, tmp_path / 'bin')
  os.rename(os.path.join(only_config, peft_io.WEIGHTS_FILE), os.path.join(only_config, 'adapter_model.bin'))
  with pytest.raises(peft_io.PeftError, match='safe_serialization=True'):
    peft_io.load_adapters(only_config, llama.shapes)
  with pytest.raises(peft_io.PeftError, match="not one jaxtrain can adapt for model_type='gpt2'"):
    peft_io.load_adapters(saved, llama.shapes, 'gpt2')
  with pytest.raises(peft_io.PeftError, match="model_type='gemma' has no PEFT module mapping"):
    peft_io.load_adapters(saved, llama.shapes, 'gemma')
  tied = models.describe(hf_config.model_config(llama.dir, tie_embeddings=True))[2]
  head = str(tmp_path / 'head')
  peft_io.save_adapter_dir(random_adapters(llama, r'^lm_head$', 2, seed=4), head, rank=2, alpha=2.0)
  with pytest.raises(peft_io.PeftError, match='tied embeddings have no lm_head'):
    peft_io.load_adapters(head, tied)
