"""Memory of StackWise stage steps (compile only, nothing trains): progressive stages against end-to-end.

  .venv/bin/python benchmarks/stackwise_memory.py                       # 8 stacks x 1 block, d_model 256
  .venv/bin/python benchmarks/stackwise_memory.py --stacks=3 --d_model=64 --seq=128   # quick

A rack of `--stacks` stacks of one block (d_model 256, 4 heads with 2 KV heads as in configs/stackwise.py
size=cpu, MLP 1024, vocabulary 4096 = 4095 token ids + MASK, tied embedding, sinusoidal time embedding),
masked-diffusion objective, AdamW as the run builds it, batch 8 x 512, float32, on one CPU device. Each step
is the one `stackwise_run` trains (`train.jit_steps`: state donated), lowered on abstract inputs and compiled;
XLA's `memory_analysis()` gives, without running:

  arguments  everything the step reads: trained params + AdamW moments (+ step, rng), the frozen part
             (trunk weights, frozen shared parameters; NF4 blocks for QLoRA) and the batch;
  temps      activations kept for backward, gradients and workspace;
  outputs    the new state and metrics; donated, so all but the metrics alias argument buffers.

total = arguments + temps + (outputs - aliased outputs): the bytes live at the peak of the step.

Table 1: every stage of the default append curriculum (frozen trunk), the last append stage with a LoRA and a
QLoRA trunk, every prepend stage (frozen suffix), and the joint (end-to-end) step of the same rack; ratios
are against the joint step. Table 2: joint steps of racks of 1..N stacks (end-to-end growth with depth).
Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np

from jaxtrain.train import loop as train, optim
from jaxtrain import sharding
from jaxtrain.stackwise import plan as stackwise
from jaxtrain.models import rack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ is not installed
from configs import stackwise as sw_config  # noqa: E402

MIB = 2 ** 20
BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask', 'doc_ids', 'doc_chunks')


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--stacks', type=int, default=8)
  p.add_argument('--d_model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--kv_heads', type=int, default=2)
  p.add_argument('--mlp', type=int, default=1024)
  p.add_argument('--vocab', type=int, default=4096, help='model vocabulary (token ids + MASK)')
  p.add_argument('--seq', type=int, default=512)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--no_joint_depth', action='store_true', help='skip table 2 (joint racks of 1..N stacks)')
  return p.parse_args()


def make_config(args: argparse.Namespace, stacks: int, direction: str,
                trunk: str = 'frozen') -> ml_collections.ConfigDict:
  """configs/stackwise.py with the benchmark's sizes; one stack of one block per stage."""
  c = sw_config.get_config(f'direction={direction},trunk={trunk}')
  m = c.model
  m.num_layers, m.d_model, m.mlp_dim = stacks, args.d_model, args.mlp
  m.num_heads, m.num_kv_heads = args.heads, args.kv_heads
  m.compute_dtype = 'float32'
  c.data.seq_len, c.data.batch_size = args.seq, args.batch
  c.stackwise.num_stacks = stacks
  c.train.steps = 10 * stacks  # only the plan's validity matters here; nothing trains
  return c


def nbytes(tree: object) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(config: ml_collections.ConfigDict, index: int, mesh: jax.sharding.Mesh, vocab: int) -> dict:
  """Compiled memory of stage `index`'s train step, as `stackwise_run` jits it."""
  rd, obj = stackwise.rack_setup(config, vocab - 1)  # vocab - 1 token ids; MASK takes the last id
  assert rd.rc.block.vocab_size == vocab, rd.rc.block.vocab_size
  stage = stackwise.plan(config)[index]
  tx, schedule = optim.make_optimizer(config.optim, stage.steps)
  # Zeros stand in for the rack's values: only shapes reach the compiler, and this skips compiling the init.
  host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), rd.shapes())
  with jax.set_mesh(mesh):
    built = stackwise.build_stage(config, rd, stage, host, tx, mesh)
    loss_fn = stackwise.make_loss_fn(config, rd, obj, stage, stackwise.depth_schedule(config))
    train_step, _ = train.jit_steps(config, built, tx, schedule, mesh, loss_fn)
    frozen = jax.eval_shape(lambda: built.create()['frozen'])  # shapes only: nothing allocated
    state = dict(built.abstract, frozen=frozen)
    b, t = config.data.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), np.int32) for k in BATCH_KEYS}
    start = time.perf_counter()
    mem = train_step.lower(state, *train.step_args(config, mesh, batch)).compile().memory_analysis()
    seconds = time.perf_counter() - start
  out_extra = mem.output_size_in_bytes - mem.alias_size_in_bytes
  return {'stage': index, 'order': stage.order, 'new': stage.new,
          'trained': rack.count(built.abstract['params']), 'state': nbytes(built.abstract),
          'frozen': nbytes(frozen), 'args': mem.argument_size_in_bytes, 'temps': mem.temp_size_in_bytes,
          'outputs': mem.output_size_in_bytes, 'aliased': mem.alias_size_in_bytes,
          'total': mem.argument_size_in_bytes + mem.temp_size_in_bytes + out_extra, 'compile_s': seconds}


def stacks_text(r: dict) -> str:
  order = r['order']
  span = f'{order[0]}..{order[-1]}' if len(order) > 1 else str(order[0])
  return f'{len(order)} ({span}; new {",".join(map(str, r["new"])) if len(r["new"]) < len(order) else "all"})'


def table(rows: list[tuple[str, dict]], ref: dict) -> str:
  head = ('| step | active stacks | trained params | state (params + AdamW) MiB | frozen MiB | arguments MiB '
          '| temps MiB | outputs MiB (aliased) | total MiB | / joint total |')
  lines = [head, '|' + '---|' * 10]
  for name, r in rows:
    lines.append(f'| {name} | {stacks_text(r)} | {r["trained"] / 1e6:.3f}M | {r["state"] / MIB:.1f} '
                 f'| {r["frozen"] / MIB:.1f} | {r["args"] / MIB:.1f} | {r["temps"] / MIB:.1f} '
                 f'| {r["outputs"] / MIB:.1f} ({r["aliased"] / MIB:.1f}) | {r["total"] / MIB:.1f} '
                 f'| {r["total"] / ref["total"]:.2f}x |')
  return '\n'.join(lines)


def main() -> None:
  args = parse_args()
  n = args.stacks
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  start = time.perf_counter()
  rows: list[tuple[str, dict]] = []

  def add(name: str, config: ml_collections.ConfigDict, index: int) -> dict:
    t = time.perf_counter()
    r = measure(config, index, mesh, args.vocab)
    rows.append((name, r))
    print(f'  {name}: temps {r["temps"] / MIB:.1f} MiB, total {r["total"] / MIB:.1f} MiB '
          f'(compile {r["compile_s"]:.1f} s of {time.perf_counter() - t:.1f} s)', file=sys.stderr, flush=True)
    return r

  append = make_config(args, n, 'append')
  for k in range(n):
    add(f'append stage {k} (frozen trunk)', append, k)
  add(f'append stage {n - 1}, LoRA trunk (r4)', make_config(args, n, 'append', 'lora'), n - 1)
  add(f'append stage {n - 1}, QLoRA-NF4 trunk (r4)', make_config(args, n, 'append', 'qlora'), n - 1)
  prepend = make_config(args, n, 'prepend')
  for k in range(n):
    add(f'prepend stage {k} (frozen suffix)', prepend, k)
  joint = add(f'joint, {n} stacks (end to end)', make_config(args, n, 'joint'), 0)

  depth_rows: list[tuple[str, dict]] = []
  if not args.no_joint_depth:
    for s in range(1, n):
      r = measure(make_config(args, s, 'joint'), 0, mesh, args.vocab)
      depth_rows.append((f'joint, {s} stack{"s" if s > 1 else ""}', r))
      print(f'  joint {s}: temps {r["temps"] / MIB:.1f} MiB', file=sys.stderr, flush=True)
    depth_rows.append((f'joint, {n} stacks', joint))

  print(f'Command: .venv/bin/python {" ".join(sys.argv)}')
  print(f'Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, one '
        f'{jax.devices()[0].platform} device; {time.perf_counter() - start:.0f} s total')
  print(f'Rack: {n} stacks x 1 block, d_model {args.d_model}, {args.heads}/{args.kv_heads} heads, MLP {args.mlp}, '
        f'vocab {args.vocab}, batch {args.batch} x {args.seq}, float32, masked diffusion, AdamW\n')
  print(table(rows, joint))
  if depth_rows:
    print()
    print(table(depth_rows, joint))


if __name__ == '__main__':
  main()
