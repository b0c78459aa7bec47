"""Fused masked attention for XLA CPU: a C++ flash-attention kernel (cpu_attention.cc) called through XLA FFI.

On CPU, XLA runs attention as separate products and softmax passes that each write the (B, N, T, S) scores
to memory, and autodiff keeps the probabilities of every layer for the backward pass. The kernel works on
64 x 64 tiles held in cache, keeps only the output and the rows' log-sum-exp, recomputes the probabilities
in the backward pass, and skips tiles the mask hides entirely (the causal upper triangle, other documents of
a packed row, keys outside a sliding window). It computes in float32; `unavailable()` says whether (and
why not) it can run here.

The kernel is compiled on first use with the C++ compiler on PATH (`CXX`, else `g++`) against the FFI
headers jaxlib ships, for this machine's CPU (`-march=native`), into jaxtrain's cache ($JAXTRAIN_CACHE, else
~/.cache/jaxtrain) keyed by the source, the compiler flags and jaxlib's version. Without a compiler,
`model.attention_impl=auto` keeps XLA's attention (`jaxtrain.models.model_config`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
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
_loaded: pathlib.Path | None = None  # the build registered with XLA in this process


def _cpu() -> str:
  """This CPU's instruction sets as the kernel cache key sees them (-march=native builds for them)."""
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), platform.machine())
  except OSError:
    return platform.machine()


def _build() -> pathlib.Path:
  """The compiled kernel's path, compiling it once per source, flags, compiler, jaxlib version and CPU."""
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise RuntimeError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on PATH (set CXX)")
  key = hashlib.sha256(_SOURCE.read_bytes() + ' '.join((cxx, *_FLAGS, jaxlib.__version__, _cpu())).encode()).hexdigest()
  out = pathlib.Path(cache_root(), 'kernels', f'cpu_attention-{key[:16]}.so')
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: parallel tests race
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o', str(tmp_so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr.strip()[-1000:]}')
    os.replace(tmp_so, out)
  return out


@functools.cache
def unavailable() -> str | None:
  """None once the kernel is compiled, loaded and registered with XLA for the CPU platform; else why not
  (no compiler, or the build failed: the compiler's message)."""
  global _loaded
  try:
    path = _build()
    if _loaded is None:  # XLA takes one registration per name and process
      lib = ctypes.cdll.LoadLibrary(str(path))
      jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.JaxtrainAttentionForward), platform='cpu')
      jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.JaxtrainAttentionBackward), platform='cpu')
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
