"""Sample provenance: the spike detector on hand-made sequences, the sidecar's format, truncation and merging,
blocklists, and one tiny training run whose poisoned steps are dumped with the right rows and texts."""

import gzip
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest

from jaxtrain import cli
from jaxtrain.train import recorder as provenance
from jaxtrain.data import blocklist
from jaxtrain.data.sources import DataError
from jaxtrain.config.defaults import base_config
from jaxtrain.train.recorder import SampleLog, SpikeDetector, read_samples
from tests.conftest import REPO

NAN = math.nan


# ----------------------------------------------------------------------------- the detector


def flagged(detector, losses, norms):
  out = {}
  for step, (loss, norm) in enumerate(zip(losses, norms, strict=True), start=1):
    spike = detector.update(loss, norm)
    if spike is not None:
      out[step] = spike
  return out


def test_detector_flags_exactly_the_spikes():
  losses = [1.0, 1.2, 0.8, 2.5, 1.0, NAN, 1.0, 1.0, 3.0, 1.8]
  norms = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0]
  spikes = flagged(SpikeDetector(factor=2.0, window=3, warmup=2), losses, norms)
  assert sorted(spikes) == [4, 6, 7, 9]
  assert spikes[4].reason.startswith('loss 2.5 > 2 x mean') and spikes[4].loss_mean == sum([1.0, 1.2, 0.8]) / 3
  assert spikes[6].reason == 'non-finite loss (nan)'
  assert spikes[7].reason.startswith('grad_norm 5 > 2 x mean 1') and spikes[7].grad_norm_mean == 1.0
  # Each names what spiked: a grad-norm spike is not a loss spike.
  assert [spikes[s].what for s in (4, 6, 7)] == ['loss spike', 'non-finite loss', 'grad_norm spike']
  # Spikes stay out of the window: step 9 is judged against steps 3, 5 and 8, so 3.0 > 2 x 0.933 flags.
  assert spikes[9].loss_mean == sum([0.8, 1.0, 1.0]) / 3
  # Step 10 is judged against the same steps (9 was left out): 1.8 < 2 x 0.933.
  assert 10 not in spikes


def test_warmup_accepts_everything_finite_and_non_finite_is_always_flagged():
  spikes = flagged(SpikeDetector(factor=2.0, window=10, warmup=3), [1.0, 9.0, math.inf, 1.0, 5.0, 12.0],
                   [1.0, 1.0, 1.0, NAN, 1.0, 1.0])
  # Steps 1, 2 and 5 are the warmup (non-finite steps do not count towards it), so 9.0 and 5.0 are accepted;
  # step 6 (12) exceeds 2 x their mean with step 1's (5).
  assert sorted(spikes) == [3, 4, 6]
  assert 'non-finite loss (inf)' in spikes[3].reason and 'non-finite grad_norm (nan)' in spikes[4].reason
  assert spikes[6].loss_mean == 5.0


def test_the_log_line_names_what_spiked(tmp_path):
  cfg = base_config()
  cfg.provenance.spike_factor, cfg.provenance.spike_window, cfg.provenance.spike_warmup = 2.0, 3, 0
  rec = provenance.Recorder(cfg, str(tmp_path), 0, None, process_index=0, process_count=1)
  values = [(1.0, 1.0), (1.0, 1.0), (1.0, 9.0), (9.0, 1.0), (9.0, 9.0), (1.0, NAN)]
  lines = [rec.observe(s, {'loss': a, 'grad_norm': b}) for s, (a, b) in enumerate(values, start=1)]
  rec.close()
  assert lines[:2] == ['', '']
  assert lines[2].startswith('step 3: grad_norm spike: grad_norm 9 > 2 x mean 1')
  assert lines[3].startswith('step 4: loss spike: loss 9 > 2 x mean 1')
  assert lines[4].startswith('step 5: loss and grad_norm spike: loss 9 > ')
  assert lines[5] == 'step 6: non-finite grad_norm: non-finite grad_norm (nan)'


def test_a_window_of_spikes_in_a_row_is_a_new_level():
  det = SpikeDetector(factor=2.0, window=3, warmup=0)
  spikes = flagged(det, [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, NAN, 5.0, 5.0, 5.0], [1.0] * 10)
  # 5, 6 and 8 (the NaN step neither counts nor breaks the run) fill a window: from then on 5.0 is normal.
  assert sorted(spikes) == [5, 6, 7, 8] and 'new baseline' in spikes[8].reason and det.means() == (5.0, 1.0)
  spikes = flagged(SpikeDetector(2.0, 3, 0), [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 1.0, 5.0, 5.0, 5.0, 5.0], [1.0] * 11)
  assert sorted(spikes) == [5, 6, 8, 9, 10]  # the accepted step 7 restarts the count


def test_detector_state_round_trips_through_json():
  rng = np.random.default_rng(0)
  head = rng.uniform(1.0, 2.0, (2, 40))
  tail = rng.uniform(1.0, 2.0, (2, 30))
  tail[0, [0, 7, 21]] = 9.0  # a spike as the very first step after the restore
  a = SpikeDetector(3.0, 16, 20)
  flagged(a, *head)
  b = SpikeDetector(3.0, 16, 20)
  b.set_state(json.loads(json.dumps(a.get_state())))
  assert b.means() == a.means()
  ours, theirs = flagged(a, *tail), flagged(b, *tail)
  assert sorted(ours) == [1, 8, 22] and ours == theirs and a.get_state() == b.get_state()
  assert sorted(flagged(SpikeDetector(3.0, 16, 20), *tail)) == [22]  # a fresh one would still be warming up


# ----------------------------------------------------------------------------- the sidecar


def fake_names(batch):
  """A stand-in for data.sample_ids with awkward characters: per row, distinct names in order."""
  out = []
  for ids, chunks in zip(batch['doc_ids'], batch['doc_chunks'], strict=True):
    names = [f'src\t{d}:dir\\x\n{d}.py' + (f':chunk{k}' if k >= 0 else '') for d, k in zip(ids, chunks, strict=True)
             if d >= 0]
    out.append(list(dict.fromkeys(names)))
  return out


def expected_rows(prov):
  """Token by token, independently of the sidecar's segment starts."""
  rows = []
  for r in range(len(prov['doc_ids'])):
    names = [fake_names({'doc_ids': [[d]], 'doc_chunks': [[k]]})[0]
             for d, k in zip(prov['doc_ids'][r], prov['doc_chunks'][r], strict=True)]
    rows.append(list(dict.fromkeys(n[0] for n in names if n)))
  return rows


def make_provenance(seed, rows=3, seq=16, first_doc=0):
  rng = np.random.default_rng(seed)
  ids, chunks = np.full((rows, seq), -1, np.int32), np.full((rows, seq), -1, np.int32)
  for r in range(rows - 1):  # the last row stays padding only
    at = 0
    while at < seq - 2:
      n = int(rng.integers(1, 7))
      ids[r, at:at + n] = first_doc + rng.integers(0, 6)  # few documents: the same one may come back in a row
      chunks[r, at:at + n] = rng.integers(-1, 2)
      at += n
  return {'doc_ids': ids, 'doc_chunks': chunks}


def record(log, steps, seed, offset=0, first_doc=0):
  batches = {s: make_provenance(seed * 1000 + s, first_doc=first_doc) for s in steps}
  for s in steps:
    log.record(s, batches[s], offset)
  return {s: expected_rows(b) for s, b in batches.items()}


def members(workdir, process=0):
  return np.fromfile(os.path.join(workdir, 'samples', f'process_{process}.idx'), np.int64).reshape(-1, 4)


def test_sidecar_reads_back_truncates_on_resume_and_never_holds_two_histories(tmp_path):
  workdir = str(tmp_path)
  directory = os.path.join(workdir, 'samples')
  log = SampleLog(directory, 0, 1, 0, fake_names)
  want = record(log, [1, 2, 3], seed=1)
  log.flush()
  want |= record(log, [4, 5, 6, 7], seed=1)
  log.flush()
  want |= record(log, [8, 9, 10], seed=1)
  log.close()
  assert members(workdir)[:, :2].tolist() == [[1, 3], [4, 7], [8, 10]]
  for step in range(1, 11):
    assert read_samples(workdir, step) == want[step]
  assert want[3][2] == [] and all(want[s][0] for s in want)  # a padding-only row names nothing

  # Resume from step 5: the member of steps 4..7 straddles it and is rewritten; a new history follows.
  log = SampleLog(directory, 0, 1, 5, fake_names)
  assert members(workdir)[:, :2].tolist() == [[1, 3], [4, 5]]
  with pytest.raises(DataError, match=r'step=6 has no sample records .* steps 1\.\.5 are recorded'):
    read_samples(workdir, 6)
  new = record(log, [6, 7, 8], seed=2)
  log.close()
  assert new[6] != want[6]
  for step in range(1, 9):
    assert read_samples(workdir, step) == (want if step <= 5 else new)[step]
  with pytest.raises(DataError):
    read_samples(workdir, 9)
  with gzip.open(os.path.join(directory, 'process_0.tsv.gz'), 'rt') as f:  # one gzip stream: zcat reads it
    keys = [tuple(map(int, line.split('\t')[:2])) for line in f]
  assert keys == [(s, r) for s in range(1, 9) for r in range(3)]

  # A crash mid-flush leaves a torn member and a torn index record: the next open drops both.
  with open(os.path.join(directory, 'process_0.tsv.gz'), 'ab') as f:
    f.write(b'\x1f\x8b torn')
  with open(os.path.join(directory, 'process_0.idx'), 'ab') as f:
    f.write(b'\x01' * 7)
  SampleLog(directory, 0, 1, 8, fake_names).close()
  end = members(workdir)[-1]
  assert os.path.getsize(os.path.join(directory, 'process_0.tsv.gz')) == end[2] + end[3]
  assert os.path.getsize(os.path.join(directory, 'process_0.idx')) == 3 * 32
  assert read_samples(workdir, 8) == new[8]


def test_sidecar_flushes_every_flush_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(provenance, 'FLUSH_STEPS', 2)
  log = SampleLog(str(tmp_path / 'samples'), 0, 1, 0, fake_names)
  want = record(log, [1, 2, 3, 4, 5], seed=3)
  assert members(str(tmp_path))[:, :2].tolist() == [[1, 2], [3, 4]]  # step 5 is still buffered
  assert read_samples(str(tmp_path), 4) == want[4]
  with pytest.raises(DataError):
    read_samples(str(tmp_path), 5)
  log.close()
  assert read_samples(str(tmp_path), 5) == want[5]


def test_processes_write_their_own_rows_and_a_smaller_resume_truncates_the_others(tmp_path):
  directory = str(tmp_path / 'samples')
  logs = [SampleLog(directory, p, 2, 0, fake_names) for p in range(2)]
  want = [record(log, [1, 2, 3, 4], seed=10 + p, offset=3 * p) for p, log in enumerate(logs)]
  for log in logs:
    log.close()
  for step in range(1, 5):
    assert read_samples(str(tmp_path), step) == want[0][step] + want[1][step]
  SampleLog(directory, 0, 1, 2, fake_names).close()  # resumed from step 2 on one process
  assert members(str(tmp_path), 1)[:, :2].tolist() == [[1, 2]]
  assert read_samples(str(tmp_path), 2) == want[0][2] + want[1][2]
  with pytest.raises(DataError):
    read_samples(str(tmp_path), 3)


def test_recorder_rebuilds_the_detector_from_its_history(tmp_path):
  cfg = base_config()
  cfg.provenance.spike_window, cfg.provenance.spike_warmup = 4, 2
  rng = np.random.default_rng(1)
  losses = rng.uniform(2.0, 3.0, 30)
  losses[[5, 21]] = 40.0
  values = [{'loss': float(v), 'grad_norm': 1.0} for v in losses]
  rec = provenance.Recorder(cfg, str(tmp_path), 0, None, process_index=0, process_count=1)
  lines = [rec.observe(s, v) for s, v in enumerate(values, start=1)]
  rec.close()
  assert [s for s, line in enumerate(lines, start=1) if line] == [6, 22]
  rec = provenance.Recorder(cfg, str(tmp_path), 20, None, process_index=0, process_count=1)
  history = np.fromfile(str(tmp_path / 'spikes' / 'history.bin'), np.float64).reshape(-1, 4)
  assert history[:, 0].tolist() == list(range(1, 21)) and history[:, 3].tolist() == [s == 6 for s in range(1, 21)]
  again = [rec.observe(s, v) for s, v in enumerate(values[20:], start=21)]
  assert again == lines[20:]  # the reasons quote the rolling means: the window came back whole
  fresh = provenance.Recorder(cfg, str(tmp_path / 'fresh'), 0, None, process_index=0, process_count=1)
  assert not any(fresh.observe(s, v) for s, v in enumerate(values[20:], start=21))  # step 22: in its warmup


# ----------------------------------------------------------------------------- blocklists


def write_dump(workdir, step, rows):
  os.makedirs(os.path.join(workdir, 'spikes'), exist_ok=True)
  with open(os.path.join(workdir, 'spikes', f'step_{step}.json'), 'w') as f:
    json.dump({'step': step, 'rows': [{'row': r, 'samples': s} for r, s in enumerate(rows)]}, f)


def blocklisted(path):
  with open(path) as f:
    lines = f.read().splitlines()
  return [line for line in lines if not line.startswith('#')], [line for line in lines if line.startswith('#')]


def test_blocklist_counts_documents_over_dumps(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  write_dump(workdir, 3, [['s:a.py:0:chunk1', 's:b.py:0'], ['s:a.py:0:chunk2']])
  write_dump(workdir, 7, [['s:a.py:0:chunk9'], ['s:c.py:4', 's:b.py:0']])
  out = str(tmp_path / 'block.txt')
  cli.main(['jaxtrain', 'blocklist', f'--workdir={workdir}', f'--out={out}'])
  assert 'wrote 3 documents (in >= 1 of 2 spike dumps' in capsys.readouterr().out
  names, header = blocklisted(out)
  assert names == ['s:a.py:0', 's:b.py:0', 's:c.py:4']  # by count (2, 2, 1), then name
  assert 'spikes/step_3.json, spikes/step_7.json' in header[1] and '--min-count=1' in header[2]
  cli.main(['jaxtrain', 'blocklist', f'--workdir={workdir}', f'--out={out}', '--min-count=2'])
  assert blocklisted(out)[0] == ['s:a.py:0', 's:b.py:0']
  other = str(tmp_path / 'other.txt')
  with open(other, 'w') as f:
    f.write('# a comment\n\n  s:z.py:1  \n')
  assert blocklist.load_blocklist(f'{out}, {other}') == {'s:a.py:0', 's:b.py:0', 's:z.py:1'}
  assert blocklist.load_blocklist([other]) == {'s:z.py:1'}
  with pytest.raises(DataError, match=r"data.exclude='/nonexistent' is not a file"):
    blocklist.load_blocklist(['/nonexistent'])
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['jaxtrain', 'blocklist', f'--workdir={tmp_path}/missing'])
  assert exit_info.value.code == 2 and 'does not exist' in capsys.readouterr().err


def test_blocklist_takes_every_process_rows_from_the_sidecar(tmp_path):
  workdir = str(tmp_path)
  logs = [SampleLog(os.path.join(workdir, 'samples'), p, 2, 0, fake_names) for p in range(2)]
  want = [record(log, [1, 2], seed=20 + p, offset=3 * p, first_doc=10 * p) for p, log in enumerate(logs)]
  for log in logs:
    log.close()
  write_dump(workdir, 2, want[0][2])  # process 0 dumps only its own rows
  counts, dumps = provenance.spike_documents(workdir)
  everything = {provenance.document_name(n) for row in want[0][2] + want[1][2] for n in row}
  assert set(counts) == everything and set(counts) > {provenance.document_name(n) for r in want[0][2] for n in r}
  assert len(dumps) == 1 and set(counts.values()) == {1}


def test_config_validation_of_the_new_keys(tmp_path):
  from jaxtrain.config import validate as config_lib
  cfg = base_config()
  cfg.provenance.spike_factor = 0.5
  with pytest.raises(config_lib.ConfigError, match=r'provenance.spike_factor=0.5: must be 0 \(off\) or > 1'):
    provenance.check(cfg.provenance)
  cfg.provenance.spike_factor, cfg.provenance.spike_window = 0.0, 0
  with pytest.raises(config_lib.ConfigError, match='provenance.spike_window=0'):
    provenance.check(cfg.provenance)
  cfg = base_config()
  cfg.data.exclude = f'{tmp_path}/missing.txt'
  with pytest.raises(config_lib.ConfigError, match="config.data.exclude=.*missing.txt' does not exist"):
    config_lib.check_paths(cfg, str(tmp_path / 'run'))


# ----------------------------------------------------------------------------- the train loop

STEPS, NAN_STEP, HUGE_STEP = 10, 6, 9


def tiny_config():
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(REPO, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.train.steps, c.train.eval_every, c.checkpoint.every, c.log.plot = STEPS, 0, 4, False
  # Factor 10: the tiny run's own grad norm wobbles up to ~2.5x its mean; only the poisoned steps qualify.
  c.provenance.spike_factor, c.provenance.spike_window, c.provenance.spike_warmup = 10.0, 5, 3
  return c


class HugeLossAt:
  """The jitted train step, reporting 100x the loss of its `at`-th step (the state is untouched); either
  kind `train.jit_steps` builds: one step per call, or several (metrics stacked, an active mask last)."""

  def __init__(self, step, at):
    self._step, self._at, self._done = step, at, 0

  def __call__(self, state, *args):
    state, metrics = self._step(state, *args)
    ran = int(np.sum(args[1])) if len(args) > 1 else 1
    index, self._done = self._at - self._done - 1, self._done + ran  # the `at`-th step's place in this call
    if 0 <= index < ran:
      loss = metrics['loss']
      metrics = dict(metrics, loss=loss.at[index].multiply(100.0) if len(args) > 1 else loss * 100.0)
    return state, metrics

  def _cache_size(self):
    return self._step._cache_size()  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def poisoned_run(tmp_path_factory):
  """A tiny run whose step NAN_STEP has a NaN loss (from its data) and step HUGE_STEP a 100x loss."""
  from jaxtrain import data
  from jaxtrain.train import loop as train
  make_dataset, jit_steps = data.make_dataset, train.jit_steps

  def poisoned_data(*args, **kwargs):
    ds = make_dataset(*args, **kwargs)
    if kwargs.get('split') != 'train':
      return ds
    count = [0]

    def poison(batch):  # a float mask on every batch, so the step compiles once
      count[0] += 1
      batch = dict(batch, loss_mask=batch['loss_mask'].astype(np.float32))
      if count[0] == NAN_STEP:
        batch['loss_mask'][0, 3] = np.nan
      return batch
    return ds.map(poison)

  def poisoned_steps(*args, **kwargs):
    train_step, eval_step = jit_steps(*args, **kwargs)
    return HugeLossAt(train_step, HUGE_STEP), eval_step

  workdir = str(tmp_path_factory.mktemp('poisoned'))
  cfg = tiny_config()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data, 'make_dataset', poisoned_data)
    mp.setattr(train, 'jit_steps', poisoned_steps)
    train.run(cfg, workdir)
  # The batches of steps 1..STEPS, rebuilt: the poison changed loss masks, never which documents came.
  tokenizer = data.load_tokenizer(cfg.data)
  it = iter(make_dataset(cfg.data, tokenizer, split='train', seed=cfg.train.seed, batch_size=cfg.data.batch_size))
  batches = {step: next(it) for step in range(1, STEPS + 1)}
  return workdir, cfg, tokenizer, batches


def logged_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_the_poisoned_steps_and_only_they_are_dumped_with_their_rows(poisoned_run):
  from jaxtrain import data
  workdir, cfg, tokenizer, batches = poisoned_run
  assert sorted(os.listdir(os.path.join(workdir, 'spikes'))) == ['history.bin', f'step_{NAN_STEP}.json',
                                                               f'step_{HUGE_STEP}.json']
  dumps = {}
  for step in (NAN_STEP, HUGE_STEP):
    with open(os.path.join(workdir, 'spikes', f'step_{step}.json')) as f:
      dumps[step] = json.load(f)
  losses = logged_losses(workdir)
  assert dumps[NAN_STEP]['reason'].startswith('non-finite loss (nan)') and math.isnan(losses[NAN_STEP])
  huge = dumps[HUGE_STEP]
  assert huge['reason'].startswith(f'loss {losses[HUGE_STEP]:.4g} > 10 x mean') and huge['loss'] == losses[HUGE_STEP]
  # The window: the 5 accepted steps before it, the NaN step left out.
  assert huge['loss_mean'] == sum(losses[s] for s in (3, 4, 5, 7, 8)) / 5
  for step, dump in dumps.items():
    batch = batches[step]
    want = data.sample_ids(cfg.data, 'train', batch)
    assert [r['row'] for r in dump['rows']] == list(range(cfg.data.batch_size)) and dump['step'] == step
    for r, row in enumerate(dump['rows']):
      assert row['samples'] == want[r]
      seg = batch['segment_ids'][r]
      ids = list(dict.fromkeys(seg[seg > 0].tolist()))
      assert len(row['segments']) == len(ids)
      assert list(dict.fromkeys(s['sample'] for s in row['segments'])) == want[r]
      for s, segment in zip(ids, row['segments'], strict=True):
        assert segment['text'] == tokenizer.decode(batch['tokens'][r][seg == s])
        assert segment['tokens'] == int((seg == s).sum())
  assert dumps[NAN_STEP]['rows'][0]['segments'][0]['text'] != dumps[HUGE_STEP]['rows'][0]['segments'][0]['text']


@pytest.mark.slow
def test_the_sidecar_names_every_step_like_sample_ids(poisoned_run, capsys):
  from jaxtrain import data
  workdir, cfg, _, batches = poisoned_run
  for step, batch in batches.items():
    assert read_samples(workdir, step) == data.sample_ids(cfg.data, 'train', batch)
  assert members(workdir)[:, :2].tolist() == [[1, 4], [5, 8], [9, 10]]  # flushed at each checkpoint
  cli.main(['jaxtrain', 'samples', f'--workdir={workdir}', '--step=3'])
  lines = capsys.readouterr().out.splitlines()
  assert lines == [f'step 3 row {r}: {" ".join(n)}' for r, n in enumerate(data.sample_ids(cfg.data, 'train',
                                                                                          batches[3]))]


@pytest.mark.slow
def test_the_blocklist_of_the_run(poisoned_run):
  from jaxtrain import data
  workdir, cfg, tokenizer, batches = poisoned_run
  cli.main(['jaxtrain', 'blocklist', f'--workdir={workdir}'])
  names, header = blocklisted(os.path.join(workdir, 'blocklist.txt'))
  per_step = [{provenance.document_name(n) for row in data.sample_ids(cfg.data, 'train', batches[s]) for n in row}
              for s in (NAN_STEP, HUGE_STEP)]
  both = per_step[0] & per_step[1]
  assert set(names) == per_step[0] | per_step[1] and set(names[:len(both)]) == both
  assert all(':chunk' not in n for n in names) and header[0].startswith(f'# jaxtrain blocklist: {len(names)} ')
  assert blocklist.load_blocklist(os.path.join(workdir, 'blocklist.txt')) == set(names)
  # The pipeline reads the file through data.exclude: none of its documents comes back.
  excluding = tiny_config()
  excluding.data.exclude = os.path.join(workdir, 'blocklist.txt')
  it = iter(data.make_dataset(excluding.data, tokenizer, split='train', seed=0, batch_size=8))
  rows = [row for _ in range(STEPS) for row in data.sample_ids(excluding.data, 'train', next(it))]
  seen = {provenance.document_name(n) for row in rows for n in row}
  assert seen and not seen & set(names)


@pytest.mark.slow
def test_a_resumed_run_keeps_one_history(poisoned_run, tmp_path):
  from jaxtrain import data
  from jaxtrain.train import loop as train
  workdir, cfg, _, batches = poisoned_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  for step in ('8', '10'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  summary = train.run(tiny_config(), resumed)  # no poison this time
  assert summary.start_step == 4
  spikes = os.path.join(resumed, 'spikes')
  assert sorted(os.listdir(spikes)) == ['discarded', 'history.bin']  # no spike now; the old dumps kept aside
  assert sorted(os.listdir(os.path.join(spikes, 'discarded'))) == [f'step_{NAN_STEP}.json', f'step_{HUGE_STEP}.json']
  history = np.fromfile(os.path.join(spikes, 'history.bin'), np.float64).reshape(-1, 4)
  assert history[:, 0].tolist() == list(range(1, STEPS + 1)) and history[:, 3].sum() == 0
  for step, batch in batches.items():
    assert read_samples(resumed, step) == data.sample_ids(cfg.data, 'train', batch)
  with gzip.open(os.path.join(resumed, 'samples', 'process_0.tsv.gz'), 'rt') as f:
    keys = [tuple(map(int, line.split('\t')[:2])) for line in f]
  assert keys == [(s, r) for s in range(1, STEPS + 1) for r in range(cfg.data.batch_size)]
