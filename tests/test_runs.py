"""`jaxtrain runs` and WORKDIR/run.json: runs that ended done, stopped (STOP file), failed (non-finite) and
early-stopped for real (tiny in-process runs of 4 steps, trained once for the module), an export recorded in the
run directory; the statuses a run cannot cheaply reach (killed by SIGKILL, on another host, running, from an
older jaxtrain, a StackWise rack mid-stage) fabricated on disk beside them."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from jaxtrain import data
from jaxtrain.errors import NonFiniteError, UserError
from jaxtrain.train import resume, runstatus
from tests.helpers import run_captured
from tests.conftest import REPO

TINY = os.path.join(REPO, 'configs', 'tiny.py')
SHORT = ('--config.train.steps=4', '--config.train.eval_every=2', '--config.checkpoint.every=2',
         '--config.train.steps_per_call=1', '--config.train.eval_batches=1', '--config.log.plot=false',
         '--config.log.peak_flops=1e12')


def command(*args: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `jaxtrain ARGS` in this process (a module fixture has no capsys)."""
  return run_captured(*args)


def train(root, name: str, *flags: str) -> tuple[int, str, str]:
  return command('train', f'--config={TINY}', f'--workdir={root / name}', *SHORT, *flags)


def listed(root) -> dict[str, dict]:
  """path -> record of `jaxtrain runs ROOT --json`."""
  code, out, err = command('runs', str(root), '--json')
  assert code == 0 and not err, err
  got = json.loads(out)
  assert got['schema'] == 1 and got['dir'] == str(root)
  return {r['path']: r for r in got['runs']}


def row(table: str, path: str) -> str:
  return next(line for line in table.splitlines() if line.split()[:1] == [path])


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """A directory of real runs: done (then exported into the same directory), stopped by its STOP file,
  failed on non-finite steps, early-stopped by a target."""
  root = tmp_path_factory.mktemp('runs')
  code, _, err = train(root, 'done')
  assert code == 0, err
  code, _, err = command('export', f'--workdir={root / "done"}', f'--out={root / "done-hf"}')  # an HF dir: no run
  assert code == 0, err
  (root / 'stopped').mkdir()
  (root / 'stopped' / 'STOP').touch()  # read after the first step: saved there, exit 0
  code, out, err = train(root, 'stopped')
  assert code == 0 and 'stopped by' in out, err
  make_dataset = data.make_dataset

  def failing(*args, **kwargs):  # the training data cannot be read from step 3 on (a file server went away)
    ds = make_dataset(*args, **kwargs)
    if kwargs.get('split') != 'train':
      return ds
    count = [0]

    def read(batch):
      count[0] += 1
      if count[0] == 3:
        raise OSError(5, 'Input/output error', 'corpus/part-3.jsonl')
      return batch
    return ds.map(read)
  with pytest.MonkeyPatch.context() as mp, pytest.raises(OSError):
    mp.setattr(data, 'make_dataset', failing)
    train(root, 'failed')  # not a user mistake: the traceback goes on to the user (here, to pytest.raises)
  code, out, err = train(root, 'early', '--config.train.early_stop.metric=eval_loss',
                         '--config.train.early_stop.target=100')
  assert code == 0 and 'stopped early after step 2' in out, (out, err)
  return root


def test_real_runs_end_done_stopped_failed_and_early_stopped(root):
  runs = listed(root)
  assert sorted(runs) == ['done', 'early', 'failed', 'stopped']  # done-hf (a transformers config.json) is no run
  done = runs['done']
  assert done['status'] == 'done' and done['reason'] is None and (done['step'], done['steps']) == (4, 4)
  assert done['config'] == TINY and done['kind'] == 'plain' and done['host'] == socket.gethostname()
  metrics = [json.loads(line) for line in open(root / 'done' / 'metrics.jsonl')]
  assert done['loss'] == [r['loss'] for r in metrics if 'loss' in r][-1] and done['loss_step'] == 4
  assert done['eval_loss'] == [r['eval_loss'] for r in metrics if 'eval_loss' in r][-1] and done['eval_step'] == 4
  assert done['started'] <= done['ended'] and done['best'] is None
  stopped = runs['stopped']
  assert stopped['status'] == 'stopped' and (stopped['step'], stopped['steps']) == (1, 4)
  assert stopped['reason'] == f'stopped by {root / "stopped" / "STOP"} file; rerun the same command to resume'
  assert stopped['eval_loss'] is None  # a stop saves and quits without the final evaluation
  failed = runs['failed']
  assert failed['status'] == 'failed' and failed['step'] == 2 and failed['steps'] == 4
  assert failed['reason'] == "OSError: [Errno 5] Input/output error: 'corpus/part-3.jsonl'"
  early = runs['early']
  assert early['status'] == 'early-stopped' and early['step'] == 2 and early['steps'] == 4
  assert early['reason'].startswith('eval_loss') and 'train.early_stop.target=100' in early['reason']
  assert early['best'] == {'metric': 'eval_loss', 'value': early['eval_loss'], 'step': 2}


def test_the_table_shows_each_status_with_reasons_and_exports(root):
  code, out, err = command('runs', f'--dir={root}')
  assert code == 0 and not err
  assert out.splitlines()[0].split() == ['RUN', 'CONFIG', 'STATUS', 'STEPS', 'LOSS', 'EVAL', 'BEST', 'EXPORTS',
                                         'UPDATED']
  done = row(out, 'done').split()
  assert done[1:4] == [TINY, 'done', '4/4'] and done[7] == '1'
  assert float(done[5]) == pytest.approx(listed(root)['done']['eval_loss'], abs=1e-4)
  assert row(out, 'stopped').split()[2:4] == ['stopped', '1/4']
  assert row(out, 'failed').split()[2:4] == ['failed', '2/4']
  early = row(out, 'early')
  assert early.split()[2:4] == ['early-stopped', '2/4'] and 'eval_loss ' in early and ' @2 ' in early
  assert f'stopped: stopped by {root / "stopped" / "STOP"} file' in out
  assert "failed: OSError: [Errno 5] Input/output error: 'corpus/part-3.jsonl'" in out
  assert f'exports:\ndone: step 4 -> {root / "done-hf"} (hf float32, ' in out


def test_exports_are_recorded_and_gone_ones_marked(root, tmp_path):
  (export,) = listed(root)['done']['exports']
  assert export['out'] == str(root / 'done-hf') and export['exists']
  assert (export['format'], export['dtype'], export['step'], export['stage']) == ('hf', 'float32', 4, None)
  run = tmp_path / 'done'
  shutil.copytree(root / 'done', run)
  code, _, err = command('export', f'--workdir={run}', f'--out={tmp_path / "peft"}', '--format=peft')
  assert code == 2 and 'error: ' in err  # a full run has no adapters: refused, and nothing is recorded
  code, _, err = command('export', f'--workdir={run}', '--step=2', '--dtype=bfloat16', f'--out={tmp_path / "hf2"}')
  assert code == 0, err
  shutil.rmtree(tmp_path / 'hf2')
  first, second = listed(tmp_path)['done']['exports']
  assert first['exists'] and (second['step'], second['dtype'], second['exists']) == (2, 'bfloat16', False)
  code, out, _ = command('runs', str(tmp_path))
  assert f'done: step 2 -> {tmp_path / "hf2"} (hf bfloat16, ' in out and out.rstrip().endswith('(gone)')


def test_start_over_moves_the_status_and_exports_with_the_old_run(root, tmp_path):
  run = tmp_path / 'run'
  shutil.copytree(root / 'done', run)
  moved = resume.start_over(str(run), say=lambda _: None)
  assert {os.path.basename(m) for m in moved} >= {'run.json', 'exports.jsonl'}
  runs = listed(tmp_path)
  (old,) = [p for p in runs if p.startswith('run/old-')]
  assert list(runs) == [old]  # what stays in run/ is no run until it trains again
  assert runs[old]['status'] == 'done' and len(runs[old]['exports']) == 1 and runs[old]['step'] == 4


def fabricate(root, name: str, record: dict | None, metrics: list[dict], config: dict | None = None) -> str:
  """A run directory with a tiny config.json, the run.json `record` (none: a run from an older jaxtrain) and
  metrics.jsonl rows."""
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(config or {'model': {}, 'train': {'steps': 10}}))
  if record is not None:
    base = {'schema': 1, 'kind': 'plain', 'status': 'running', 'reason': None, 'config': 'configs/tiny.py',
            'pid': os.getpid(), 'host': socket.gethostname(), 'started': runstatus.now(), 'ended': None,
            'steps': 10, 'step': None, 'best': None}
    (workdir / 'run.json').write_text(json.dumps(base | record))
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in metrics))
  return str(workdir)


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', ''])
  proc.wait()
  return proc.pid


def test_runs_that_never_wrote_their_end(tmp_path):
  rows = [{'step': s, 'loss': 5.0 - s / 10} for s in range(1, 8)] + [{'step': 6, 'eval_loss': 4.5}]
  fabricate(tmp_path, 'alive', {}, rows)  # this process: it lives
  fabricate(tmp_path, 'killed', {'pid': dead_pid()}, rows)
  old_start = '2000-01-01T00:00:00+00:00'  # a pid alive now but started after the run: the pid was reused
  fabricate(tmp_path, 'reused', {'started': old_start}, rows)
  fabricate(tmp_path, 'elsewhere', {'host': 'another-host', 'pid': 1}, rows)
  stale = fabricate(tmp_path, 'stale', {'host': 'another-host', 'pid': 1}, rows)
  hours_ago = time.time() - 2 * 3600
  for name in ('run.json', 'metrics.jsonl'):
    os.utime(os.path.join(stale, name), (hours_ago, hours_ago))
  runs = listed(tmp_path)
  assert runs['alive']['status'] == 'running' and runs['alive']['reason'] is None
  assert (runs['alive']['step'], runs['alive']['steps'], runs['alive']['loss']) == (7, 10, pytest.approx(4.3))
  assert (runs['alive']['eval_loss'], runs['alive']['eval_step']) == (4.5, 6)
  for name in ('killed', 'reused'):
    assert runs[name]['status'] == 'failed (died)', name
    assert runs[name]['reason'].startswith(f'pid {runs[name]["pid"]} on {socket.gethostname()} is gone')
  assert runs['elsewhere']['status'] == 'running' and runs['elsewhere']['reason'] == 'pid 1 on another-host'
  assert runs['stale']['status'] == 'running?' and 'has logged nothing for 120 minutes' in runs['stale']['reason']
  code, out, _ = command('runs', str(tmp_path))
  assert row(out, 'killed').split()[2:5] == ['failed', '(died)', '7/10']
  assert row(out, 'stale').split()[2] == 'running?'


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads process states from /proc')
def test_a_killed_run_not_yet_reaped_died(tmp_path):
  """SIGKILL leaves a zombie until its parent waits for it (a launcher that never does keeps it): signal 0
  still reaches the pid, but the run is dead."""
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    fabricate(tmp_path, 'zombie', {'pid': proc.pid}, [{'step': 1, 'loss': 5.0}])
    assert listed(tmp_path)['zombie']['status'] == 'running'
    proc.kill()
    for _ in range(100):  # until the kernel has made it a zombie (not reaped: no wait yet)
      with open(f'/proc/{proc.pid}/stat', encoding='utf-8') as f:
        if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
          break
      time.sleep(0.05)
    assert listed(tmp_path)['zombie']['status'] == 'failed (died)'
  finally:
    proc.kill()
    proc.wait()


def test_runs_from_before_run_json_say_so(tmp_path):
  finished = [{'step': s, 'loss': 5.0} for s in range(1, 11)] + [{'step': 10, 'eval_loss': 4.9}]
  fabricate(tmp_path, 'old-done', None, finished)
  fabricate(tmp_path, 'old-cut', None, finished[:5])
  fabricate(tmp_path, 'old-empty', None, [])
  runs = listed(tmp_path)
  assert runs['old-done']['status'] == 'done?' and runs['old-done']['step'] == 10
  assert runs['old-cut']['status'] == 'unknown' and (runs['old-cut']['step'], runs['old-cut']['steps']) == (5, 10)
  assert 'no run.json' in runs['old-cut']['reason'] and runs['old-cut']['config'] is None
  assert runs['old-empty']['status'] == 'unknown' and runs['old-empty']['step'] is None
  code, out, _ = command('runs', str(tmp_path))
  assert row(out, 'old-empty').split()[1:4] == ['-', 'unknown', '?/10']


def test_a_stackwise_run_is_read_over_its_stages(tmp_path):
  config = {'model': {}, 'train': {'steps': 4}, 'stackwise': {'num_stacks': 2}}
  workdir = fabricate(tmp_path, 'rack', {'kind': 'stackwise', 'steps': 8, 'stage_steps': [3, 5], 'stage': 1}, [],
                      config)
  for stage, rows in ((0, [{'step': s, 'loss': 6.0} for s in (1, 2, 3)] + [{'step': 3, 'eval_loss': 5.9}]),
                      (1, [{'step': 1, 'loss': 5.5}, {'step': 2, 'loss': 5.25}])):
    os.makedirs(os.path.join(workdir, 'stages', str(stage)))
    with open(os.path.join(workdir, 'stages', str(stage), 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  run = listed(tmp_path)['rack']  # the stage directories (no config.json) are no runs of their own
  assert run['kind'] == 'stackwise' and run['status'] == 'running'
  assert (run['step'], run['steps'], run['stage'], run['stages']) == (3 + 2, 8, 1, 2)
  assert (run['loss'], run['loss_step'], run['eval_loss']) == (5.25, 2, None)
  code, out, _ = command('runs', str(tmp_path))
  assert '5/8 (stage 1 of 2)' in row(out, 'rack')


def test_a_stackwise_run_whose_stages_stopped_early_counts_the_steps_they_ran(tmp_path):
  """train.early_stop ended both stages at step 4 of 6 (each stage's run.json says so); the job ended 'done'
  with its planned 12 steps: 8 ran, and the reason names the stages."""
  config = {'model': {}, 'train': {'steps': 12}, 'stackwise': {'num_stacks': 2}}
  workdir = fabricate(tmp_path, 'rack', {'kind': 'stackwise', 'status': 'done', 'steps': 12, 'step': 12,
                                         'stage_steps': [6, 6], 'stage': 1}, [], config)
  for stage in (0, 1):
    stage_dir = os.path.join(workdir, 'stages', str(stage))
    os.makedirs(stage_dir)
    with open(os.path.join(stage_dir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in [{'step': s, 'loss': 6.0 - s / 10} for s in range(1, 5)]
                   + [{'step': 4, 'eval_loss': 5.5}])
    with open(os.path.join(stage_dir, 'run.json'), 'w') as f:
      json.dump({'schema': 1, 'kind': 'plain', 'status': 'early-stopped', 'reason': 'eval_loss did not improve',
                 'steps': 6, 'step': 4}, f)
  run = listed(tmp_path)['rack']
  assert (run['status'], run['step'], run['steps'], run['stage']) == ('done', 8, 12, 1)
  assert run['reason'] == 'train.early_stop ended stage 0 at step 4 of 6, stage 1 at step 4 of 6'
  code, out, _ = command('runs', str(tmp_path))
  assert '8/12 (stage 1 of 2)' in row(out, 'rack')


def test_recording_keeps_a_user_mistake_out_and_records_a_crash(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(UserError), runstatus.Recording(workdir, 5):
    assert runstatus.read(workdir)['status'] == 'running'
    raise UserError('data.train', 'x', 'matches no file')
  assert not os.path.exists(os.path.join(workdir, 'run.json'))  # a user mistake writes nothing
  with runstatus.Recording(workdir, 5) as status:
    status.end('done', 5)
  before = open(os.path.join(workdir, 'run.json')).read()
  with pytest.raises(UserError), runstatus.Recording(workdir, 9):
    raise UserError('data.train', 'x', 'matches no file')
  assert open(os.path.join(workdir, 'run.json')).read() == before  # the previous run's record stays
  with pytest.raises(OSError), runstatus.Recording(workdir, 9):
    raise OSError(28, 'No space left on device')
  record = runstatus.read(workdir)
  assert record['status'] == 'failed' and record['reason'] == 'OSError: [Errno 28] No space left on device'
  with pytest.raises(NonFiniteError), runstatus.Recording(workdir, 9):  # the loop's own message, first sentence
    raise NonFiniteError('stopping: 3 consecutive steps (5..7) had a non-finite loss or gradients '
                         '(train.max_bad_steps=3). Their updates were skipped, so ...\nSamples of step 7: a, b')
  assert runstatus.read(workdir)['reason'] == ('stopping: 3 consecutive steps (5..7) had a non-finite loss or '
                                               'gradients (train.max_bad_steps=3)')
  with runstatus.Recording(workdir, 9, enabled=False):  # processes other than the first write nothing
    pass
  assert runstatus.read(workdir)['status'] == 'failed'


def test_long_metrics_are_read_from_their_end(tmp_path):
  rows = [{'step': 1, 'eval_loss': 7.0}] + [{'step': s, 'loss': float(s), 'pad': 'x' * 300} for s in range(1, 2000)]
  fabricate(tmp_path, 'long', {}, rows)
  with open(tmp_path / 'long' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 2000, "loss": 1.')  # a row being written
  train_row, eval_row = runstatus.last_metrics(str(tmp_path / 'long'))
  assert train_row['step'] == 1999 and eval_row == {'step': 1, 'eval_loss': 7.0}


@pytest.mark.parametrize('args, needle', [
    (('/nonexistent/runs',), "error: DIR '/nonexistent/runs' does not exist; give the directory holding your runs"),
    (('--dir=/nonexistent',), "error: DIR '/nonexistent' does not exist"),
    ((TINY,), f"error: DIR '{TINY}' is a file, not a directory"),
    (('/tmp', 'b'), "error: unexpected arguments ['b']"),
    (('--dir=/tmp', 'b'), "error: unexpected arguments ['b']"),
    (('--json=maybe',), 'error: flag --json=maybe: '),
])
def test_bad_dir_is_one_line_exit_2(args, needle):
  code, out, err = command('runs', *args)
  assert code == 2 and not out and len(err.splitlines()) == 1 and err.startswith(needle), err


def test_an_empty_dir_has_no_runs(tmp_path):
  (tmp_path / 'notes').mkdir()
  assert command('runs', str(tmp_path)) == (0, f'no runs under {tmp_path}\n', '')
  code, out, _ = command('runs', '--json', str(tmp_path))
  assert code == 0 and json.loads(out) == {'schema': 1, 'dir': str(tmp_path), 'runs': []}
  cwd = os.getcwd()
  try:  # the default DIR is runs/ of the working directory
    os.chdir(tmp_path)
    assert command('runs')[0] == 2
    (tmp_path / 'runs').mkdir()
    assert command('runs') == (0, 'no runs under runs\n', '')
  finally:
    os.chdir(cwd)
