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
  assert float(f(0)) == pytest.approx(0.1)  # (0+1)/10: step 0 already moves
  assert float(f(4)) == pytest.approx(0.5)
  assert float(f(9)) == pytest.approx(1.0)  # the last warmup step is the first at the peak
  assert float(f(10)) == pytest.approx(1.0)  # decay starts after it


def test_constant_linear_cosine_end_values():
  """110 steps, warmup 10: linear and cosine go from the peak at step 10 to the floor at step 109, the last."""
  assert float(sched('constant')(109)) == pytest.approx(1.0)
  assert float(sched('linear')(59.5)) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
  assert float(sched('linear')(109)) == pytest.approx(0.1)
  assert float(sched('cosine')(59.5)) == pytest.approx(0.55)
  assert float(sched('cosine')(109)) == pytest.approx(0.1)
  assert float(sched('cosine')(34.75)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25)))


@pytest.mark.parametrize('shape,mid', [('linear', 0.55), ('cosine', 0.55), ('sqrt', 0.1 + 0.9 * (1 - 0.5 ** 0.5))])
def test_wsd_stable_then_decay(shape, mid):
  f = sched('wsd', decay_fraction=0.2, decay_shape=shape)  # 110 steps: the last 22 (88..109) decay
  assert float(f(50)) == pytest.approx(1.0)
  assert float(f(87)) == pytest.approx(1.0)
  assert float(f(88)) < 1.0
  assert float(f(98)) == pytest.approx(mid, rel=1e-5)
  assert float(f(109)) == pytest.approx(0.1)


@pytest.mark.parametrize('kind,shape', [('linear', 'linear'), ('cosine', 'linear'), ('wsd', 'linear'),
                                        ('wsd', 'cosine'), ('wsd', 'sqrt')])
@pytest.mark.parametrize('steps,warmup,fraction', [(20, 5, 0.5), (50, 5, 0.1), (7, 0, 0.2), (3, 1, 0.5)])
def test_the_last_trained_step_uses_the_floor(kind, shape, steps, warmup, fraction):
  """The issue's numbers: 20 steps, warmup 5, decay_fraction 0.5 ended at 0.16/0.11/0.19/0.15 of the peak and a
  50-step wsd with decay_fraction 0.1 at 0.28; the last step (index steps-1) now uses lr * min_lr_ratio."""
  c = base_config().optim
  c.schedule, c.decay_shape, c.lr, c.warmup_steps, c.min_lr_ratio, c.decay_fraction = (
      kind, shape, 2.0, warmup, 0.1, fraction)
  f = optim.make_schedule(c, steps)
  lrs = [float(f(i)) for i in range(steps)]
  assert lrs[-1] == pytest.approx(0.2)
  assert lrs[0] > 0 and max(lrs) == pytest.approx(2.0)
  if warmup:
    assert lrs[warmup - 1] == pytest.approx(2.0) and lrs[0] == pytest.approx(2.0 / warmup)
  assert all(a >= b - 1e-6 for a, b in zip(lrs[warmup:-1], lrs[warmup + 1:], strict=True))  # never rises after warmup


def test_a_warmup_longer_than_the_run_is_clamped_with_a_note():
  c = base_config().optim
  c.schedule, c.lr, c.warmup_steps = 'cosine', 1.0, 1000
  optim.check(c)  # no error
  f = optim.make_schedule(c, 8)
  assert [float(f(i)) for i in range(8)] == pytest.approx([(i + 1) / 8 for i in range(8)])
  assert 'optim.warmup_steps=1000' in optim.warmup_note(c, 8)
  assert optim.warmup_note(c, 1000) is None


def test_decay_mask_excludes_norms_biases_embeddings():
  params = {'embed': 0, 'lm_head': 0, 'final_norm': {'scale': 0},
            'blocks': {'attn': {'q': 0, 'q_bias': 0}, 'mlp_norm': {'scale': 0}, 'mlp': {'up': 0}}}
  mask = optim.decay_mask(params, base_config().optim.no_decay)
  assert mask == {'embed': False, 'lm_head': True, 'final_norm': {'scale': False},
                  'blocks': {'attn': {'q': True, 'q_bias': False}, 'mlp_norm': {'scale': False}, 'mlp': {'up': True}}}


# Through the command line, in-process (`jaxtrain.cli.main`, as a user runs it): `fit` is wrapped to keep the
# RunResult and the job's initial parameters.

def train_cli(workdir, monkeypatch, *flags):
  import jax

  from jaxtrain import cli
  from jaxtrain.train import loop
  kept, real_fit = {}, loop.fit

  def fit(config, job, *args, **kwargs):
    kept['config'], kept['init'] = config, jax.device_get(job.built.create()['params'])
    kept['result'] = real_fit(config, job, *args, **kwargs)
    return kept['result']

  monkeypatch.setattr(loop, 'fit', fit)
  cli.main(['jaxtrain', 'train', '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.eval_every=0',
            '--config.train.eval_batches=1', '--config.checkpoint.every=0', '--config.log.every=1',
            '--config.data.prefetch=0', *flags])
  return kept


def logged(workdir):
  import json
  import os
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'lr' in r]


def test_skipped_steps_consume_their_schedule_step_and_max_bad_steps_0_never_stops(tmp_path, monkeypatch, capsys):
  """Steps 1-7 of 8 are non-finite (a poisoned loss mask) and train.max_bad_steps=0: the run says in its header
  that it never stops for them, trains to the end (exit 0) and its summary counts the skipped steps. The lr of
  every step follows the train step, skipped or not: the one update applied (step 8, state step 7) is Adam's
  first, |update| = lr where the gradient is not ~0, and it is the floor the log shows, not schedule(0) as when
  optax's own counter froze on skipped steps."""
  import jax
  import numpy as np

  from jaxtrain import data
  make_dataset = data.make_dataset

  def poisoned(*args, **kwargs):
    ds = make_dataset(*args, **kwargs)
    if kwargs.get('split') != 'train':
      return ds
    count = [0]

    def poison(batch):
      count[0] += 1
      if count[0] <= 7:
        batch = dict(batch, loss_mask=batch['loss_mask'].astype(np.float32))
        batch['loss_mask'][0, 3] = np.nan
      return batch
    return ds.map(poison)

  monkeypatch.setattr(data, 'make_dataset', poisoned)
  workdir = str(tmp_path / 'run')
  kept = train_cli(workdir, monkeypatch, '--config.train.steps=8', '--config.train.max_bad_steps=0',
                   '--config.optim.weight_decay=0', '--config.optim.schedule=cosine', '--config.train.steps_per_call=1')
  out = capsys.readouterr().out
  assert 'non-finite steps are skipped and never stop the run (train.max_bad_steps=0)' in out.splitlines()[0], out
  assert '7 of 8 steps skipped (non-finite)' in out, out
  result, config = kept['result'], kept['config']
  assert result.skipped == 7 and int(result.state['step']) == 8
  records = logged(workdir)
  schedule = optim.make_schedule(config.optim, 8)
  assert [r['step'] for r in records] == list(range(1, 9))
  assert [r['skipped'] for r in records] == [1.0] * 7 + [0.0]
  assert [r['lr'] for r in records] == pytest.approx([float(schedule(s)) for s in range(8)])
  assert records[-1]['lr'] == pytest.approx(config.optim.lr * config.optim.min_lr_ratio)
  moved = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
              for a, b in zip(jax.tree.leaves(jax.device_get(result.state['params'])), jax.tree.leaves(kept['init']),
                              strict=True))
  assert moved == pytest.approx(records[-1]['lr'], rel=1e-3)


def test_a_warmup_longer_than_a_short_run_is_clamped_with_a_note(tmp_path, monkeypatch, capsys):
  """A smoke run shorter than the config's warmup (`--config.train.steps=8` on configs/llama.py) used to be a
  ConfigError; the warmup is clamped to the run, with a note at its start."""
  workdir = str(tmp_path / 'run')
  train_cli(workdir, monkeypatch, '--config.train.steps=4', '--config.optim.warmup_steps=1000',
            '--config.train.steps_per_call=1')
  out = capsys.readouterr().out
  assert ('note: optim.warmup_steps=1000 is longer than the 4 steps of this run; warming up over all 4 (the run '
          'ends at the peak lr)') in out, out
  assert [r['lr'] for r in logged(workdir)] == pytest.approx([1e-2 * (i + 1) / 4 for i in range(4)])
