"""Where a jaxtrain train step spends its time on this machine, and attention against torch's SDPA.

  .venv/bin/python benchmarks/step_breakdown.py

Same model and batch as benchmarks/throughput.py (31.5M Llama, batch 8 x 512, float32). Times the shipped
step, the step with layers unrolled, the forward pass alone, and the step with the attention core replaced
by the identity on V (to isolate its cost); then one attention layer forward + backward in
`jax.nn.dot_product_attention`, in einsum + softmax, and in torch `scaled_dot_product_attention`.
Prints Markdown tables for docs/benchmarks.md. Needs the dev extra (torch).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import sharding, steps, train
from jaxtrain.models import ModelConfig, transformer
from timing import time_calls

MODEL = ModelConfig(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                    mlp_dim=1536, attention_block=128)  # the CPU default (model.attention_block=-1)
B, T = 8, 512


def median_time(fn: Callable[[], object], repeats: int = 4) -> float:
  return statistics.median(time_calls(fn, repeats))


def step_time(cfg: ModelConfig, forward_only: bool = False) -> float:
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones((B, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)), 'loss_mask': np.ones((B, T), np.int32)}
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = optax.adamw(1e-4)
  with jax.set_mesh(mesh):
    graphdef, state, _ = train.init_state(cfg, tx, 0, mesh)
    loss_fn = train.make_loss_fn(graphdef, 0.0)
    gb = sharding.to_global(batch, mesh)
    if forward_only:
      f = jax.jit(lambda s, b: loss_fn(s['params'], b, None)[0])
      return median_time(lambda: jax.block_until_ready(f(state, gb)))
    f = jax.jit(steps.make_train_step(loss_fn, tx), donate_argnums=0)
    holder = {'state': state}

    def one() -> None:
      holder['state'], m = f(holder['state'], gb)
      m['loss'].block_until_ready()

    return median_time(one)


def attention_times() -> dict[str, float]:
  n, h = MODEL.num_heads, MODEL.head_dim
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, h)).astype(np.float32)) for _ in range(3))
  mask = jnp.tril(jnp.ones((T, T), bool))[None, None]

  def library(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)

  segments = jnp.ones((B, T), jnp.int32)

  def blocked(q, k, v):
    return transformer.attention(q, k, v, segments, causal=True, block=128)

  def einsum_softmax(q, k, v):
    s = jnp.where(mask, jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(h), -1e30)
    return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, axis=-1), v)

  out = {}
  for name, f in [('jax.nn.dot_product_attention (mask), one call', library),
                  ('jaxtrain attention, causal blocks of 128', blocked), ('einsum + softmax', einsum_softmax)]:
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2)))
    out[name] = median_time(lambda grad=grad: jax.block_until_ready(grad(q, k, v)))

  import torch
  torch.set_num_threads(2)
  tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  out['torch scaled_dot_product_attention (causal)'] = median_time(
      lambda: sdpa(tq, tk, tv, is_causal=True).sum().backward())
  return out


def main() -> None:
  single_call = dataclasses.replace(MODEL, attention_block=0)
  rows = [('CPU default (scan over layers, causal attention in blocks of 128)', step_time(MODEL)),
          ('attention as one call over the row (attention_block=0)', step_time(single_call)),
          ('layers unrolled', step_time(dataclasses.replace(MODEL, scan_layers=False))),
          ('forward pass only', step_time(MODEL, forward_only=True))]
  with mock.patch.object(jax.nn, 'dot_product_attention', lambda q, k, v, mask=None: v):
    rows.append(('attention core replaced by identity on V', step_time(single_call)))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; 31.5M Llama, batch {B} x {T}, float32\n')
  print('| jaxtrain step variant | median step time (s) |\n|---|---|')
  for name, t in rows:
    print(f'| {name} | {t:.2f} |')
  print(f'\n| one attention layer, forward + backward (B {B}, T {T}, 8 x 64 heads) | median time (s) |\n|---|---|')
  for name, t in attention_times().items():
    print(f'| {name} | {t:.3f} |')


if __name__ == '__main__':
  main()
