"""Train-step throughput of jaxtrain vs PyTorch (transformers LlamaForCausalLM, eager and torch.compile).

  .venv/bin/python benchmarks/throughput.py                     # ~31.5M params, batch 8 x 512
  .venv/bin/python benchmarks/throughput.py --quick             # 5.5M params, batch 8 x 256, about 2 minutes
  .venv/bin/python benchmarks/throughput.py --torch_compile=none          # jaxtrain vs torch eager only
  .venv/bin/python benchmarks/throughput.py --torch_compile=aot_eager     # if inductor cannot compile here

All sides run the same architecture (RMSNorm, RoPE, SwiGLU, tied embeddings), AdamW, float32, full-length
rows of random tokens; jaxtrain's model and step are the config defaults as resolved on this backend (on CPU
4 train steps per compiled call, `train.steps_per_call`, timed per call and reported per step). Each framework
runs in its own child process (this script with --child), so neither one's idle threads (torch's OpenMP
pool, XLA's) take cores from the other; one round runs each framework once, and --rounds rounds alternate
between them, so interference from other work on a shared machine hits all of them alike and shows up as
spread between rounds. torch.compile wraps the model (forward + loss; the backward is compiled by
AOTAutograd) and `optimizer.step` (inductor on CPU needs a C++ compiler). Each child builds its step and
calls it twice untimed (jit / torch.compile compilation, optimizer-state creation, recompiles; reported
separately), then runs at least --steps timed steps. Reports median tokens/s, the ratios jaxtrain/torch, and model-FLOP
utilisation against a float32 1024 x 1024 matmul peak each framework measures in its own process, before and
after its timed steps (the better of the two: a probe of a few milliseconds can land in a slow moment), and
against the machine's peak: the best probe of the whole run, any framework's, the MFU the goal is read from.
Needs the dev extra (torch). Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

from jaxtrain import models, sharding
from jaxtrain.train import execution, loop as train, steps
from jaxtrain.models import flops
from jaxtrain.models import Execution, ModelConfig
from timing import run_json_child, time_calls

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
  p.add_argument('--child', default='', help=argparse.SUPPRESS)
  p.add_argument('--torch_compile', default='inductor',
                 help="torch.compile backend for the extra torch row ('inductor', 'aot_eager', ...); 'none' skips it")
  if p.parse_known_args()[0].quick:
    p.set_defaults(**QUICK)  # flags given explicitly still win
  a = p.parse_args()
  return a


def default_model(vocab: int, d_model: int, layers: int, heads: int, kv_heads: int, mlp: int,
                  **model: object) -> tuple[ModelConfig, Execution]:
  """The model and its execution as `python -m jaxtrain.main` builds them here: the config defaults (with
  `model` overrides of config.model) resolved for this backend by `execution.plan` (on CPU: float32, the
  fused attention kernel where it builds, else causal XLA attention in blocks of 128, layers unrolled)."""
  from jaxtrain.config.defaults import base_config
  config = base_config()
  m = config.model
  m.update(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, mlp_dim=mlp)
  m.update(model)
  mc = models.model_config(m, vocab)
  return mc, execution.plan(config, mc)


def shipped_steps_per_call() -> int:
  """Train steps per compiled call as `python -m jaxtrain.main` resolves it here (4 on CPU)."""
  from jaxtrain.config.defaults import base_config
  return execution.steps_per_call(base_config())


def make_jax_step(cfg: ModelConfig, tokens: np.ndarray, steps_per_call: int = 1,
                  ex: Execution | None = None) -> Callable[[], None]:
  """One call of the train step as `train.run` compiles it: `steps_per_call` steps on the same batch."""
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  tx = optax.adamw(1e-4, weight_decay=0.0)
  b, t = tokens.shape
  batch = {'tokens': tokens, 'segment_ids': np.ones((b, t), np.int32),
           'positions': np.tile(np.arange(t, dtype=np.int32), (b, 1)), 'loss_mask': np.ones((b, t), np.int32)}
  with jax.set_mesh(mesh):
    graphdef, state, state_sh = train.init_state(cfg, tx, 0, mesh, ex)
    step = train.jit_train_step(steps.make_train_step(train.make_loss_fn(graphdef, 0.0), tx), steps_per_call,
                                state_sh, mesh)
  holder = {'state': state}

  def one() -> None:
    with jax.set_mesh(mesh):
      holder['state'], m = train.run_steps(step, holder['state'], [batch] * steps_per_call, steps_per_call, mesh)
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


NAMES = {'jax': 'jaxtrain (XLA CPU)', 'eager': 'torch eager (transformers LlamaForCausalLM, sdpa)',
         'compile': 'torch.compile (same model, model + optimizer step)'}


def child(a: argparse.Namespace) -> None:
  """One framework in this process: its matmul peak, two untimed calls, then --steps timed ones (JSON)."""
  cfg, ex = default_model(a.vocab, a.d_model, a.layers, a.heads, a.kv_heads, a.mlp)
  tokens = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq_len)).astype(np.int32)
  k = 1
  if a.child == 'jax':
    k = shipped_steps_per_call()
    probe, fn = flops.measure_matmul_peak, make_jax_step(cfg, tokens, k, ex)
  else:
    backend = a.torch_compile if a.child == 'compile' else None
    probe, fn = torch_matmul_peak, make_torch_step(cfg, tokens, a.threads, backend)
  before = probe()
  warm = first_calls(fn)  # per call: the first compiles, then runs k steps
  times = [t / k for t in time_calls(fn, -(-a.steps // k), warmup=0)]  # per step
  peak = max(before, probe())
  print(json.dumps({'peak': peak, 'warm': warm, 'times': times, 'steps_per_call': k}))


def run_child(which: str, argv: list[str]) -> dict | str:
  return run_json_child([sys.executable, os.path.abspath(__file__), f'--child={which}', *argv])


def main() -> None:
  a = parse_args()
  if a.child:
    child(a)
    return
  cfg, _ = default_model(a.vocab, a.d_model, a.layers, a.heads, a.kv_heads, a.mlp)
  n_tokens = a.batch * a.seq_len
  step_flops = flops.flops_per_token(cfg, a.seq_len) * n_tokens
  backend = None if a.torch_compile in ('', 'none') else a.torch_compile
  if backend == 'inductor' and not (shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')):
    print('warning: no C++ compiler on PATH; inductor on CPU needs one (try --torch_compile=aot_eager)')
  which = ['jax', 'eager'] + (['compile'] if backend else [])
  # Every setting the child needs, passed on explicitly (the defaults may have come from --quick).
  argv = [f'--{k}={getattr(a, k)}' for k in ('d_model', 'layers', 'heads', 'kv_heads', 'mlp', 'vocab', 'batch',
                                             'seq_len', 'steps', 'threads', 'torch_compile')]
  runs: dict[str, list[dict]] = {w: [] for w in which}
  failed: dict[str, str] = {}
  for r in range(a.rounds):
    for w in which:
      if w in failed:
        continue
      out = run_child(w, argv)
      if isinstance(out, str):
        failed[w] = out
        print(f'{NAMES[w]}: FAILED {out}', flush=True)
        continue
      runs[w].append(out)
      print(f'round {r + 1}: {NAMES[w]}: first call {out["warm"][0]:.1f} s, median '
            f'{statistics.median(out["times"]):.3f} s', flush=True)
  med = {w: statistics.median([t for o in rs for t in o['times']]) for w, rs in runs.items() if rs}

  params = models.count_params(jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0))))
  print(f'\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch threads {a.threads}')
  print(f'model: {params / 1e6:.1f}M params (d_model {a.d_model}, {a.layers} layers, {a.heads}/{a.kv_heads} heads, '
        f'mlp {a.mlp}, vocab {a.vocab}), batch {a.batch} x {a.seq_len}, AdamW, float32; each framework in its own '
        f'process, {a.rounds} round(s) alternating, {a.steps} timed steps each after 2 untimed\n')
  print('| framework | first / second call (s) | step time (s) | per-round medians (s) | tokens/s | '
        'matmul peak (GFLOP/s) | MFU vs that peak |')
  print('|---|---|---|---|---|---|---|')
  for w, t in med.items():
    first = runs[w][0]
    peak = statistics.median(o['peak'] for o in runs[w])
    rounds = ', '.join(f'{statistics.median(o["times"]):.3f}' for o in runs[w])
    name = NAMES[w].replace('torch.compile (', f'torch.compile (backend={backend}, ')
    if first.get('steps_per_call', 1) > 1:
      name = name.replace(')', f', {first["steps_per_call"]} steps per call)')
    print(f'| {name} | {first["warm"][0]:.1f} / {first["warm"][1]:.2f} | {t:.3f} | {rounds} | {n_tokens / t:.0f} | '
          f'{peak / 1e9:.0f} | {step_flops / t / peak:.1%} |')
  for w, why in failed.items():
    print(f'| {NAMES[w]} | failed: {why} | | | | | |')
  best = max(o['peak'] for rs in runs.values() for o in rs) if med else 0.0
  if 'jax' in med:
    print(f'\n| framework | MFU vs the machine peak: the best probe of this run, {best / 1e9:.0f} GFLOP/s | goal |'
          '\n|---|---|---|')
    for w, t in med.items():
      print(f'| {NAMES[w].split(" (")[0]} | {step_flops / t / best:.1%} | {">= 60%" if w == "jax" else ""} |')
  goals = {'eager': '>= 1.0x', 'compile': '>= 0.8x'}
  if 'jax' in med:
    print('\n| comparison (same run) | jaxtrain tokens/s over theirs | goal |\n|---|---|---|')
    for w in which[1:]:
      if w in med:
        print(f'| jaxtrain / {NAMES[w].split(" (")[0]} | {med[w] / med["jax"]:.2f}x | {goals[w]} |')


if __name__ == '__main__':
  main()
