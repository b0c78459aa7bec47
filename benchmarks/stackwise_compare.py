"""Progressive (StackWise) against end-to-end training of the same rack on the same number of tokens.

  .venv/bin/python benchmarks/stackwise_compare.py                          # append vs joint (~15-20 min on CPU)
  .venv/bin/python benchmarks/stackwise_compare.py --variants=append,joint,lora,clm,clm_joint
  .venv/bin/python benchmarks/stackwise_compare.py --extra=size=cpu --workdir_root=/tmp/sw --keep
  .venv/bin/python benchmarks/stackwise_compare.py --set=train.steps=8 --set=data.max_files=8   # smoke test

Each variant is one `python -m jaxtrain.main --config=configs/stackwise.py:ARGS` in a fresh workdir under
`--workdir_root` (default: a new temporary directory, deleted at the end unless --keep), one after another:

  append     (default) append stages, frozen trunk, masked diffusion: 4 stages x 300 steps at size=cpu
  joint      direction=joint: all stacks trained at once for the same total steps (the config gives joint
             num_stacks x steps-per-stage), from the same initial weights (stack i is seeded by its index)
  lora       trunk=lora: append stages with rank-4 adapters on the trunk
  clm        objective=clm (causal decoder, append stages); clm_joint: objective=clm,direction=joint

Same seed and batch size for all, so every variant sees the same number of tokens (steps x batch x seq).
The data order is not identical: each stage draws its own order (seed + stage index); the evaluation
batches are the same for all.

Read back from each run directory: the final rack's eval loss (the last stage's eval record in
WORKDIR/stages/<k>/metrics.jsonl: the masked-diffusion ELBO bound per token, or the next-token CE for clm),
the training FLOPs logged per stage, and the median step time. The runs' own eval draws the diffusion times
t from the stage's rng, which differs between stages and variants; so the script also re-evaluates each
final rack (WORKDIR/rack) with the objective's deterministic per-sample times on `--reeval_batches`
evaluation batches, the same for all variants. Compiled step memory is measured by
benchmarks/stackwise_memory.py. Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    'append': '',
    'joint': 'direction=joint',
    'lora': 'trunk=lora',
    'clm': 'objective=clm',
    'clm_joint': 'objective=clm,direction=joint',
}


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variants', default='append,joint', help=f'comma list of {", ".join(VARIANTS)}')
  p.add_argument('--extra', default='', help='config args added to every variant, e.g. size=cpu')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a --config.KEY=VALUE override for every variant (repeatable)')
  p.add_argument('--workdir_root', default='', help='run directories go here (default: a new temp dir)')
  p.add_argument('--keep', action='store_true', help='keep the run directories of a temporary root')
  p.add_argument('--reeval_batches', type=int, default=16, help='0: skip the deterministic re-evaluation')
  args = p.parse_args()
  unknown = [v for v in args.variants.split(',') if v not in VARIANTS]
  if unknown:
    p.error(f'unknown variants {unknown}; valid are {", ".join(VARIANTS)}')
  return args


def config_arg(variant: str, extra: str) -> str:
  return ','.join(filter(None, (VARIANTS[variant], extra)))


def override(config: ml_collections.ConfigDict, sets: list[str]) -> ml_collections.ConfigDict:
  """`config` with the --set overrides applied as config_flags would (values parsed as Python literals)."""
  for item in sets:
    key, _, text = item.partition('=')
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    try:
      node[name] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      node[name] = text
  return config


def train(variant: str, extra: str, sets: list[str], root: str) -> dict:
  """Runs one variant in a fresh workdir; returns its wall time, workdir and the stdout summary line."""
  workdir = os.path.join(root, variant)
  if os.path.exists(workdir):
    shutil.rmtree(workdir)  # a fresh run, never a resume of an older one
  arg = config_arg(variant, extra)
  cmd = [sys.executable, '-m', 'jaxtrain.main', f'--config=configs/stackwise.py{":" + arg if arg else ""}',
         f'--workdir={workdir}'] + [f'--config.{item}' for item in sets]
  print(f'[{variant}] {" ".join(cmd[1:])}', file=sys.stderr, flush=True)
  start = time.perf_counter()
  with open(os.path.join(root, f'{variant}.log'), 'w') as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
  seconds = time.perf_counter() - start
  with open(os.path.join(root, f'{variant}.log'), 'a') as log:
    log.write(proc.stdout)
  if proc.returncode:
    raise SystemExit(f'[{variant}] exited with {proc.returncode}; see {root}/{variant}.log')
  summary = [line for line in proc.stdout.splitlines() if line.startswith('stackwise:')]
  print(f'[{variant}] {seconds:.0f} s: {summary[-1] if summary else "(no summary line)"}', file=sys.stderr,
        flush=True)
  return {'variant': variant, 'arg': arg, 'workdir': workdir, 'seconds': seconds,
          'summary': summary[-1] if summary else ''}


def read_run(run: dict) -> dict:
  """Eval loss of the final rack, tokens, training FLOPs and step times from the run directory."""
  workdir = run['workdir']
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = json.load(f)
  stage_dirs = sorted(glob.glob(os.path.join(workdir, 'stages', '*')), key=lambda d: int(os.path.basename(d)))
  flops, step_times, evals = 0.0, [], []
  for d in stage_dirs:
    with open(os.path.join(d, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
    train_records = [r for r in records if 'train_flops_total' in r]
    flops += train_records[-1]['train_flops_total'] if train_records else 0.0
    # The first logged steps include compilation; the median of the rest is the steady step time.
    step_times += [r['step_time'] for r in train_records[1:]]
    evals += [r for r in records if 'eval_loss' in r]
  tokens = cfg['train']['steps'] * cfg['data']['batch_size'] * cfg['data']['seq_len']
  last = evals[-1]
  masked_ce = last['eval_masked_ce'] / last['eval_masked'] if last.get('eval_masked') else None
  return dict(run, kind=cfg['objective']['kind'], stages=len(stage_dirs), eval=last['eval_loss'],
              eval_mce=masked_ce, tokens=tokens, flops=flops,
              step_s=statistics.median(step_times) if step_times else float('nan'))


def reeval(run: dict, sets: list[str], batches: int) -> tuple[float, float | None]:
  """(loss, mean CE of the masked tokens or None for clm) of the final rack on the first `batches` eval
  batches, with deterministic diffusion times."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, REPO)
  from configs import stackwise as sw_config
  from jaxtrain import data
  from jaxtrain.stackwise import job as stackwise_run, objectives, plan as stackwise
  from jaxtrain.models import rack
  from jaxtrain.stackwise.checkpoint import StackCheckpointer

  config = override(sw_config.get_config(run['arg']), sets)
  tokenizer = data.load_tokenizer(config.data)
  rd, obj = stackwise.rack_setup(config, tokenizer.vocab_size)
  store = StackCheckpointer(os.path.join(run['workdir'], 'rack'))
  host_rack, trained = stackwise_run.restore_rack(store, store.latest(), rd,
                                                  stackwise.initial_rack(rd, config.train.seed))
  order = tuple(range(rd.rc.num_stacks))
  assert tuple(trained) == order, f'{run["workdir"]}: final rack holds stacks {trained}, expected {order}'
  params = jax.tree.map(jnp.asarray, host_rack)

  @jax.jit
  def sums(params: dict, batch: dict) -> jax.Array:
    c = objectives.prepare(obj, batch, None)  # rng None: evaluation times, a hash of each sample's id
    logits = rack.forward(rd, params, batch, order, c.t, c.tokens)
    _, s = objectives.loss_sums(obj, logits, batch, c)
    return jnp.stack([s['loss_sum'], s['tokens'], s.get('masked_ce_sum', 0.0), s.get('masked_sum', 0.0)])

  ds = data.make_dataset(config.data, tokenizer, split='eval', seed=config.train.seed,
                         batch_size=config.data.batch_size)
  it = iter(ds)
  total = np.zeros(4)
  for _ in range(batches):
    b = next(it)
    b = {k: jnp.asarray(b[k]) for k in ('tokens', 'segment_ids', 'positions', 'loss_mask', 'doc_ids', 'doc_chunks')}
    total += np.asarray(jax.device_get(sums(params, b)), np.float64)
  loss_sum, tokens, masked_ce_sum, masked = total
  return loss_sum / max(tokens, 1.0), (masked_ce_sum / masked if masked else None)


def table(rows: list[dict], reeval_batches: int) -> str:
  ref = rows[0]
  lines = ['| variant | config args | stages | final eval loss (run) | masked CE (run) | re-eval loss, fixed t '
           f'({reeval_batches} batches) | masked CE (re-eval) | tokens seen | train PFLOP | median step s '
           f'| wall time | wall / {ref["variant"]} |', '|' + '---|' * 12]
  num = lambda x: '-' if x is None else f'{x:.4f}'  # noqa: E731
  for r in rows:
    what = 'ELBO bound' if r['kind'] == 'diffusion' else 'CE'
    lines.append(f'| {r["variant"]} | `{r["arg"] or "(defaults)"}` | {r["stages"]} | {r["eval"]:.4f} {what} '
                 f'(ppl {"<= " if r["kind"] == "diffusion" else ""}{math.exp(min(r["eval"], 50)):.1f}) '
                 f'| {num(r["eval_mce"])} | {num(r.get("reeval"))} | {num(r.get("reeval_mce"))} '
                 f'| {r["tokens"] / 1e6:.2f}M | {r["flops"] / 1e15:.3f} | {r["step_s"]:.3f} '
                 f'| {r["seconds"] / 60:.1f} min | {r["seconds"] / ref["seconds"]:.2f}x |')
  return '\n'.join(lines)


def main() -> None:
  args = parse_args()
  temporary = not args.workdir_root
  root = args.workdir_root or tempfile.mkdtemp(prefix='stackwise-compare-')
  os.makedirs(root, exist_ok=True)
  start = time.perf_counter()
  rows = []
  try:
    for v in args.variants.split(','):
      rows.append(read_run(train(v, args.extra, args.set, root)))
    if args.reeval_batches:
      for r in rows:
        r['reeval'], r['reeval_mce'] = reeval(r, args.set, args.reeval_batches)
    print(f'Command: .venv/bin/python {" ".join(sys.argv)}')
    print(f'Machine: {platform.machine()}, {os.cpu_count()} cores; {time.perf_counter() - start:.0f} s total; '
          f'run directories in {root}{" (deleted)" if temporary and not args.keep else ""}\n')
    print(table(rows, args.reeval_batches))
    print()
    for r in rows:
      print(f'- {r["variant"]}: {r["summary"]}')
  finally:
    if temporary and not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
