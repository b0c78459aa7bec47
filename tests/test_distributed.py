"""Two local CPU processes (gloo over 127.0.0.1) train one run: one log, one checkpoint, per-process data."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
  workdir = str(tmp_path / 'run')
  port = free_port()
  procs = []
  for index in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(index), XLA_FLAGS='--xla_force_host_platform_device_count=2')
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxtrain.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         '--config.train.steps=6', '--config.checkpoint.every=3', '--config.train.eval_every=0'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert 'steps 1..6' in outs[0][0] and 'steps 1..6' not in outs[1][0]  # only the first process reports
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'loss' in r] == [1, 2, 3, 4, 5, 6]  # written once, not twice
  assert records[0]['loss_tokens'] > 0 and all(r['loss'] == r['loss'] for r in records if 'loss' in r)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', '6', 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
