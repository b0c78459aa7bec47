"""Train-step throughput of jaxtrain vs PyTorch (transformers LlamaForCausalLM, eager and torch.compile).

  .venv/bin/python benchmarks/throughput.py                     # ~31.5M params, batch 8 x 512
  .venv/bin/python benchmarks/throughput.py --quick             # 5.5M params, batch 8 x 256, about 2 minutes
  .venv/bin/python benchmarks/throughput.py --torch_compile=none          # jaxtrain vs torch eager only
  .venv/bin/python benchmarks/throughput.py --torch_compile=aot_eager     # if inductor cannot compile here

All sides run the same architecture (RMSNorm, RoPE, SwiGLU, tied embeddings), AdamW, float32, full-length
rows of random tokens, in one process. torch.compile wraps the model (forward + loss; the backward is compiled
by AOTAutograd) and `optimizer.step` (inductor on CPU needs a C++ compiler). Each step function is built and
run twice untimed first: those two calls (jit / torch.compile compilation, optimizer-state creation,
recompiles) are reported separately. Then `--rounds` rounds of `--steps` timed steps alternate between the
frameworks, so interference from other work on a shared machine hits all of them alike and shows up as spread
between rounds. Reports median tokens/s, the ratios jaxtrain/torch, and model-FLOP utilisation against a
float32 matmul peak measured here for each framework. Needs the dev extra (torch). Prints Markdown tables
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

from jaxtrain import metrics, models, sharding, steps, train
from jaxtrain.models import ModelConfig
from timing import time_calls

QUICK = dict(d_model=256, layers=4, heads=4, kv_heads=4, mlp=768, vocab=8192, batch=8, seq_len=256, steps=5)


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help=f'smaller config: {QUICK}')
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--kv_heads', type=int, default=8)
  p.add_argument('--mlp', type=int, default=1536)
  p.add_argument('--vocab', type=int, default=8192)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=512)
  p.add_argument('--steps', type=int, default=6, help='timed steps per framework per round (after 2 warm-up steps)')
  p.add_argument('--rounds', type=int, default=1, help='rounds of timed steps, alternating between frameworks')
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  p.add_argument('--torch_compile', default='inductor',
                 help="torch.compile backend for the extra torch row ('inductor', 'aot_eager', ...); 'none' skips it")
  if p.parse_known_args()[0].quick:
    p.set_defaults(**QUICK)  # flags given explicitly still win
  a = p.parse_args()
  return a


def make_jax_step(cfg: ModelConfig, tokens: np.ndarray) -> Callable[[], None]:
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
    with jax.set_mesh(mesh):
      holder['state'], m = step(holder['state'], gb)
    m['loss'].block_until_ready()

  return one


def make_torch_step(cfg: ModelConfig, tokens: np.ndarray, threads: int, backend: str | None) -> Callable[[], None]:
  """transformers LlamaForCausalLM + AdamW step; `backend` set: model and optimizer step under torch.compile."""
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
  forward, opt_step = model, opt.step
  if backend:
    forward = torch.compile(model, backend=backend)
    opt_step = torch.compile(opt.step, backend=backend)

  def one() -> None:
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    opt_step()
    opt.zero_grad(set_to_none=True)

  return one


def torch_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  import torch
  x = torch.ones(n, n)
  return 2 * n ** 3 / min(time_calls(lambda: x @ x, repeats))


def first_calls(fn: Callable[[], None], k: int = 2) -> list[float]:
  out = []
  for _ in range(k):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def main() -> None:
  a = parse_args()
  # attention_block=128: what `model.attention_block=-1` (auto) resolves to on CPU.
  cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                    num_kv_heads=a.kv_heads, head_dim=a.d_model // a.heads, mlp_dim=a.mlp,
                    attention_block=min(128, a.seq_len))
  tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq_len)).astype(np.int32)
  n_tokens = a.batch * a.seq_len
  flops = metrics.flops_per_token(cfg, a.seq_len) * n_tokens

  jax_peak = metrics.measure_matmul_peak()
  torch_peak = torch_matmul_peak()
  backend = None if a.torch_compile in ('', 'none') else a.torch_compile
  if backend == 'inductor' and not (shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')):
    print('warning: no C++ compiler on PATH; inductor on CPU needs one (try --torch_compile=aot_eager)')
  names = ['jaxtrain (XLA CPU)', 'torch eager (transformers LlamaForCausalLM, sdpa)']
  builders = [lambda: make_jax_step(cfg, tokens), lambda: make_torch_step(cfg, tokens, a.threads, None)]
  if backend:
    names.append(f'torch.compile (same model, backend={backend}, model + optimizer step)')
    builders.append(lambda: make_torch_step(cfg, tokens, a.threads, backend))

  fns, warm, failed = {}, {}, {}
  for name, build in zip(names, builders, strict=True):
    try:
      fns[name] = build()
      warm[name] = first_calls(fns[name])
      print(f'{name}: first call {warm[name][0]:.1f} s, second {warm[name][1]:.2f} s', flush=True)
    except Exception as e:  # report a failed torch.compile backend and go on with the rest
      failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
      print(f'{name}: FAILED {failed[name]}', flush=True)
      fns.pop(name, None)
  times = {n: [] for n in fns}
  per_round = {n: [] for n in fns}
  for r in range(a.rounds):
    for name, fn in fns.items():
      ts = time_calls(fn, a.steps, warmup=0)
      times[name] += ts
      per_round[name].append(statistics.median(ts))
      print(f'round {r + 1}: {name}: median {per_round[name][-1]:.3f} s', flush=True)
  med = {n: statistics.median(ts) for n, ts in times.items()}

  params = models.count_params(jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0))))
  import torch
  print(f'\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}, '
        f'torch threads {a.threads}')
  print(f'model: {params / 1e6:.1f}M params (d_model {a.d_model}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, '
        f'mlp {a.mlp}, vocab {a.vocab}), batch {a.batch} x {a.seq_len}, AdamW, float32; median of '
        f'{a.rounds} x {a.steps} steps after 2 untimed\n')
  print('| framework | first / second call (s) | step time (s) | per-round medians (s) | tokens/s | '
        'matmul peak (GFLOP/s) | MFU vs that peak |')
  print('|---|---|---|---|---|---|---|')
  for name, t in med.items():
    peak = jax_peak if name.startswith('jaxtrain') else torch_peak
    rounds = ', '.join(f'{x:.3f}' for x in per_round[name])
    print(f'| {name} | {warm[name][0]:.1f} / {warm[name][1]:.2f} | {t:.3f} | {rounds} | {n_tokens / t:.0f} | '
          f'{peak / 1e9:.0f} | {flops / t / peak:.1%} |')
  for name, why in failed.items():
    print(f'| {name} | failed: {why} | | | | | |')
  jax_t = med.get(names[0])
  if jax_t:
    for name in names[1:]:
      if name in med:
        print(f'\nratio jaxtrain / {name.split(" (")[0]} tokens/s: {med[name] / jax_t:.2f}x')


if __name__ == '__main__':
  main()
