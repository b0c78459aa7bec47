"""Schedules at their landmarks, and the weight-decay mask."""

import numpy as np
import pytest

from jaxtrain.train import optim
from jaxtrain.config.defaults import base_config


def sched(kind, **kw):
  c = base_config().optim
  c.schedule, c.lr, c.warmup_steps, c.min_lr_ratio = kind, 1.0, 10, 0.1
  for k, v in kw.items():
    c[k] = v
  return optim.make_schedule(c, 110)


@pytest.mark.parametrize('kind', optim.SCHEDULES)
def test_warmup_reaches_peak(kind):
  f = sched(kind)
  assert float(f(0)) == pytest.approx(0.1)  # (0+1)/10
  assert float(f(4)) == pytest.approx(0.5)
  assert float(f(10)) == pytest.approx(1.0)


def test_constant_linear_cosine_end_values():
  assert float(sched('constant')(110)) == pytest.approx(1.0)
  assert float(sched('linear')(60)) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
  assert float(sched('linear')(110)) == pytest.approx(0.1)
  assert float(sched('cosine')(60)) == pytest.approx(0.55)
  assert float(sched('cosine')(110)) == pytest.approx(0.1)
  assert float(sched('cosine')(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25)))


@pytest.mark.parametrize('shape,mid', [('linear', 0.55), ('cosine', 0.55), ('sqrt', 0.1 + 0.9 * (1 - 0.5 ** 0.5))])
def test_wsd_stable_then_decay(shape, mid):
  f = sched('wsd', decay_fraction=0.2, decay_shape=shape)  # 110 steps: decay over the last 22 (88..110)
  assert float(f(50)) == pytest.approx(1.0)
  assert float(f(88)) == pytest.approx(1.0)
  assert float(f(99)) == pytest.approx(mid, rel=1e-5)
  assert float(f(110)) == pytest.approx(0.1)


def test_decay_mask_excludes_norms_biases_embeddings():
  params = {'embed': 0, 'lm_head': 0, 'final_norm': {'scale': 0},
            'blocks': {'attn': {'q': 0, 'q_bias': 0}, 'mlp_norm': {'scale': 0}, 'mlp': {'up': 0}}}
  mask = optim.decay_mask(params, base_config().optim.no_decay)
  assert mask == {'embed': False, 'lm_head': True, 'final_norm': {'scale': False},
                  'blocks': {'attn': {'q': True, 'q_bias': False}, 'mlp_norm': {'scale': False}, 'mlp': {'up': True}}}
