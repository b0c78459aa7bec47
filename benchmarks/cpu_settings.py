"""Which XLA CPU options and model settings make the jaxtrain train step fastest on this machine.

  .venv/bin/python benchmarks/cpu_settings.py                  # 31.5M Llama, batch 8 x 512 (throughput.py's model)
  .venv/bin/python benchmarks/cpu_settings.py --quick          # 5.5M, batch 8 x 256
  .venv/bin/python benchmarks/cpu_settings.py --only=default,ynn_off --rounds=2

XLA reads XLA_FLAGS once, when the backend starts, so every variant runs in its own child process (this
script with --child). Each child builds the same step as benchmarks/throughput.py (as shipped: 4 train
steps per compiled call on CPU), calls it twice untimed, then times whole calls covering at least --steps
steps; rounds alternate between the variants so load from other work on a shared machine hits all alike.
Prints the median step time per variant and its ratio to the shipped defaults (what
`python -m jaxtrain.main` uses on CPU: XLA's own options, which no flag here beat, and the model defaults
resolved for CPU), as a Markdown table with each variant's page faults and kernel CPU time per step. A variant
XLA rejects is reported as failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys

from timing import run_json_child

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  what: str
  flags: str = ''  # XLA_FLAGS for the child
  model: tuple[tuple[str, object], ...] = ()  # ModelConfig overrides
  steps_per_call: int = 0  # train steps per compiled call; 0: as shipped (train.steps_per_call resolved)
  env: tuple[tuple[str, str], ...] = ()  # other environment variables for the child


VARIANTS = (
    Variant('default', 'shipped CPU defaults'),
    Variant('ynn_off', 'YNNPACK off: Eigen dots, XLA loop fusions', '--xla_cpu_experimental_ynn_fusion_type='),
    Variant('ynn_dots_only', 'YNNPACK for dots only', '--xla_cpu_experimental_ynn_fusion_type=individual_dot'),
    Variant('xnn', 'XNNPACK dots instead of YNNPACK',
            '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true '
            '--xla_cpu_experimental_xnn_fusion_type=individual_dot'),
    Variant('onednn', 'oneDNN', '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true'),
    Variant('no_concurrency_scheduler', 'scheduler not optimised for concurrent ops',
            '--xla_cpu_enable_concurrency_optimized_scheduler=false'),
    Variant('fast_math', 'fast math', '--xla_cpu_enable_fast_math=true'),
    Variant('single_thread_eigen', 'Eigen single-threaded', '--xla_cpu_multi_thread_eigen=false'),
    Variant('ynn_no_dots', "Eigen's dots, YNNPACK for the rest",
            '--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-dot'),
    Variant('vector_512', "512-bit vectors in XLA's own loops (AVX-512)", '--xla_cpu_prefer_vector_width=512'),
    # XLA allocates each step's temporaries as one buffer (3.3 GB here), which glibc maps fresh and unmaps
    # again every step: about 800k page faults per step. These settings keep freed memory in the heap.
    Variant('malloc_keep', 'glibc keeps freed memory (one arena, no mmap, no trim)',
            env=(('GLIBC_TUNABLES', 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                                    'glibc.malloc.trim_threshold=68719476736'),)),
    # The same buffer in 2 MB transparent huge pages (glibc madvises its mmapped chunks): 512x fewer faults.
    Variant('malloc_hugetlb', 'glibc puts malloc memory in transparent huge pages',
            env=(('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1'),)),
    Variant('one_step_per_call', 'one train step per compiled call (train.steps_per_call=1)', steps_per_call=1),
    Variant('eight_steps_per_call', 'eight train steps per compiled call', steps_per_call=8),
    Variant('scan', 'layers in lax.scan (the accelerator default) instead of unrolled', model=(('scan_layers', True),)),
    Variant('remat_full', 'remat full', model=(('remat', 'full'),)),
    Variant('remat_dots', 'remat save_dots', model=(('remat', 'save_dots'),)),
    Variant('attn_xla', "XLA's attention in causal blocks of 128 instead of the fused kernel (attention_impl=xla)",
            model=(('attention_impl', 'xla'),)),
    Variant('attn_xla_one_call', "XLA's attention as one call (attention_impl=xla, attention_block=0)",
            model=(('attention_impl', 'xla'), ('attention_block', 0))),
    Variant('attn_xla_block_256', "XLA's attention in blocks of 256", model=(('attention_impl', 'xla'),
                                                                           ('attention_block', 256))),
)
BY_NAME = {v.name: v for v in VARIANTS}


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='5.5M model, batch 8 x 256')
  p.add_argument('--only', default='', help='comma-separated variant names; ' + ', '.join(BY_NAME))
  p.add_argument('--steps', type=int, default=3, help='timed steps per variant per round')
  p.add_argument('--rounds', type=int, default=1)
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  return p.parse_args()


def child(a: argparse.Namespace) -> None:
  """Runs in the variant's process: XLA_FLAGS are already set by the parent."""
  import numpy as np

  import throughput
  from timing import time_calls
  v = BY_NAME[a.child]
  size = throughput.QUICK if a.quick else dict(d_model=512, layers=8, heads=8, mlp=1536, batch=8, seq_len=512)
  cfg, ex = throughput.default_model(8192, size['d_model'], size['layers'], size['heads'], size['heads'], size['mlp'],
                                     **dict(v.model))
  tokens = np.random.default_rng(0).integers(0, 8192, (size['batch'], size['seq_len'])).astype(np.int32)
  k = v.steps_per_call or throughput.shipped_steps_per_call()
  one = throughput.make_jax_step(cfg, tokens, k, ex)
  one()
  one()
  calls = -(-a.steps // k)
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  times = [t / k for t in time_calls(one, calls, warmup=0)]  # per step
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  print(json.dumps({'times': times, 'faults': (r1.ru_minflt - r0.ru_minflt) / (calls * k),
                    'sys_s': (r1.ru_stime - r0.ru_stime) / (calls * k)}))


def run_variant(v: Variant, a: argparse.Namespace) -> dict | str:
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=v.flags, **dict(v.env))
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={v.name}', f'--steps={a.steps}'] + (
      ['--quick'] if a.quick else [])
  out = run_json_child(cmd, env)
  return f'failed: {out}' if isinstance(out, str) else out


def main() -> None:
  a = parse_args()
  if a.child:
    child(a)
    return
  names = [n for n in a.only.split(',') if n] or list(BY_NAME)
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    sys.exit(f'error: unknown variant(s) {unknown}; valid: {", ".join(BY_NAME)}')
  if 'default' not in names:
    names.insert(0, 'default')
  times: dict[str, list[float]] = {n: [] for n in names}
  kernel: dict[str, list[tuple[float, float]]] = {n: [] for n in names}  # (page faults, system CPU s) per step
  failed: dict[str, str] = {}
  for r in range(a.rounds):
    for n in names:
      if n in failed:
        continue
      out = run_variant(BY_NAME[n], a)
      if isinstance(out, str):
        failed[n] = out
      else:
        times[n] += out['times']
        kernel[n].append((out['faults'], out['sys_s']))
      shown = out if isinstance(out, str) else f'{statistics.median(out["times"]):.3f} s'
      print(f'round {r + 1}: {n}: {shown}', flush=True)
  size = '5.5M Llama, batch 8 x 256' if a.quick else '31.5M Llama, batch 8 x 512'
  print(f'\n{size}, float32, AdamW; median per step of {a.rounds} rounds of at least {a.steps} steps per variant '
        'after 2 untimed calls\n')
  print('| variant | what changes | XLA_FLAGS / model setting | step time (s) | slowest step (s) | '
        'vs shipped defaults | page faults / step | kernel CPU / step (s) |')
  print('|---|---|---|---|---|---|---|---|')
  base = statistics.median(times['default']) if times['default'] else None
  for n in names:
    v = BY_NAME[n]
    setting = ' '.join(filter(None, [v.flags and f'`{v.flags}`', ', '.join(f'{k}={x}' for k, x in v.model),
                                     v.steps_per_call and f'train.steps_per_call={v.steps_per_call}',
                                     ' '.join(f'`{k}={x}`' for k, x in v.env)]))
    if n in failed:
      print(f'| {n} | {v.what} | {setting} | {failed[n]} | | | | |')
      continue
    t = statistics.median(times[n])
    ratio = f'{base / t:.2f}x' if base else ''
    faults, sys_s = (statistics.median(x) for x in zip(*kernel[n], strict=True))
    print(f'| {n} | {v.what} | {setting or "(none)"} | {t:.3f} | {max(times[n]):.3f} | {ratio} | {faults:,.0f} | '
          f'{sys_s:.2f} |')


if __name__ == '__main__':
  main()
