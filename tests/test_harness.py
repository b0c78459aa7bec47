"""The lm-evaluation-harness backend (`jaxtrain.evaluation.harness`, `jaxtrain eval --harness`): on the shipped
tasks its scores equal lm-eval's own Hugging Face backend on the exported model (torch CPU), loglikelihood_rolling
equals per-token sums of a plain forward pass, packed batches compile once, and bad input is one line, exit 2,
nothing written. One tiny run is trained and exported once for the module."""

import json
import os
import subprocess
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # everything here is local: nothing may download
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxtrain import models  # noqa: E402
from jaxtrain.evaluation import EvalError, harness  # noqa: E402
from jaxtrain.train import export, loop as train, losses  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import run_captured, run_command  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402

lm_eval = pytest.importorskip('lm_eval')
TASKS = 'jaxtrain_local'  # the tag of the two shipped tasks
LONG = ''.join(f'def f{i}(x):\n    return x * {i}\n' for i in range(12))  # several 64-token windows


def instances(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(kind, {}, a, k) for k, a in enumerate(args)]


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A 12-step run of configs/tiny.py (one checkpoint), its `jaxtrain export`, and `jaxtrain eval --harness`
  of the shipped tasks on the run (its results JSON and samples)."""
  root = tmp_path_factory.mktemp('harness')
  workdir, out = str(root / 'run'), str(root / 'hf')
  # test_evaluation's settings (its compiled train step comes from JAX's persistent cache in a full suite run)
  train.run(tiny_config(**{'train.steps': 12, 'train.steps_per_call': 1, 'train.eval_batches': 2, 'log.plot': False,
                           'log.peak_flops': 1e12, 'checkpoint.every': 12}), workdir)
  export.export(workdir, out)
  return {'workdir': workdir, 'hf': out, 'root': root}


@pytest.fixture(scope='module')
def lm(tiny):
  """The run's newest checkpoint as lm-eval's `jaxtrain` model."""
  return harness.model_class()(workdir=tiny['workdir'])


def jaxtrain(*argv: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `jaxtrain ARGV` in this process (usable in module fixtures)."""
  return run_captured(*argv)


def files(directory: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, names in os.walk(directory) for f in names)


@pytest.fixture(scope='module')
def ours(tiny):
  """`jaxtrain eval --workdir=RUN --harness=jaxtrain_local` run from another working directory: (results JSON,
  samples by task and doc_id, stdout)."""
  cwd = os.getcwd()
  os.chdir(tiny['root'])  # relative data_files resolve from the task's YAML, not from here
  try:
    code, out, err = jaxtrain('eval', f'--workdir={tiny["workdir"]}', f'--harness={TASKS}')
  finally:
    os.chdir(cwd)
  assert code == 0, err
  path = os.path.join(tiny['workdir'], 'eval', 'harness', f'12-{TASKS}.json')
  with open(path, encoding='utf-8') as f:
    results = json.load(f)
  samples: dict = {}
  with open(path[:-len('.json')] + '_samples.jsonl', encoding='utf-8') as f:
    for line in f:
      s = json.loads(line)
      samples.setdefault(s['task'], {})[s['doc_id']] = s
  return results, samples, out


def test_scores_equal_lm_evals_hf_backend_on_the_exported_model(tiny, ours):
  results, samples, out = ours
  tm, _ = harness.task_manager([TASKS])
  hf = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={tiny["hf"]},device=cpu,dtype=float32,max_length=64',
                               tasks=[TASKS], task_manager=tm, batch_size=16)
  assert set(hf['samples']) == set(samples) == {'jaxtrain_python_choice', 'jaxtrain_python_lines'}
  worst = 0.0
  for task, rows in hf['samples'].items():
    assert len(rows) == len(samples[task]) == (32 if task.endswith('choice') else 30)
    for ref in rows:
      got = samples[task][ref['doc_id']]
      if task.endswith('choice'):  # four (loglikelihood, is_greedy) per example
        for (r,), (g,) in zip(ref['resps'], got['resps'], strict=True):
          worst = max(worst, abs(r[0] - g[0]))
          assert r[1] == g[1], (ref['doc_id'], r, g)
      else:  # the same greedy text, cut at the same stop string
        assert ref['resps'] == got['resps'], (ref['doc'], ref['resps'], got['resps'])
  assert worst < 1e-4, worst
  for task in hf['results']:
    for metric in ('acc,none', 'acc_norm,none', 'exact_match,none'):
      if metric in hf['results'][task]:
        assert results['results'][task][metric] == hf['results'][task][metric], (task, metric)
  assert 0 < results['results']['jaxtrain_python_choice']['acc,none'] < 1  # a real score, not a constant
  assert results['jaxtrain']['score_compiles'] == 1  # every request of both tasks, one program
  assert results['jaxtrain']['requests'] == {'loglikelihood': 128, 'loglikelihood_rolling': 0, 'generate_until': 30}
  assert '|jaxtrain_python_choice|' in out and 'exact_match' in out and f'12-{TASKS}.json' in out


def test_exported_directory_scores_as_the_run(tiny, ours):
  """--model-dir (the export, window set to the run's 64) gives the run's numbers; --limit keeps N examples."""
  _, samples, _ = ours
  code, _, err = jaxtrain('eval', f'--model-dir={tiny["hf"]}', '--harness=jaxtrain_python_choice', '--limit=5',
                          '--max-length=64')
  assert code == 0, err
  path = os.path.join(tiny['hf'], 'eval', 'harness', 'jaxtrain_python_choice-limit5_samples.jsonl')
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 5
  for row in rows:
    for (g,), (r,) in zip(row['resps'], samples['jaxtrain_python_choice'][row['doc_id']]['resps'], strict=True):
      assert abs(g[0] - r[0]) < 1e-4 and g[1] == r[1]


def reference_rolling(params, mc, ids, prefix, window):
  """Sum of log p(token | all tokens before it, at most `window` - 1 of them, the prefix first) from a plain
  forward pass of each chunk of `window` predictions (no packing): lm-eval's rolling definition, by hand."""
  graphdef, _, _ = models.describe(mc)
  # Each chunk is right-padded to `window` (causal: padding after a token changes nothing before it), so the
  # forward pass compiles once rather than running op by op.
  forward = jax.jit(lambda p, b, t: losses.token_cross_entropy(models.apply(graphdef, p, b), t)[0])
  seq = [prefix] + list(ids)
  total = 0.0
  for a in range(1, len(seq), window):  # predict seq[a:e] from the `window` tokens before seq[e - 1]
    e = min(a + window, len(seq))
    s = max(0, e - 1 - window)
    n = e - 1 - s
    inp, tgt = np.zeros((1, window), np.int32), np.zeros((1, window), np.int32)
    inp[0, :n], tgt[0, :n] = seq[s:e - 1], seq[s + 1:e]
    batch = {'tokens': inp, 'segment_ids': (np.arange(window) < n)[None].astype(np.int32),
             'positions': np.arange(window, dtype=np.int32)[None]}
    total -= float(np.asarray(forward(params, batch, tgt))[0, a - 1 - s:n].sum())
  return total


def test_rolling_equals_per_token_sums_and_hf(tiny, lm):
  texts = ['import os\n', 'def main():\n    return 0\n', LONG]
  got = lm.loglikelihood_rolling(instances('loglikelihood_rolling', [(t,) for t in texts]))
  m = lm.model
  for text, value in zip(texts, got, strict=True):
    ids = lm.tok_encode(text)
    want = reference_rolling(m.params, m.mc, ids, m.eos_id, m.window)
    assert abs(value - want) < 1e-4 * max(1.0, len(ids) / 10), (text[:20], value, want)
  assert len(lm.tok_encode(LONG)) > 2 * m.window  # three windows or more
  from lm_eval.models.huggingface import HFLM
  ref = HFLM(pretrained=tiny['hf'], device='cpu', dtype='float32', max_length=64)
  hf = ref.loglikelihood_rolling(instances('loglikelihood_rolling', [(t,) for t in texts]))
  np.testing.assert_allclose(got, hf, rtol=1e-6, atol=1e-4)
  assert lm.engine.compiles == 1  # all windows of all texts in one program
  assert lm.engine.counts['loglikelihood_rolling'] == 3 and lm.engine.counts['loglikelihood'] == 0


def test_packed_batches_compile_once_for_many_lengths(lm):
  lm = harness.model_class()(model=lm.model, batch_tokens=256)  # 4 rows of 64: many batches
  contexts = [LONG[:n] for n in range(1, 400, 7)]  # 1 to ~130 tokens: left-truncated to the window
  args = [(c, ' pass') for c in contexts] + [('', 'def f():')]  # and an empty context (the EOS prefix)
  got = lm.loglikelihood(instances('loglikelihood', args))
  assert lm.engine.compiles == 1 and len(got) == len(args)
  # Each equals the request scored alone (a batch of one), so packing changes nothing.
  for k in (0, 9, 30, len(args) - 1):
    assert abs(lm.loglikelihood(instances('loglikelihood', [args[k]]))[0][0] - got[k][0]) < 1e-4
  assert lm.engine.compiles == 1


def test_pack_places_every_request_once_within_rows():
  lengths = [5, 64, 3, 30, 30, 10, 1, 64, 7, 2, 33]
  batches = harness.pack(lengths, rows=2, width=64, segments=3)
  placed = [i for b in batches for row in b for i in row]
  assert sorted(placed) == list(range(len(lengths)))
  for b in batches:
    assert 1 <= len(b) <= 2
    for row in b:
      assert sum(lengths[i] for i in row) <= 64 and len(row) <= 3
  assert batches[0] == [[1], [7]]  # the longest first
  with pytest.raises(ValueError):
    harness.pack([65], rows=1, width=64)


def test_generate_until_stops_at_the_stop_string(lm):
  prompts = ['def f(x):\n', 'import']
  free = lm.generate_until(instances('generate_until', [(p, {'until': [], 'max_gen_toks': 16}) for p in prompts]))
  assert all(free)
  for prompt, text in zip(prompts, free, strict=True):
    stop = text[1:3]  # a piece of what greedy writes: cut there the next time
    cut = lm.generate_until(instances('generate_until', [(prompt, {'until': [stop], 'max_gen_toks': 16})]))[0]
    assert cut == text.split(stop)[0] and stop not in cut


def test_continuation_merged_into_the_context_is_one_line(lm):
  """A choice the tokenizer merges into the context's last token (no target_delimiter) has no token to score:
  one EvalError naming it (lm-eval's HF backend fails an assertion), not a traceback."""
  pairs = [(w[:k], w[k:]) for w in ('return', 'import', 'self', 'print', 'range', 'def', 'class')
           for k in range(1, len(w))]
  merged = [(c, x) for c, x in pairs if len(lm.tok_encode(c + x)) <= len(lm.tok_encode(c))]
  assert merged, 'no word of the list splits inside one token of this tokenizer'
  context, continuation = merged[0]
  with pytest.raises(EvalError, match=f'the continuation {continuation!r} after the context {context!r} has no '
                     'token of its own.*target_delimiter'):
    lm.loglikelihood(instances('loglikelihood', [('import os\n', ' x'), (context, continuation)]))


@pytest.mark.parametrize('args, says', [
    (['--harness=no_such_task'], 'no such lm-eval task, group or tag; local tasks: jaxtrain_local, '
     'jaxtrain_python_choice, jaxtrain_python_lines'),
    ([f'--harness={TASKS}', '--include-path=/no/such/dir'], "--include-path='/no/such/dir': no such directory"),
    ([f'--harness={TASKS}', '--limit=0'], '--limit=0: expected at least 1 example per task'),
    ([f'--harness={TASKS}', '--step=5'], '--step=5: no such checkpoint'),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, capsys, args, says):
  workdir = tiny['workdir']
  before = files(workdir)
  code, _, err = run_command(capsys, 'eval', f'--workdir={workdir}', *args)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and says in lines[0], err
  assert files(workdir) == before


def test_missing_run_dir_and_model_choice(tmp_path, capsys):
  code, _, err = run_command(capsys, 'eval', f'--workdir={tmp_path / "none"}', f'--harness={TASKS}')
  assert code == 2 and "no such directory" in err and not (tmp_path / 'none').exists()
  code, _, err = run_command(capsys, 'eval', f'--harness={TASKS}')
  assert code == 2 and 'give the model: --workdir=RUN' in err
  code, _, err = run_command(capsys, 'eval', f'--workdir={tmp_path}', '--limit=3')
  assert code == 2 and '--limit without --harness' in err


def test_max_length_beyond_learned_positions_is_refused(tiny, tmp_path):
  """A GPT-2 directory has positions for n_positions tokens: a longer --max-length would read clamped rows of the
  table (wrong numbers, no error), so it is one line; the table's length itself is fine."""
  import shutil

  import transformers

  cfg = transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=16, n_layer=1, n_head=2)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
  for name in os.listdir(tiny['hf']):
    if name.startswith('tokenizer'):
      shutil.copy(os.path.join(tiny['hf'], name), tmp_path / name)
  with pytest.raises(EvalError, match=r"--max-length=64: the model has learned positions for 32 tokens only"):
    harness.load_hf(str(tmp_path), max_length=64)
  assert harness.load_hf(str(tmp_path), max_length=32).window == 32


def test_missing_lm_eval_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'lm_eval', None)  # `import lm_eval` raises ImportError
  with pytest.raises(EvalError, match=r"pip install 'jaxtrain\[eval\]'"):
    harness.lm_eval()


def test_importing_jaxtrain_does_not_import_lm_eval():
  code = ('import sys, jaxtrain, jaxtrain.evaluation.harness, jaxtrain.cli.evaluate; '
          'assert "lm_eval" not in sys.modules, "lm_eval imported"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
