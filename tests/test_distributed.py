"""Two local CPU processes (gloo over 127.0.0.1) train one run: one log, one checkpoint, per-process data."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO


# Fresh processes here set their own device count; they keep the suite's cheap XLA compile (tests/conftest.py)
# and skip the matmul probe and the loss plot, which these tests do not look at (~4 s of each process).
XLA_CHEAP = ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
QUICK = ('--config.log.peak_flops=1e11', '--config.log.plot=false')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_run_that_refuses_another_process_count(tmp_path):
  workdir = str(tmp_path / 'run')
  port = free_port()
  procs = []
  for index in range(2):  # configured through config flags here; the other tests use the env variables
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2' + XLA_CHEAP)
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxtrain.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         '--config.train.steps=6', '--config.checkpoint.every=3', '--config.train.eval_every=0',
         f'--config.distributed.coordinator=127.0.0.1:{port}', '--config.distributed.num_processes=2',
         f'--config.distributed.process_id={index}', *QUICK],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert 'steps 1..6' in outs[0][0] and 'steps 1..6' not in outs[1][0]  # only the first process reports
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3, 4, 5, 6]  # written once, not twice
  assert records[0]['loss_tokens'] > 0 and all(r['loss'] == r['loss'] for r in records if 'loss' in r)
  # Per-source counters are the run's, not process 0's: 6 global batches of 8 x 64 tokens, rows ~99% full
  # (process 0 alone holds half), and the saved counts are the logged ones.
  last = [r for r in records if 'loss' in r][-1]
  assert 0.95 * 6 * 8 * 64 <= last['tokens/stdlib'] <= 6 * 8 * 64
  with open(os.path.join(workdir, 'source_tokens.json')) as f:
    assert json.load(f)['6'] == {'stdlib': last['tokens/stdlib']}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', '6', 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']

  # That run read disjoint documents per process (process_split='documents', the default): it cannot silently
  # resume with another process count (checked on this run's checkpoint rather than a second 2-process run).
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxtrain.main', '--config=configs/tiny.py', f'--workdir={workdir}',
       '--config.train.steps=8', '--config.checkpoint.every=3', '--config.train.eval_every=0', *QUICK],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4' + XLA_CHEAP),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and 'written by 2 processes' in lines[0] and "process_split='rows'" in lines[0]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '6'))  # nothing moved aside or lost


def launch(workdir: str, processes: int, devices_each: int, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
  """Runs tiny in `processes` local processes (gloo) with `devices_each` CPU devices each; returns stdouts."""
  port = free_port()
  procs = []
  for index in range(processes):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_each}' + XLA_CHEAP)
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(index))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxtrain.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         f'--config.train.steps={steps}', '--config.checkpoint.every=4', '--config.train.eval_every=0',
         '--config.data.process_split=rows', *QUICK, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  return outs


def train_losses(workdir: str) -> dict[int, float]:
  return {step: r['loss'] for step, r in train_records(workdir).items()}


def train_records(workdir: str) -> dict[int, dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if 'loss' in r}


def source_counts(workdir: str, keys: tuple[str, ...] = ('tokens/stdlib', 'epochs/stdlib')) -> dict[int, tuple]:
  """The logged per-source counters of every step (they are the run's, whatever the process count)."""
  return {step: tuple(r[k] for k in keys) for step, r in train_records(workdir).items()}


@pytest.mark.slow
def test_two_processes_match_one_and_one_process_restores_their_checkpoint(tmp_path):
  single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
  launch(single, processes=1, devices_each=4, steps=8)
  launch(double, processes=2, devices_each=2, steps=8)
  one, two = train_losses(single), train_losses(double)
  assert sorted(one) == sorted(two) == list(range(1, 9))
  for step in one:  # the same global batch on the same 4-device program; only the collectives differ
    assert two[step] == pytest.approx(one[step], rel=1e-6), (step, one[step], two[step])
  # The logged tokens/<source> and epochs/<source> are global (summed over processes): the same global batches,
  # the same counts; so are the saved ones.
  counts = source_counts(single)
  assert source_counts(double) == counts and counts[1][0] > 0
  with open(os.path.join(single, 'source_tokens.json')) as f, open(os.path.join(double, 'source_tokens.json')) as g:
    assert json.load(f) == json.load(g)
  data_dir = os.path.join(double, 'checkpoints', '8', 'data')
  assert sorted(os.listdir(data_dir)) == ['commit_success.txt', 'metadata']  # one shared iterator state
  # A single process resumes the two-process run from its step-4 checkpoint and continues as the
  # single-process run did (to the same 1e-6: the restored parameters carry the collectives' rounding).
  shutil.rmtree(os.path.join(double, 'checkpoints', '8'))
  out = launch(double, processes=1, devices_each=4, steps=8)[0]
  assert f'resumed from {double}/checkpoints/4' in out
  resumed = train_losses(double)
  for step in range(5, 9):
    assert resumed[step] == pytest.approx(one[step], rel=1e-6), (step, one[step], resumed[step])
  assert source_counts(double) == counts  # the counters continue from the two processes' global counts
