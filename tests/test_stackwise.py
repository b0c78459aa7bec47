"""StackWise stages: the plan and its validation, what each stage trains, frozen prefixes that keep no
activations, LoRA / QLoRA / dual-LoRA trunks, the consistency loss and time-as-depth ratios."""

import pickle

import jax
import numpy as np
import optax
import pytest

from jaxtrain.config import validate as config_lib
from jaxtrain import sharding
from jaxtrain.stackwise import plan as stackwise
from jaxtrain.train import steps
from jaxtrain.stackwise.plan import initial_rack, rack_setup
from tests.helpers import packed_batch

TOKENIZER_VOCAB = 120  # the rack's vocabulary is 128: MASK = 120


def sw_config(**overrides):
  from configs import tiny
  c = tiny.get_config()
  c.model.num_layers, c.model.d_model, c.model.mlp_dim = 3, 32, 64
  c.stackwise.num_stacks = 3
  c.objective.kind = 'diffusion'
  c.train.steps = 6
  c.optim.warmup_steps = 1
  for key, value in overrides.items():
    section, name = key.split('__')
    c[section][name] = value
  return c


def batch(rows=8, seq=32, seed=0):
  b = packed_batch([[20, 12]] * rows, seq, vocab=TOKENIZER_VOCAB, seed=seed)
  b['doc_ids'] = np.where(b['segment_ids'] > 0, b['segment_ids'] + 2 * np.arange(rows)[:, None], -1).astype(np.int32)
  b['doc_chunks'] = np.full_like(b['tokens'], -1)
  return b


def stage_setup(config, index, mesh):
  rd, obj = rack_setup(config, TOKENIZER_VOCAB)
  stages = stackwise.plan(config)
  stage = stages[index]
  tx = optax.adamw(1e-2)
  host = initial_rack(rd, config.train.seed)
  built = stackwise.build_stage(config, rd, stage, host, tx, mesh)
  loss_fn = stackwise.make_loss_fn(config, rd, obj, stage, None)
  return rd, obj, stage, tx, host, built, loss_fn


def test_plan_orders_ratios_and_steps():
  c = sw_config()
  assert [s.order for s in stackwise.plan(c)] == [(0,), (0, 1), (0, 1, 2)]
  assert [s.steps for s in stackwise.plan(c)] == [2, 2, 2]
  c = sw_config(stackwise__direction='prepend', objective__time='depth', objective__depth_schedule=(1.0, 0.5, 0.2))
  plan = stackwise.plan(c)
  assert [s.order for s in plan] == [(2,), (1, 2), (0, 1, 2)]
  assert [s.ratio for s in plan] == [0.2, 0.5, 1.0]
  assert [s.trunk for s in plan] == [(), (2,), (1, 2)]
  joint = stackwise.plan(sw_config(stackwise__direction='joint'))
  assert len(joint) == 1 and joint[0].new == (0, 1, 2) and joint[0].steps == 6
  c = sw_config(stackwise__trunk='lora', stackwise__rank_schedule='increasing', stackwise__trunk_rank=2,
                stackwise__stack_rank=8)
  assert stackwise.plan(c)[2].trunk_ranks == {0: 2, 1: 4}
  assert stackwise.plan(c)[2].stack_rank == 24
  c = sw_config(stackwise__stage_steps=(1, 2, 3))
  assert [s.steps for s in stackwise.plan(c)] == [1, 2, 3]


@pytest.mark.parametrize('overrides, message', [
    ({'stackwise__stages': 4}, 'stages=4 is more than the 3 stacks'),
    ({'objective__time': 'depth', 'objective__depth_schedule': (1.0, 0.5)}, 'has 2 ratios for 3 stacks'),
    ({'stackwise__trunk': 'qlora', 'stackwise__quantize': 'none'}, 'qlora needs a quantizer'),
    ({'stackwise__direction': 'prepend', 'objective__kind': 'clm'}, 'prepend with objective.kind=clm is undefined'),
    ({'stackwise__trunk': 'lora', 'stackwise__trunk_rank': 8, 'stackwise__stack_rank': 8},
     'dual LoRA needs trunk ranks below'),
    ({'stackwise__consistency': 0.1}, 'consistency=0.1 needs direction=prepend'),
    ({'model__num_layers': 4}, 'must be a multiple of stackwise.num_stacks=3'),
    ({'stackwise__rank_schedule': 'list', 'stackwise__trunk_ranks': (1, 2)}, 'needs one rank per stack'),
    ({'stackwise__stage_steps': (1, 2)}, 'give 3 positive step counts'),
])
def test_bad_settings_fail_validation_with_one_line(overrides, message, tmp_path):
  c = sw_config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.prepare(c, str(tmp_path / 'w'), 8)
  assert '\n' not in str(e.value)
  assert e.value.line() == str(e.value)  # what the CLI's error handler prints (it used to raise AttributeError)
  assert pickle.loads(pickle.dumps(e.value)).line() == e.value.line()


def test_stackwise_config_error_is_one_line_on_the_command_line(tmp_path, capsys):
  from jaxtrain import cli
  with pytest.raises(SystemExit) as e:
    cli.main(['jaxtrain', 'check', '--config=configs/tiny.py', '--config.stackwise.num_stacks=3',
              f'--workdir={tmp_path / "w"}'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: config.model.num_layers=2 ') and err.count('\n') == 1, err
  assert not (tmp_path / 'w').exists()


def test_masked_objective_needs_a_rack(tmp_path):
  c = sw_config(stackwise__num_stacks=0)
  with pytest.raises(config_lib.ConfigError, match='masked objectives train StackWise racks'):
    config_lib.prepare(c, str(tmp_path / 'w'), 8)


def run_steps(built, loss_fn, tx, mesh, n=3):
  step = jax.jit(steps.make_train_step(loss_fn, tx, param_transform=built.transform))
  state = built.create()
  history = []
  for i in range(n):
    state, m = step(state, sharding.to_global(batch(seed=i), mesh))
    history.append(jax.device_get(m))
  return state, history


def test_append_stage_trains_new_stack_and_head_only():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  c = sw_config()
  with jax.set_mesh(mesh):
    rd, obj, stage, tx, host, built, loss_fn = stage_setup(c, 2, mesh)
    assert stage.new == (2,) and stage.trunk == (0, 1)
    assert set(built.abstract['params']) == {'shared', 'stack'}
    # Tied (the tiny config): only the final norm; the embedding is the frozen trunk's input too.
    assert set(built.abstract['params']['shared']) == {'final_norm'}
    assert set(built.abstract['params']['stack']) == {'2'}
    state, history = run_steps(built, loss_fn, tx, mesh)
    assert all(np.isfinite(h['loss']) for h in history)
    assert history[-1]['masked_ce'] > 0  # extra loss sums are logged per token
    merged, changed = stackwise.merge_stage(c, stage, host, state['params'])
  assert changed == [2]
  for i in ('0', '1'):  # the trunk is bitwise what it was
    jax.tree.map(np.testing.assert_array_equal, merged['stacks'][i], host['stacks'][i])
  assert not np.array_equal(merged['stacks']['2']['blocks']['mlp']['up'], host['stacks']['2']['blocks']['mlp']['up'])
  np.testing.assert_array_equal(merged['shared']['embed'], host['shared']['embed'])
  untied = sw_config(model__tie_embeddings=False)
  rd, _ = rack_setup(untied, TOKENIZER_VOCAB)
  stage = stackwise.plan(untied)[1]
  assert stackwise.trained_shared(untied, stage, tuple(rd.shared_shapes)) == ('final_norm', 'lm_head')


def test_frozen_prefix_keeps_no_activations():
  """Temporary memory of an append stage with a frozen trunk stays flat as the trunk deepens, while training
  the same racks end to end grows with depth (XLA's compiled memory analysis)."""
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])

  def temp_bytes(direction, stacks, index):
    c = sw_config(model__num_layers=stacks, stackwise__num_stacks=stacks, stackwise__direction=direction,
                  model__d_model=64, model__mlp_dim=256, data__seq_len=128, train__steps=stacks)
    with jax.set_mesh(mesh):
      _, _, _, tx, _, built, loss_fn = stage_setup(c, index, mesh)
      step = jax.jit(steps.make_train_step(loss_fn, tx, param_transform=built.transform))
      b = jax.tree.map(lambda x: jax.ShapeDtypeStruct((8, 128), np.int32), batch(seq=128))
      abstract = dict(built.abstract, frozen=jax.eval_shape(lambda: built.create()['frozen']))
      return step.lower(abstract, b).compile().memory_analysis().temp_size_in_bytes

  # Four stacks show the trend as well as six did (measured: append 15.5 MB at 2, 4 and 6 stacks; joint 31,
  # 59 and 88 MB) and compile in two thirds of the time.
  shallow, deep = temp_bytes('append', 2, 1), temp_bytes('append', 4, 3)
  joint2, joint4 = temp_bytes('joint', 2, 0), temp_bytes('joint', 4, 0)
  assert deep < 1.15 * shallow, (shallow, deep)
  assert joint4 > 1.7 * joint2 and joint4 > 3 * deep, (joint2, joint4, deep)


def test_lora_trunk_adapters_all_learn_and_merge_into_the_trunk():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  c = sw_config(stackwise__trunk='lora', stackwise__trunk_rank=2)
  with jax.set_mesh(mesh):
    rd, obj, stage, tx, host, built, loss_fn = stage_setup(c, 2, mesh)
    assert set(built.abstract['params']['trunk']) == {'0', '1'}
    state, _ = run_steps(built, loss_fn, tx, mesh, n=2)
    grad_fn = jax.jit(steps.make_grad_fn(loss_fn, built.transform))
    grads, _ = grad_fn(state['params'], state['frozen'], sharding.to_global(batch(seed=5), mesh),
                       jax.random.PRNGKey(0))
    for i in ('0', '1'):
      for leaf in jax.tree.leaves(grads['trunk'][i]):
        assert np.abs(np.asarray(leaf)).sum() > 0
    merged, changed = stackwise.merge_stage(c, stage, host, state['params'])
  assert changed == [0, 1, 2]
  assert not np.array_equal(merged['stacks']['0']['blocks']['attn']['q'], host['stacks']['0']['blocks']['attn']['q'])
  # Norms carry no adapters and stay as they were.
  np.testing.assert_array_equal(merged['stacks']['0']['blocks']['attn_norm']['scale'],
                                host['stacks']['0']['blocks']['attn_norm']['scale'])


def test_qlora_trunk_is_quantized_and_dual_lora_trains_adapters_only():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  c = sw_config(stackwise__trunk='qlora', stackwise__trunk_rank=2, stackwise__stack_rank=4)
  with jax.set_mesh(mesh):
    rd, obj, stage, tx, host, built, loss_fn = stage_setup(c, 1, mesh)
    state = built.create()
    q = state['frozen']['trunk']['0']['blocks']['attn']['q']
    assert type(q).__name__ == 'Quantized'
    assert set(state['params']['stack']['blocks']) == {'attn', 'mlp'}  # stack LoRA adapters, not weights
    adapters = stackwise.rack.count(state['params']['stack']) + stackwise.rack.count(state['params']['trunk'])
    assert adapters < stackwise.rack.count(host['stacks']['1']) / 2
    state, history = run_steps(built, loss_fn, tx, mesh, n=2)
    assert np.isfinite(history[-1]['loss'])
    merged, changed = stackwise.merge_stage(c, stage, host, state['params'])
  assert changed == [0, 1]
  # The new stack = its initial weights + the stack adapters' delta (not the quantized trunk's rounding).
  delta = merged['stacks']['1']['blocks']['mlp']['up'] - host['stacks']['1']['blocks']['mlp']['up']
  assert 0 < np.abs(delta).max() < 0.1


def test_prepend_consistency_and_depth_ratio():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  c = sw_config(stackwise__direction='prepend', objective__time='depth', objective__depth_schedule=(1.0, 0.6, 0.3),
                stackwise__consistency=0.5)
  with jax.set_mesh(mesh):
    rd, obj, stage, tx, host, built, _ = stage_setup(c, 1, mesh)
    loss_fn = stackwise.make_loss_fn(c, rd, obj, stage, (1.0, 0.6, 0.3))
    assert stage.ratio == 0.6
    # The anchor (head side) is frozen; only the input side trains with the new front stack (tied: nothing).
    assert set(built.abstract['params']['shared']) == set()
    state, history = run_steps(built, loss_fn, tx, mesh, n=2)
  assert history[0]['consistency'] > 0
  assert abs(history[0]['masked'] - 0.6) < 0.1  # the share of scored tokens masked


def test_mask_token_starts_as_the_mean_embedding():
  c = sw_config(model__tie_embeddings=False)
  rd, obj = rack_setup(c, TOKENIZER_VOCAB)
  assert obj.mask_id == TOKENIZER_VOCAB and rd.rc.block.vocab_size == 128
  host = initial_rack(rd, 0, TOKENIZER_VOCAB)
  embed, head = host['shared']['embed'], host['shared']['lm_head']
  np.testing.assert_allclose(embed[obj.mask_id], embed[:TOKENIZER_VOCAB].mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(head[:, obj.mask_id], head[:, :TOKENIZER_VOCAB].mean(1), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(embed[:TOKENIZER_VOCAB], initial_rack(rd, 0)['shared']['embed'][:TOKENIZER_VOCAB])


def test_stage_flops():
  c = sw_config(stackwise__direction='joint')
  rd, _ = rack_setup(c, TOKENIZER_VOCAB)
  joint = stackwise.plan(c)[0]
  train_f, eval_f = stackwise.stage_flops(rd.rc.block, 32, joint, True, -1)
  assert train_f == pytest.approx(3 * eval_f)
  c = sw_config()
  last = stackwise.plan(c)[2]
  train_f, eval_f = stackwise.stage_flops(rd.rc.block, 32, last, True, 2)
  from jaxtrain.models import flops
  import dataclasses
  one = flops.flops_per_token(dataclasses.replace(rd.rc.block, num_layers=1), 32, False)
  assert train_f == pytest.approx(eval_f + 2 * one)  # forward + input and weight grads of stack 2 and head


def test_evaluation_scores_the_same_corruptions_in_every_stage():
  """Eval times and masks depend on the batch only, not on the stage's key: stages compare like with like."""
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  c = sw_config()
  with jax.set_mesh(mesh):
    masked = []
    for index in (0, 1):
      _, _, _, _, _, built, loss_fn = stage_setup(c, index, mesh)
      eval_step = jax.jit(steps.make_eval_step(loss_fn, built.transform))
      sums = eval_step(built.create(), sharding.to_global(batch(seed=3), mesh))
      masked.append(float(sums['masked_sum']))
  assert masked[0] == masked[1] > 0
