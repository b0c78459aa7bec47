"""Composable train and eval steps.

The train state is a plain pytree: {'params', 'opt_state', 'step', 'rng'} and optionally 'frozen', a tree
that takes no gradient and has no optimizer state (a LoRA base, a frozen StackWise trunk). A
`param_transform(params, frozen, rng) -> model_params` combines the two before the loss (rng is None in
evaluation, turning off e.g. adapter dropout); without one the trainable params are the model params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain import sharding

Batch = dict[str, jax.Array]
# loss_fn(model_params, batch, rng) -> (objective sum to differentiate, {'loss_sum': objective sum, 'tokens': loss
# token count, optional further 'X_sum's (logged as X per token)}).
# rng is None in evaluation: anything random (e.g. diffusion times) must then be a function of the batch, so
# every evaluation of every run and stage scores the same corruptions.
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]
ParamTransform = Callable[[Any, Any, jax.Array | None], Any]


def _identity_transform(params: Any, frozen: Any, rng: jax.Array | None) -> Any:
  del frozen, rng
  return params


def split_micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """(B, ...) -> (accum, B/accum, ...) taking rows k, k+accum, ... for micro-batch k.

  Strided rows keep every micro-batch spread over all data-parallel devices (contiguous rows would put a
  whole micro-batch on a few devices).
  """
  def split(x: jax.Array) -> jax.Array:
    b = x.shape[0]
    x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_grad_fn(loss_fn: LossFn, param_transform: ParamTransform | None = None,
                 accum_steps: int = 1) -> Callable[[Any, Any, Batch, jax.Array], tuple[Any, dict]]:
  """(params, frozen, batch, rng) -> (gradient of the summed objective, summed metrics over the batch).

  With accum_steps > 1 the batch runs as micro-batches under `lax.scan`; gradients and sums are added, so
  the caller's single division by the total token count is exact whatever each micro-batch holds.
  """
  transform = param_transform or _identity_transform

  def objective(params: Any, frozen: Any, batch: Batch, rng: jax.Array):
    # The transform and the loss draw from independent streams of the step's key.
    return loss_fn(transform(params, frozen, jax.random.fold_in(rng, 1)), batch, rng)

  value_and_grad = jax.value_and_grad(objective, has_aux=True)

  def grads_and_sums(params: Any, frozen: Any, batch: Batch, rng: jax.Array):
    if accum_steps == 1:
      (_, sums), grads = value_and_grad(params, frozen, batch, rng)
      return grads, sums
    micro = split_micro_batches(batch, accum_steps)

    def body(carry, xs):
      grads_acc, sums_acc = carry
      i, mb = xs
      (_, sums), grads = value_and_grad(params, frozen, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

    _, sums_shape = jax.eval_shape(objective, params, frozen, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return grads, sums

  return grads_and_sums


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    schedule: Callable[[Any], jax.Array] | None = None, accum_steps: int = 1,
                    param_transform: ParamTransform | None = None,
                    skip_nonfinite: bool = True) -> Callable[[dict, Batch], tuple[dict, dict]]:
  """Builds the pure `train_step(state, batch) -> (state, metrics)`.

  The loss's sums must hold `loss_sum` (the objective summed over the batch) and `tokens` (the loss tokens);
  every other `X_sum` it reports (e.g. `z_loss_sum`) is optional and logged as `X` per loss token. The loss
  is normalised once by the number of loss tokens in the whole global batch (all micro-batches, all
  devices). Metrics: loss, grad_norm (before clipping), loss_tokens, skipped, lr (with a `schedule`), and one
  per further sum (z_loss with the decoder's loss).

  `tx.update` is given the train step (`step=state['step']`): `optim.make_optimizer`'s transform takes its
  lr from it, and `schedule(state['step'])` is the lr logged, so the logged lr is the applied one; a plain
  optax transform ignores it. The state keeps the dtypes it was created with (parameters in
  model.param_dtype, the optimizer state in what its `init` made: float32 moments with make_optimizer), so
  the step compiles once. With `skip_nonfinite`, a step whose loss or gradients are not finite leaves params
  and optimizer state unchanged (the step counter still advances, as the batch was consumed, and with it the
  lr schedule) and reports skipped = 1.
  """
  grads_and_sums = make_grad_fn(loss_fn, param_transform, accum_steps)
  tx = optax.with_extra_args_support(tx)

  def train_step(state: dict, batch: Batch) -> tuple[dict, dict]:
    rng = jax.random.fold_in(state['rng'], state['step'])
    frozen = state.get('frozen')
    grads, sums = grads_and_sums(state['params'], frozen, batch, rng)
    tokens = jnp.maximum(sums['tokens'], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'], step=state['step'])
    params = optax.apply_updates(state['params'], updates)
    same_dtype = lambda new, old: new.astype(old.dtype) if hasattr(old, 'dtype') else new  # noqa: E731
    params = jax.tree.map(same_dtype, params, state['params'])
    opt_state = jax.tree.map(same_dtype, opt_state, state['opt_state'])
    finite = jnp.isfinite(sums['loss_sum'] + sums.get('z_loss_sum', 0.0)) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      params = jax.tree.map(keep, params, state['params'])
      opt_state = jax.tree.map(keep, opt_state, state['opt_state'])
    new_state = dict(state, params=params, opt_state=opt_state, step=state['step'] + 1)
    metrics = {
        'loss': sums['loss_sum'] / tokens,
        'grad_norm': grad_norm,
        'loss_tokens': sums['tokens'],
        'skipped': 1.0 - finite.astype(jnp.float32),
    }
    # Further sums a loss reports (z_loss, masked-token cross-entropy, ...) are logged per loss token too.
    for k, v in sums.items():
      if k.endswith('_sum') and k != 'loss_sum':
        metrics[k[:-len('_sum')]] = v / tokens
    if schedule is not None:
      metrics['lr'] = schedule(state['step'])
    return new_state, metrics

  return train_step


def make_multi_step(train_step: Callable[[dict, Batch], tuple[dict, dict]]
                    ) -> Callable[[dict, Batch, jax.Array], tuple[dict, dict]]:
  """`train_steps(state, batches, active) -> (state, metrics)`: K train steps in one call, under `lax.scan`.

  `batches` holds K batches stacked on a new leading axis; `active` (K,) bool says which of them run. An
  inactive slot (a call with fewer batches than K pads with copies) leaves the state as it is, step counter
  included, and reports zeros. Metrics come stacked (K,). On XLA CPU each call allocates its temporaries
  afresh and the OS zero-fills every page of them again, so K steps per call pay that once (docs/benchmarks.md).
  """
  def body(state: dict, xs: tuple[Batch, jax.Array]) -> tuple[dict, dict]:
    batch, on = xs

    def skip(state: dict, batch: Batch) -> tuple[dict, dict]:
      shapes = jax.eval_shape(train_step, state, batch)[1]
      return state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.cond(on, train_step, skip, state, batch)

  def train_steps(state: dict, batches: Batch, active: jax.Array) -> tuple[dict, dict]:
    return jax.lax.scan(body, state, (batches, active))

  return train_steps


def make_eval_step(loss_fn: LossFn, param_transform: ParamTransform | None = None) -> Callable[[dict, Batch], dict]:
  """`eval_step(state, batch) -> sums` ({'loss_sum', 'tokens', ...}); the caller adds batches and divides."""
  transform = param_transform or _identity_transform

  def eval_step(state: dict, batch: Batch) -> dict:
    params = transform(state['params'], state.get('frozen'), None)
    _, sums = loss_fn(params, batch, None)
    return sums

  return eval_step
