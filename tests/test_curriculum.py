"""Context-length curriculum: exact schedule values, the variant bound, the window mask, a tiny resumable run."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.config import validate as config_lib
from jaxtrain.train import curriculum, loop as train, metrics
from jaxtrain import models
from jaxtrain.models import flops
from jaxtrain.train.curriculum import Schedule
from jaxtrain.errors import ConfigError
from jaxtrain.config.defaults import base_config
from tests.helpers import packed_batch, tiny


# ----------------------------------------------------------------------------- the schedule


def test_linear_values():
  s = Schedule('linear', 32, 256, 21, fraction=0.5, max_variants=4)  # ramp ends at step 10
  assert s.levels() == (32, 106, 181, 256)  # 32 + 224 * i // 3
  assert [s.raw(i) for i in (0, 5, 10, 15)] == [32.0, 144.0, 256.0, 256.0]
  assert s.raw(3) == pytest.approx(99.2)
  assert [s.window(i) for i in range(21)] == [32] * 4 + [106] * 3 + [181] * 3 + [256] * 11
  assert s.segments() == [(0, 4, 32), (4, 7, 106), (7, 10, 181), (10, 21, 256)]


def test_cosine_is_slow_at_both_ends_and_differs_from_linear():
  cos = Schedule('cosine', 16, 64, 13, fraction=1.0, max_variants=4)  # ramp = 12: the last step is full
  lin = Schedule('linear', 16, 64, 13, fraction=1.0, max_variants=4)
  assert cos.levels() == (16, 32, 48, 64)
  # 16 + 48 (1 - cos(pi i / 12)) / 2 at i = 4, 6, 8: cos = 1/2, 0, -1/2.
  assert [cos.raw(i) for i in (4, 6, 8)] == pytest.approx([28.0, 40.0, 52.0], abs=1e-9)
  assert [cos.window(i) for i in range(13)] == [16] * 5 + [32] * 3 + [48] * 4 + [64]
  assert [lin.window(i) for i in range(13)] == [16] * 4 + [32] * 4 + [48] * 4 + [64]


def test_step_holds_each_stage():
  s = Schedule('step', 8, 64, 13, fraction=0.5, steps_per_stage=2, max_variants=8)  # ramp = 6
  assert [s.raw(i) for i in range(8)] == pytest.approx([8, 8, 8 + 56 / 3, 8 + 56 / 3, 8 + 112 / 3, 8 + 112 / 3,
                                                        64, 64])
  assert s.levels() == (8, 16, 24, 32, 40, 48, 56, 64)
  assert [s.window(i) for i in range(13)] == [8, 8, 24, 24, 40, 40] + [64] * 7
  auto = Schedule('step', 8, 64, 13, fraction=0.5, max_variants=3)  # stages of 3 steps, one per level
  assert auto.stage_steps == 3.0
  assert [auto.window(i) for i in range(13)] == [8] * 3 + [36] * 3 + [64] * 7


def test_window_function_on_a_run_config():
  c = base_config()
  c.data.seq_len = 256
  assert curriculum.window(0, 21, c) == 256  # kind none: always the full row
  c.curriculum.kind, c.curriculum.start = 'linear', 32
  assert [curriculum.window(i, 21, c) for i in (0, 4, 7, 10, 20)] == [32, 106, 181, 256, 256]
  assert curriculum.enabled(c)


@pytest.mark.parametrize('kind', ['linear', 'cosine', 'step'])
def test_quantisation_bound_and_invariants(kind):
  for start, seq_len, total, fraction, variants, per_stage in [
      (32, 256, 100, 0.5, 4, 0), (1, 64, 37, 1.0, 2, 0), (8, 512, 1000, 0.3, 5, 0), (32, 40, 50, 0.8, 16, 0),
      (16, 1024, 200, 0.6, 3, 7), (8, 64, 9, 0.5, 6, 1), (64, 64, 10, 0.5, 4, 0)]:
    s = Schedule(kind, start, seq_len, total, fraction, per_stage if kind == 'step' else 0, variants)
    ws = [s.window(i) for i in range(total)]
    assert len(set(ws)) <= variants and set(ws) <= set(s.levels()) and len(s.levels()) <= variants
    assert ws[0] == start and ws[-1] == seq_len and s.levels()[-1] == seq_len
    assert ws == sorted(ws)  # never narrows
    gap = (seq_len - start) / (variants - 1) + 1  # + 1: levels are floored to integers
    for i, w in enumerate(ws):
      assert w <= s.raw(i) + 1e-6 and s.raw(i) - w < gap
    if kind != 'step':  # full from the end of the ramp on (step may land there later: whole stages)
      assert all(w == seq_len for w in ws[math.ceil(fraction * (total - 1)):])
    assert [w for first, end, w in s.segments() for _ in range(first, end)] == ws


def test_bad_schedules_are_config_errors():  # the same rules, and lines, as the config's (test_config_validation)
  with pytest.raises(ConfigError, match=r"curriculum.kind='exp'"):
    Schedule('exp', 8, 64, 10)
  with pytest.raises(ConfigError, match=r'curriculum.start=65: must be <= data.seq_len=64'):
    Schedule('linear', 65, 64, 10)
  with pytest.raises(ConfigError, match=r'curriculum.max_variants=1: must be >= 2'):
    Schedule('linear', 8, 64, 10, max_variants=1)
  with pytest.raises(ConfigError, match=r'curriculum.fraction=0: must be in \(0, 1\]'):
    Schedule('cosine', 8, 64, 10, fraction=0)


@pytest.mark.parametrize('key, value, message', [
    ('kind', 'exp', 'must be one of none, linear, cosine, step'),
    ('start', 300, 'must be <= data.seq_len=256'),
    ('start', 0, 'must be > 0'),
    ('max_variants', 1, 'must be >= 2'),
    ('fraction', 1.5, r'must be in \(0, 1\]'),
    ('steps_per_stage', -1, 'must be >= 0'),
])
def test_config_validation(key, value, message):
  c = base_config()
  c.curriculum.kind = 'linear'
  c.curriculum[key] = value
  with pytest.raises(ConfigError, match=rf'config.curriculum.{key}={value!r}: {message}'):
    config_lib.check_values(c, 8)
  config_lib.check_values(base_config(), 8)  # the defaults (kind none) pass


def test_stackwise_runs_refuse_a_curriculum():
  c = base_config()
  c.curriculum.kind, c.stackwise.num_stacks = 'linear', 2
  with pytest.raises(ConfigError, match=r"config.curriculum.kind='linear': applies to plain"):
    curriculum.check(c)


# ----------------------------------------------------------------------------- variants, mask, FLOPs


class _FakeJit:
  def __init__(self, mc):
    self.mc, self.calls = mc, 0

  def _cache_size(self):
    return 1 if self.calls else 0


def test_variants_build_lazily_and_reuse_the_full_step():
  mc = tiny()
  full = _FakeJit(mc)
  made = []
  v = curriculum.Variants(Schedule('linear', 8, 64, 12, 0.5, 0, 3), mc, lambda m: made.append(_FakeJit(m)) or made[-1],
                          lambda m: flops.flops_per_token(m, 64), full)
  assert v.built_windows() == (64,) and not made
  assert v.at(11) is full  # the end of training runs the no-curriculum step object itself
  assert v.at(4) is v.at(5) and v.at(4).mc.sliding_window == 36 and v.at(0).mc.sliding_window == 8
  assert v.built_windows() == (8, 36, 64) and len(made) == 2
  # FLOPs follow the window: attention over min(w, position) keys, the rest unchanged.
  per = [flops.flops_per_token(curriculum.window_config(mc, w, 64), 64) for w in (8, 36, 64)]
  assert per[0] < per[1] < per[2] == flops.flops_per_token(mc, 64)
  assert [v.flops_per_token(i) for i in range(12)] == [per[0]] * 3 + [per[1]] * 3 + [per[2]] * 6
  assert v.flops_total(5) == pytest.approx(3 * per[0] + 2 * per[1])
  assert v.flops_total(12) == pytest.approx(sum(v.flops_per_token(i) for i in range(12)))
  # A call of several steps ends where the window changes.
  assert [v.segment_end(i) for i in range(12)] == [3] * 3 + [6] * 3 + [12] * 6


def test_window_config():
  mc = tiny()
  assert curriculum.window_config(mc, 64, 64) is mc
  assert curriculum.window_config(mc, 16, 64).sliding_window == 16
  own = tiny(sliding_window=8)  # a Mistral-style model keeps its narrower window
  assert curriculum.window_config(own, 16, 64).sliding_window == 8
  assert curriculum.window_config(own, 4, 64).sliding_window == 4


@pytest.mark.parametrize('layers, block', [(1, 0), (1, 4), (2, 4)])
def test_window_constrains_attention(layers, block):
  """With window w, position p sees tokens back to p - L (w - 1) through L layers and nothing before."""
  w, t, p = 4, 16, 13
  mc = curriculum.window_config(tiny(num_layers=layers), w, t)
  graphdef, _, shapes = models.describe(mc, models.Execution(attention_block=block))
  rng = np.random.default_rng(0)  # any weights do; numpy skips compiling the initialiser for each shape
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
  batch = {k: jnp.asarray(v) for k, v in packed_batch([[t], [t]], t).items()}
  logits = jax.jit(lambda tokens: models.apply(graphdef, params, dict(batch, tokens=tokens)))
  base = np.asarray(logits(batch['tokens']))
  reach = layers * (w - 1)  # the oldest token that can still reach p

  def changed_at(q: int) -> np.ndarray:
    tokens = batch['tokens'].at[:, q].set((batch['tokens'][:, q] + 7) % 63 + 1)
    return np.asarray(logits(tokens))[:, p]

  np.testing.assert_array_equal(changed_at(p - reach - 1), base[:, p])
  np.testing.assert_array_equal(changed_at(0), base[:, p])
  assert np.abs(changed_at(p - reach) - base[:, p]).max() > 1e-6


# ----------------------------------------------------------------------------- a tiny run


def tiny_run_config():
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 4, 2, 64
  d = c.data
  d.max_files, d.tokenizer_vocab_size, d.seq_len, d.batch_size, d.eval_fraction = 24, 512, 64, 8, 0.2
  c.optim.lr, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.eval_every, c.train.eval_batches = 12, 0, 1
  c.checkpoint.every = 4
  c.log.every, c.log.wandb, c.log.progress, c.log.plot = 1, 'disabled', False, False
  c.log.peak_flops = 1e11  # skips the matmul probe: MFU is not under test
  u = c.curriculum
  u.kind, u.start, u.fraction, u.max_variants = 'linear', 8, 0.5, 2  # each window costs a compile
  return c


@pytest.fixture(scope='module')
def curriculum_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('curriculum'))
  config = tiny_run_config()
  return workdir, train.run(config, workdir)  # validates first (config.validate.prepare)


@pytest.mark.slow
def test_run_compiles_one_step_per_window_and_logs_it(curriculum_run):
  workdir, summary = curriculum_run
  windows = [8] * 6 + [64] * 6  # levels 8 and 64; the raw window 8 + 56 i / 5.5 reaches 64 at step 6
  assert [curriculum.window(i, 12, tiny_run_config()) for i in range(12)] == windows
  assert summary.compiles == 2  # <= max_variants: one program per window
  records = [r for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in records] == list(range(1, 13))
  assert [r['attn_window'] for r in records] == windows
  assert all(np.isfinite(r['loss']) for r in records) and records[-1]['loss'] < records[0]['loss']
  # train_flops_total adds each step's own FLOPs, which grow with the window.
  tokens = 8 * 64
  mc = models.model_config(tiny_run_config().model, 512)
  per = {w: flops.flops_per_token(curriculum.window_config(mc, w, 64), 64) for w in (8, 64)}
  assert per[8] < per[64] == flops.flops_per_token(mc, 64)
  expected = np.cumsum([per[w] * tokens for w in windows])
  assert [r['train_flops_total'] for r in records] == pytest.approx(list(expected), rel=1e-12)
  assert summary.flops.train == pytest.approx(expected[-1], rel=1e-12)


@pytest.mark.slow
def test_resume_mid_curriculum_is_bitwise(curriculum_run, tmp_path):
  """Stopped after checkpoint 4 (two more 8-token steps, then the full window), the run continues with
  exactly the same losses."""
  workdir, summary = curriculum_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  for step in ('8', '12'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  again = train.run(tiny_run_config(), resumed)
  assert again.start_step == 4
  assert again.losses == {s: loss for s, loss in summary.losses.items() if s > 4}
  assert again.eval == summary.eval
  assert again.compiles == 2
  rows = [r for r in metrics.read_metrics(resumed) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(1, 13))  # the rows past the checkpoint were dropped, not repeated
  assert [r['attn_window'] for r in rows if r['step'] > 4] == [8, 8] + [64] * 6
