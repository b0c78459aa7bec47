"""The execution plan of a job that runs a model: the `models.Execution` its config asks for on this backend,
and the train steps per compiled call.

This is the one place that decides whether the fused CPU attention kernel runs (and so the one caller of
`cpu_attention.unavailable()`, which compiles it). Jobs that run a model (train, StackWise, estimate,
benchmarks) call `plan` at their start, before anything is written; jobs that only describe, load, export or
merge a model use `models.execution.default` and never touch the kernel.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from jaxtrain.errors import ConfigError
from jaxtrain.kernels import cpu_attention
from jaxtrain.models import execution as execution_lib
from jaxtrain.models.config import ModelConfig
from jaxtrain.models.execution import Execution

_warned: set[str] = set()  # reasons already warned about in this process: one warning each


def plan(config: Any, mc: ModelConfig | None = None, backend: str | None = None, probe: bool = True) -> Execution:
  """The execution `config.model` asks for on `backend` (default: JAX's): compute_dtype auto, attention_block
  -1 and scan_layers unset take the backend's defaults (`models.execution.from_model`); attention_impl is
  resolved here. `mc` (the architecture, for its remat) defaults to what `config.model` says. `probe` False
  assumes the kernel builds instead of building it: what `jaxtrain check` predicts memory for, running no
  compiler."""
  model = config.model
  cpu = (backend or jax.default_backend()) == 'cpu'
  return execution_lib.from_model(model, mc, attention_impl(model, cpu, probe), backend)


def attention_impl(model: Any, cpu: bool, probe: bool = True) -> str:
  """`model.attention_impl` resolved: auto takes the fused CPU kernel on CPU for GQA attention where it
  builds and loads (2x faster than XLA's ops forward + backward: docs/benchmarks.md), else XLA's ops with one
  warning saying why; cpu_fused where it cannot run is a ConfigError. `probe` False: where it would be tried,
  the kernel is assumed to build."""
  want, fits = model.attention_impl, cpu and model.attention == 'gqa'
  if want == 'xla' or (want == 'auto' and not fits):
    return 'xla'
  if not fits:
    raise ConfigError('model.attention_impl', want, f'needs the CPU backend and GQA attention; this run has '
                      f'backend {jax.default_backend()!r}, model.attention={model.attention!r} (use auto or xla)')
  if not probe:
    return 'cpu_fused'
  why = cpu_attention.unavailable()
  if want == 'cpu_fused' and why:
    raise ConfigError('model.attention_impl', want, f'the kernel does not build here ({_one_line(why)}); use auto '
                      'or xla')
  if why and why not in _warned:
    _warned.add(why)
    # One line on the console: the reason folded, and no source line under it (warnings.warn would print the
    # line of code that warned; a location without a source file prints none).
    warnings.warn_explicit(f'model.attention_impl=auto: XLA attention, the fused CPU kernel does not build here: '
                           f'{_one_line(why)}', UserWarning, 'jaxtrain', 0, module=__name__)
  return 'xla' if why else 'cpu_fused'


def _one_line(text: str) -> str:
  return ' '.join(text.split())


def steps_per_call(config: Any, backend: str | None = None) -> int:
  """`train.steps_per_call` resolved: 0 (auto) is 4 on CPU (host overhead per call dominates small steps),
  1 on accelerators (see defaults.py)."""
  return config.train.steps_per_call or (4 if (backend or jax.default_backend()) == 'cpu' else 1)


def dtypes(config: Any, backend: str | None = None) -> str:
  """'param dtype P, compute dtype C' of `config.model` on `backend` (compute_dtype auto resolved as `plan`
  does), for a run's header line."""
  model = config.model
  compute = execution_lib.from_model(model, None, backend=backend).compute_dtype
  return f'param dtype {model.get("param_dtype", "float32")}, compute dtype {compute}'
