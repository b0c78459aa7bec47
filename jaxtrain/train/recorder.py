"""Which documents trained each step: a sample-id sidecar, loss-spike dumps and blocklists.

  WORKDIR/samples/process_<i>.tsv.gz  process i's rows: one line per (step, row): 'step<TAB>row<TAB>id<TAB>id...'
  WORKDIR/samples/process_<i>.idx     int64 records (first step, last step, byte offset, byte length), one
                                      per gzip member of the .tsv.gz
  WORKDIR/spikes/step_<N>.json        a spike (loss, grad norm, non-finite): metrics, means, reason, and per row the
                                      sample ids and the decoded text of each document segment
  WORKDIR/spikes/history.bin          float64 records (step, loss, grad_norm, flagged) the detector resumes from

Sidecar. Each step only reduces its batch's 'doc_*' keys to the first token of every segment (vectorised:
0.03 ms for 8 x 64 tokens, ~4 ms for 256 x 2048 on a busy CPU core); the rows are named and written in one
go every FLUSH_STEPS steps and before every checkpoint save, through `data.sample_ids` on a batch of one-token
rows, one per distinct segment, so naming follows the pipeline's rules whatever keys it adds and loads the
document index once per flush, not per step.
A flush appends one gzip member (the file stays a valid gzip stream: `zcat` reads it) and its index record, so
a lookup decompresses one member. Names are written out, not interned: nothing grows in memory with the corpus.

Resume. The files are only ever appended to, and reopening truncates them to the restored checkpoint step
(a member that straddles it is rewritten; a torn tail is dropped), so they never hold two histories. Records
up to a checkpoint are flushed before it is saved, so none is lost when a run dies after one. Global row =
process index x rows per process + local row; each process writes its own files (process 0 also truncates
those of processes a resumed run no longer has), and `read_samples` merges them.

Spikes. `SpikeDetector` is pure and host-side: a step is a spike when loss or grad norm is non-finite, or,
once `warmup` steps were accepted, exceeds `factor` x the mean of the last `window` accepted steps. Spikes are
kept out of the window, so a burst does not raise the bar for its own later steps; `window` finite spikes in a
row are a new level rather than a spike, and become the window. Only process 0 detects and dumps (no
collective a spike could deadlock); its dump holds its own rows, and `jaxtrain blocklist` takes every process's
rows of a dumped step from the sidecar. Dumps of steps after a restored checkpoint are moved to
spikes/discarded/, and the detector replays history.bin up to the checkpoint, so a resumed run flags what an
uninterrupted one would (after a crash, the checkpoint's own step may be missing: its metrics arrive late).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxtrain import paths
from jaxtrain.data.sources import DataError
from jaxtrain.errors import ConfigError

SAMPLES_DIR = paths.SAMPLES
SPIKES_DIR = paths.SPIKES
FLUSH_STEPS = 100  # a flush names the buffered steps with one document-index load; also bounds the loss on a crash
FLUSH_SEGMENTS = 1 << 16  # ... or sooner when big batches buffer this many segments
_INDEX = 4  # int64 fields per index record: first step, last step, offset, length
_HISTORY = 4  # float64 fields per history record: step, loss, grad_norm, flagged
_CHUNK = re.compile(r':chunk\d+$')
_UNESCAPE = {'t': '\t', 'n': '\n', 'r': '\r', '\\': '\\'}

Namer = Callable[[Mapping[str, np.ndarray]], list[list[str]]]


def check(v: Any) -> None:
  """The `provenance` section: spike detection settings. Raises ConfigError."""
  if not (v.spike_factor == 0 or v.spike_factor > 1):
    raise ConfigError('provenance.spike_factor', v.spike_factor, 'must be 0 (off) or > 1 (a multiple of the '
                      'rolling mean that makes a spike)')
  if v.spike_window < 1:
    raise ConfigError('provenance.spike_window', v.spike_window, 'must be >= 1 (steps in the rolling means)')
  for key in ('spike_warmup', 'max_dumps'):
    if v[key] < 0:
      raise ConfigError(f'provenance.{key}', v[key], 'must be >= 0')


# ----------------------------------------------------------------------------- spike detection


@dataclasses.dataclass(frozen=True)
class Spike:
  """A flagged step: its loss and grad norm, the rolling means it was judged against, and why; `flagged`
  names the metrics that spiked ('loss', 'grad_norm') and `finite` whether they were finite."""

  loss: float
  grad_norm: float
  loss_mean: float
  grad_norm_mean: float
  reason: str
  flagged: tuple[str, ...] = ('loss',)
  finite: bool = True

  @property
  def what(self) -> str:
    """What spiked, for a log line: 'loss spike', 'grad_norm spike', 'loss and grad_norm spike', or
    'non-finite loss' (and/or grad_norm)."""
    names = ' and '.join(self.flagged)
    return f'{names} spike' if self.finite else f'non-finite {names}'


class SpikeDetector:
  """Flags steps whose loss or grad norm is non-finite or above `factor` x its rolling mean (see the module)."""

  def __init__(self, factor: float, window: int, warmup: int):
    if not factor > 0 or window < 1 or warmup < 0:
      raise ValueError(f'factor={factor}, window={window}, warmup={warmup}: expected factor > 0, window >= 1, '
                       'warmup >= 0')
    self.factor, self.window, self.warmup = float(factor), int(window), int(warmup)
    self._losses: collections.deque[float] = collections.deque(maxlen=self.window)
    self._norms: collections.deque[float] = collections.deque(maxlen=self.window)
    self._seen = 0  # accepted steps so far (the warmup counts these)
    self._streak: list[tuple[float, float]] = []  # the finite spikes since the last accepted step

  def means(self) -> tuple[float, float]:
    """(loss, grad norm) means over the window; nan while it is empty."""
    if not self._losses:
      return math.nan, math.nan
    return sum(self._losses) / len(self._losses), sum(self._norms) / len(self._norms)

  def update(self, loss: float, grad_norm: float) -> Spike | None:
    """Judges one step; a step that is not a spike joins the window."""
    loss, grad_norm = float(loss), float(grad_norm)
    loss_mean, norm_mean = self.means()
    flagged = [name for name, value in (('loss', loss), ('grad_norm', grad_norm)) if not math.isfinite(value)]
    reasons = [f'non-finite {name} ({value})' for name, value in (('loss', loss), ('grad_norm', grad_norm))
               if not math.isfinite(value)]
    finite = not reasons
    if not reasons and self._seen >= self.warmup and self._losses:
      # A mean <= 0 gives no scale to compare against (CE losses and norms are >= 0 anyway).
      for name, value, mean in (('loss', loss, loss_mean), ('grad_norm', grad_norm, norm_mean)):
        if mean > 0 and value > self.factor * mean:
          flagged.append(name)
          reasons.append(f'{name} {value:.4g} > {self.factor:g} x mean {mean:.4g} of the last {len(self._losses)} '
                         'steps')
    if not reasons:
      self._losses.append(loss)
      self._norms.append(grad_norm)
      self._seen += 1
      self._streak = []
      return None
    if math.isfinite(loss) and math.isfinite(grad_norm):
      self._streak.append((loss, grad_norm))
      if len(self._streak) == self.window:
        # A whole window of "spikes" is a new level, not a spike (kept out, it would flag every later step).
        self._losses.extend(v for v, _ in self._streak)
        self._norms.extend(v for _, v in self._streak)
        self._streak = []
        reasons.append(f'the last {self.window} steps all exceeded it: they are the new baseline')
    return Spike(loss, grad_norm, loss_mean, norm_mean, '; '.join(reasons), tuple(flagged), finite)

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; `set_state` on a detector with the same settings continues identically."""
    return {'losses': list(self._losses), 'grad_norms': list(self._norms), 'seen': self._seen,
            'streak': [list(v) for v in self._streak]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores `get_state()` (the window keeps its last `window` entries)."""
    self._losses = collections.deque((float(v) for v in state['losses']), maxlen=self.window)
    self._norms = collections.deque((float(v) for v in state['grad_norms']), maxlen=self.window)
    self._seen = int(state['seen'])
    self._streak = [(float(a), float(b)) for a, b in state['streak']]


def _restore_history(path: str, keep_through: int, detector: SpikeDetector) -> Any:
  """Truncates history.bin to steps <= keep_through and replays it into the detector (the run's own rule,
  under today's settings; ~3 s per 10^6 steps on a CPU core); returns the file, open for appends."""
  if os.path.exists(path):
    raw = np.fromfile(path, np.float64)
    records = raw[:len(raw) // _HISTORY * _HISTORY].reshape(-1, _HISTORY)
    records = records[:int(np.searchsorted(records[:, 0], keep_through, side='right'))]
    with open(path, 'r+b') as f:
      f.truncate(records.nbytes)
    for _, loss, grad_norm, _ in records.tolist():
      detector.update(loss, grad_norm)
  return open(path, 'ab')


# ----------------------------------------------------------------------------- the sidecar


def _escape(name: str) -> str:
  return name.replace('\\', '\\\\').replace('\t', '\\t').replace('\n', '\\n').replace('\r', '\\r')


def _unescape(text: str) -> str:
  return re.sub(r'\\(.)', lambda m: _UNESCAPE.get(m.group(1), m.group(1)), text)


def _segment_starts(provenance: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(doc_* keys, row and (n, keys) values of each token where any key changes along the row)."""
  keys = sorted(provenance)
  arrays = [np.asarray(provenance[k]) for k in keys]  # each (rows, seq)
  change = np.ones(arrays[0].shape, bool)
  change[:, 1:] = False
  for a in arrays:
    change[:, 1:] |= a[:, 1:] != a[:, :-1]
  rows, cols = np.nonzero(change)
  return keys, rows, np.stack([a[rows, cols] for a in arrays], axis=1)


def _paths(directory: str, process: int) -> tuple[str, str]:
  return os.path.join(directory, f'process_{process}.tsv.gz'), os.path.join(directory, f'process_{process}.idx')


def _index(index_path: str, data_size: int) -> np.ndarray:
  """The index records that describe complete, contiguous members within `data_size` bytes."""
  if not os.path.exists(index_path):
    return np.zeros((0, _INDEX), np.int64)
  raw = np.fromfile(index_path, np.int64)
  entries = raw[:len(raw) // _INDEX * _INDEX].reshape(-1, _INDEX)
  end = good = 0
  for first, last, offset, length in entries.tolist():
    if offset != end or offset + length > data_size or first > last:
      break
    end, good = offset + length, good + 1
  return entries[:good]


def _member_lines(data_path: str, entry: np.ndarray) -> list[str]:
  with open(data_path, 'rb') as f:
    f.seek(int(entry[2]))
    return gzip.decompress(f.read(int(entry[3]))).decode('utf-8').splitlines(keepends=True)


def _append_member(data_file: Any, index_file: Any, lines: list[str], offset: int) -> int:
  """Writes the member, then its index record (a crash between leaves a tail the next open drops)."""
  member = gzip.compress(''.join(lines).encode('utf-8'), compresslevel=6, mtime=0)
  data_file.write(member)
  data_file.flush()
  steps = [int(line.split('\t', 1)[0]) for line in (lines[0], lines[-1])]
  index_file.write(np.asarray([steps[0], steps[1], offset, len(member)], np.int64).tobytes())
  index_file.flush()
  return offset + len(member)


def truncate_samples(directory: str, process: int, keep_through: int) -> int:
  """Cuts process `process`'s sidecar to steps <= keep_through; returns the data file's new size."""
  data_path, index_path = _paths(directory, process)
  if not os.path.exists(data_path) and not os.path.exists(index_path):
    return 0
  size = os.path.getsize(data_path) if os.path.exists(data_path) else 0
  entries = _index(index_path, size)
  kept = entries[entries[:, 1] <= keep_through]
  end = int(kept[-1, 2] + kept[-1, 3]) if len(kept) else 0
  straddle = entries[len(kept)] if len(entries) > len(kept) and entries[len(kept), 0] <= keep_through else None
  lines = [] if straddle is None else [line for line in _member_lines(data_path, straddle)
                                       if int(line.split('\t', 1)[0]) <= keep_through]
  # The index shrinks first (atomically): at no moment does a record point at bytes being rewritten.
  with open(index_path + '.tmp', 'wb') as f:
    f.write(kept.tobytes())
  os.replace(index_path + '.tmp', index_path)
  with open(data_path, 'r+b' if os.path.exists(data_path) else 'wb') as f, open(index_path, 'ab') as idx:
    f.truncate(end)
    f.seek(end)
    if lines:
      end = _append_member(f, idx, lines, end)
  return end


class SampleLog:
  """One process's sidecar writer: `record` each step's provenance, `flush` before checkpoints, `close`."""

  def __init__(self, directory: str, process_index: int, process_count: int, keep_through: int, namer: Namer,
               enabled: bool = True):
    self._namer = namer
    self._buffer: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, row of each segment start, its values)
    self._keys: list[str] | None = None
    self._segments = 0
    end = truncate_samples(directory, process_index, keep_through)
    if process_index == 0:  # a resumed run with fewer processes: their files must not keep a second history
      for path in glob.glob(os.path.join(directory, 'process_*.idx')):
        other = int(re.findall(r'process_(\d+)\.idx$', path)[0])
        if other >= process_count:
          truncate_samples(directory, other, keep_through)
    self._files = None
    if enabled:
      os.makedirs(directory, exist_ok=True)
      data_path, index_path = _paths(directory, process_index)
      self._files = (open(data_path, 'ab'), open(index_path, 'ab'))
      self._offset = end

  def record(self, step: int, provenance: Mapping[str, np.ndarray], row_offset: int = 0) -> None:
    """Buffers the segment starts of one step's batch (`row_offset`: this process's first global row)."""
    if self._files is None or not provenance:
      return
    keys, rows, values = _segment_starts(provenance)
    if self._keys is not None and keys != self._keys:
      self.flush()  # one naming batch needs one set of keys
    self._keys = keys
    self._buffer.append((step, rows + row_offset, values))
    self._segments += len(rows)
    if len(self._buffer) >= FLUSH_STEPS or self._segments >= FLUSH_SEGMENTS:
      self.flush()

  def flush(self) -> None:
    """Names and writes the buffered steps as one gzip member."""
    if self._files is None or not self._buffer:
      return
    values = np.concatenate([b[2] for b in self._buffer])
    unique, inverse = np.unique(values, axis=0, return_inverse=True)
    named = self._namer({k: unique[:, j:j + 1] for j, k in enumerate(self._keys)})
    names = [_escape(n[0]) if n else None for n in named]  # padding names nothing
    lines, at = [], 0
    for step, rows, _ in self._buffer:
      per_row: dict[int, dict[str, None]] = {}  # every row has a segment start at its first token
      for r, u in zip(rows.tolist(), inverse.reshape(-1)[at:at + len(rows)].tolist(), strict=True):
        row = per_row.setdefault(r, {})
        if names[u] is not None:
          row.setdefault(names[u])  # distinct per row, in order of appearance (as sample_ids)
      at += len(rows)
      lines.extend(f'{step}\t{r}' + ''.join('\t' + n for n in row) + '\n' for r, row in sorted(per_row.items()))
    self._offset = _append_member(*self._files, lines, self._offset)
    self._buffer, self._segments = [], 0

  def close(self) -> None:
    """Flushes and closes the files."""
    self.flush()
    if self._files is not None:
      for f in self._files:
        f.close()
      self._files = None


def read_samples(workdir: str, step: int) -> list[list[str]]:
  """The sample ids of each global row of train step `step` (1-based, as in metrics.jsonl) of a run."""
  if not os.path.isdir(workdir):
    raise DataError('--workdir', workdir, 'does not exist', 'expected the directory of a jaxtrain run')
  directory = os.path.join(workdir, SAMPLES_DIR)
  found: dict[int, list[str]] = {}
  ranges = []
  for index_path in sorted(glob.glob(os.path.join(directory, 'process_*.idx'))):
    data_path = index_path[:-len('.idx')] + '.tsv.gz'
    entries = _index(index_path, os.path.getsize(data_path) if os.path.exists(data_path) else 0)
    if not len(entries):
      continue
    ranges.append((int(entries[0, 0]), int(entries[-1, 1])))
    i = int(np.searchsorted(entries[:, 1], step))
    if i < len(entries) and entries[i, 0] <= step:
      for line in _member_lines(data_path, entries[i]):
        fields = line.rstrip('\n').split('\t')
        if int(fields[0]) == step:
          found[int(fields[1])] = [_unescape(f) for f in fields[2:]]
  if not found:
    where = (f'steps {min(r[0] for r in ranges)}..{max(r[1] for r in ranges)} are recorded' if ranges else
             f'{directory} holds no records (provenance.sidecar=False, or not a jaxtrain run directory)')
    raise DataError('step', step, f'has no sample records in {directory}', f'expected a recorded step: {where}')
  return [found[r] for r in sorted(found)]


# ----------------------------------------------------------------------------- the train loop's recorder


class Recorder:
  """What `train.fit` calls: `record` each drawn batch, `observe` each step's metrics (which arrive one step
  late), `flush` before a checkpoint is saved, `close` at the end. Reads `config.provenance`."""

  def __init__(self, config: Any, workdir: str, start: int, tokenizer: Any, process_index: int | None = None,
               process_count: int | None = None):
    import jax

    from jaxtrain import data
    self._process = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    p = config.provenance
    self._tokenizer, self._max_dumps = tokenizer, p.max_dumps
    self._names = functools.partial(data.sample_ids, config.data, 'train')
    self._samples = SampleLog(os.path.join(workdir, SAMPLES_DIR), self._process, count, start, self._names,
                              enabled=p.sidecar)
    self._detector: SpikeDetector | None = None
    self._recent: dict[int, tuple[np.ndarray, np.ndarray, dict]] = {}  # step -> this step's host rows
    if self._process == 0 and p.spike_factor > 0:
      self._spikes = os.path.join(workdir, SPIKES_DIR)
      os.makedirs(self._spikes, exist_ok=True)
      for path in _dump_paths(self._spikes):
        if _dump_step(path) > start:  # from a history the resume discards; kept aside, like corrupt checkpoints
          os.makedirs(os.path.join(self._spikes, 'discarded'), exist_ok=True)
          os.replace(path, os.path.join(self._spikes, 'discarded', os.path.basename(path)))
      self._dumps = len(_dump_paths(self._spikes))
      self._detector = SpikeDetector(p.spike_factor, p.spike_window, p.spike_warmup)
      self._history = _restore_history(os.path.join(self._spikes, 'history.bin'), start, self._detector)

  def record(self, step: int, host_batch: Mapping[str, np.ndarray], provenance: Mapping[str, np.ndarray]) -> None:
    """Step `step`'s batch as drawn: its provenance for the sidecar; tokens and segments kept for a dump."""
    rows = len(np.asarray(host_batch['tokens']))
    self._samples.record(step, provenance, self._process * rows)
    if self._detector is not None:
      self._recent[step] = (np.asarray(host_batch['tokens']), np.asarray(host_batch['segment_ids']),
                            dict(provenance))

  def observe(self, step: int, values: Mapping[str, float]) -> str:
    """Judges step `step`'s metrics; on a spike writes WORKDIR/spikes/step_<N>.json. Returns a line to log."""
    if self._detector is None:
      return ''
    batch = self._recent.pop(step, None)
    for old in [s for s in self._recent if s < step]:
      del self._recent[old]
    spike = self._detector.update(values['loss'], values.get('grad_norm', 0.0))
    self._history.write(np.asarray([step, values['loss'], values.get('grad_norm', 0.0), spike is not None],
                                   np.float64).tobytes())
    if spike is None:
      return ''
    if batch is None:  # observed without its batch (only outside the train loop)
      return f'step {step}: {spike.what}: {spike.reason}'
    if self._dumps >= self._max_dumps:
      return (f'step {step}: {spike.what}: {spike.reason}; not dumped (provenance.max_dumps={self._max_dumps} '
              'reached)')
    path = os.path.join(self._spikes, f'step_{step}.json')
    _write_json(path, self._dump(step, spike, *batch))
    self._dumps += 1
    return f'step {step}: {spike.what}: {spike.reason}; its rows and texts are in {path}'

  def _dump(self, step: int, spike: Spike, tokens: np.ndarray, segment_ids: np.ndarray, provenance: dict) -> dict:
    row_samples = self._names(provenance)
    starts = []  # (row, segment id, first position)
    for r, seg in enumerate(segment_ids):
      ids, first = np.unique(seg, return_index=True)
      order = np.argsort(first)  # in order of appearance
      starts.extend((r, int(s), int(i)) for s, i in zip(ids[order].tolist(), first[order].tolist(), strict=True)
                    if s > 0)
    at_rows, at_cols = np.asarray([s[0] for s in starts], int), np.asarray([s[2] for s in starts], int)
    names = self._names({k: np.asarray(v)[at_rows, at_cols][:, None] for k, v in provenance.items()})
    offset = self._process * len(tokens)
    rows = [{'row': offset + r, 'samples': row_samples[r], 'segments': []} for r in range(len(tokens))]
    for (r, s, _), name in zip(starts, names, strict=True):
      piece = tokens[r][segment_ids[r] == s]
      rows[r]['segments'].append({'sample': name[0] if name else None, 'tokens': len(piece),
                                  'text': self._tokenizer.decode(piece)})
    d = self._detector
    return {'step': step, 'loss': spike.loss, 'grad_norm': spike.grad_norm, 'loss_mean': spike.loss_mean,
            'grad_norm_mean': spike.grad_norm_mean, 'factor': d.factor, 'window': d.window, 'reason': spike.reason,
            'what': spike.what,
            'process_rows': [offset, offset + len(tokens)], 'rows': rows}

  def flush(self) -> None:
    """Everything recorded so far to disk (called before each checkpoint save)."""
    self._samples.flush()
    if self._detector is not None:
      self._history.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    self._samples.close()
    if self._detector is not None:
      self._history.close()
      self._detector = None


def _write_json(path: str, value: Any) -> None:
  # Written aside and renamed, so a blocklist run never reads half a dump.
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, ensure_ascii=False)
  os.replace(path + '.tmp', path)


def _dump_step(path: str) -> int:
  return int(re.findall(r'step_(\d+)\.json$', path)[0])


def _dump_paths(directory: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, 'step_*.json')), key=_dump_step)


# ----------------------------------------------------------------------------- blocklists


def document_name(sample_id: str) -> str:
  """The document of a sample id: its ':chunk<K>' suffix stripped."""
  return _CHUNK.sub('', sample_id)


def spike_documents(workdir: str) -> tuple[dict[str, int], list[str]]:
  """({document: number of spike dumps whose step trained on it}, the dumps read) over WORKDIR/spikes and, for a
  StackWise run, WORKDIR/stages/*/spikes. A dumped step's rows come from the sidecar when it has them (every
  process's rows), else from the dump (process 0's)."""
  if not os.path.isdir(workdir):
    raise DataError('--workdir', workdir, 'does not exist', 'expected the directory of a jaxtrain run')
  counts: dict[str, int] = collections.Counter()
  dumps = []
  runs = [workdir] + sorted(glob.glob(os.path.join(workdir, paths.STAGES, '*')))
  for run in runs:
    for path in _dump_paths(os.path.join(run, SPIKES_DIR)):
      with open(path, encoding='utf-8') as f:
        rows = [r['samples'] for r in json.load(f)['rows']]
      try:
        rows = read_samples(run, _dump_step(path))
      except DataError:
        pass  # no sidecar for this step: the dump's own rows
      counts.update({document_name(s) for row in rows for s in row})
      dumps.append(path)
  return dict(counts), dumps


def write_blocklist(workdir: str, out: str, min_count: int = 1) -> str:
  """Writes the documents of at least `min_count` spike dumps of `workdir` to `out`; returns a summary line."""
  if min_count < 1:
    raise DataError('--min-count', min_count, 'is not valid', 'expected a number of spike dumps >= 1')
  counts, dumps = spike_documents(workdir)
  chosen = sorted((d for d, n in counts.items() if n >= min_count), key=lambda d: (-counts[d], d))
  steps = ', '.join(os.path.relpath(p, workdir) for p in dumps) or 'none'
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
  header = [f'# jaxtrain blocklist: {len(chosen)} documents seen in >= {min_count} of {len(dumps)} loss-spike dumps',
            f'# from {os.path.abspath(workdir)}: {steps}',
            f'# written {now} by: jaxtrain blocklist --workdir={workdir} --min-count={min_count}',
            '# one document sample id per line (chunk suffix stripped); train without them: '
            '--config.data.exclude=THIS_FILE']
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w', encoding='utf-8') as f:
    f.write('\n'.join(header + chosen) + '\n')
  return f'wrote {len(chosen)} documents (in >= {min_count} of {len(dumps)} spike dumps of {workdir}) to {out}'
