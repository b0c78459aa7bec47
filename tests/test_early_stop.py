"""train.early_stop and data.eval_sets: a plateau stops at the evaluation its logged metrics predict, a target at
the first evaluation reaching it, the best checkpoint survives checkpoint.keep=1 and is what `eval --best` and
`export --best` pick, a rerun trains no further unless train.steps or the settings change, named sets are
logged per set (equal to `jaxtrain eval` on the same files), and bad settings are one line, exit 2, nothing
written. Every run goes through the `jaxtrain train` command in this process."""

import json
import math
import os
import shutil

import pytest

from jaxtrain.train import earlystop, metrics
from tests.helpers import run_captured
from tests.conftest import REPO

# configs/tiny.py, one step per call, one eval batch, no plot, a stated peak (no probe matmul); 12 steps with an
# evaluation every 2 and a checkpoint every 4, of which only the newest is kept (plus the best). A constant lr:
# the train step does not depend on train.steps, so every run here (16 steps too) shares one compiled program.
# A small packing look-ahead: the named set's rows then hold no piece twice (see the jaxtrain eval comparison).
BASE = (f'--config={os.path.join(REPO, "configs", "tiny.py")}', '--config.train.steps_per_call=1',
        '--config.train.eval_batches=1', '--config.log.plot=False', '--config.log.peak_flops=1e12',
        '--config.train.steps=12', '--config.train.eval_every=2', '--config.checkpoint.every=4',
        '--config.checkpoint.keep=1', '--config.optim.schedule=constant', '--config.data.pack_buffer=16')
# A plateau by the rule's own measure: the tiny run's eval_loss falls by less than min_delta=1 over all its steps
# (checked on the logs), so no evaluation after the first improves on it. Patience 2: it stops at step 6.
PLATEAU = ('--config.train.early_stop.metric=eval_loss', '--config.train.early_stop.min_delta=1.0',
           '--config.train.early_stop.patience=2')
MIN_DELTA = 1.0


def jaxtrain(*argv: str) -> tuple[int, str, list[str]]:
  """(exit status, stdout, stderr lines) of `jaxtrain ARGV` in this process."""
  code, out, err = run_captured(*argv)
  return code, out, [line for line in err.splitlines() if line.strip()]


def train(workdir: str, *extra: str) -> str:
  code, out, err = jaxtrain('train', f'--workdir={workdir}', *BASE, *extra)
  assert code == 0, err
  return out


def evals(workdir: str, metric: str = 'eval_loss') -> dict[int, float]:
  return {r['step']: r[metric] for r in metrics.read_metrics(workdir) if metric in r}


def trained_steps(workdir: str) -> list[int]:
  return [r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r]


def checkpoints(workdir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def predicted_stop(values: dict[int, float], patience: int, min_delta: float) -> int | None:
  """The rule written out independently for mode min: the step of the evaluation after which `patience`
  evaluations in a row failed to beat the best by min_delta (and by more than nothing)."""
  best, bad = math.inf, 0
  for step in sorted(values):
    if best - values[step] > 0 and best - values[step] >= min_delta:
      best, bad = values[step], 0
    else:
      bad += 1
      if bad == patience:
        return step
  return None


@pytest.fixture(scope='module')
def held(tmp_path_factory):
  """A JSON Lines file of three stdlib modules' text: more than one eval batch of tokens (no piece repeats)."""
  path = tmp_path_factory.mktemp('held') / 'held.jsonl'
  import csv
  import string
  import textwrap
  with open(path, 'w', encoding='utf-8') as f:
    for module in (csv, string, textwrap):
      with open(module.__file__, encoding='utf-8') as src:
        f.write(json.dumps({'text': src.read()[:6000]}) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def plateau(tmp_path_factory, held):
  """A run with the named set `held` that stops early on the plateau, and the output of its first run."""
  workdir = str(tmp_path_factory.mktemp('early') / 'plateau')
  return workdir, train(workdir, *PLATEAU, *SETS(held))


def SETS(held: str) -> tuple[str, ...]:  # noqa: N802 -- reads as the constant it stands for
  return (f'--config.data.eval_sets=held={held}',)


def test_the_rule():
  s = earlystop.Settings('eval_loss', 'min', patience=2, min_delta=0.1)
  t = earlystop.update(s, earlystop.Tracker(), 5, 3.0)
  assert (t.best, t.best_step, t.bad, t.improved, t.reason) == (3.0, 5, 0, True, None)
  t = earlystop.update(s, t, 10, 2.95)  # better, but by less than min_delta: no improvement, the best stays
  assert (t.best, t.best_step, t.bad, t.improved, t.reason) == (3.0, 5, 1, False, None)
  t = earlystop.update(s, t, 15, math.nan)  # a non-finite value never improves
  assert t.bad == 2 and 'did not improve on its best 3 (step 5)' in t.reason and 'patience=2' in t.reason
  flat = earlystop.Settings('eval_loss', 'min', patience=1)
  assert earlystop.update(flat, earlystop.update(flat, earlystop.Tracker(), 1, 2.0), 2, 2.0).reason  # equal: none
  up = earlystop.Settings('eval_ppl', 'max', patience=0, target=10.0)
  t = earlystop.update(up, earlystop.Tracker(), 1, 9.0)
  assert t.improved and t.reason is None
  t = earlystop.update(up, t, 2, 10.0)
  assert t.improved and t.best_step == 2 and 'reached train.early_stop.target=10' in t.reason
  assert earlystop.replay(s, [{'step': 5, 'eval_loss': 3.0}, {'step': 6, 'loss': 1.0},
                              {'step': 10, 'eval_loss': 2.0}]) == earlystop.Tracker(2.0, 10, 0, True, None)


def test_plateau_stops_at_the_predicted_evaluation(plateau):
  workdir, out = plateau
  logged = evals(workdir)
  assert sorted(logged) == [2, 4, 6]  # no evaluation (and no train step) after the stop
  assert max(logged.values()) - min(logged.values()) < MIN_DELTA  # the plateau, read from the logs
  assert logged[6] < logged[4] < logged[2]  # though it learns
  assert predicted_stop(logged, patience=2, min_delta=MIN_DELTA) == 6
  assert trained_steps(workdir) == list(range(1, 7))
  summary = out.strip().splitlines()[-1]
  assert summary.startswith('stopped early after step 6 of 12: eval_loss did not improve on its best'), summary
  assert f'best eval_loss {logged[2]:.4f} at step 2' in summary
  # The best checkpoint (step 2, off the every-4 schedule: saved because it improved) survives keep=1.
  assert checkpoints(workdir) == [2, 6] and earlystop.best_step(workdir) == 2
  record = earlystop.read(workdir)
  assert record['best'] == {'metric': 'eval_loss', 'value': logged[2], 'step': 2}
  assert record['stopped']['step'] == 6 and record['stopped']['steps'] == 12


def test_rerun_trains_no_further(plateau, held):
  workdir, _ = plateau
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    before = f.read()
  out = train(workdir, *PLATEAU, *SETS(held))
  assert 'already stopped early at step 6 of 12: eval_loss did not improve' in out.strip().splitlines()[-1]
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert f.read() == before
  assert checkpoints(workdir) == [2, 6]


def test_eval_and_export_best_pick_the_best_checkpoint(plateau, tmp_path):
  workdir, _ = plateau
  code, out, err = jaxtrain('eval', f'--workdir={workdir}', '--best')
  assert code == 0, err
  with open(os.path.join(workdir, 'eval', '2.json'), encoding='utf-8') as f:
    assert json.load(f)['step'] == 2
  code, out, err = jaxtrain('export', f'--workdir={workdir}', '--best', f'--out={tmp_path / "hf"}')
  assert code == 0, err
  assert out.startswith(f'exported step 2 of {workdir}'), out
  for argv in (('eval', '--best', '--step=6'), ('export', '--best', '--step=6', f'--out={tmp_path / "x"}')):
    code, out, err = jaxtrain(argv[0], f'--workdir={workdir}', *argv[1:])
    assert code == 2 and len(err) == 1 and 'choose one' in err[0], err
  assert not os.path.exists(tmp_path / 'x')


def test_best_of_a_run_without_one_is_one_line(plateau, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(plateau[0], workdir)
  os.remove(earlystop.record_path(workdir))
  evaluated = sorted(os.listdir(os.path.join(workdir, 'eval'))) if os.path.isdir(os.path.join(workdir, 'eval')) else []
  for argv in (('eval', '--best'), ('export', '--best', f'--out={tmp_path / "x"}')):
    code, out, err = jaxtrain(argv[0], f'--workdir={workdir}', *argv[1:])
    assert code == 2 and len(err) == 1, err
    assert 'recorded no best checkpoint' in err[0] and 'available: 2, 6' in err[0], err
  assert not os.path.exists(tmp_path / 'x')
  assert (sorted(os.listdir(os.path.join(workdir, 'eval'))) if evaluated else []) == evaluated


def test_more_steps_or_other_settings_train_on(plateau, held, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(plateau[0], workdir)
  # More steps: it trains on, and the rule (2 evaluations without improvement already) stops it at the next one.
  out = train(workdir, *PLATEAU, *SETS(held), '--config.train.steps=16')
  assert trained_steps(workdir) == list(range(1, 9))
  assert out.strip().splitlines()[-1].startswith('stopped early after step 8 of 16'), out
  # patience 5 judges the same history by the new rule: 3 bad evaluations so far, 2 more stop it at step 12.
  out = train(workdir, *PLATEAU, *SETS(held), '--config.train.steps=16', '--config.train.early_stop.patience=5')
  assert trained_steps(workdir) == list(range(1, 13))
  logged = evals(workdir)
  assert predicted_stop(logged, patience=5, min_delta=MIN_DELTA) == 12
  assert 'stopped early after step 12 of 16' in out and 'in 5 evaluations' in out
  assert checkpoints(workdir) == [2, 12] and earlystop.best_step(workdir) == 2


def test_named_sets_are_logged_and_equal_jaxtrain_eval(plateau, held):
  workdir, _ = plateau
  records = [r for r in metrics.read_metrics(workdir) if 'eval_loss' in r]
  assert [r['step'] for r in records][:3] == [2, 4, 6]
  for r in records:
    assert {'eval_loss/held', 'eval_ppl/held', 'eval_tokens/held'} <= set(r)
    assert math.isclose(r['eval_ppl/held'], math.exp(r['eval_loss/held']))
  held_loss = evals(workdir, 'eval_loss/held')
  assert held_loss[6] < held_loss[2]  # it learns
  # `jaxtrain eval` on the same file, one batch: the same rows, scored by its own code.
  code, out, err = jaxtrain('eval', f'--workdir={workdir}', '--step=6', f'--data=again={held}', '--batches=1')
  assert code == 0, err
  with open(os.path.join(workdir, 'eval', '6.json'), encoding='utf-8') as f:
    scored = json.load(f)['sets']
  again = scored['again']
  assert again['repeats_skipped'] == 0 and abs(again['loss'] - held_loss[6]) < 1e-5, (again['loss'], held_loss)
  # The run's own named set is scored without being asked for, as the loop scored it.
  assert scored['held']['kind'] == 'named' and scored['held']['loss'] == again['loss'], scored['held']


def test_target_stops_at_the_first_evaluation_reaching_it(plateau, held, tmp_path):
  reference = evals(plateau[0], 'eval_loss/held')
  target = (reference[2] + reference[4]) / 2  # step 2 is above it, step 4 reaches it
  workdir = str(tmp_path / 'target')
  out = train(workdir, *SETS(held), '--config.train.early_stop.metric=eval_loss/held',
              f'--config.train.early_stop.target={target!r}')
  assert evals(workdir, 'eval_loss/held') == {2: reference[2], 4: reference[4]}  # the same run, up to its stop
  summary = out.strip().splitlines()[-1]
  assert summary.startswith('stopped early after step 4 of 12: eval_loss/held'), summary
  assert f'reached train.early_stop.target={target:g}' in summary
  assert earlystop.best_step(workdir) == 4 and checkpoints(workdir) == [4]  # 4 is the best and the newest


@pytest.mark.parametrize('overrides, message', [
    (('--config.train.early_stop.metric=eval_acc',), "config.train.early_stop.metric='eval_acc': is not an eval "
     'metric this run logs; valid: eval_loss, eval_ppl'),
    (('--config.train.early_stop.metric=eval_loss/wiki',), 'METRIC/NAME needs NAME in data.eval_sets'),
    (('--config.train.early_stop.metric=eval_loss', '--config.train.early_stop.mode=avg'),
     "config.train.early_stop.mode='avg': must be one of min, max"),
    (('--config.train.early_stop.metric=eval_loss', '--config.train.early_stop.patience=-1'),
     'config.train.early_stop.patience=-1: must be >= 0'),
    (('--config.train.early_stop.min_delta=-0.5',), 'config.train.early_stop.min_delta=-0.5: must be >= 0'),
    (('--config.train.early_stop.target=3.5',), 'train.early_stop.target is set'),
    (('--config.train.early_stop.metric=eval_loss', '--config.train.eval_every=0'), 'train.eval_every=0'),
    (('--config.data.eval_sets=held',), "entry 'held' is not NAME=GLOBS"),
    (('--config.data.eval_sets=a b=x.jsonl',), "the set name 'a b' may hold only letters, digits, - and _"),
    (('--config.data.eval_sets=held=/no/such/*.jsonl',), "the glob '/no/such/*.jsonl' of set 'held' matches no file"),
    (('--config.data.eval_sets=held=,',), "set 'held' names no file"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, overrides, message):
  workdir = tmp_path / 'run'
  code, out, err = jaxtrain('train', f'--workdir={workdir}', *BASE, *overrides)
  assert code == 2 and len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not workdir.exists()


@pytest.mark.parametrize('lines, message', [
    ('', 'holds no non-empty document'),
    ('{"body": 1}\n{"body": 2}\n', "2 bad records of 2"),
])
def test_a_set_that_does_not_read_is_named_as_the_user_wrote_it(tmp_path, lines, message):
  """Not as the data.sources.NAME section it is read as (a key the user never wrote): one line, nothing written."""
  path = tmp_path / 'bad.jsonl'
  path.write_text(lines)
  workdir = tmp_path / 'run'
  code, out, err = jaxtrain('train', f'--workdir={workdir}', *BASE, f'--config.data.eval_sets=bad={path}')
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith(f"error: data.eval_sets set 'bad': '{path}' ") and message in err[0], err
  assert 'data.sources' not in err[0], err
  assert not workdir.exists()


def test_the_step_it_stopped_at_is_logged_whatever_log_every(held, tmp_path):
  """log.every=4 logs steps 4, 8, 12; the run stops early at 6, which is logged too (`jaxtrain runs` reads the
  latest train loss from there)."""
  workdir = str(tmp_path / 'sparse')
  out = train(workdir, *PLATEAU, *SETS(held), '--config.log.every=4')
  assert out.strip().splitlines()[-1].startswith('stopped early after step 6 of 12'), out
  assert trained_steps(workdir)[-1] == 6 and 5 not in trained_steps(workdir)
  code, out, err = jaxtrain('runs', workdir, '--json')
  assert code == 0, err
  assert json.loads(out)['runs'][0]['loss_step'] == 6


def test_fewer_steps_than_the_run_holds_keep_its_history(plateau, held, tmp_path):
  """A rerun asking for fewer train.steps than the run holds (it stopped at 6; now 4) trains nothing and evaluates
  again at step 6: the evaluation at step 4 stays as it was, none is logged at a step the weights are not from,
  and the best checkpoint stays."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(plateau[0], workdir)
  before = evals(workdir)
  train(workdir, *PLATEAU, *SETS(held), '--config.train.steps=4')
  rows = [r['step'] for r in metrics.read_metrics(workdir)]
  assert rows == sorted(rows), rows
  assert evals(workdir) == pytest.approx(before)
  assert checkpoints(workdir) == [2, 6] and earlystop.best_step(workdir) == 2
