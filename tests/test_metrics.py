"""FLOPs accounting by hand, the loss plot of a resumed run, wandb never waiting on a login, and what a run
logs: plain progress lines off a terminal, the compile kept out of step times, each step once after a resume."""

import json
import os
import shutil
import types

import numpy as np
import pytest

from jaxtrain import models
from jaxtrain.adapters import lora
from jaxtrain.models import flops
from jaxtrain.train import metrics
from tests.helpers import tiny


def test_flops_per_token_by_hand():
  cfg = tiny()  # d 32, 2 layers, 4 heads / 2 kv of dim 8, mlp 64, vocab 64, tied
  per_layer = 32 * 8 * (4 + 2 * 2) + 4 * 8 * 32 + 3 * 32 * 64  # q,k,v + o + gate/up/down
  matmul = 2 * per_layer + 32 * 64  # LM head counts; the embedding lookup does not
  attention = 4 * 2 * 16 * 4 * 8 * 0.5  # QK^T and AV over 16 positions, causal half
  assert flops.flops_per_token(cfg, 16, training=False) == 2 * matmul + attention
  assert flops.flops_per_token(cfg, 16) == 3 * (2 * matmul + attention)
  gelu = flops.flops_per_token(tiny(mlp='gelu'), 16, training=False)
  assert gelu == 2 * (matmul - 2 * 32 * 64) + attention  # no gate matrix
  assert flops.flops_per_token(tiny(causal=False), 16, training=False) == 2 * matmul + 2 * attention


def test_sliding_window_counts_keys_in_the_window():
  # Keys per query min(window, position): over 16 positions with window 4, 4 - 4^2 / (2 * 16) = 3.5 on average.
  full = flops.flops_per_token(tiny(), 16, training=False)
  windowed = flops.flops_per_token(tiny(sliding_window=4), 16, training=False)
  assert full - windowed == 4 * 2 * 4 * 8 * (8 - 3.5)
  assert flops.flops_per_token(tiny(sliding_window=16), 16) == flops.flops_per_token(tiny(), 16)
  assert flops.keys_per_query(tiny(sliding_window=4, causal=False), 16) == 7.0  # both sides


def test_lora_flops_by_hand():
  """A frozen base needs only input gradients (1x forward in backward); adapters and attention train fully."""
  cfg = tiny()
  per_layer = 32 * 8 * (4 + 2 * 2) + 4 * 8 * 32 + 3 * 32 * 64
  weights = 2 * (2 * per_layer + 32 * 64)
  attention = 4 * 2 * 16 * 4 * 8 * 0.5
  adapters = 2 * 2 * 4 * ((32 + 32) + (32 + 16))  # rank 4 on q (32 -> 32) and v (32 -> 16), both layers
  spec = flops.LoraFlops(4, ('blocks/attn/q', 'blocks/attn/v'))
  assert flops.flops_per_token(cfg, 16, training=False, lora=spec) == weights + adapters + attention
  assert flops.flops_per_token(cfg, 16, lora=spec) == 2 * weights + 3 * (adapters + attention)
  adapters_tree = {'blocks': {'attn': {'q': {'a': np.zeros((2, 32, 4)), 'b': np.zeros((2, 4, 4, 8))}}}}
  assert lora.flops_of(adapters_tree) == flops.LoraFlops(4, ('blocks/attn/q',))


def test_mla_flops_by_hand():
  """MLA: every projection it has (latents, up-projections, shared rope key) and QK^T over nope + rope dims,
  AV over v_dim; a rank of 0 swaps the two projections through a latent for one direct one."""
  mla = dict(attention='mla', mla_q_rank=16, mla_kv_rank=12, mla_nope_dim=8, mla_rope_dim=4, mla_v_dim=6)
  per_layer = (32 * 16 + 16 * 4 * 12  # q_down, q_up (4 heads of 8 + 4)
               + 32 * 12 + 12 * 4 * 8 + 12 * 4 * 6  # kv_down, k_up, v_up
               + 32 * 4 + 4 * 6 * 32 + 3 * 32 * 64)  # k_rope, o, MLP
  attention = 2 * 2 * 4 * (12 + 6) * 8  # layers, heads, QK^T over 12 dims + AV over 6, 8 keys (causal half of 16)
  assert flops.flops_per_token(tiny(**mla), 16, training=False) == 2 * (2 * per_layer + 32 * 64) + attention
  direct = dict(mla, mla_q_rank=0, mla_kv_rank=0)
  per_layer = 32 * 4 * 12 + 32 * 4 * 8 + 32 * 4 * 6 + 32 * 4 + 4 * 6 * 32 + 3 * 32 * 64  # q, k, v, k_rope, o, MLP
  assert flops.flops_per_token(tiny(**direct), 16, training=False) == 2 * (2 * per_layer + 32 * 64) + attention


def test_plot_uses_last_record_per_step(tmp_path):
  rows = [{'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0}, {'step': 2, 'loss': 4.0}, {'step': 2, 'eval_loss': 4.5}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  path = metrics.plot_losses(str(tmp_path))
  assert path and os.path.getsize(path) > 1000
  assert metrics.plot_losses(str(tmp_path / 'empty')) is None


@pytest.mark.slow
def test_wandb_online_without_login_falls_back_to_offline(tmp_path, monkeypatch):
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  monkeypatch.delenv('WANDB_MODE', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc
  notes = []
  cfg = types.SimpleNamespace(wandb='online', wandb_project='jaxtrain-test')
  run = metrics._start_wandb(str(tmp_path), cfg, {'a': 1}, notes.append)
  run.log({'loss': 1.0}, step=1)
  run.finish()
  assert notes and 'logging offline' in notes[0]
  assert any(d.startswith('offline-run') for d in os.listdir(tmp_path / 'wandb'))


def _xla_flops(cfg, batch: int, seq: int, training: bool, lora_rank: int = 0) -> float:
  """FLOPs XLA counts for the compiled train step (or eval step) on one device; nothing runs. With
  `lora_rank` the state is LoRA on every projection through state.build, as train.run builds it."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxtrain import sharding
  from jaxtrain.train import loop as train, state, steps
  from tests.test_train import tiny_config
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  tx = optax.sgd(0.1)
  config = tiny_config(**{'lora.rank': lora_rank, 'lora.targets': r'attn/(q|k|v|o)$|mlp/(gate|up|down)$'})
  with jax.set_mesh(mesh):
    # One attention call over the row, layers unrolled (a scan body is counted once).
    built = state.build(config, cfg, tx, mesh, models.Execution(attention_block=0, scan_layers=False))
    abstract = jax.eval_shape(built.create)  # with the frozen base, if any
    loss_fn = train.make_loss_fn(built.graphdef, 0.0)
    spec = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ('tokens', 'segment_ids', 'positions',
                                                                        'loss_mask')}
    fn = (steps.make_train_step(loss_fn, tx, skip_nonfinite=False, param_transform=built.transform) if training
          else steps.make_eval_step(loss_fn, built.transform))
    cost = jax.jit(fn).lower(abstract, spec).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('causal,kv,training,lora_rank', [
    (True, 2, True, 0), (False, 4, True, 0), (True, 4, False, 0), (True, 2, True, 4), (True, 2, False, 4)])
def test_flops_per_token_matches_xla_cost_analysis(causal, kv, training, lora_rank):
  """Model FLOPs within 10% of what XLA counts, for full training, LoRA training and evaluation. XLA executes
  the masked half of causal attention, so it is compared exactly (3%) against the same formula with full
  attention. Layers are unrolled: XLA's cost analysis counts a lax.scan body once, not once per layer."""
  import dataclasses
  cfg = dataclasses.replace(tiny(), vocab_size=2048, d_model=256, num_heads=4, num_kv_heads=kv, head_dim=64,
                            mlp_dim=1024, causal=causal)
  batch, seq = 4, 256
  spec = None
  if lora_rank:
    spec = flops.LoraFlops(lora_rank, tuple(p for p in flops.weight_matrices(cfg) if p.startswith('blocks/')))
  xla = _xla_flops(cfg, batch, seq, training, lora_rank)
  model = flops.flops_per_token(cfg, seq, training, spec) * batch * seq
  executed = flops.flops_per_token(dataclasses.replace(cfg, causal=False), seq, training, spec) * batch * seq
  print(f'ours / XLA = {model / xla:.3f} (executed {executed / xla:.3f})')
  assert abs(xla / model - 1) <= 0.10, (xla, model)
  assert abs(xla / executed - 1) <= 0.03, (xla, executed)


@pytest.mark.parametrize('training', [True, False])
def test_mla_flops_per_token_match_xla_cost_analysis(training):
  """The same cross-check for multi-head latent attention with both compressions, value heads narrower than
  query/key heads (64 + 32 vs 48: the einsum attention path), causal as in training."""
  import dataclasses
  cfg = dataclasses.replace(tiny(), vocab_size=2048, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
                            mlp_dim=1024, attention='mla', mla_q_rank=128, mla_kv_rank=96,
                            mla_nope_dim=64, mla_rope_dim=32, mla_v_dim=48)
  batch, seq = 4, 256
  xla = _xla_flops(cfg, batch, seq, training)
  model = flops.flops_per_token(cfg, seq, training) * batch * seq
  executed = flops.flops_per_token(dataclasses.replace(cfg, causal=False), seq, training) * batch * seq
  print(f'ours / XLA = {model / xla:.3f} (executed {executed / xla:.3f})')
  assert abs(xla / model - 1) <= 0.10, (xla, model)
  assert abs(xla / executed - 1) <= 0.03, (xla, executed)


def _train(workdir, *flags):
  from jaxtrain import cli
  cli.main(['jaxtrain', 'train', '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=8',
            '--config.checkpoint.every=4', '--config.train.eval_every=4', '--config.log.every=2',
            '--config.log.progress=True', *flags])


def test_a_run_off_a_terminal_logs_plain_lines_and_a_resume_logs_each_step_once(tmp_path, capsys):
  """Progress without a terminal (capsys is not one): one plain line per logged train step, no '\\r'. The
  header states the dtypes; the compile is timed on its own (`compile_s` of step 1, which is logged for it), not
  charged to the first steps' tokens/s. A resume drops the rows a crashed run logged past its checkpoint."""
  workdir = str(tmp_path / 'run')
  _train(workdir)
  out, err = capsys.readouterr()
  assert '\r' not in out + err
  assert 'param dtype float32, compute dtype float32' in out.splitlines()[0]
  assert "MFU is against this run's probe" in out.splitlines()[0]
  assert len([line for line in out.splitlines() if line.startswith('compiled the train step in ')]) == 1
  records = metrics.read_metrics(workdir)
  train_rows = [r for r in records if 'loss' in r]
  plain = [line for line in out.splitlines() if line.startswith('step ') and ' tokens/s' in line]
  assert [line.split('/')[0] for line in plain] == [f"step {r['step']}" for r in train_rows]
  assert [r['step'] for r in train_rows] == [1, 2, 4, 6, 8]  # every 2 steps, and step 1 for its compile_s
  assert train_rows[0]['compile_s'] > 0 and all('compile_s' not in r for r in train_rows[1:])
  later = float(np.median([r['tokens_per_s'] for r in train_rows[1:]]))
  assert train_rows[0]['tokens_per_s'] > 0.2 * later, (train_rows[0], later)  # the compile is not in it
  # A crash after checkpoint 4: checkpoint 8 never finished, steps 5..8 were logged, the last line is torn.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '8'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 9, "loss": 1.')
  _train(workdir)
  assert 'resumed from' in capsys.readouterr().out
  records = metrics.read_metrics(workdir)
  steps = [r['step'] for r in records if 'loss' in r]
  assert steps == [1, 2, 4, 5, 6, 8]  # 5: the resumed run's compile
  assert [r['step'] for r in records if 'eval_loss' in r] == [4, 8]
  # A complete run run again logs its final evaluation once.
  _train(workdir)
  assert [r['step'] for r in metrics.read_metrics(workdir) if 'eval_loss' in r] == [4, 8]


def test_the_progress_bar_shows_a_step_s_loss_beside_that_step(tmp_path, monkeypatch, capsys):
  import re
  import time
  monkeypatch.setattr(metrics, '_is_terminal', lambda: True, raising=False)
  cfg = types.SimpleNamespace(progress=True, wandb='disabled')
  logger = metrics.Logger(str(tmp_path), cfg, 3, 0, {})
  for step in (1, 2, 3):
    logger.log(step, {'loss': float(step), 'tokens_per_s': 10.0})
    logger.advance()
    time.sleep(0.12)  # past tqdm's mininterval: the next change may draw
  logger.close()
  frames = [re.search(r'(\d+)/3 .*loss=([\d.]+)', f) for f in capsys.readouterr().err.split('\r')]
  shown = [(int(m.group(1)), float(m.group(2))) for m in frames if m]
  assert shown and all(n == loss for n, loss in shown), shown
