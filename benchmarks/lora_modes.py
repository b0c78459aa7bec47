"""LoRA step time and memory: merged weights (W + s·A·B) against the factored product, with full training
and QLoRA (NF4 and int8 bases) beside them, all in one run.

  .venv/bin/python benchmarks/lora_modes.py [--quick]

Model: a 31.5M-parameter Llama (d_model 512, 8 layers, MLP 1536, vocab 8192), batch 8 x 512, float32,
rank 16 on every projection (q, k, v, o, gate, up, down). Memory is XLA's compiled memory analysis of the
train step (arguments + temporaries: what the step needs resident). Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np
import optax

from jaxtrain.config import defaults
from jaxtrain import models, sharding
from jaxtrain.adapters import quant
from jaxtrain.train import execution, loop as train, state, steps
from timing import time_calls


def model_config(quick: bool) -> tuple[object, int, int]:
  c = defaults.base_config()
  m = c.model
  if quick:
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim, m.vocab_size = 128, 2, 4, 4, 384, 1024
    return c, 4, 128
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim, m.vocab_size = 512, 8, 8, 8, 1536, 8192
  return c, 8, 512


def measure(config, b: int, t: int, repeats: int) -> tuple[float, float, float]:
  """(median step seconds, argument MiB, temporary MiB) of one train step."""
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  mc = models.model_config(config.model, config.model.vocab_size)
  tx = optax.adamw(1e-4)
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, mc.vocab_size, (b, t)).astype(np.int32),
           'segment_ids': np.ones((b, t), np.int32), 'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)),
           'loss_mask': np.ones((b, t), np.int32)}
  with jax.set_mesh(mesh):
    built = state.build(config, mc, tx, mesh, execution.plan(config, mc))
    step = jax.jit(steps.make_train_step(train.make_loss_fn(built.graphdef, 0.0), tx, param_transform=built.transform),
                   donate_argnums=0)
    holder = {'state': built.create()}
    gb = sharding.to_global(batch, mesh)
    mem = step.lower(holder['state'], gb).compile().memory_analysis()

    def one() -> None:
      holder['state'], m = step(holder['state'], gb)
      m['loss'].block_until_ready()

    seconds = statistics.median(time_calls(one, repeats))
  return seconds, mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='a tiny model, to check the script runs')
  parser.add_argument('--rank', type=int, default=16)
  args = parser.parse_args()
  repeats = 2 if args.quick else 4
  rows = []
  variants = [('full training', {}), ('LoRA merged', {'mode': 'merged'}), ('LoRA factored', {'mode': 'factored'}),
              ('QLoRA nf4 (double quant)', {'mode': 'factored', 'quantize': 'nf4'}),
              ('QLoRA int8', {'mode': 'factored', 'quantize': 'int8'})]
  base_bytes = None
  for name, lora_keys in variants:
    config, b, t = model_config(args.quick)
    if lora_keys:
      config.lora.rank, config.lora.alpha = args.rank, 2.0 * args.rank
      for k, v in lora_keys.items():
        config.lora[k] = v
    seconds, arg_mib, temp_mib = measure(config, b, t, repeats)
    rows.append((name, seconds, arg_mib, temp_mib))
    if base_bytes is None:
      mc = models.model_config(config.model, config.model.vocab_size)
      base_bytes = models.count_params(models.describe(mc)[2])
  ref = rows[0][1]
  print(f'| variant (rank {args.rank}) | step s | vs full training | arguments MiB | temporaries MiB | total MiB |')
  print('|---|---|---|---|---|---|')
  for name, s, a, t in rows:
    print(f'| {name} | {s:.2f} | {ref / s:.2f}x | {a:.1f} | {t:.1f} | {a + t:.1f} |')
  config, _, _ = model_config(args.quick)
  mc = models.model_config(config.model, config.model.vocab_size)
  shapes = models.describe(mc)[2]
  for kind in ('nf4', 'int8'):
    for dq in (True, False):
      tree = jax.eval_shape(lambda p, k=kind, d=dq: quant.quantize_tree(p, state.QUANTIZED, k, 64, d), shapes)
      print(f'{kind} double_quant={dq}: {quant.bytes_per_param(tree):.4f} bytes per quantized base parameter')


if __name__ == '__main__':
  main()
