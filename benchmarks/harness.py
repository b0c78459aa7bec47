"""lm-evaluation-harness loglikelihood requests/s: jaxtrain's backend (`jaxtrain.evaluation.harness`, packed
fixed-shape batches) against lm-eval's own Hugging Face backend (`HFLM`, torch CPU), on the same `jaxtrain
export`ed model and the same requests, side by side in one run.

  .venv/bin/python benchmarks/harness.py [--quick] [--repeat=4] [--hf_batch=1,32] [--repeats=3]

Model: a Llama-style decoder trained for one step in a child process (training leaves threads that would slow
what this process times) (configs/tiny.py's data, so its own tokenizer) at d_model 384,
6 layers, 6/6 heads, SwiGLU 1024, vocab 2048, rows of 256 tokens, float32, exported with `jaxtrain export`;
both backends load that directory with a window of 256 tokens. Requests: the loglikelihood requests of the
shipped task jaxtrain_python_choice (32 examples x 4 choices; 8-27 tokens each with this tokenizer), `--repeat`
times over.
jaxtrain: `JaxtrainLM(model_dir=...)` (2048-token batches of 8 rows x 256); lm-eval: `HFLM(...,
batch_size=B)` for each --hf_batch (its default is 1), 2 torch threads. Each side: one untimed pass (jaxtrain
compiles), then the median of `--repeats` timed passes of `loglikelihood` over all requests (tokenizing
included, as lm-eval runs it). The log-probabilities and is-greedy flags are compared request by request.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from generate import tiny_config  # noqa: E402  (the same benchmark model)
from timing import time_calls  # noqa: E402


def task_requests(repeat: int) -> list:
  """The loglikelihood Instances of jaxtrain_python_choice (as the task builds them: context, choice), `repeat`
  times over."""
  from lm_eval.api.instance import Instance

  from jaxtrain.evaluation import harness

  with open(os.path.join(harness.TASKS_DIR, 'python_choice.jsonl'), encoding='utf-8') as f:
    docs = [json.loads(line) for line in f]
  args = [(d['context'], c) for d in docs for c in d['choices']] * repeat
  return [Instance('loglikelihood', {}, a, k) for k, a in enumerate(args)]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true', help='d_model 128, 2 layers (a smoke test of the script)')
  p.add_argument('--repeat', type=int, default=4, help='times the 128 requests of the task are scored per pass')
  p.add_argument('--hf_batch', default='1,32', help="HFLM batch sizes, comma-separated (lm-eval's default: 1)")
  p.add_argument('--repeats', type=int, default=3, help='timed passes per side (the median is reported)')
  p.add_argument('--build', help=argparse.SUPPRESS)  # the child: train and export the model into this folder
  args = p.parse_args()
  if args.build:
    from jaxtrain.train import export, loop as train
    train.run(tiny_config(args.quick), os.path.join(args.build, 'run'))
    export.export(os.path.join(args.build, 'run'), os.path.join(args.build, 'hf'))
    return

  import jax
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  from jaxtrain.evaluation import harness

  torch.set_num_threads(2)
  root = tempfile.mkdtemp(prefix='bench-harness-')
  hf_dir = os.path.join(root, 'hf')
  subprocess.run([sys.executable, os.path.abspath(__file__), f'--build={root}'] + ['--quick'] * args.quick,
                 check=True, stdout=subprocess.DEVNULL)
  config = tiny_config(args.quick)
  window = int(config.data.seq_len)
  requests = task_requests(args.repeat)
  ours = harness.model_class()(model_dir=hf_dir, max_length=window)
  lengths = [len(ours.tok_encode(c + x)) for c, x in (r.args for r in requests)]
  m = config.model
  model_line = (f'Model: d_model {m.d_model}, {m.num_layers} layers, vocab {len(ours.tokenizer)}, '
                f'{sum(x.size for x in jax.tree.leaves(ours.model.params)) / 1e6:.1f}M parameters, window {window}; '
                f'{len(requests)} loglikelihood requests of {min(lengths)}-{max(lengths)} tokens '
                f'(jaxtrain_python_choice x {args.repeat}); jax {jax.__version__}, torch {torch.__version__}, '
                f'transformers {transformers.__version__}, median of {args.repeats} passes')

  def run(lm) -> list:
    return lm.loglikelihood(requests, disable_tqdm=True)

  got = run(ours)  # compiles
  ours_s = statistics.median(time_calls(functools.partial(run, ours), args.repeats, warmup=0))
  # The caption right above the table (benchmarks/run.py keeps that line with it).
  print(f'{model_line}; jaxtrain packs them into batches of {ours.engine.rows} x {ours.engine.width} tokens '
        f'({ours.engine.compiles} compile).')
  print('| backend | pass (s) | requests/s | jaxtrain / this | max abs loglikelihood difference | same is_greedy |')
  print('|---|--:|--:|--:|--:|--:|')
  print(f'| jaxtrain (packed, fixed shape) | {ours_s:.2f} | {len(requests) / ours_s:.0f} | 1.00x | | |')
  for b in (int(x) for x in args.hf_batch.split(',')):
    hf = HFLM(pretrained=hf_dir, device='cpu', dtype='float32', max_length=window, batch_size=b)
    want = run(hf)
    hf_s = statistics.median(time_calls(functools.partial(run, hf), args.repeats, warmup=0))
    worst = max(abs(a[0] - c[0]) for a, c in zip(got, want, strict=True))
    same = sum(a[1] == c[1] for a, c in zip(got, want, strict=True))
    print(f'| lm-eval HFLM, batch_size={b} | {hf_s:.2f} | {len(requests) / hf_s:.0f} | {hf_s / ours_s:.2f}x | '
          f'{worst:.1e} | {same}/{len(requests)} |')


if __name__ == '__main__':
  main()
