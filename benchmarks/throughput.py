"""Train-step throughput of jaxtrain vs PyTorch (transformers LlamaForCausalLM, eager) on the same model.

  .venv/bin/python benchmarks/throughput.py                     # ~30M params, batch 8 x 512
  .venv/bin/python benchmarks/throughput.py --d_model=256 --layers=4 --seq_len=256 --steps=5   # quick

Both sides run the same architecture (RMSNorm, RoPE, SwiGLU, tied embeddings), AdamW, float32, full-length
rows of random tokens, in one process one after the other. Reports tokens/s, the ratio jaxtrain/torch, and
model-FLOP utilisation against a float32 matmul peak measured here for each framework. Needs the dev extra
(torch). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import numpy as np
import optax

from jaxtrain import metrics, models, sharding, steps, train
from jaxtrain.models import ModelConfig
from timing import time_calls


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--kv_heads', type=int, default=8)
  p.add_argument('--mlp', type=int, default=1536)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=512)
  p.add_argument('--steps', type=int, default=6, help='timed steps per framework (after 2 warm-up steps)')
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  return p.parse_args()


def bench_jax(cfg: ModelConfig, tokens: np.ndarray, n: int) -> list[float]:
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = optax.adamw(1e-4, weight_decay=0.0)
  b, t = tokens.shape
  batch = {'tokens': tokens, 'segment_ids': np.ones((b, t), np.int32),
           'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)), 'loss_mask': np.ones((b, t), np.int32)}
  with jax.set_mesh(mesh):
    graphdef, state, state_sh = train.init_state(cfg, tx, 0, mesh)
    step = jax.jit(steps.make_train_step(train.make_loss_fn(graphdef, 0.0), tx),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)), out_shardings=(state_sh, None),
                   donate_argnums=0)
    gb = sharding.to_global(batch, mesh)
    holder = {'state': state}

    def one() -> None:
      holder['state'], m = step(holder['state'], gb)
      m['loss'].block_until_ready()

    return time_calls(one, n, warmup=2)


def bench_torch(cfg: ModelConfig, tokens: np.ndarray, n: int, threads: int) -> list[float]:
  import torch
  import transformers
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
      max_position_embeddings=tokens.shape[1], attn_implementation='sdpa')
  model = transformers.LlamaForCausalLM(hf).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  ids = torch.from_numpy(tokens.astype(np.int64))

  def one() -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return time_calls(one, n, warmup=2)


def torch_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  import torch
  x = torch.ones(n, n)
  return 2 * n ** 3 / min(time_calls(lambda: x @ x, repeats))


def main() -> None:
  a = parse_args()
  # attention_block=128: what `model.attention_block=-1` (auto) resolves to on CPU.
  cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                    num_kv_heads=a.kv_heads, head_dim=a.d_model // a.heads, mlp_dim=a.mlp, attention_block=128)
  tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq_len)).astype(np.int32)
  n_tokens = a.batch * a.seq_len
  flops = metrics.flops_per_token(cfg, a.seq_len) * n_tokens

  jax_peak = metrics.measure_matmul_peak()
  torch_peak = torch_matmul_peak()
  jax_t = statistics.median(bench_jax(cfg, tokens, a.steps))
  torch_t = statistics.median(bench_torch(cfg, tokens, a.steps, a.threads))

  params = models.count_params(jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0))))
  print(f'\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch threads {a.threads}')
  print(f'model: {params / 1e6:.1f}M params (d_model {a.d_model}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, '
        f'mlp {a.mlp}, vocab {a.vocab}), batch {a.batch} x {a.seq_len}, AdamW, float32; median of {a.steps} steps\n')
  print('| framework | step time (s) | tokens/s | matmul peak (GFLOP/s) | MFU vs that peak |')
  print('|---|---|---|---|---|')
  print(f'| jaxtrain (XLA CPU) | {jax_t:.3f} | {n_tokens / jax_t:.0f} | {jax_peak / 1e9:.0f} | '
        f'{flops / jax_t / jax_peak:.1%} |')
  print(f'| torch eager (transformers LlamaForCausalLM, sdpa) | {torch_t:.3f} | {n_tokens / torch_t:.0f} | '
        f'{torch_peak / 1e9:.0f} | {flops / torch_t / torch_peak:.1%} |')
  print(f'\nratio jaxtrain / torch eager tokens/s: {torch_t / jax_t:.2f}x')


if __name__ == '__main__':
  main()
