"""The train step: learns, accumulates exactly, shards without changing the numbers, compiles once."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import sharding
from jaxtrain.train import loop as train, steps
from tests.helpers import packed_batch, tiny

CFG = tiny()


def build(tx, mesh_cfg, devices=None, accum_steps=1):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  with jax.set_mesh(mesh):
    graphdef, state, state_sh = train.init_state(CFG, tx, 0, mesh)
    loss_fn = train.make_loss_fn(graphdef, 0.0)
    step = jax.jit(steps.make_train_step(loss_fn, tx, accum_steps=accum_steps),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)), out_shardings=(state_sh, None),
                   donate_argnums=0)
  return mesh, graphdef, state, state_sh, step


def run_steps(mesh, step, state, batch, n):
  history = []
  with jax.set_mesh(mesh):
    gb = sharding.to_global(batch, mesh)
    for _ in range(n):
      state, m = step(state, gb)
      history.append(float(m['loss']))
  return state, history


def test_overfits_one_batch():
  mesh, _, state, _, step = build(optax.adam(1e-2), {'data': -1, 'fsdp': 1, 'tensor': 1})
  batch = packed_batch([[32], [20, 12], [32], [32]] * 2, 32, seed=1)
  _, history = run_steps(mesh, step, state, batch, 150)
  assert history[0] > 3.5  # ~ln(64) at init
  assert history[-1] < 0.05, history[-10:]


def test_accumulation_equals_one_large_batch_with_unequal_token_counts():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with jax.set_mesh(mesh):
    graphdef, state, _ = train.init_state(CFG, optax.sgd(0.1), 0, mesh)
    loss_fn = train.make_loss_fn(graphdef, 0.0)
    # 16 rows with very different numbers of loss tokens (one nearly empty row per micro-batch).
    lengths = [[32], [3], [20, 12], [5], [32], [2, 2], [16], [9], [31], [4], [8, 8], [6], [30], [2], [12], [7]]
    batch = sharding.to_global(packed_batch(lengths, 32, seed=2), mesh)
    full = jax.jit(steps.make_grad_fn(loss_fn, accum_steps=1))
    micro = jax.jit(steps.make_grad_fn(loss_fn, accum_steps=4))
    g1, s1 = full(state['params'], None, batch, state['rng'])
    g4, s4 = micro(state['params'], None, batch, state['rng'])
  assert float(s1['tokens']) == float(s4['tokens'])
  n1, n4 = optax.tree.norm(g1), optax.tree.norm(g4)
  diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, g1, g4))
  assert float(diff / n1) <= 1e-5, float(diff / n1)
  np.testing.assert_allclose(float(n1), float(n4), rtol=1e-5)
  # The per-micro-batch-mean shortcut would be measurably wrong on this batch.
  per_micro = [jax.tree.map(lambda x, k=k: x[k::4], batch) for k in range(4)]
  sums_fn = jax.jit(lambda p, b: loss_fn(p, b, None)[1])
  means = [sums_fn(state['params'], mb) for mb in per_micro]
  mean_of_means = np.mean([float(m['loss_sum'] / m['tokens']) for m in means])
  assert abs(mean_of_means - float(s1['loss_sum'] / s1['tokens'])) > 1e-3


def test_sharded_step_matches_single_device():
  batch = packed_batch([[32], [10, 22], [32], [16, 16], [5], [32], [30], [32]], 32, seed=3)
  tx = optax.sgd(0.5)
  mesh1, _, s1, _, step1 = build(tx, {'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  mesh8, _, s8, sh8, step8 = build(tx, {'data': 2, 'fsdp': 2, 'tensor': 2}, accum_steps=2)
  s1, h1 = run_steps(mesh1, step1, s1, batch, 3)
  s8, h8 = run_steps(mesh8, step8, s8, batch, 3)
  np.testing.assert_allclose(h8, h1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8['params']), jax.tree.leaves(s1['params']), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  q = s8['params']['blocks']['attn']['q']
  assert isinstance(q.sharding, NamedSharding)
  assert q.sharding.spec == P(None, 'fsdp', 'tensor', None)  # (layers, embed, heads, head_dim)
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  assert s8['params']['embed'].sharding.spec == P('tensor', 'fsdp')
  mu = s8['opt_state']  # sgd has no moments; the state tree still carries the mesh shardings
  assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(mu))


def test_step_compiles_once():
  mesh, _, state, _, step = build(optax.adamw(1e-3), {'data': -1, 'fsdp': 1, 'tensor': 1})
  for seed in range(4):
    state, _ = run_steps(mesh, step, state, packed_batch([[16], [8, 8], [4], [16]] * 2, 16, seed=seed), 1)
  assert step._cache_size() == 1


@pytest.mark.parametrize('z', [0.0, 1e-3])
def test_metrics_are_normalised_by_loss_tokens(z):
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with jax.set_mesh(mesh):
    graphdef, state, state_sh = train.init_state(CFG, optax.sgd(0.0), 0, mesh)
    loss_fn = train.make_loss_fn(graphdef, z)
    step = jax.jit(steps.make_train_step(loss_fn, optax.sgd(0.0), schedule=lambda s: 0.5 * s))
    batch = sharding.to_global(packed_batch([[16], [3]] * 4, 16), mesh)
    _, m = step(state, batch)
    sums = jax.jit(lambda p, b: loss_fn(p, b, None)[1])(state['params'], batch)
  assert float(m['loss_tokens']) == 4 * (15 + 2)
  np.testing.assert_allclose(float(m['loss']), float(sums['loss_sum'] / sums['tokens']), rtol=1e-6)
  assert (float(m['z_loss']) > 0) == (z > 0)
  assert float(m['lr']) == 0.0


def test_non_finite_step_is_skipped_and_counted():
  mesh, _, state, _, step = build(optax.adamw(1e-2), {'data': -1, 'fsdp': 1, 'tensor': 1})
  batch = packed_batch([[16], [8, 8], [4], [16]] * 2, 16, seed=5)
  poisoned = dict(batch, loss_mask=batch['loss_mask'].astype(np.float32))
  poisoned['loss_mask'][0, 5] = np.nan  # a real token (row 0 is one 16-token document)
  with jax.set_mesh(mesh):
    before = jax.device_get(state)
    state, m = step(state, sharding.to_global(poisoned, mesh))
    assert float(m['skipped']) == 1.0 and not np.isfinite(float(m['loss']))
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((before['params'], before['opt_state'])),
                    jax.tree.leaves((after['params'], after['opt_state'])), strict=True):
      np.testing.assert_array_equal(a, b)
    assert int(after['step']) == int(before['step']) + 1
    state, m = step(state, sharding.to_global(batch, mesh))  # a clean batch trains normally again
  assert float(m['skipped']) == 0.0 and np.isfinite(float(m['loss']))


def test_multi_step_runs_its_active_slots_in_order_and_leaves_the_rest():
  """Three batches in a 4-slot call: the same states and metrics as three single steps; the fourth slot
  (a copy of the third batch, inactive) changes nothing, step counter included, and reports zeros."""
  tx = optax.adamw(1e-2)
  mesh, _, single_state, state_sh, single = build(tx, {'data': -1, 'fsdp': 1, 'tensor': 1})
  _, graphdef, multi_state, _, _ = build(tx, {'data': -1, 'fsdp': 1, 'tensor': 1})
  batches = [packed_batch([[16], [8, 8], [4], [16]] * 2, 16, seed=s) for s in range(3)]
  with jax.set_mesh(mesh):
    multi = jax.jit(steps.make_multi_step(steps.make_train_step(train.make_loss_fn(graphdef, 0.0), tx)),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh, stacked=True), None),
                    out_shardings=(state_sh, None), donate_argnums=0)
    stacked = {k: np.stack([b[k] for b in batches + batches[-1:]]) for k in batches[0]}
    multi_state, m = multi(multi_state, sharding.to_global(stacked, mesh, stacked=True),
                           np.array([True, True, True, False]))
    losses = []
    for b in batches:
      single_state, s = single(single_state, sharding.to_global(b, mesh))
      losses.append(float(s['loss']))
  assert m['loss'].shape == (4,) and float(m['loss'][3]) == 0.0 and float(m['loss_tokens'][3]) == 0.0
  np.testing.assert_allclose(np.asarray(m['loss'][:3]), losses, rtol=1e-5)
  assert len(set(losses)) == 3  # three different batches, so the order is checked
  assert int(multi_state['step']) == int(single_state['step']) == 3
  for a, b in zip(jax.tree.leaves(multi_state['params']), jax.tree.leaves(single_state['params']), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_a_loss_needs_only_its_sum_and_token_count():
  """A custom loss reports {'loss_sum', 'tokens'} and nothing else: the step trains and logs loss (the step
  used to read 'z_loss_sum' unconditionally); a further sum it reports is logged per token."""
  mesh, graphdef, state, state_sh, _ = build(optax.adamw(1e-2), {'data': -1, 'fsdp': 1, 'tensor': 1})
  decoder = train.make_loss_fn(graphdef, 0.0)

  def minimal(params, batch, rng):
    objective, sums = decoder(params, batch, rng)
    return objective, {'loss_sum': sums['loss_sum'], 'tokens': sums['tokens']}

  def with_extra(params, batch, rng):
    objective, sums = minimal(params, batch, rng)
    return objective, dict(sums, twice_sum=2 * sums['loss_sum'])

  batch = packed_batch([[16], [8, 8], [4], [16]] * 2, 16, seed=5)
  with jax.set_mesh(mesh):
    for loss_fn in (minimal, with_extra):
      step = jax.jit(steps.make_train_step(loss_fn, optax.adamw(1e-2)), in_shardings=(state_sh, None),
                     out_shardings=(state_sh, None))
      _, m = step(state, sharding.to_global(batch, mesh))
      assert float(m['skipped']) == 0.0 and np.isfinite(float(m['loss'])) and 'z_loss' not in m
  assert float(m['twice']) == pytest.approx(2 * float(m['loss']))


def bf16_run(tmp_path, monkeypatch, calls, schedule, shape):
  from jaxtrain import cli
  kept, real_fit = {}, train.fit

  def fit(*args, **kwargs):
    kept['result'] = real_fit(*args, **kwargs)
    return kept['result']

  monkeypatch.setattr(train, 'fit', fit)
  workdir = str(tmp_path / 'run')
  cli.main(['jaxtrain', 'train', '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=8',
            '--config.model.param_dtype=bfloat16', f'--config.train.steps_per_call={calls}',
            f'--config.optim.schedule={schedule}', f'--config.optim.decay_shape={shape}',
            '--config.optim.warmup_steps=2', '--config.optim.decay_fraction=0.5', '--config.train.eval_every=0',
            '--config.train.eval_batches=1', '--config.checkpoint.every=0', '--config.log.every=1'])
  return kept['result'], workdir


@pytest.mark.parametrize('calls,schedule,shape', [(1, 'linear', 'linear'), (4, 'wsd', 'sqrt')])
def test_bfloat16_params_train_with_float32_moments_in_one_compile(tmp_path, monkeypatch, calls, schedule, shape):
  """`--config.model.param_dtype=bfloat16` crashed under the K-steps-per-call scan (the first moment turned
  float32, `cond branches must have equal output types`) and with one step per call recompiled after step 1,
  ending with mu float32 and nu bfloat16. Now: one compile, bfloat16 parameters, float32 moments; the last
  step's logged lr is the schedule's floor."""
  import json
  import os

  import jax.numpy as jnp
  result, workdir = bf16_run(tmp_path, monkeypatch, calls, schedule, shape)
  assert result.compiles == 1 and int(result.state['step']) == 8
  assert {x.dtype for x in jax.tree.leaves(result.state['params'])} == {jnp.dtype(jnp.bfloat16)}
  adam = [s for s in jax.tree.leaves(result.state['opt_state'], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert {x.dtype for x in jax.tree.leaves((adam[0].mu, adam[0].nu))} == {jnp.dtype(jnp.float32)}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lrs = [r['lr'] for r in map(json.loads, f) if 'lr' in r]
  assert len(lrs) == 8 and lrs[-1] == pytest.approx(1e-2 * 0.1) and lrs[0] == pytest.approx(1e-2 / 2)
