"""Runs that survive, tested on real processes: signals and the STOP file save and quit, SIGKILL and corrupted
checkpoints resume from the newest good one, and every resume continues with the exact losses of an
uninterrupted run."""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 60
ARGS = ['--config=configs/tiny.py', f'--config.train.steps={STEPS}', '--config.checkpoint.every=10',
        '--config.checkpoint.keep=20', '--config.train.eval_every=0', '--config.log.every=1',
        # Each run is a fresh process: skip the 2.5 s matmul probe (at the suite's LLVM opt level 0) and the
        # 2 s matplotlib plot, which these tests do not look at.
        '--config.log.peak_flops=1e11', '--config.log.plot=false']


def start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'jaxtrain.main', *ARGS, f'--workdir={workdir}'], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def losses(workdir: str) -> dict[int, float]:
  """Train loss per step, the last record winning (a resumed run re-logs the steps after its checkpoint)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        out[r['step']] = r['loss']
  return out


def wait_for_step(proc: subprocess.Popen, workdir: str, step: int) -> None:
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(path) and len(losses(workdir)) >= step:
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  raise TimeoutError(f'no step {step} in {path}')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  finish(start(workdir))
  ref = losses(workdir)
  assert sorted(ref) == list(range(1, STEPS + 1))
  return ref


def logged_steps(workdir: str) -> tuple[list[int], list[int]]:
  """The steps of metrics.jsonl's (train, eval) rows, in file order, repeats included."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r['step'] for r in records if 'loss' in r], [r['step'] for r in records if 'eval_loss' in r]


# What must never reach the terminal of a resumed run: library tracebacks and warnings (orbax's about an
# interrupted save, asyncio/TensorStore's after a failed read of a corrupt checkpoint).
NOISE = re.compile(r'Traceback|Event loop is closed|Exception ignored|never retrieved|orbax|tensorstore|asyncio')


def resume_and_compare(workdir: str, reference: dict[int, float]) -> str:
  out, err = finish(start(workdir))
  assert not NOISE.search(err), err[-3000:]
  assert losses(workdir) == reference  # bitwise: the steps after the resume equal the uninterrupted run
  # Each step logged once: the resume dropped the rows logged past its checkpoint (plots, compare, dashboards).
  assert logged_steps(workdir) == (list(range(1, STEPS + 1)), [STEPS])
  return out


def test_stop_requests_save_quit_and_resume_exactly(reference, tmp_path):
  # One run stopped four times, once by each kind of request (the last a second SIGINT while the first one's
  # save is under way), each time resumed by the same command; the whole loss history must equal the
  # uninterrupted run's (one lineage instead of four keeps the suite short).
  workdir = str(tmp_path / 'run')
  stopped_at = 0
  for how, at in (('SIGTERM', 12), ('SIGUSR1', 24), ('STOP', 36), ('SIGINT twice', 46)):
    proc = start(workdir)
    if stopped_at:
      wait_for_step(proc, workdir, stopped_at + 1)
    wait_for_step(proc, workdir, at)
    if how == 'STOP':
      open(os.path.join(workdir, 'STOP'), 'w').close()
    elif how == 'SIGINT twice':
      proc.send_signal(signal.SIGINT)
      time.sleep(0.02)
      proc.send_signal(signal.SIGINT)
    else:
      proc.send_signal(getattr(signal, how))
    out, err = finish(proc)
    assert 'Traceback' not in err, err[-3000:]
    if stopped_at:
      assert f'resumed from {workdir}/checkpoints/{stopped_at}' in out
    stopped_at = max(losses(workdir))
    assert at <= stopped_at < STEPS
    reason = {'STOP': 'STOP file', 'SIGINT twice': 'SIGINT'}.get(how, how)
    assert 'stopped by' in out and reason in out and 'run the same command to resume' in out, out
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped_at)))
    assert not os.path.exists(os.path.join(workdir, 'STOP'))  # consumed, so the rerun does not stop at once
  out = resume_and_compare(workdir, reference)
  assert f'resumed from {workdir}/checkpoints/{stopped_at}' in out


def test_sigkill_at_random_moments_resumes_from_newest_complete(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  rng = random.Random(0)
  for target in (14, 33):  # two kills: one in the first run, one in the resumed run
    proc = start(workdir)
    wait_for_step(proc, workdir, target)
    time.sleep(rng.uniform(0.0, 0.5))  # anywhere, often inside an async save
    proc.kill()
    proc.wait()
  out = resume_and_compare(workdir, reference)
  assert 'resumed from' in out


def test_corrupted_checkpoints_are_reported_and_skipped(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = start(workdir)
  wait_for_step(proc, workdir, 35)
  open(os.path.join(workdir, 'STOP'), 'w').close()
  finish(proc)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  newest, previous, good = steps[-1], steps[-2], steps[-3]
  # Truncate the biggest state file of the newest checkpoint; delete the data-iterator file of the previous.
  files = [f for f in glob.glob(f'{ckpt_dir}/{newest}/state/**', recursive=True) if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  for f in glob.glob(f'{ckpt_dir}/{previous}/data/process_*.json'):
    os.remove(f)
  out = resume_and_compare(workdir, reference)
  assert f'resumed from {ckpt_dir}/{good}' in out, out
  for step in (newest, previous):
    assert f'checkpoint {ckpt_dir}/{step} is incomplete or corrupt' in out
    assert glob.glob(f'{ckpt_dir}/{step}.corrupt-*'), os.listdir(ckpt_dir)  # moved aside, not deleted


NAN_SCRIPT = '''
import sys
import numpy as np
from jaxtrain import data, main

make_dataset = data.make_dataset
def poisoned(*args, **kwargs):
  ds = make_dataset(*args, **kwargs)
  if kwargs.get('split') != 'train':
    return ds
  count = [0]
  def poison(batch):
    count[0] += 1
    if count[0] in (5, 6, 7):  # the batches of steps 5, 6 and 7
      batch = dict(batch, loss_mask=batch['loss_mask'].astype(np.float32))
      batch['loss_mask'][0, 3] = np.nan
    return batch
  return ds.map(poison)
data.make_dataset = poisoned
sys.argv = ['jaxtrain'] + sys.argv[1:]
main.run_main()
'''


@pytest.mark.parametrize('calls', [1, 4])
def test_non_finite_steps_are_skipped_then_stop_with_a_clean_checkpoint(tmp_path, calls):
  """Steps 5-7 are non-finite and max_bad_steps is 3. One step per call: the run stops at 7 with the state of
  step 4. Four per call: step 8 recovers and steps 8-12 have run when the streak is read; the run still stops,
  saying so, with the state after step 12."""
  import jax
  import numpy as np
  import optax

  from jaxtrain import sharding
  from jaxtrain.train import loop as train
  from jaxtrain.train.checkpoint import Checkpointer

  script = tmp_path / 'nan_run.py'
  script.write_text(NAN_SCRIPT)
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, str(script), '--config=configs/tiny.py', f'--workdir={workdir}', '--config.train.steps=30',
       '--config.checkpoint.every=4', '--config.train.max_bad_steps=3', '--config.data.prefetch=0',
       f'--config.train.steps_per_call={calls}', '--config.log.peak_flops=1e11', '--config.log.plot=false'],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 1, proc.stderr[-3000:]
  message = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(message) == 1 and '3 consecutive steps (5..7)' in message[0], proc.stderr[-3000:]
  assert 'Samples of step 7:' in message[0]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if r.get('skipped')] == [5, 6, 7]
  with open(os.path.join(workdir, 'nonfinite_steps.json')) as f:
    bad = json.load(f)
  assert [b['step'] for b in bad] == [5, 6, 7] and all(b['samples'] for b in bad)
  if calls > 1:
    assert 'steps 8..12 had already run' in message[0] and 'holds the state after step 12' in message[0], message
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), every=4, keep=3)
    assert 12 in ckpt.all_steps() and max(r['step'] for r in records if 'loss' in r) == 12
    return
  assert 'from before step 5' in message[0]
  # The checkpoint written at the stop holds exactly the state of step 4: the bad updates were skipped.
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  config = json.load(open(os.path.join(workdir, 'config.json')))
  from jaxtrain import data, models
  from jaxtrain.train import optim
  from jaxtrain.config.defaults import base_config
  cfg = base_config()
  cfg.update_from_flattened_dict({f'{s}.{k}': v for s, d in config.items() for k, v in d.items()})
  mc = models.model_config(cfg.model, data.load_tokenizer(cfg.data).vocab_size)
  with jax.set_mesh(mesh):
    _, abstract, _, _ = train.state_factory(mc, optim.make_optimizer(cfg.optim, 30)[0], 0, mesh)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), every=4, keep=3)
  assert 7 in ckpt.all_steps()
  at4, at7 = ckpt.restore(4, abstract, None), ckpt.restore(7, abstract, None)
  for a, b in zip(jax.tree.leaves((at4['params'], at4['opt_state'])),
                  jax.tree.leaves((at7['params'], at7['opt_state'])), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(at7['step']) == 7
  del optax
