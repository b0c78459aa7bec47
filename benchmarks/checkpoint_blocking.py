"""How long an async checkpoint save blocks the training loop, against a synchronous save of the same state.

  .venv/bin/python benchmarks/checkpoint_blocking.py              # 31.5M Llama + AdamW (~380 MB), 4 repeats
  .venv/bin/python benchmarks/checkpoint_blocking.py --d_model=256 --layers=4 --repeats=2   # quick

The state is the one benchmarks/throughput.py trains (params, two AdamW moments, step, rng) plus a grain
iterator position, saved through `jaxtrain.checkpoint.Checkpointer` into a temporary directory under /tmp.
Side by side in one process, `--repeats` times each:

  (a) synchronous save (`async_save=False`): `save()` + `wait()` wall time;
  (b) async save: the time `save()` blocks the caller, and the time until `wait()` returns;
  (c) a loop of jitted ~1 s compute steps (a matmul chain, `--step_s`) in which one step also starts an async
      save and the next `--after` steps run while it is written: their extra time over steps without a
      save is what the save really costs the loop on a machine whose cores the writer shares.

Each is run with orbax's default zstd compression of the arrays and uncompressed (`Checkpointer`'s default),
alternating. Prints a Markdown table for docs/benchmarks.md; the goal is blocked time <= 10% of the
synchronous save.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import sharding
from jaxtrain.train import loop as train
from jaxtrain.train.checkpoint import Checkpointer
from jaxtrain.models import ModelConfig


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--mlp', type=int, default=1536)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--repeats', type=int, default=4)
  p.add_argument('--step_s', type=float, default=1.0, help='target time of one compute step in (c)')
  p.add_argument('--after', type=int, default=4, help='steps timed after the step that starts a save in (c)')
  return p.parse_args()


def build_state(args: argparse.Namespace) -> dict:
  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=8,
                    num_kv_heads=8, head_dim=args.d_model // 8, mlp_dim=args.mlp)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with jax.set_mesh(mesh):
    _, state, _ = train.init_state(cfg, optax.adamw(1e-4), 0, mesh)
  # Fresh AdamW moments are zeros, which zstd squeezes to nothing; a trained state's are not.
  leaves, tree = jax.tree.flatten(state['opt_state'])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x
           for k, x in zip(keys, leaves, strict=True)]
  state['opt_state'] = jax.tree.unflatten(tree, noisy)
  return jax.block_until_ready(state)


def data_iterator() -> grain.DatasetIterator:
  it = iter(grain.MapDataset.range(1_000_000).shuffle(seed=0).batch(8).to_iter_dataset())
  for _ in range(3):
    next(it)
  return it


def compute_step(target_s: float) -> Callable[[], float]:
  """A jitted chain of 1024 x 1024 matmuls calibrated to take about `target_s`; returns a timed call."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32) / 32)
  x0 = jnp.ones((1024, 1024), jnp.float32)

  def make(n: int) -> Callable[[], object]:
    f = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda _, y: jnp.tanh(y @ w), x))
    return lambda: f(x0).block_until_ready()

  probe = make(8)
  probe()
  t = time.perf_counter()
  probe()
  n = max(1, round(8 * target_s / (time.perf_counter() - t)))
  step = make(n)
  step()

  def timed() -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t

  return timed


KEYS = ('sync', 'blocked', 'e2e', 'base', 'with_save', 'after', 'extra')


def measure(root: str, compress: bool, state: dict, it: grain.DatasetIterator, step: Callable[[], float],
            args: argparse.Namespace) -> tuple[list[Checkpointer], Callable[[int], dict[str, float]]]:
  """Checkpointers for one compression setting and a function running repeat `i` of (a), (b), (c)."""
  # Keep every step: orbax deletes old ones synchronously in a synchronous save, in the background otherwise.
  def make(name: str, async_save: bool) -> Checkpointer:
    return Checkpointer(os.path.join(root, f'{name}-{compress}'), every=1, keep=args.repeats + 1,
                        async_save=async_save, compress=compress)

  sync, asyn, loop = make('sync', False), make('async', True), make('loop', True)

  def repeat(i: int) -> dict[str, float]:
    r = {}
    t = time.perf_counter()
    sync.save(i, state, it)
    sync.wait()
    r['sync'] = time.perf_counter() - t
    t = time.perf_counter()
    asyn.save(i, state, it)
    r['blocked'] = time.perf_counter() - t
    asyn.wait()
    r['e2e'] = time.perf_counter() - t
    base = statistics.median(step() for _ in range(3))
    t = time.perf_counter()
    loop.save(i, state, it)
    step()
    r['with_save'] = time.perf_counter() - t
    after = [step() for _ in range(args.after)]
    t = time.perf_counter()
    loop.wait()
    r['extra'] = r['with_save'] + sum(after) + time.perf_counter() - t - base * (1 + args.after)
    r['base'], r['after'] = base, statistics.mean(after)
    return r

  return [sync, asyn, loop], repeat


def main() -> None:
  args = parse_args()
  state = build_state(args)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  nparams = sum(x.size for x in jax.tree.leaves(state['params']))
  it = data_iterator()
  step = compute_step(args.step_s)
  root = tempfile.mkdtemp(prefix='jaxtrain-ckpt-bench-', dir='/tmp')
  settings = {'zstd (orbax default)': True, 'uncompressed (jaxtrain default)': False}
  results: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KEYS} for name in settings}
  disk: dict[str, float] = {}
  managers: list[Checkpointer] = []
  try:
    runs = {}
    for name, compress in settings.items():
      made, runs[name] = measure(root, compress, state, it, step, args)
      managers += made
      made[0].save(0, state, it)  # warm-up save (directories, handler setup), untimed
      made[0].wait()
      disk[name] = _du(os.path.join(made[0].directory, '0', 'state'))
    for i in range(1, args.repeats + 1):  # the settings alternate, so drift on the machine hits both alike
      for name in settings:
        for k, v in runs[name](i).items():
          results[name][k].append(v)
  finally:
    for c in managers:
      c.close()
    shutil.rmtree(root, ignore_errors=True)

  print(f'jax {jax.__version__}, orbax {_orbax_version()}, {platform.machine()} {os.cpu_count()} cores; state '
        f'{nparams / 1e6:.1f}M params + AdamW = {nbytes / 1e6:.0f} MB; median of {args.repeats} repeats\n')
  names = list(settings)
  med = {n: {k: statistics.median(v) for k, v in results[n].items()} for n in names}
  print('| measurement | ' + ' | '.join(names) + ' |\n|---|' + '---|' * len(names))
  rows = [('checkpoint on disk (MB)', lambda m, n: f'{disk[n] / 1e6:.0f}'),
          ('(a) synchronous save: save + wait (s)', lambda m, n: f"{m['sync']:.3f}"),
          ('(b) async: `save()` blocks the caller (s)', lambda m, n: f"{m['blocked']:.3f}"),
          ('**(b) blocked / (a) synchronous save** (goal <= 10%)', lambda m, n: f"**{m['blocked'] / m['sync']:.1%}**"),
          ('(b) async: until `wait()` returns (s)', lambda m, n: f"{m['e2e']:.3f}"),
          ('(c) compute step without a save (s)', lambda m, n: f"{m['base']:.3f}"),
          ('(c) step that starts an async save (s, x step)',
           lambda m, n: f"{m['with_save']:.3f} ({m['with_save'] / m['base']:.2f}x)"),
          (f'(c) mean of the {args.after} steps after it (s, x step)',
           lambda m, n: f"{m['after']:.3f} ({m['after'] / m['base']:.2f}x)"),
          ('(c) extra loop time per async save (s, / (a))',
           lambda m, n: f"{m['extra']:.3f} ({m['extra'] / m['sync']:.0%})")]
  for label, cell in rows:
    print(f'| {label} | ' + ' | '.join(cell(med[n], n) for n in names) + ' |')
  for n in names:
    print(f'\n{n}, per repeat: ' + '; '.join(f'{k} ' + ', '.join(f'{x:.2f}' for x in v) for k, v in results[n].items()))


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _orbax_version() -> str:
  import orbax.checkpoint as ocp
  return ocp.__version__


if __name__ == '__main__':
  main()
