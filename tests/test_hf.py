"""Hugging Face import/export: logits equal transformers' (float32) for every supported family, both ways;
clear errors for checkpoints jaxtrain cannot read; the export command end to end.

Run with `-s` to see the parity table (max |logit diff| per architecture)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxtrain.config import resolve, validate as config_lib  # noqa: E402
from jaxtrain.errors import ConfigError  # noqa: E402
from jaxtrain.hf import config as hf_config, weights as hf_weights  # noqa: E402
from jaxtrain.train import export  # noqa: E402
from jaxtrain import models  # noqa: E402
from jaxtrain.config.defaults import base_config  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny  # noqa: E402

T = 16  # sequence length: longer than the sliding window and the attention block below
TOL = 1e-4
PARITY: dict[str, float] = {}  # architecture -> measured max |logit diff|, printed by the last test
LLAMA3 = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 4.0, 'original_max_position_embeddings': 8}  # 8 < T: the scaling matters
LAYERS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def tokens(vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (2, T)).astype(np.int32)


def jax_logits(mc: models.ModelConfig, params: dict, tok: np.ndarray, block: int = 0) -> np.ndarray:
  """Float32 logits through XLA's attention (in causal blocks of `block`; 0: one call)."""
  graphdef, _, _ = models.describe(mc, models.Execution(attention_block=block, compute_dtype='float32'))
  batch = {'tokens': tok, 'segment_ids': np.ones_like(tok), 'positions': np.tile(np.arange(T, dtype=np.int32), (2, 1))}
  return np.asarray(jax.jit(lambda p, b: models.apply(graphdef, p, b))(params, batch))


def torch_logits(model, tok: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tok, dtype=torch.long)).logits.float().numpy()


def flat(tree: dict) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_hf(config_cls, model_cls, path: str, shard: str | None = None, **kw):
  """A random float32 transformers model saved to `path`, every weight (biases and norm scales too) moved
  off its initial value so a misplaced one shows in the logits."""
  torch.manual_seed(0)
  model = model_cls(config_cls(**kw)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, **({'max_shard_size': shard} if shard else {}))
  return model


# name: (config class, model class, config kwargs, max_shard_size, attention_block)
IMPORTS = {
    'llama (tied, GQA, rope_theta 5e5, llama3 rope scaling, sharded)': (
        'LlamaConfig', 'LlamaForCausalLM',
        dict(LAYERS, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
             rope_parameters=LLAMA3), '60KB', 0),
    'llama (untied, MHA, linear rope scaling, attention_block 4)': (
        'LlamaConfig', 'LlamaForCausalLM',
        dict(LAYERS, num_key_value_heads=4, tie_word_embeddings=False,
             rope_parameters={'rope_type': 'linear', 'rope_theta': 500000.0, 'factor': 2.0}), None, 4),
    'mistral (sliding window 5 < 16 tokens)': (
        'MistralConfig', 'MistralForCausalLM', dict(LAYERS, num_key_value_heads=2, sliding_window=5), None, 0),
    'mistral (sliding window 5, attention_block 4)': (
        'MistralConfig', 'MistralForCausalLM', dict(LAYERS, num_key_value_heads=2, sliding_window=5), None, 4),
    'qwen2 (q/k/v bias, GQA)': ('Qwen2Config', 'Qwen2ForCausalLM', dict(LAYERS, num_key_value_heads=2), None, 0),
    'qwen3 (q/k norm, head_dim 24 != 64/4)': (
        'Qwen3Config', 'Qwen3ForCausalLM', dict(LAYERS, num_key_value_heads=2, head_dim=24), None, 0),
    'gpt2 (LayerNorm, learned positions, gelu_new, fused c_attn)': (
        'GPT2Config', 'GPT2LMHeadModel',
        dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0),
        '60KB', 0),
}


@pytest.mark.parametrize('name', list(IMPORTS))
def test_import_matches_transformers(name, tmp_path):
  config_cls, model_cls, kw, shard, block = IMPORTS[name]
  model = random_hf(getattr(transformers, config_cls), getattr(transformers, model_cls), str(tmp_path), shard, **kw)
  if shard:
    assert os.path.exists(tmp_path / hf_weights.INDEX) and len(hf_weights.safetensors_files(str(tmp_path))) >= 2
  mc = hf_config.model_config(str(tmp_path))
  params = hf_weights.load_params(str(tmp_path), mc)
  assert jax.tree.structure(params) == jax.tree.structure(models.init_params(mc, jax.random.PRNGKey(0)))
  tok = tokens(mc.vocab_size)
  ours, ref = jax_logits(mc, params, tok, block), torch_logits(model, tok)
  diff = float(np.abs(ours - ref).max())
  PARITY[f'import {name}'] = diff
  print(f'\nimport {name}: max |logit diff| {diff:.2e}')
  assert diff <= TOL
  if mc.sliding_window or mc.rope_scaling != 'none':  # the feature is live at this length: without it, logits move
    plain = dataclasses.replace(mc, sliding_window=0, rope_scaling='none')
    assert np.abs(jax_logits(plain, params, tok, block) - ref).max() > 100 * TOL


# name: (jaxtrain ModelConfig, expected transformers class)
EXPORTS = {
    'llama (tied, GQA) + tokenizer': (tiny(), 'LlamaForCausalLM'),
    'llama (untied, llama3 rope scaling)': (
        tiny(tie_embeddings=False, rope_scaling='llama3', rope_original_max_positions=8, rope_theta=500000.0),
        'LlamaForCausalLM'),
    'llama (attention + mlp biases)': (tiny(attn_out_bias=True, mlp_bias=True), 'LlamaForCausalLM'),
    'qwen2 (q/k/v bias)': (tiny(qkv_bias=True), 'Qwen2ForCausalLM'),
    'qwen3 (q/k norm)': (tiny(qk_norm=True, head_dim=12), 'Qwen3ForCausalLM'),
    'mistral (sliding window 5)': (tiny(sliding_window=5), 'MistralForCausalLM'),
    'gpt2': (tiny(norm='layernorm', positions='learned', max_positions=32, mlp='gelu_tanh', num_kv_heads=4,
                  qkv_bias=True, attn_out_bias=True, mlp_bias=True), 'GPT2LMHeadModel'),
}


@pytest.fixture(scope='module')
def bpe():
  from jaxtrain.data import tokenizer as tokenizer_lib
  from jaxtrain.data.tokenizer import Tokenizer
  backend = tokenizer_lib.build_bpe(iter(['def f(x):\n    return x + 1\n' * 50, 'hello world ' * 50]), 300)
  return Tokenizer(backend, eos_id=backend.token_to_id(tokenizer_lib.EOS), path='<built in test>')


@pytest.mark.parametrize('name', list(EXPORTS))
def test_export_loads_in_transformers_with_equal_logits(name, tmp_path, bpe):
  mc, architecture = EXPORTS[name]
  mc = dataclasses.replace(mc, vocab_size=384)  # room for the 300-token tokenizer
  params = models.init_params(mc, jax.random.PRNGKey(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)  # norms, biases too
  out = str(tmp_path / 'hf')
  tokenizer = bpe if 'tokenizer' in name else None
  files = hf_weights.save(params, mc, tokenizer, out, max_shard_bytes=20_000)
  assert len(files) >= 2 and os.path.exists(os.path.join(out, hf_weights.INDEX))
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == architecture
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  tok = tokens(mc.vocab_size, seed=1)
  diff = float(np.abs(jax_logits(mc, params, tok) - torch_logits(model.eval(), tok)).max())
  PARITY[f'export {name}'] = diff
  print(f'\nexport {name}: max |logit diff| {diff:.2e}')
  assert diff <= TOL
  # and back: the directory imports to the same parameters (plus zero biases where the class has them)
  back = flat(hf_weights.load_params(out, hf_config.model_config(out)))
  for path, value in flat(params).items():
    np.testing.assert_array_equal(back.pop(path), value)
  assert all(not np.any(v) for v in back.values()), list(back)
  if tokenizer is not None:
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    text = 'def f(x):\n    return x + 1\nhello world'
    assert loaded.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert loaded.eos_token_id == bpe.eos_id
    with open(os.path.join(out, 'config.json')) as f:
      assert json.load(f)['eos_token_id'] == bpe.eos_id


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_stackwise_clm_rack_exports_as_the_decoder_it_computes(name, tmp_path):
  # A causal rack of 3 stacks (`jaxtrain export` of a StackWise clm run): its stacks concatenated into one
  # decoder, written through the same `hf_weights.save`, give the rack's own logits in transformers.
  from jaxtrain.models import rack
  from jaxtrain.stackwise import inference, objectives
  mc, architecture = EXPORTS['llama (untied, llama3 rope scaling)' if name == 'llama' else 'gpt2']
  rc = rack.RackConfig(dataclasses.replace(mc, num_layers=1, vocab_size=256), 3)
  params = rack.init_params(rc, jax.random.PRNGKey(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)  # norms, biases too
  r = inference.Rack(rack.describe(rc), objectives.Objective('clm'), (0, 1, 2), params)
  tok = tokens(256, seed=3)
  batch = {'tokens': tok, 'segment_ids': np.ones_like(tok), 'positions': np.tile(np.arange(T, dtype=np.int32), (2, 1))}
  ours = np.asarray(jax.jit(lambda p: rack.forward(r.rd, p, batch, r.order))(params))
  out = str(tmp_path / 'hf')
  hf_weights.save(*inference.transformer(r), None, out)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(model).__name__ == architecture and model.config.num_hidden_layers == 3
  assert not any(info.values()), info
  diff = float(np.abs(ours - torch_logits(model.eval(), tok)).max())
  PARITY[f'export a StackWise clm rack of 3 stacks as {architecture}'] = diff
  assert diff <= TOL


def test_half_precision_checkpoints(tmp_path):
  """bfloat16 export and float16 checkpoints read back exactly (bf16 safetensors need ml_dtypes, not torch)."""
  mc = tiny()
  params = models.init_params(mc, jax.random.PRNGKey(3))
  hf_weights.save(params, mc, None, str(tmp_path / 'bf16'), dtype='bfloat16')
  with open(tmp_path / 'bf16' / 'config.json') as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  back = hf_weights.load_params(str(tmp_path / 'bf16'), mc)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(b).astype(jax.numpy.bfloat16).astype(np.float32))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'bf16'))
  model.half().save_pretrained(str(tmp_path / 'f16'))
  f16 = hf_weights.load_params(str(tmp_path / 'f16'), dataclasses.replace(mc, param_dtype='bfloat16'))
  assert f16['embed'].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(f16['embed'], np.float32),
                                model.model.embed_tokens.weight.detach().float().numpy().astype(jax.numpy.bfloat16))


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('llama'))
  random_hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, path, **dict(LAYERS, num_key_value_heads=2))
  return path


def edited_copy(src: str, dst, edit) -> str:
  """A copy of a single-file checkpoint whose tensors dict went through `edit`."""
  shutil.copytree(src, dst)
  tensors = safetensors.numpy.load_file(os.path.join(dst, 'model.safetensors'))
  edit(tensors)
  safetensors.numpy.save_file(tensors, os.path.join(dst, 'model.safetensors'))
  return str(dst)


def test_load_params_places_each_parameter_with_its_sharding(llama_dir):
  from jaxtrain import sharding
  mc = hf_config.model_config(llama_dir)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  _, specs, shapes = models.describe(mc)
  target = sharding.param_shardings(specs, shapes, mesh)
  placed = hf_weights.load_params(llama_dir, mc, target)
  plain = hf_weights.load_params(llama_dir, mc)
  for a, b, sh in zip(jax.tree.leaves(placed), jax.tree.leaves(plain), jax.tree.leaves(target), strict=True):
    assert a.sharding == sh
    np.testing.assert_array_equal(a, b)
  assert placed['blocks']['mlp']['up'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')


def test_unsupported_model_type(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  with pytest.raises(hf_config.HfError, match=r"model_type 'bert' is not supported; supported: llama, mistral, qwen2"):
    hf_config.model_overrides(str(tmp_path))


def test_unsupported_config_features(llama_dir, tmp_path):
  config = json.load(open(os.path.join(llama_dir, 'config.json')))
  for i, (change, needle) in enumerate([
      ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}}, "rope type 'yarn'"),
      ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
      ({'model_type': 'mistral', 'attention_bias': True}, 'attention_bias=true is not part of mistral'),
      ({'model_type': 'qwen2', 'use_sliding_window': True, 'sliding_window': 4, 'max_window_layers': 1},
       'mixing sliding and full attention')]):
    path = tmp_path / str(i)
    path.mkdir()
    (path / 'config.json').write_text(json.dumps({**config, **change}))
    with pytest.raises(hf_config.HfError, match=needle):
      hf_config.model_overrides(str(path))


@pytest.mark.parametrize('edit, needle', [
    (lambda t: t.pop('model.layers.1.mlp.up_proj.weight'),
     r'missing tensor model.layers.1.mlp.up_proj.weight, expected shape \[128, 64\]'),
    (lambda t: t.update({'model.layers.0.self_attn.k_proj.weight': np.zeros((64, 64), np.float32)}),
     r'model.layers.0.self_attn.k_proj.weight has shape \[64, 64\], expected \[32, 64\]'),
    (lambda t: t.update({'model.layers.0.self_attn.extra.weight': np.zeros((3,), np.float32)}),
     r'unknown tensor model.layers.0.self_attn.extra.weight \[3\]'),
], ids=['missing', 'misshaped', 'unknown'])
def test_bad_tensors_fail_before_loading(llama_dir, tmp_path, edit, needle):
  path = edited_copy(llama_dir, tmp_path / 'bad', edit)
  mc = hf_config.model_config(path)
  with pytest.raises(hf_config.HfError, match=needle):
    hf_weights.check_weights(path, mc)
  with pytest.raises(hf_config.HfError, match=needle):
    hf_weights.load_params(path, mc)


def test_untied_model_needs_its_head(llama_dir, tmp_path):
  path = edited_copy(llama_dir, tmp_path / 'headless', lambda t: t.pop('lm_head.weight'))  # config: untied
  with pytest.raises(hf_config.HfError, match=r'missing tensor lm_head.weight, expected shape \[256, 64\].*tie_word'):
    hf_weights.check_weights(path, hf_config.model_config(path))


def test_unrepresentable_export(tmp_path):
  mc = tiny(sliding_window=4, mlp_bias=True)
  with pytest.raises(hf_config.HfError, match='Mistral has no biases'):
    hf_weights.save(models.init_params(mc, jax.random.PRNGKey(0)), mc, None, str(tmp_path / 'x'))


def test_init_from_hf_sets_the_architecture(llama_dir, tmp_path):
  cfg = base_config()
  cfg.init.from_hf = llama_dir
  out = resolve.resolved(cfg)
  assert (out.model.d_model, out.model.num_kv_heads, out.model.vocab_size, out.model.tie_embeddings) == (64, 2, 256,
                                                                                                          False)
  cfg.init.from_hf = str(tmp_path / 'nope')
  with pytest.raises(ConfigError, match='init.from_hf'):
    resolve.resolved(cfg)
  cfg.init.from_hf = edited_copy(llama_dir, tmp_path / 'bad', lambda t: t.pop('model.norm.weight'))
  with pytest.raises(ConfigError, match=r'init.from_hf=.*missing tensor model.norm.weight'):
    resolve.resolved(cfg)  # from the headers, before a workdir or a weight is touched


def test_prepare_from_hf_leaves_its_input_alone(llama_dir, tmp_path):
  cfg = base_config()
  cfg.init.from_hf = llama_dir
  cfg.lock()
  before = cfg.to_dict()
  out = config_lib.prepare(cfg, str(tmp_path / 'w'))
  assert cfg.to_dict() == before  # validation never writes into the config it checks
  assert out.model.d_model == 64 and out.is_locked and out is not cfg
  assert config_lib.prepare(out, str(tmp_path / 'w')).to_dict() == out.to_dict()  # idempotent


# ----------------------------------------------------------------------------- the export command


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from jaxtrain.train import loop as train
  from tests.test_train import tiny_config
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(**{'train.steps': 2, 'train.eval_every': 0, 'train.eval_batches': 1, 'checkpoint.every': 0,
                          'optim.warmup_steps': 1, 'log.plot': False})
  train.run(config, workdir)
  return workdir, config


@pytest.mark.slow
def test_export_command_round_trip(trained, tmp_path):
  workdir, config = trained
  out = str(tmp_path / 'hf')
  proc = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'export', f'--workdir={workdir}', f'--out={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'as LlamaForCausalLM' in proc.stdout
  state = export.restore_state(workdir, 2)
  params = export.model_params_for_export(config, state)
  mc = models.model_config(config.model, params['embed'].shape[0])
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tok = tokens(mc.vocab_size, seed=2)
  diff = float(np.abs(jax_logits(mc, params, tok) - torch_logits(model, tok)).max())
  PARITY['export command (configs/tiny.py, 2 steps)'] = diff
  assert diff <= TOL
  from jaxtrain import data
  text = 'import os\nprint(os.getcwd())'
  assert transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == \
      data.load_tokenizer(config.data).encode(text)
  # user mistakes, in-process: an output dir that is not empty, a step that does not exist
  with pytest.raises(export.ExportError, match='exists and is not an empty directory'):
    export.export(workdir, out)
  with pytest.raises(export.ExportError, match='--step=7: no such checkpoint .* available: 2'):
    export.export(workdir, str(tmp_path / 'other'), step=7)


@pytest.mark.slow
def test_sample_command_on_a_plain_run_is_the_models_greedy_continuation(trained, capsys):
  # `jaxtrain generate` reads a plain run too (its decoder as a causal rack of one stack): greedy KV-cache
  # decoding equals the argmax continuation recomputed from the Transformer's own logits.
  import jax.numpy as jnp
  from jaxtrain import cli, data
  workdir, config = trained
  capsys.readouterr()
  cli.main(['jaxtrain', 'generate', f'--workdir={workdir}', '--prompt=import os', '--max_tokens=5', '--nostop_at_eos',
            '--format=jsonl'])
  rec = json.loads(capsys.readouterr().out)
  assert rec['prompt_ids'] == data.load_tokenizer(config.data).encode('import os') and len(rec['ids']) == 5
  params = export.model_params_for_export(config, export.restore_state(workdir, 2))
  mc = models.model_config(config.model, params['embed'].shape[0])
  graphdef = models.describe(mc)[0]
  size = len(rec['prompt_ids']) + 5
  batch = {'segment_ids': jnp.ones((1, size), jnp.int32), 'positions': jnp.arange(size)[None]}
  logits = jax.jit(lambda p, tokens: models.apply(graphdef, p, dict(batch, tokens=tokens))[0])
  seq = rec['prompt_ids'] + [0] * 5
  for j in range(len(rec['prompt_ids']), size):  # causal: the zeros after j cannot change logits at j - 1
    seq[j] = int(np.argmax(logits(params, jnp.asarray([seq]))[j - 1]))
  assert rec['ids'] == seq[-5:]


def test_export_command_missing_workdir(tmp_path):
  missing = str(tmp_path / 'no-such-run')
  proc = subprocess.run([sys.executable, '-m', 'jaxtrain.cli', 'export', f'--workdir={missing}', f'--out={tmp_path}/o'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == f'error: --workdir={missing} does not exist'
  assert not os.path.exists(tmp_path / 'o')


def test_parity_table():
  """Prints the measured max |logit diff| per architecture (run with -s); every entry is within TOL."""
  if not PARITY:
    pytest.skip('run with the parity tests')
  print('\n| case | max abs logit diff vs transformers (float32) |\n|---|---|')
  for name, diff in PARITY.items():
    print(f'| {name} | {diff:.1e} |')
  assert max(PARITY.values()) <= TOL
