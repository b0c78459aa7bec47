"""Generation throughput: `jaxtrain generate`'s KV-cache decoding against transformers' `generate` on the
`jaxtrain export`ed model (torch CPU), same prompts, same number of new tokens, greedy, side by side in one run.

  .venv/bin/python benchmarks/generate.py [--quick] [--batches=1,8] [--new_tokens=32] [--repeats=2]

Model: a Llama-style decoder trained for one step (configs/tiny.py's data, so its own tokenizer) at d_model 384,
6 layers, 6/6 heads, SwiGLU 1024, vocab 2048, rows of 256 tokens, float32; exported with `jaxtrain export`
(what transformers loads). Prompts: the first B of eight code snippets of 4 to 40 tokens. jaxtrain runs
`inference.generate` (the function behind `jaxtrain generate --nostop_at_eos --temperature=0`): the prompts
right-padded to the row, one compiled call per batch; transformers runs `model.generate(do_sample=False,
min_new_tokens=N, max_new_tokens=N)` on the prompts left-padded to the longest, with 2 torch threads. Each
side: one untimed call (jaxtrain's compiles), then the median of `repeats` timed calls. tokens/s counts new
tokens only (B x N per call). The greedy ids are compared row by row.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from timing import time_calls  # noqa: E402

PROMPTS = ['import os', 'def parse(text):\n    """Parse the text into tokens."""\n    return',
           'class Reader:\n    def __init__(self, path):\n        self.path = path\n\n    def read(self):',
           'for i in range(10):', 'with open(path) as f:\n    for line in f:\n        if line.startswith("#"):',
           'x = ', '@property\ndef name(self):', 'try:\n    import numpy as np\nexcept ImportError:\n    np = None\n'
           '\ndef mean(values):\n    if np is not None:\n        return']


def tiny_config(quick: bool):
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(REPO, 'configs', 'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  m = c.model
  if quick:
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 128, 2, 4, 4, 384
  else:
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 384, 6, 6, 6, 1024
  c.data.tokenizer_vocab_size, c.data.seq_len, c.data.batch_size = 2048, 256, 2
  c.train.steps, c.train.eval_every, c.train.steps_per_call, c.checkpoint.every = 1, 0, 1, 0
  c.log.plot, c.log.peak_flops = False, 1e12
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true', help='d_model 128, 2 layers (a smoke test of the script)')
  p.add_argument('--batches', default='1,8', help='prompt batch sizes, comma-separated (at most 8)')
  p.add_argument('--new_tokens', type=int, default=32)
  p.add_argument('--repeats', type=int, default=2)
  args = p.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  if not all(1 <= b <= len(PROMPTS) for b in batches):
    p.error(f'--batches: each size in 1..{len(PROMPTS)}')

  import jax
  import torch
  import transformers

  from jaxtrain.stackwise import inference
  from jaxtrain.train import export, loop as train

  torch.set_num_threads(2)
  root = tempfile.mkdtemp(prefix='bench-generate-')
  workdir, hf_dir = os.path.join(root, 'run'), os.path.join(root, 'hf')
  config = tiny_config(args.quick)
  train.run(config, workdir)
  export.export(workdir, hf_dir)
  loaded = inference.load_run(workdir)
  tok, window, n = loaded.tokenizer, loaded.window, args.new_tokens
  settings = inference.Settings(max_tokens=n, temperature=0.0, stop_at_eos=False)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side='left')
  if hf_tok.pad_token is None:
    hf_tok.pad_token = hf_tok.eos_token
  params = sum(x.size for x in jax.tree.leaves(loaded.rack.params))
  m = config.model
  print(f'Model: d_model {m.d_model}, {m.num_layers} layers, vocab {tok.vocab_size}, {params / 1e6:.1f}M parameters, '
        f'rows of {window} tokens; {n} new tokens per prompt, greedy; jax {jax.__version__}, torch '
        f'{torch.__version__}, transformers {transformers.__version__}, {args.repeats} timed calls each:')
  print('| batch | prompt tokens | jaxtrain first call (s) | jaxtrain call (s) | jaxtrain tokens/s | transformers '
        'call (s) | transformers tokens/s | jaxtrain / transformers | identical greedy rows |')
  print('|---|---|---|---|---|---|---|---|---|')
  def ours(prompts: list[str]) -> list[list[int]]:
    return [s.ids for s in inference.generate(loaded.rack, tok, prompts, settings, window)]

  def theirs(enc: dict) -> list[list[int]]:
    with torch.no_grad():
      out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=hf_tok.pad_token_id)
    return out[:, enc['input_ids'].shape[1]:].tolist()

  for b in batches:
    prompts = PROMPTS[:b]
    lengths = [len(tok.encode(x)) for x in prompts]
    t0 = time.perf_counter()
    our_ids = ours(prompts)  # compiles (one program per batch size)
    compile_s = time.perf_counter() - t0
    ours_s = statistics.median(time_calls(functools.partial(ours, prompts), args.repeats, warmup=0))
    enc = hf_tok(prompts, return_tensors='pt', padding=True, add_special_tokens=False)
    their_ids = theirs(enc)
    theirs_s = statistics.median(time_calls(functools.partial(theirs, enc), args.repeats, warmup=0))
    same = sum(a == c for a, c in zip(our_ids, their_ids, strict=True))
    print(f'| {b} | {min(lengths)}-{max(lengths)} | {compile_s:.2f} | {ours_s:.3f} | {b * n / ours_s:.0f} | '
          f'{theirs_s:.3f} | {b * n / theirs_s:.0f} | {theirs_s / ours_s:.2f}x | {same}/{b} |')

if __name__ == '__main__':
  main()
