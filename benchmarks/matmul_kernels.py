"""The float32 matmul kernels under each framework, on the train step's own shapes: XLA CPU vs PyTorch.

  .venv/bin/python benchmarks/matmul_kernels.py              # the shapes of throughput.py's 31.5M Llama step
  .venv/bin/python benchmarks/matmul_kernels.py --quick      # the 1024^3 square and one MLP shape

About 60% of jaxtrain's CPU train step is spent in dots (XLA's per-op trace; docs/benchmarks.md), so the
kernel each framework calls bounds the throughput ratio before any graph-level work. Each side runs in its
own child process (this script with --child; rounds alternate): jaxtrain's XLA with its default dot kernels
(YNNPACK), with YNNPACK off (Eigen) and with XNNPACK, each a jitted `jnp.einsum`; torch with its own BLAS
(`torch.matmul`, MKL in the CPU wheel). A transposed operand is given as the transpose of a contiguous
array, as autodiff hands it over. Reports the best of --repeats calls per shape in GFLOP/s and the ratio
XLA default / torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from timing import run_json_child, time_calls

# (name, M, K, N, how the operands come): 'nn' x @ w, 'nt' x @ w.T, 'tn' x.T @ w. B*T = 4096 rows.
SHAPES = (
    ('1024 x 1024 x 1024 (the MFU peak probe)', 1024, 1024, 1024, 'nn'),
    ('MLP gate / up: (B*T, D) @ (D, F)', 4096, 512, 1536, 'nn'),
    ('MLP down: (B*T, F) @ (F, D)', 4096, 1536, 512, 'nn'),
    ('attention projection: (B*T, D) @ (D, D)', 4096, 512, 512, 'nn'),
    ('input gradient: (B*T, F) @ (D, F).T', 4096, 1536, 512, 'nt'),
    ('weight gradient: (B*T, D).T @ (B*T, F)', 512, 4096, 1536, 'tn'),
    ('tied LM head: (B*T, D) @ (V, D).T', 4096, 512, 8192, 'nt'),
)
QUICK = (0, 1)
XLA_VARIANTS = {
    'xla': ('XLA CPU, default dot kernels (YNNPACK)', ''),
    'xla_eigen': ('XLA CPU, YNNPACK off (Eigen dots)', '--xla_cpu_experimental_ynn_fusion_type='),
    'xla_xnn': ('XLA CPU, XNNPACK dots', '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true '
                '--xla_cpu_experimental_xnn_fusion_type=individual_dot'),
}


def operands(m: int, k: int, n: int, mode: str, rng) -> tuple:
  a = rng.standard_normal((k, m) if mode == 'tn' else (m, k), dtype='float32')
  b = rng.standard_normal((n, k) if mode == 'nt' else (k, n), dtype='float32')
  return a, b


def child(which: str, shapes: list[int], repeats: int) -> None:
  import numpy as np
  rng = np.random.default_rng(0)
  out = []
  if which == 'torch':
    import torch
    torch.set_num_threads(os.cpu_count())
    for i in shapes:
      _, m, k, n, mode = SHAPES[i]
      a, b = (torch.from_numpy(x) for x in operands(m, k, n, mode, rng))
      fn = {'nn': lambda a=a, b=b: a @ b, 'nt': lambda a=a, b=b: a @ b.T, 'tn': lambda a=a, b=b: a.T @ b}[mode]
      out.append(min(time_calls(fn, repeats, warmup=2)))
  else:
    import jax
    import jax.numpy as jnp
    for i in shapes:
      _, m, k, n, mode = SHAPES[i]
      a, b = (jnp.asarray(x) for x in operands(m, k, n, mode, rng))
      spec = {'nn': 'mk,kn->mn', 'nt': 'mk,nk->mn', 'tn': 'km,kn->mn'}[mode]
      f = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
      out.append(min(time_calls(lambda f=f, a=a, b=b: f(a, b).block_until_ready(), repeats, warmup=2)))
  print(json.dumps({'seconds': out}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='two shapes only')
  p.add_argument('--repeats', type=int, default=7, help='timed calls per shape (the best counts)')
  p.add_argument('--rounds', type=int, default=2, help='rounds alternating between the frameworks')
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--shapes', default='', help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    child(a.child, [int(i) for i in a.shapes.split(',')], a.repeats)
    return
  shapes = list(QUICK) if a.quick else list(range(len(SHAPES)))
  sides = {**XLA_VARIANTS, 'torch': ('torch.matmul (MKL)', '')}
  best: dict[str, list[float]] = {}
  for _ in range(a.rounds):
    for which, (_, flags) in sides.items():
      env = dict(os.environ, XLA_FLAGS=flags)
      res = run_json_child([sys.executable, os.path.abspath(__file__), f'--child={which}', f'--repeats={a.repeats}',
                            '--shapes=' + ','.join(map(str, shapes))], env)
      if isinstance(res, str):
        sys.exit(f'error: {which} failed: {res}')
      prev = best.get(which)
      best[which] = res['seconds'] if prev is None else [min(x, y) for x, y in zip(prev, res['seconds'], strict=True)]
  print(f'float32, {os.cpu_count()} threads, best of {a.rounds} x {a.repeats} calls per shape\n')
  print('| shape (M x K x N) | ' + ' | '.join(f'{name} (GFLOP/s)' for name, _ in sides.values())
        + ' | XLA default / torch |')
  print('|---' * (len(sides) + 2) + '|')
  ratios = []
  for j, i in enumerate(shapes):
    name, m, k, n, _ = SHAPES[i]
    rate = {w: 2 * m * k * n / best[w][j] / 1e9 for w in sides}
    ratios.append(rate['xla'] / rate['torch'])
    print(f'| {name}: {m} x {k} x {n} | ' + ' | '.join(f'{rate[w]:.0f}' for w in sides) + f' | {ratios[-1]:.2f}x |')
  print(f'\nMedian over the shapes, XLA default / torch: {statistics.median(ratios):.2f}x')


if __name__ == '__main__':
  main()
