"""`Execution`: how a model runs on this backend, apart from what it computes (`ModelConfig`).

The same parameters and the same function run with XLA's attention or the fused CPU kernel, in causal query
blocks or one call, with the layers scanned or unrolled, in float32 or bfloat16 activations. Those choices
depend on the backend (and, for the kernel, on a C++ compiler), so they are resolved where a job runs a model
(`jaxtrain.train.execution.plan`), never when a model is only described, exported or loaded. The model
functions take an `Execution`; without one they use `default(cfg)`, which never touches the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxtrain.models.config import ModelConfig

IMPLS = ('xla', 'cpu_fused')


@dataclasses.dataclass(frozen=True)
class Execution:
  """Backend choices of one model run. The defaults are the accelerator's; `default(cfg)` gives this backend's."""

  attention_impl: str = 'xla'  # xla: XLA's ops (per attention_block); cpu_fused: the C++ kernel (cpu_attention)
  attention_block: int = 0  # causal attention in query blocks of this size (0: one call over the row)
  scan_layers: bool = True  # lax.scan over the stacked blocks (compile time flat in depth) or unrolled
  compute_dtype: str = 'float32'  # activations' dtype (parameters keep ModelConfig.param_dtype)

  def __post_init__(self):
    if self.attention_impl not in IMPLS:
      raise ValueError(f'Execution.attention_impl={self.attention_impl!r}: must be one of {", ".join(IMPLS)}')


def _on_cpu(backend: str | None) -> bool:
  return (backend or jax.default_backend()) == 'cpu'


def default(cfg: ModelConfig | None = None, backend: str | None = None) -> Execution:
  """This backend's safe execution: XLA's attention (no kernel, no compiler probe); on CPU causal blocks of
  128 (half XLA CPU's attention time), layers unrolled unless `cfg.remat` asks for the scan's memory bound,
  float32; elsewhere one attention call (cuDNN may fuse it), scanned layers, bfloat16."""
  return from_model(None, cfg, backend=backend)


def from_model(model: Any, cfg: ModelConfig | None = None, attention_impl: str = 'xla',
               backend: str | None = None) -> Execution:
  """The execution the `config.model` section asks for on `backend` (default: JAX's), with `attention_impl`
  already resolved by the caller (the kernel's availability is not this module's business): compute_dtype
  auto, attention_block -1 and scan_layers None take the backend's defaults. `model` None: all defaults."""
  cpu = _on_cpu(backend)
  get = (lambda name, unset: unset) if model is None else (lambda name, unset: getattr(model, name))
  remat = cfg.remat if cfg is not None else (get('remat', 'none') or 'none')
  compute = get('compute_dtype', 'auto')
  if compute == 'auto':
    compute = 'float32' if cpu else 'bfloat16'
  block = get('attention_block', -1)
  if block < 0:
    block = 128 if cpu else 0
  scan = get('scan_layers', None)
  if scan is None:  # unrolled layers are faster on CPU; with remat the scan keeps its memory bound
    scan = not cpu or remat != 'none'
  return Execution(attention_impl=attention_impl, attention_block=block, scan_layers=bool(scan),
                   compute_dtype=compute)


def resolve(execution: Execution | None, cfg: ModelConfig | None = None) -> Execution:
  """`execution`, or `default(cfg)` when None."""
  return default(cfg) if execution is None else execution
