"""Differentiable pieces with hand-written derivatives, each faster than autodiff's on XLA CPU.

`linear` (every plain-weight projection), `swiglu` (the SwiGLU MLP), `softmax` (attention's einsum core),
`rotate` (RoPE's turn) and `computed_once` (RoPE's tables). Each is tested against autodiff or the plain
formula with a random cotangent (tests/test_ops.py, tests/test_transformer.py); docs/benchmarks.md has the
profiles and A/B runs that motivated them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear(spec: str, x: Array, w: Array) -> Array:
  """`einsum(spec, x, w)` (x and w of one dtype) whose weight gradient transposes the smaller operand.

  A weight gradient contracts the batch and sequence axes, which XLA CPU's dot wants as the last axis of its
  first operand and the first of its second, so it writes its first operand transposed, fused into whatever
  produced it. Autodiff puts the cotangent first: RoPE's backward or the tied LM head's (B*T, V) logits
  gradient then runs as a slow strided loop. Here the first operand is whichever of x and the cotangent is
  smaller (x on a tie: the q, k and v weights share it), and the small weight gradient is transposed instead.
  """
  return jnp.einsum(spec, x, w)


def _linear_fwd(spec: str, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return linear(spec, x, w), (x, w)


def _linear_bwd(spec: str, res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, w = res
  ins, ys = spec.replace(' ', '').split('->')
  xs, ws = ins.split(',')
  dx = jnp.einsum(f'{ys},{ws}->{xs}', dy, w)
  (a, sa), (b, sb) = ((dy, ys), (x, xs)) if dy.size < x.size else ((x, xs), (dy, ys))
  order = ''.join(c for c in sa + sb if c in ws)  # the first operand's weight axes, then the second's
  dw = jnp.einsum(f'{sa},{sb}->{order}', a, b)
  return dx, jnp.transpose(dw, [order.index(c) for c in ws])


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_jvp
def softmax(x: Array) -> Array:
  """Softmax over the last axis that multiplies by the reciprocal of the sum (one division per row, not per
  element: XLA keeps a division a division) and differentiates as y * (t - sum(y * t))."""
  e = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  return e * (1.0 / e.sum(-1, keepdims=True))


@softmax.defjvp
def _softmax_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
  y, t = softmax(primals[0]), tangents[0]
  return y, y * (t - (y * t).sum(-1, keepdims=True))


@jax.custom_vjp
def swiglu(x: Array, gate: Array, up: Array, down: Array) -> Array:
  """down(silu(x @ gate) * (x @ up)) for plain weight arrays, with a hand-written backward pass.

  Autodiff of the same expression keeps four (B, T, F) residuals per layer (the pieces of silu's
  derivative), and on XLA CPU each weight gradient then needs an elementwise pass that writes its (B*T, F)
  operand transposed. Here the residuals are the two projections and the backward is six plain products:
  forward + backward at B*T 4096, D 512, F 1536 takes 0.28-0.38 s instead of 0.48-0.61 s (torch eager:
  0.25-0.33 s; benchmarks/step_breakdown.py, several runs), with gradients equal to autodiff's to float rounding.
  """
  return jnp.einsum('btf,fd->btd', _silu_times(x, gate, up)[0], down)


def _silu_times(x: Array, gate: Array, up: Array) -> tuple[Array, Array, Array]:
  g = jnp.einsum('btd,df->btf', x, gate)
  u = jnp.einsum('btd,df->btf', x, up)
  return jax.nn.silu(g) * u, g, u


def _swiglu_fwd(x: Array, gate: Array, up: Array, down: Array) -> tuple[Array, tuple[Array, ...]]:
  h, g, u = _silu_times(x, gate, up)
  return jnp.einsum('btf,fd->btd', h, down), (x, g, u, gate, up, down)


def _swiglu_bwd(res: tuple[Array, ...], dy: Array) -> tuple[Array, Array, Array, Array]:
  x, g, u, gate, up, down = res
  s = jax.nn.sigmoid(g)
  silu = g * s
  dh = jnp.einsum('btd,fd->btf', dy, down)
  d_down = jnp.einsum('btd,btf->df', dy, silu * u).T  # dy first: XLA CPU writes (B*T, D), not (B*T, F), transposed
  du = dh * silu
  dg = dh * u * (s * (1 + g * (1 - s)))  # d silu(g) / dg = s + g s (1 - s)
  d_gate = jnp.einsum('btd,btf->df', x, dg)
  d_up = jnp.einsum('btd,btf->df', x, du)
  dx = jnp.einsum('btf,df->btd', dg, gate) + jnp.einsum('btf,df->btd', du, up)
  return dx, d_gate, d_up, d_down


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def computed_once(fn: Callable[[Array], Any], x: Array) -> Any:
  """fn(x), on XLA CPU written to memory once instead of fused into each consumer.

  XLA CPU fuses cos and sin into every loop that reads them and evaluates them there per element, a scalar
  libm call each: for RoPE that is once per head, in the forward pass and again in the backward (sincosf was
  2-4% of the CPU train step). Its `optimization_barrier` is dropped on CPU, but a conditional's branches are
  compiled apart from their consumers; both branches are `fn`, so the predicate never changes the result.
  On other backends a conditional can cost a synchronisation, and fused transcendentals are cheap there.
  """
  if jax.default_backend() != 'cpu' or x.size == 0:
    return fn(x)
  return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), fn, fn, x)


@jax.custom_vjp
def rotate(x: Array, cos: Array, sin: Array) -> Array:
  """Each half-split pair (x1, x2) turned by the angle of (cos, sin).

  The backward pass is the same turn by the opposite angle. Autodiff of the split and concatenate
  instead builds slices and pads of the cotangent (seen in XLA's CPU profile of the train step).
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rotate_fwd(x: Array, cos: Array, sin: Array) -> tuple[Array, tuple[Array, Array]]:
  return rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(res: tuple[Array, Array], dy: Array) -> tuple[Array, Array, Array]:
  cos, sin = res  # functions of the integer positions only: nothing upstream needs their gradients
  return rotate(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


rotate.defvjp(_rotate_fwd, _rotate_bwd)
