"""Bytes written per StackWise stage by `StackCheckpointer` (changed parts only) against a full-rack save.

  .venv/bin/python benchmarks/stack_checkpoint_bytes.py                  # 6 stacks of 2 blocks, d_model 256
  .venv/bin/python benchmarks/stack_checkpoint_bytes.py --stacks=3 --d_model=128   # quick

A rack of float32 parts grows by one stack per stage (append curriculum): `shared` (embedding, head, final
norm) plus `stack0..stack<k>` at stage k, each stack `--blocks` transformer blocks (attention q/k/v/o, MLP
up/down of width 4*d_model, two norms). Two ways of training the trunk:

  frozen: stage k trains the new stack and the shared head; stacks 0..k-1 are bitwise unchanged.
  lora:   the trunk carries rank-`--rank` adapters merged at the stage end, so every earlier stack changes too.

Each stage is saved through `StackCheckpointer` into a temporary directory; the table gives the leaf bytes it
wrote, their size on disk (orbax metadata included), the bytes of a full-rack save, cumulative totals and the
wall time of the save (hashing + writing). Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from jaxtrain.stackwise.checkpoint import StackCheckpointer

MB = 1e6


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--stacks', type=int, default=6)
  p.add_argument('--blocks', type=int, default=2, help='blocks per stack')
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--vocab', type=int, default=4096)
  p.add_argument('--rank', type=int, default=8, help='rank of the merged trunk adapters (lora mode)')
  return p.parse_args()


def init_stack(key: jax.Array, blocks: int, d: int) -> dict:
  """One stack: `blocks` pre-norm transformer blocks of float32 weights."""
  def block(k):
    ks = jax.random.split(k, 6)
    dense = lambda k, i, o: jax.random.normal(k, (i, o), jnp.float32) / i ** 0.5
    return {'attn': {n: dense(ks[j], d, d) for j, n in enumerate('qkvo')},
            'mlp': {'up': dense(ks[4], d, 4 * d), 'down': dense(ks[5], 4 * d, d)},
            'norm1': jnp.ones(d), 'norm2': jnp.ones(d)}
  return {'blocks': [block(k) for k in jax.random.split(key, blocks)]}


def init_shared(key: jax.Array, vocab: int, d: int) -> dict:
  k1, k2 = jax.random.split(key)
  return {'embed': jax.random.normal(k1, (vocab, d)) * 0.02, 'head': jax.random.normal(k2, (d, vocab)) * 0.02,
          'norm': jnp.ones(d)}


def nudge(tree: dict, key: jax.Array) -> dict:
  """A stage of training on `tree`: every leaf moves a little."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  moved = [x + 1e-3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, moved)


def merge_lora(tree: dict, key: jax.Array, rank: int) -> dict:
  """Merged low-rank adapters: each matrix gets W + B @ A; vectors (norms) are not adapted and stay put."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))

  def merge(x, k):
    if x.ndim != 2:
      return x
    ka, kb = jax.random.split(k)
    return x + 1e-3 * jax.random.normal(kb, (x.shape[0], rank)) @ jax.random.normal(ka, (rank, x.shape[1]))
  return jax.tree.unflatten(treedef, [merge(x, k) for x, k in zip(leaves, keys, strict=True)])


def run(mode: str, args: argparse.Namespace) -> list[dict]:
  """Saves `args.stacks` stages of one curriculum; one row per stage."""
  directory = tempfile.mkdtemp(prefix=f'stack-ckpt-{mode}-')
  try:
    ckpt = StackCheckpointer(directory)
    key = jax.random.key(0)
    rack = {'shared': init_shared(jax.random.fold_in(key, 1000), args.vocab, args.d_model)}
    rows, cum_written, cum_full = [], 0, 0
    for stage in range(args.stacks):
      k = jax.random.fold_in(key, stage)
      new = f'stack{stage}'
      if mode == 'lora':
        for i, name in enumerate([n for n in rack if n.startswith('stack')]):
          rack[name] = merge_lora(rack[name], jax.random.fold_in(k, 100 + i), args.rank)
      rack[new] = nudge(init_stack(jax.random.fold_in(k, 1), args.blocks, args.d_model), jax.random.fold_in(k, 2))
      rack['shared'] = nudge(rack['shared'], jax.random.fold_in(k, 3))
      jax.block_until_ready(rack)
      t0 = time.perf_counter()
      report = ckpt.save(stage, rack, meta={'mode': mode})
      seconds = time.perf_counter() - t0
      cum_written += report.bytes_written
      cum_full += report.total_bytes
      rows.append({'stage': stage, 'written': report.written, 'reused': report.reused,
                   'bytes': report.bytes_written, 'disk': report.disk_bytes, 'full': report.total_bytes,
                   'cum_written': cum_written, 'cum_full': cum_full, 'seconds': seconds})
    return rows
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def table(mode: str, rows: list[dict]) -> str:
  out = [f'**{mode}**', '',
         '| stage | parts written | reused | written MB | on disk MB | full rack MB | cum. written MB | '
         'cum. full MB | saved | save s |',
         '|---:|---|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    reused = ', '.join(r['reused']) or '-'
    out.append(f"| {r['stage']} | {', '.join(r['written'])} | {reused} | {r['bytes'] / MB:.1f} | "
               f"{r['disk'] / MB:.1f} | {r['full'] / MB:.1f} | {r['cum_written'] / MB:.1f} | "
               f"{r['cum_full'] / MB:.1f} | {1 - r['cum_written'] / r['cum_full']:.0%} | {r['seconds']:.2f} |")
  return '\n'.join(out)


def main() -> None:
  args = parse_args()
  print(f"`{' '.join(['.venv/bin/python', *sys.argv])}`  ")
  print(f'{platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), '
        f'jax {jax.__version__}; rack: shared + {args.stacks} stacks x {args.blocks} blocks, d_model '
        f'{args.d_model}, vocab {args.vocab}, float32; "saved" = share of cumulative full-rack bytes not written')
  print()
  for mode in ('frozen', 'lora'):
    print(table(mode, run(mode, args)))
    print()


if __name__ == '__main__':
  main()
