"""Adapter merging agrees with PEFT's add_weighted_adapter (linear, ties, dare_linear, dare_ties), factor by factor."""

import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, merge_utils  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from jaxtrain import cli  # noqa: E402
from jaxtrain.hf import merge as merge_adapters  # noqa: E402
from jaxtrain.hf import peft as peft_io  # noqa: E402

# Three adapters of one rank over different modules and layers, one with rsLoRA: the union of targets, the
# per-adapter scales and the skipped layers are all exercised.
ADAPTERS = {
    'a0': dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj', 'lm_head']),
    'a1': dict(r=4, lora_alpha=16, use_rslora=True, target_modules=['q_proj', 'k_proj', 'o_proj', 'gate_proj',
                                                                    'up_proj', 'down_proj']),
    'a2': dict(r=4, lora_alpha=4, target_modules=['q_proj', 'v_proj', 'up_proj'], layers_to_transform=[1]),
}
WEIGHTS = [0.7, -0.4, 0.5]
CASES = [('linear', None, 'total'), ('ties', 0.5, 'total'), ('ties', 0.3, 'frequency'),
         ('dare_linear', 0.6, 'total'), ('dare_ties', 0.5, 'total'), ('dare_ties', 0.4, 'frequency')]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('merge')
  torch.manual_seed(0)
  base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)).eval()
  base.save_pretrained(str(root / 'base'))
  dirs = {}
  for i, (name, kw) in enumerate(ADAPTERS.items()):
    torch.manual_seed(10 + i)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # PEFT notes that it saves the targeted lm_head's base weight
      model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, task_type='CAUSAL_LM', **kw))
      dirs[name] = str(root / name)
      model.save_pretrained(dirs[name])
  pm = PeftModel.from_pretrained(copy.deepcopy(base), dirs['a0'], adapter_name='a0')
  for name in ('a1', 'a2'):
    pm.load_adapter(dirs[name], adapter_name=name)
  read = [peft_io.read_adapter_dir(dirs[n]) for n in ADAPTERS]
  return dict(root=root, base=base, dirs=dirs, pm=pm, adapters=[a for a, _ in read],
              scales=[i['scales'] for _, i in read])


def peft_layout(tree, root, name):
  """{PEFT tensor key: array} of a jaxtrain adapter tree (through save_adapter_dir itself)."""
  out = str(root / name)
  peft_io.save_adapter_dir(tree, out, rank=4, alpha=4)
  return load_file(os.path.join(out, peft_io.WEIGHTS_FILE))


def peft_merge(s, method, density, sign, masks=None):
  """PEFT's combined factors, with DARE's random masks replaced by `masks` ({tensor key: keep mask})."""
  pm, name = s['pm'], f'{method}_{density}_{sign}'.replace('.', 'p')
  lookup = {}
  if masks is not None:
    for module_name, module in pm.named_modules():
      for i, adapter in enumerate(ADAPTERS):
        if hasattr(module, 'lora_A') and adapter in module.lora_A:
          for ab in 'AB':
            weight = getattr(module, f'lora_{ab}')[adapter].weight
            lookup[weight.data_ptr()] = torch.from_numpy(masks[i][f'{module_name}.lora_{ab}.weight'])

  def fixed_random_pruning(tensor, density, rescale):
    pruned = tensor * lookup[tensor.data_ptr()]
    return pruned / density if rescale else pruned

  original = merge_utils.random_pruning
  merge_utils.random_pruning = fixed_random_pruning
  try:
    pm.add_weighted_adapter(list(ADAPTERS), WEIGHTS, name, combination_type=method, density=density,
                            majority_sign_method=sign)
  finally:
    merge_utils.random_pruning = original
  return {k: v.numpy() for k, v in get_peft_model_state_dict(pm, adapter_name=name,
                                                                         save_embedding_layers=False).items()}


@pytest.mark.parametrize('method,density,sign', CASES)
def test_matches_peft_add_weighted_adapter(setup, method, density, sign):
  s = setup
  masks = peft_masks = None
  if method.startswith('dare'):
    masks = merge_adapters.dare_masks(s['adapters'], density, seed=1)
    peft_masks = [peft_layout(m, s['root'], f'mask{i}_{method}_{density}') for i, m in enumerate(masks)]
  ours = merge_adapters.combine(s['adapters'], s['scales'], WEIGHTS, method, density, sign, masks=masks)
  got = peft_layout(ours, s['root'], f'ours_{method}_{density}_{sign}')
  want = peft_merge(s, method, density, sign, peft_masks)
  assert sorted(got) == sorted(want)
  worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
  print(f'{method} {density} {sign}: max |ours - peft| = {worst:.2e}')
  assert worst < 1e-5, worst
  if method != 'linear':  # pruning really happened: some factor values are zero
    assert any(np.mean(want[k] == 0) > 0.2 for k in want)


def test_one_adapter_is_linear(setup):
  s = setup
  ties = merge_adapters.combine(s['adapters'][:1], s['scales'][:1], [2.0], 'ties', 0.1)
  linear = merge_adapters.combine(s['adapters'][:1], s['scales'][:1], [2.0], 'linear')
  for k in ('a', 'b'):
    np.testing.assert_array_equal(ties['lm_head'][k], linear['lm_head'][k])


def load_exactly(base, adapter_dir):
  """PeftModel over `base` with the adapter loaded; fails on missing keys or tensors PEFT has no place for."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
  assert not [w for w in caught if 'missing adapter keys' in str(w.message)]
  state = pm.state_dict()
  stored = load_file(os.path.join(adapter_dir, peft_io.WEIGHTS_FILE))
  for key, value in stored.items():
    np.testing.assert_array_equal(state[key.replace('.weight', '.default.weight')].numpy(), value)
  assert sum('lora_A.default' in k for k in state) == sum('lora_A' in k for k in stored)
  return pm


def merge_cli(argv):
  """`jaxtrain merge-adapters ARGV` in-process; its exit status (0 when it returns)."""
  try:
    cli.main(['jaxtrain', 'merge-adapters', *argv])
  except SystemExit as e:
    return e.code
  return 0


def test_cli_writes_a_dir_peft_loads(setup, tmp_path):
  s = setup
  out = tmp_path / 'merged'
  cmd = [sys.executable, '-m', 'jaxtrain.cli', 'merge-adapters', '--adapters', *s['dirs'].values(),
         '--weights', *map(str, WEIGHTS), '--method', 'dare_ties', '--density', '0.5', '--seed', '3',
         '--out', str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'rank-4 PEFT adapter' in done.stdout
  load_exactly(s['base'], str(out))
  # The seed names the merge: the same combine in-process gives the same tensors.
  again = merge_adapters.combine(s['adapters'], s['scales'], WEIGHTS, 'dare_ties', 0.5, seed=3)
  want = peft_layout(again, tmp_path, 'again')
  got = load_file(os.path.join(out, peft_io.WEIGHTS_FILE))
  assert all(np.array_equal(got[k], want[k]) for k in want) and sorted(got) == sorted(want)


def test_cli_base_writes_the_merged_model(setup, tmp_path):
  from transformers import AutoModelForCausalLM
  s = setup
  out = tmp_path / 'model'
  argv = ['--adapters', *s['dirs'].values(), '--weights', *map(str, WEIGHTS), '--method', 'ties', '--density', '0.5',
          '--out', str(out), '--base', str(s['root'] / 'base')]
  assert merge_cli(argv) == 0
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 128, (2, 10)))
  pm = s['pm']
  peft_merge(s, 'ties', 0.5, 'total')  # PEFT's merged adapter (alpha = r: scale 1, as ours) over the same base
  pm.set_adapter('ties_0p5_total')
  with torch.no_grad():
    want = pm(tokens).logits.numpy()
    got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(tokens).logits.numpy()
    plain = s['base'](tokens).logits.numpy()
  err = float(np.max(np.abs(got - want)))
  print(f'--base ties: max |logit difference| {err:.1e}, adapter effect {np.max(np.abs(want - plain)):.2f}')
  assert err < 1e-4 and np.max(np.abs(want - plain)) > 1e-2


@pytest.mark.parametrize('args,message', [
    (['--weights', '1'], '1 weights for 2 adapters'),
    (['--weights', '1', '1', '--method', 'average'], '--method=average: value should be one of'),
    (['--weights', '1', '1', '--method', 'ties', '--density', '1.5'], 'density=1.5: must be in (0, 1]'),
    (['--weights', '1', '1', '--method', 'dare_linear', '--density', '0'], 'density=0.0: must be in (0, 1]'),
    (['--weights', '1', '1', '--method', 'ties'], 'needs a density'),
    (['--weights', '1', '1', '--density', '0.5'], 'no effect with --method=linear'),
])
def test_cli_errors_are_one_line(setup, tmp_path, capsys, args, message):
  argv = ['--adapters', setup['dirs']['a0'], setup['dirs']['a1'], '--out', str(tmp_path / 'o'), *args]
  with pytest.raises(SystemExit) as e:
    sys.exit(merge_cli(argv))
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1 and message in err, err


def test_missing_adapter_dir(setup, tmp_path, capsys):
  argv = ['--adapters', setup['dirs']['a0'], str(tmp_path / 'nope'), '--weights', '1', '1', '--out',
          str(tmp_path / 'o')]
  assert merge_cli(argv) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'nope' in err and 'does not exist' in err, err


def test_different_ranks_are_refused(setup, tmp_path):
  s = setup
  small = {'lm_head': {k: v[..., :2] if k == 'a' else v[:2] for k, v in s['adapters'][0]['lm_head'].items()}}
  with pytest.raises(merge_adapters.MergeError, match=r'ranks \[2, 4\]'):
    merge_adapters.combine([small, s['adapters'][1]], [1.0, 1.0], [1, 1], 'linear')


def test_gpt2_fused_qkv_merges_linearly_only(tmp_path, capsys):
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32))
  dirs = []
  for i in range(2):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # PEFT sets fan_in_fan_out for Conv1D itself
      model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=['c_attn'], init_lora_weights=False))
    dirs.append(str(tmp_path / f'g{i}'))
    model.save_pretrained(dirs[-1])
  argv = [f'--adapters={",".join(dirs)}', '--weights=1,1', '--out']  # absl's comma-separated lists
  assert merge_cli(argv + [str(tmp_path / 'ties'), '--method', 'ties', '--density', '0.5']) == 2
  assert 'GPT-2 q/k/v adapters are one fused c_attn LoRA' in capsys.readouterr().err
  assert merge_cli(argv + [str(tmp_path / 'linear')]) == 0
  pm = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name='g0')
  pm.load_adapter(dirs[1], adapter_name='g1')
  pm.add_weighted_adapter(['g0', 'g1'], [1.0, 1.0], 'm', combination_type='linear')
  want = {k: v.numpy() for k, v in get_peft_model_state_dict(pm, adapter_name='m').items()}
  got = load_file(os.path.join(tmp_path / 'linear', peft_io.WEIGHTS_FILE))
  assert sorted(got) == sorted(want) and max(float(np.max(np.abs(got[k] - want[k]))) for k in want) < 1e-6
