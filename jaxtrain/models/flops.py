"""FLOPs accounting, the device peak, and the logging sinks (metrics.jsonl, progress bar, wandb, plot)."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from jaxtrain.models import ModelConfig, mla


# Dense bf16 peak FLOP/s per chip (no sparsity).
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6': 918e12,
}


@dataclasses.dataclass(frozen=True)
class LoraFlops:
  """What a LoRA run trains, as far as FLOPs go: the adapter rank and the '/'-joined paths of the adapted
  weights (blocks/attn/q, lm_head, ...). Everything else is frozen."""

  rank: int
  targets: tuple[str, ...]



def weight_matrices(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
  """{parameter path: (times applied per token, fan_in, fan_out)} of every matmul weight; biases, norms and the
  embedding lookup are left out (no matmul, or negligible). A tied head multiplies by the embedding."""
  d, n, k, h, f, layers = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_layers
  if cfg.attention == 'mla':
    out = _mla_matrices(cfg)
  else:
    out = {'blocks/attn/q': (layers, d, n * h), 'blocks/attn/k': (layers, d, k * h),
           'blocks/attn/v': (layers, d, k * h), 'blocks/attn/o': (layers, n * h, d)}
  if cfg.mlp == 'swiglu':  # GELU MLPs have no gate
    out['blocks/mlp/gate'] = (layers, d, f)
  out.update({'blocks/mlp/up': (layers, d, f), 'blocks/mlp/down': (layers, f, d)})
  out['embed' if cfg.tie_embeddings else 'lm_head'] = (1, d, cfg.vocab_size)
  return out


def _mla_matrices(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
  """The projections `mla.MLA` creates for `cfg` (zero-width parts have none)."""
  d, n, layers = cfg.d_model, cfg.num_heads, cfg.num_layers
  qk, v = mla.head_dims(cfg)
  nope, q_rank, kv_rank = cfg.mla_nope_dim, cfg.mla_q_rank, cfg.mla_kv_rank
  out = {}
  if q_rank:
    out.update({'blocks/attn/q_down': (layers, d, q_rank), 'blocks/attn/q_up': (layers, q_rank, n * qk)})
  else:
    out['blocks/attn/q'] = (layers, d, n * qk)
  if kv_rank:
    out['blocks/attn/kv_down'] = (layers, d, kv_rank)
    if nope:
      out['blocks/attn/k_up'] = (layers, kv_rank, n * nope)
    out['blocks/attn/v_up'] = (layers, kv_rank, n * v)
  else:
    if nope:
      out['blocks/attn/k'] = (layers, d, n * nope)
    out['blocks/attn/v'] = (layers, d, n * v)
  if cfg.mla_rope_dim:
    out['blocks/attn/k_rope'] = (layers, d, cfg.mla_rope_dim)
  out['blocks/attn/o'] = (layers, n * v, d)
  return out


def keys_per_query(cfg: ModelConfig, seq_len: int) -> float:
  """Mean keys a query attends to over a row of seq_len (dense attention on packed rows): seq_len/2 when
  causal, min(window, position) with a sliding window, twice that (both sides) when bidirectional."""
  w = min(cfg.sliding_window or seq_len, seq_len)
  one_side = w - w * w / (2 * seq_len)  # mean of min(w, p) over p in [0, seq_len]: seq_len/2 at w = seq_len
  return one_side if cfg.causal else 2 * one_side


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, lora: LoraFlops | None = None) -> float:
  """Model FLOPs per token of a training step (training=True) or an evaluation (forward only).

  Forward: 2 FLOPs per weight of every matmul (LM head included, embedding lookup excluded) plus
  QK^T and AV over `keys_per_query` keys (per head: the query/key width for QK^T, the value width for AV,
  which differ under MLA). Backward, training every weight: 2x forward (input and weight
  gradients). With `lora` the base is frozen: its matmuls need only the input gradient (1x forward), while
  the adapters (x@a then @b, both factors trained) and attention take the full 2x. Counted is the work the
  model needs, not what a particular step executes: XLA also runs the masked half of dense causal attention,
  rematerialisation repeats the forward and merged-mode LoRA forms the frozen weights' gradient.
  """
  weights = adapters = 0.0
  for path, (times, fan_in, fan_out) in weight_matrices(cfg).items():
    weights += 2 * times * fan_in * fan_out
    if lora is not None and path in lora.targets:
      adapters += 2 * times * lora.rank * (fan_in + fan_out)
  qk, v = mla.head_dims(cfg)
  attention = 2 * cfg.num_layers * cfg.num_heads * (qk + v) * keys_per_query(cfg, seq_len)
  forward = weights + adapters + attention
  if not training:
    return forward
  if lora is None:
    return 3 * forward
  return 2 * weights + 3 * (adapters + attention)


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on the first device: the practical CPU peak to report MFU against."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def device_peak_flops(override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from): `override` when > 0 (config.log.peak_flops), the table for
  known accelerators, else a matmul probe (run once per process: later runs and stages reuse it)."""
  if override > 0:
    return override, 'config.log.peak_flops'
  return _detected_peak()


@functools.cache
def _detected_peak() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak, f'table ({kind})'
  return measure_matmul_peak(), f'measured f32 matmul ({kind})'

