"""Fused masked attention for XLA CPU: a C++ flash-attention kernel (cpu_attention.cc) called through XLA FFI.

On CPU, XLA runs attention as separate products and softmax passes that each write the (B, N, T, S) scores
to memory, and autodiff keeps the probabilities of every layer for the backward pass. The kernel works on
64 x 64 tiles held in cache, keeps only the output and the rows' log-sum-exp, recomputes the probabilities
in the backward pass, and skips tiles the mask hides entirely (the causal upper triangle, other documents of
a packed row, keys outside a sliding window). It computes in float32; `unavailable()` says whether (and
why not) it can run here.

The kernel is compiled on first use with the C++ compiler on PATH (`CXX`, else `g++`) against the FFI
headers jaxlib ships, for this machine's CPU (`-march=native`), into jaxtrain's cache ($JAXTRAIN_CACHE, else
~/.cache/jaxtrain) keyed by the source, the compiler flags, the compiler's version, jaxlib's version and the
CPU (`cpu_identity`), within `BUILD_TIMEOUT_S`. Only a run picks it (`jaxtrain.train.execution.plan`): without
a compiler, or when the build fails, hangs or does not load, `model.attention_impl=auto` keeps XLA's attention
with one warning; describing, exporting or loading a model never builds it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

from jaxtrain import sharding
from jaxtrain.paths import cache_root

Array = jax.Array

_SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno', '-w')
_FORWARD, _BACKWARD = 'jaxtrain_attention_fwd', 'jaxtrain_attention_bwd'
BUILD_TIMEOUT_S = 120.0  # a compiler that hangs (a stuck license server, a wrapper waiting on stdin) is 'unavailable'
_VERSION_TIMEOUT_S = 10.0
_loaded: pathlib.Path | None = None  # the build registered with XLA in this process


def cpu_identity() -> str:
  """This machine's CPU as the kernel cache key sees it: /proc/cpuinfo's first 'model name' and instruction
  set ('flags', or 'Features' on ARM) lines, and the architecture. -march=native builds for exactly this CPU,
  so a binary cached on a shared disk by another machine must not be loaded here."""
  wanted = {'model name': '', 'flags': '', 'Features': ''}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        name = line.split(':', 1)[0].strip()
        if name in wanted and not wanted[name]:
          wanted[name] = line.strip()
        if wanted['model name'] and (wanted['flags'] or wanted['Features']):
          break  # the first processor's lines; the rest repeat them
  except OSError:
    pass
  return '\n'.join([platform.machine(), platform.processor(), *wanted.values()])


def _compiler() -> str:
  """The C++ compiler's path (`CXX`, else `g++`); RuntimeError when there is none."""
  name = os.environ.get('CXX', 'g++')
  cxx = shutil.which(name)
  if cxx is None:
    raise RuntimeError(f"no C++ compiler {name!r} on PATH (set CXX)")
  return cxx


def _run(cmd: list[str], what: str, timeout: float) -> str:
  """`cmd`'s stdout; RuntimeError (the reason the kernel is unavailable) when it fails or runs past `timeout`
  seconds. It runs in its own process group, killed whole on timeout: the compiler driver's children (cc1plus)
  would otherwise hold the pipes open."""
  try:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  except OSError as e:
    raise RuntimeError(f'{what} could not run: {e}') from None
  with proc:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      raise RuntimeError(f'{what} took over {timeout:g} s: {" ".join(cmd)}') from None
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed: {(err or out).strip()[-1000:]}')
  return out


def cache_path(cxx: str) -> pathlib.Path:
  """Where the kernel built by `cxx` for this machine lives: keyed by the source, the flags, the compiler
  (path and `--version`), jaxlib's version and `cpu_identity()`."""
  version = _run([cxx, '--version'], f'{cxx} --version', _VERSION_TIMEOUT_S)
  key = hashlib.sha256(_SOURCE.read_bytes() + '\n'.join((cxx, version, *_FLAGS, jaxlib.__version__,
                                                          cpu_identity())).encode()).hexdigest()
  return pathlib.Path(cache_root(), 'kernels', f'cpu_attention-{key[:16]}.so')


def _build() -> pathlib.Path:
  """The compiled kernel's path, compiling it once per source, flags, compiler, jaxlib version and CPU."""
  cxx = _compiler()
  out = cache_path(cxx)
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: parallel tests race
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', str(tmp_so)]
    _run(cmd, 'compiling the fused CPU attention kernel', BUILD_TIMEOUT_S)
    os.replace(tmp_so, out)
  return out


def _register(path: pathlib.Path) -> None:
  """Load the built library and register its two entry points with XLA for the CPU platform; RuntimeError
  when the library does not load or lacks a symbol (a stale or foreign build)."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
    forward, backward = lib.JaxtrainAttentionForward, lib.JaxtrainAttentionBackward
  except (OSError, AttributeError) as e:
    raise RuntimeError(f'{path.name} does not load as the kernel: {e}') from None
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(forward), platform='cpu')
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(backward), platform='cpu')


@functools.cache
def unavailable() -> str | None:
  """None once the kernel is compiled, loaded and registered with XLA for the CPU platform; else why not
  (no compiler, the build failed or timed out: the compiler's message, the library does not load or lacks
  a symbol). Only `jaxtrain.train.execution.plan` calls it, when a run asks for or may use the kernel."""
  global _loaded
  try:
    path = _build()
    if _loaded is None:  # XLA takes one registration per name and process
      _register(path)
      _loaded = path
  except (RuntimeError, OSError) as e:
    return str(e)
  if path != _loaded:
    return f'{_SOURCE} changed after this process loaded {_loaded.name}; restart to use the new build'
  return None


def _forward_call(q: Array, k: Array, v: Array, seg: Array, causal: bool, window: int) -> tuple[Array, Array]:
  b, t, n, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method='sequential')(q, k, v, seg, seg, causal=causal, window=window)


def _backward_call(q: Array, k: Array, v: Array, seg: Array, o: Array, lse: Array, do: Array, causal: bool,
                   window: int) -> tuple[Array, Array, Array]:
  out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  call = jax.ffi.ffi_call(_BACKWARD, out, vmap_method='sequential')
  return call(q, k, v, seg, seg, o, lse, do, causal=causal, window=window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _local(q: Array, k: Array, v: Array, seg: Array, causal: bool, window: int) -> Array:
  return _forward_call(q, k, v, seg, causal, window)[0]


def _local_fwd(q, k, v, seg, causal, window):
  o, lse = _forward_call(q, k, v, seg, causal, window)
  return o, (q, k, v, seg, o, lse)


def _local_bwd(causal, window, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward_call(q, k, v, seg, o, lse, do, causal, window)
  return dq, dk, dv, None


_local.defvjp(_local_fwd, _local_bwd)


def attention(q: Array, k: Array, v: Array, segment_ids: Array, causal: bool, window: int = 0) -> Array:
  """Self-attention of q (B,T,N,H) over k, v (B,T,K,H) (N a multiple of K), scaled by 1/sqrt(H), with the
  mask of `transformer.attention_mask`: same segment, no future keys if `causal`, keys less than `window`
  away if `window` > 0. Computed in float32 (as the einsum core's scores and softmax), returned in q's
  dtype. Under a mesh each batch shard runs the kernel on its own rows."""
  if q.shape[1] != k.shape[1] or len({q.shape[-1], k.shape[-1], v.shape[-1]}) != 1 or q.shape[2] % k.shape[2]:
    raise ValueError(f'fused CPU attention: self-attention with equal head dims and N a multiple of K; got q '
                     f'{q.shape}, k {k.shape}, v {v.shape}')
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  out = sharding.per_batch_shard(lambda q, k, v, seg: _local(q, k, v, seg, causal, int(window)),
                                 (*f32, segment_ids.astype(jnp.int32)), q.ndim)
  return out.astype(q.dtype)
