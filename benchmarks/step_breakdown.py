"""Where a jaxtrain train step spends its time on this machine, and attention against torch's SDPA.

  .venv/bin/python benchmarks/step_breakdown.py

Same model and batch as benchmarks/throughput.py (31.5M Llama, batch 8 x 512, float32). Times the shipped
step (the fused CPU attention kernel), the step with XLA's attention (in causal blocks and as one call), with
layers in lax.scan, the forward pass alone, and with the attention core replaced by the identity on V (to
isolate its cost); then one attention layer forward + backward in the fused kernel,
`jax.nn.dot_product_attention` (one call and in causal blocks), in jaxtrain's XLA causal blocks (its einsum
core), in einsum + softmax, and in torch `scaled_dot_product_attention`; and the SwiGLU MLP (jaxtrain's own backward
pass against autodiff and torch) and the cross-entropy against torch.
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

from jaxtrain.train import loop as train, losses, steps
from jaxtrain import sharding
import throughput
from jaxtrain.models import Execution, ModelConfig, transformer
from jaxtrain.kernels import cpu_attention
from timing import time_calls

MODEL, EXECUTION = throughput.default_model(8192, 512, 8, 8, 8, 1536)  # CPU defaults: fused attention, unrolled
B, T = 8, 512


def median_time(fn: Callable[[], object], repeats: int = 4) -> float:
  return statistics.median(time_calls(fn, repeats))


def step_time(ex: Execution, forward_only: bool = False, cfg: ModelConfig = MODEL) -> float:
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones((B, T), np.int32),
           'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)), 'loss_mask': np.ones((B, T), np.int32)}
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = optax.adamw(1e-4)
  with jax.set_mesh(mesh):
    graphdef, state, _ = train.init_state(cfg, tx, 0, mesh, ex)
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

  def blocked_library(q, k, v):  # the same blocks, each a jax.nn.dot_product_attention call
    outs = []
    for start in range(0, T, 128):
      block_mask = transformer.attention_mask(segments[:, start:start + 128], True, segments[:, :start + 128], start)
      outs.append(jax.nn.dot_product_attention(q[:, start:start + 128], k[:, :start + 128], v[:, :start + 128],
                                               mask=block_mask))
    return jnp.concatenate(outs, axis=1)

  def einsum_softmax(q, k, v):
    s = jnp.where(mask, jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(h), -1e30)
    return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, axis=-1), v)

  def fused(q, k, v):
    return cpu_attention.attention(q, k, v, segments, causal=True)

  out = {}
  for name, f in [('jaxtrain fused CPU kernel (cpu_attention; the CPU default where g++ is on PATH)', fused),
                  ('jax.nn.dot_product_attention (mask), one call', library),
                  ('jax.nn.dot_product_attention in causal blocks of 128', blocked_library),
                  ('jaxtrain XLA attention: einsum core with its own softmax in causal blocks of 128 '
                   '(attention_impl=xla)', blocked),
                  ('einsum + softmax', einsum_softmax)]:
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2)))
    out[name] = median_time(lambda grad=grad: jax.block_until_ready(grad(q, k, v)))

  import torch
  torch.set_num_threads(2)
  tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  out['torch scaled_dot_product_attention (causal)'] = median_time(
      lambda: sdpa(tq, tk, tv, is_causal=True).sum().backward())
  return out


def piece_times() -> dict[str, float]:
  """The SwiGLU MLP with jaxtrain's hand-written backward pass against autodiff and torch, and the
  cross-entropy against torch, forward + backward."""
  import torch
  torch.set_num_threads(2)
  rng = np.random.default_rng(0)
  d, f, vocab = MODEL.d_model, MODEL.mlp_dim, MODEL.vocab_size
  x = jnp.asarray(rng.normal(size=(B, T, d)).astype(np.float32))
  gate, up = (jnp.asarray(rng.normal(size=(d, f)).astype(np.float32) * 0.04) for _ in range(2))
  down = jnp.asarray(rng.normal(size=(f, d)).astype(np.float32) * 0.04)

  def autodiff_mlp(x, gate, up, down):
    return jnp.einsum('btf,fd->btd', jax.nn.silu(jnp.einsum('btd,df->btf', x, gate)) *
                      jnp.einsum('btd,df->btf', x, up), down)

  logits = jnp.asarray(rng.normal(size=(B, T, vocab)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, vocab, (B, T)).astype(np.int32))

  def grad_time(fn, *args):
    g = jax.jit(jax.grad(fn, argnums=tuple(range(len(args)))))
    return median_time(lambda: jax.block_until_ready(g(*args)))

  def square(f):  # a loss whose cotangent is not uniform
    return lambda *a: (f(*a) ** 2).sum()

  out = {'SwiGLU MLP, autodiff': grad_time(square(autodiff_mlp), x, gate, up, down),
         'SwiGLU MLP, own backward (transformer.swiglu, the default)': grad_time(square(transformer.swiglu), x, gate,
                                                                                 up, down)}
  tx = torch.tensor(np.asarray(x), requires_grad=True)
  tw = [torch.tensor(np.asarray(w), requires_grad=True) for w in (gate, up, down)]

  def torch_mlp() -> None:
    y = (torch.nn.functional.silu(tx @ tw[0]) * (tx @ tw[1])) @ tw[2]
    (y ** 2).sum().backward()

  out['SwiGLU MLP, torch eager'] = median_time(torch_mlp)
  out['cross-entropy (losses.cross_entropy_sums)'] = grad_time(
      lambda z: losses.cross_entropy_sums(z, targets, jnp.ones(targets.shape))['loss_sum'], logits)
  tz = torch.tensor(np.asarray(logits).reshape(-1, vocab), requires_grad=True)
  tt = torch.tensor(np.asarray(targets).reshape(-1).astype(np.int64))
  out['cross-entropy, torch eager (F.cross_entropy)'] = median_time(
      lambda: torch.nn.functional.cross_entropy(tz, tt, reduction='sum').backward())
  return out


def main() -> None:
  xla_blocks = dataclasses.replace(EXECUTION, attention_impl='xla')
  single_call = dataclasses.replace(xla_blocks, attention_block=0)
  rows = [(f'CPU default (layers unrolled, attention_impl={EXECUTION.attention_impl})', step_time(EXECUTION)),
          ('XLA attention in causal blocks of 128 (attention_impl=xla)', step_time(xla_blocks)),
          ('XLA attention as one call over the row (attention_impl=xla, attention_block=0)', step_time(single_call)),
          ('layers in lax.scan', step_time(dataclasses.replace(EXECUTION, scan_layers=True))),
          ('forward pass only', step_time(EXECUTION, forward_only=True))]
  with mock.patch.object(jax.nn, 'dot_product_attention', lambda q, k, v, mask=None: v):
    rows.append(('attention core replaced by identity on V', step_time(single_call)))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; 31.5M Llama, batch {B} x {T}, float32\n')
  print('| jaxtrain step variant | median step time (s) |\n|---|---|')
  for name, t in rows:
    print(f'| {name} | {t:.2f} |')
  print(f'\n| one attention layer, forward + backward (B {B}, T {T}, 8 x 64 heads) | median time (s) |\n|---|---|')
  for name, t in attention_times().items():
    print(f'| {name} | {t:.3f} |')
  print(f'\n| one piece, forward + backward (B*T {B * T}, D {MODEL.d_model}, F {MODEL.mlp_dim}, V {MODEL.vocab_size}) '
        '| median time (s) |\n|---|---|')
  for name, t in piece_times().items():
    print(f'| {name} | {t:.3f} |')


if __name__ == '__main__':
  main()
