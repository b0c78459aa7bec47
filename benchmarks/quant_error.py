"""Storage, round-trip error and backward-pass memory of the QLoRA base quantizer (`jaxtrain.quant`).

  .venv/bin/python benchmarks/quant_error.py                    # d_model 1024, 8 layers
  .venv/bin/python benchmarks/quant_error.py --d_model=256      # quick

Error is measured on Gaussian weights and on heavier-tailed Student-t (5 degrees of freedom) weights, which
look more like trained ones: relative RMS error ||w - deq|| / ||w|| and the largest error as a fraction of
the documented per-element bound. Memory is XLA's temp size for the gradient (for x) of a scan over L
projections, with the quantized product's custom VJP vs dequantize-then-einsum. Prints Markdown tables.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.adapters import quant


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--d_model', type=int, default=1024)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--block', type=int, default=64)
  return p.parse_args()


def bound(w: np.ndarray, q: quant.Quantized) -> np.ndarray:
  """Per-element error bound of the module docstring, from the block absmax of `w` (one weight, no lead)."""
  n, block = w.size, q.block
  blocks = np.pad(w.reshape(-1), (0, -n % block)).reshape(-1, block)
  a = np.abs(blocks).max(-1)
  gap = quant.NF4_MAX_GAP if q.kind == 'nf4' else 1 / quant.INT8_MAX
  b = a * gap / 2
  if q.scale_scales is not None:
    groups = -(-a.size // quant.SCALE_GROUP)
    g = np.pad(a, (0, groups * quant.SCALE_GROUP - a.size), mode='edge').reshape(groups, -1)
    b = b + np.repeat((g.max(-1) - g.min(-1)) / (2 * quant.INT8_MAX), quant.SCALE_GROUP)[:a.size] / 2
  return np.repeat(b, block)[:n].reshape(w.shape)


def error_table(d: int, block: int) -> None:
  rng = np.random.default_rng(0)
  weights = {'normal': 0.02 * rng.standard_normal((d, 4 * d)),
             'student-t(5)': 0.02 * rng.standard_t(5, (d, 4 * d))}
  print('| kind | double quant | bytes/param | bits/param | rel. RMS error (normal / t5) | max err / bound |')
  print('|---|---|---|---|---|---|')
  for kind in quant.KINDS:
    for dq in (True, False):
      rms, ratio = [], 0.0
      for w in weights.values():
        w = w.astype(np.float32)
        q = quant.quantize(jnp.asarray(w), kind, block, dq)
        err = np.abs(np.asarray(jax.jit(q.dequantize)()) - w)
        rms.append(np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(w ** 2)))
        ratio = max(ratio, float((err / bound(w, q)).max()))
      bpp = quant.bytes_per_param(q)
      print(f'| {kind} | {dq} | {bpp:.4f} | {8 * bpp:.3f} | {rms[0]:.4f} / {rms[1]:.4f} | {ratio:.3f} |')


def memory_table(d: int, layers: int, block: int) -> None:
  print('\n| layers | custom VJP temp (MB) | dequantize-then-einsum temp (MB) | L f32 weights (MB) |')
  print('|---|---|---|---|')
  x = jnp.ones((8, d), jnp.float32)
  for n in (layers // 2, layers, 2 * layers):
    q = quant.quantize(jax.random.normal(jax.random.PRNGKey(0), (n, d, d)), 'nf4', block, True, batch_dims=1)

    def loss(x, q, custom):
      def body(h, layer):
        y = layer.einsum('bd,de->be', h) if custom else jnp.einsum('bd,de->be', h, layer.dequantize(h.dtype))
        return jnp.tanh(y), None
      return jnp.sum(jax.lax.scan(body, x, q)[0])

    temp = [jax.jit(jax.grad(loss), static_argnums=2).lower(x, q, custom).compile().memory_analysis()
            .temp_size_in_bytes / 2**20 for custom in (True, False)]
    print(f'| {n} | {temp[0]:.2f} | {temp[1]:.2f} | {n * d * d * 4 / 2**20:.2f} |')


def main() -> None:
  args = parse_args()
  print(f'{jax.default_backend()}, weights ({args.d_model}, {4 * args.d_model}), block {args.block}\n')
  error_table(args.d_model, args.block)
  memory_table(args.d_model, args.layers, args.block)


if __name__ == '__main__':
  main()
