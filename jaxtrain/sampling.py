"""Sampling on token ids for causal, MLM and masked-diffusion models.

Every function takes the model as a pure callable, so the same code serves toy models in tests and the real
model (close over params, segment ids, ...). Nothing here jits by itself: wrap the call in `jax.jit` with the
callable bound by `functools.partial`, and pass params through the jitted function's arguments rather than as
closure constants (XLA would otherwise embed the weights in the program). Loops are `lax` loops with a fixed
trip count (or an early exit in `lax.while_loop`), so one compilation serves all inputs of one shape, and the
result is a pure function of the inputs and the PRNG key: step i draws with `fold_in(rng, i)`.

Detokenizing is the caller's job.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
# decode_fn(tokens (B,t), positions (B,t), cache, index) -> (logits (B,t,V), cache); writes cache rows [index, index+t).
DecodeFn = Callable[[Array, Array, Any, Array], tuple[Array, Any]]
# logits_fn(tokens (B,T), positions (B,T)) -> logits (B,T,V); must be causal.
CausalLogitsFn = Callable[[Array, Array], Array]
# logits_fn(tokens (B,T), t (B,) masked fraction) -> logits (B,T,V).
MaskedLogitsFn = Callable[[Array, Array], Array]

SCHEDULES = ('linear', 'cosine')
# Nucleus mass within this of top_p counts as reaching it: float32 softmax of probs [0.5, 0.3, ...] sums the
# first two to 0.8 +- 1 ulp, and p=0.8 must keep exactly two tokens.
_TOP_P_TOL = 1e-6
# Schedule counts within this of an integer count as that integer (cos(pi/3) * 4 must be 2, not 3).
_SCHEDULE_TOL = 1e-4


def _check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0) -> None:
  if not temperature >= 0:
    raise ValueError(f'temperature must be >= 0 (0 means greedy), got {temperature}')
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f'top_k must be an integer >= 0 (0 means off), got {top_k}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')


def _scatter_last(values: Array, order: Array) -> Array:
  """Inverse of take_along_axis(x, order, -1): out[..., order[..., j]] = values[..., j]."""
  flat_v, flat_o = values.reshape(-1, values.shape[-1]), order.reshape(-1, order.shape[-1])
  rows = jnp.arange(flat_v.shape[0])[:, None]
  return jnp.zeros_like(flat_v).at[rows, flat_o].set(flat_v).reshape(values.shape)


def filter_logits(logits: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Float32 logits (..., V) divided by temperature, tokens outside top_k then top_p set to -inf.

  top_k keeps exactly k tokens; top_p keeps the smallest set, largest first, whose probability (after top_k)
  reaches p, always at least the top token. Ties go to the lower token id. Temperature 0 keeps only the argmax.
  """
  _check_sampling(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if temperature == 0:
    keep = jax.nn.one_hot(jnp.argmax(logits, axis=-1), vocab, dtype=jnp.bool_)
    return jnp.where(keep, logits, -jnp.inf)
  logits = logits / temperature
  if 0 < top_k < vocab:
    # lax.top_k breaks ties towards the lower index; scattering its indices keeps exactly k even under ties,
    # which a threshold on the k-th value would not.
    _, idx = lax.top_k(logits, top_k)
    rows = jnp.arange(idx.size // top_k)[:, None]
    keep = jnp.zeros((rows.shape[0], vocab), jnp.bool_).at[rows, idx.reshape(-1, top_k)].set(True)
    logits = jnp.where(keep.reshape(logits.shape), logits, -jnp.inf)
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1, stable=True)  # stable: equal logits stay in token-id order
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)  # mass ranked above
    keep_sorted = (before < top_p - _TOP_P_TOL).at[..., 0].set(True)
    logits = jnp.where(_scatter_last(keep_sorted, order), logits, -jnp.inf)
  return logits


def sample_token(logits: Array, rng: Array, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> Array:
  """One token id per row of logits (B, V) -> (B,) int32; temperature 0 is argmax (lowest id on ties)."""
  _check_sampling(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Autoregressive generation


def _prompt_positions(prompt: Array, positions: Array | None) -> Array:
  if positions is None:
    return jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
  if positions.shape != prompt.shape:
    raise ValueError(f'positions shape {positions.shape} must equal prompt shape {prompt.shape}')
  return positions.astype(jnp.int32)


def _check_generate(prompt: Array, max_new_tokens: int) -> None:
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'prompt must be (batch, length>=1) token ids, got shape {prompt.shape}')
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
    raise ValueError(f'max_new_tokens must be an integer >= 0, got {max_new_tokens}')


def _key_per_row(rng: Array) -> bool:
  """Whether `rng` is a batch of keys (B,) typed or (B,2) raw, one per row, rather than one key."""
  return rng.ndim == (1 if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else 2)


def _next(logits: Array, rng: Array, i: Array, done: Array, sampling: dict, eos_id: int | None,
          pad_id: int) -> tuple[Array, Array]:
  """Token i of the continuation (pad once a row has emitted eos) and the updated done flags. With a key per
  row, row b draws from fold_in(rng[b], i) exactly as it would alone in a batch of one."""
  if _key_per_row(rng):
    tok = jax.vmap(lambda row, key: sample_token(row[None], jax.random.fold_in(key, i), **sampling)[0])(logits, rng)
  else:
    tok = sample_token(logits, jax.random.fold_in(rng, i), **sampling)
  tok = jnp.where(done, jnp.int32(pad_id), tok)
  if eos_id is not None:
    done = done | (tok == eos_id)
  return tok, done


def generate(decode_fn: DecodeFn, cache: Any, prompt: Array, max_new_tokens: int, rng: Array, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             pad_id: int = 0, positions: Array | None = None, prompt_len: Array | int | None = None) -> Array:
  """Prompt (B,P) followed by max_new_tokens sampled tokens -> (B, P+max_new_tokens) int32, with a KV cache.

  The prompt is prefilled in one decode_fn call at cache index 0, then one token per step in a while_loop
  that stops early once every row has emitted eos_id; rows that are done emit pad_id. Prompts share one
  length P: group prompts by length, or left-pad them, pass their `positions` (B,P) and let decode_fn mask
  the padding; new tokens continue from positions[:, -1] + 1. `cache` (from the caller, e.g.
  `init_cache(batch, max_len)`) needs at least P + max_new_tokens - 1 rows.

  `prompt_len` (a scalar, may be traced): only prompt[:, :prompt_len] is the prompt and the rest right
  padding, so one compilation serves prompts of every length up to P. The padding is prefilled too, but
  decode_fn must hide cache rows past those it is writing (causal by cache row, as
  `jaxtrain.models.layers.cached_attention` is) and each new token overwrites the next padded row, so the
  result (the continuation at [prompt_len, prompt_len + max_new_tokens), then leftover padding) is what the
  unpadded prompt gives; new tokens continue from positions[:, prompt_len - 1] + 1. A (B,) prompt_len gives
  each row its own length: the prefill still writes cache rows [0, P) of every row at index 0, but each step
  then passes decode_fn a (B,) index, row b writing its cache row index[b].

  `rng`: one key for the batch, or a batch of keys (B,) typed / (B,2) raw, one per row, so that a row's draws
  do not depend on the other rows.
  """
  _check_generate(prompt, max_new_tokens)
  _check_sampling(temperature, top_k, top_p)
  prompt = prompt.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  batch, width = prompt.shape
  plen = jnp.int32(width) if prompt_len is None else jnp.asarray(prompt_len, jnp.int32)  # () or (B,)
  ends = jnp.broadcast_to(plen, (batch,))  # (B,): where each row's continuation starts
  rows = jnp.arange(batch)
  pos = _prompt_positions(prompt, positions)
  last_pos = jnp.take_along_axis(pos, ends[:, None] - 1, axis=1)  # (B,1): the position of the last prompt token
  out = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)

  logits, cache = decode_fn(prompt, pos, cache, jnp.int32(0))
  logits = jnp.take_along_axis(logits, (ends - 1)[:, None, None], axis=1)[:, 0]
  tok, done = _next(logits, rng, jnp.int32(0), jnp.zeros((batch,), jnp.bool_), sampling, eos_id, pad_id)
  out = out.at[rows, ends].set(tok)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, done, cache, out = carry  # tok is token i-1 of the continuation, not yet in the cache
    logits, cache = decode_fn(tok[:, None], last_pos + i, cache, plen + i - 1)
    tok, done = _next(logits[:, 0], rng, i, done, sampling, eos_id, pad_id)
    out = out.at[rows, ends + i].set(tok)
    return i + 1, tok, done, cache, out

  return lax.while_loop(cond, body, (jnp.int32(1), tok, done, cache, out))[-1]


def generate_no_cache(logits_fn: CausalLogitsFn, prompt: Array, max_new_tokens: int, rng: Array, *,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                      pad_id: int = 0, positions: Array | None = None) -> Array:
  """Reference for `generate` (same arguments, same keys, same result): recomputes the whole sequence each step.

  logits_fn sees a fixed (B, P+max_new_tokens) buffer whose not-yet-generated tail holds pad_id, so shapes
  never change under jit; it must be causal, so that tail cannot affect the logits read at step i.
  """
  _check_generate(prompt, max_new_tokens)
  _check_sampling(temperature, top_k, top_p)
  prompt = prompt.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  batch, plen = prompt.shape
  pos = _prompt_positions(prompt, positions)
  pos = jnp.concatenate([pos, pos[:, -1:] + 1 + jnp.arange(max_new_tokens, dtype=jnp.int32)], axis=1)
  out = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], axis=1)

  def body(i, carry):
    done, out = carry
    logits = lax.dynamic_index_in_dim(logits_fn(out, pos), plen + i - 1, axis=1, keepdims=False)
    tok, done = _next(logits, rng, i, done, sampling, eos_id, pad_id)
    return done, lax.dynamic_update_slice(out, tok[:, None], (0, plen + i))

  return lax.fori_loop(0, max_new_tokens, body, (jnp.zeros((batch,), jnp.bool_), out))[1]


# ---------------------------------------------------------------------------------------------------------
# Masked diffusion: iterative unmasking


def remaining_masks(num_masks: Array, step: int | Array, steps: int, schedule: str = 'linear') -> Array:
  """Masks left after step `step` (0-based) of `steps` for rows that started with num_masks (int32)."""
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
  m = jnp.asarray(num_masks, jnp.int32)
  done = jnp.asarray(step, jnp.int32) + 1
  if schedule == 'linear':
    # Integer ceil(M * (steps - done) / steps): exact, where float rounding could add one.
    left = (m * (steps - done) + steps - 1) // steps
  else:
    x = m.astype(jnp.float32) * jnp.cos(0.5 * math.pi * done.astype(jnp.float32) / steps)
    near = jnp.round(x)
    left = jnp.where(jnp.abs(x - near) < _SCHEDULE_TOL, near, jnp.ceil(x)).astype(jnp.int32)
  return jnp.where(done >= steps, 0, jnp.clip(left, 0, m))


def _predict(logits_fn: MaskedLogitsFn, x: Array, t: Array, mask_id: int, rng: Array,
             temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[Array, Array]:
  """Chosen token (B,T) and its probability under the untempered, unfiltered model, mask_id forbidden."""
  logits = logits_fn(x, t).astype(jnp.float32)
  logits = logits.at[..., mask_id].set(-jnp.inf)
  tok = sample_token(logits, rng, temperature, top_k, top_p)
  logp = jax.nn.log_softmax(logits, axis=-1)
  conf = jnp.exp(jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0])
  return tok, conf


def _generable(tokens: Array, mask_id: int, fixed: Array | None) -> Array:
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be (batch, length) token ids, got shape {tokens.shape}')
  gen = tokens == mask_id
  if fixed is not None:
    if fixed.shape != tokens.shape:
      raise ValueError(f'fixed shape {fixed.shape} must equal tokens shape {tokens.shape}')
    gen &= ~fixed.astype(jnp.bool_)
  return gen


def _fraction(masked: Array, total: Array) -> Array:
  return jnp.where(total > 0, masked / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def unmask(logits_fn: MaskedLogitsFn, tokens: Array, mask_id: int, steps: int, rng: Array, *,
           schedule: str = 'linear', temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           fixed: Array | None = None) -> Array:
  """Fill the mask_id positions of tokens (B,T) in `steps` model calls, most confident first -> (B,T) int32.

  logits_fn(tokens, t) gets the current sequence and t (B,) float32, the fraction of the row's M initial
  masks still masked (1 at the first step, 0 for rows without masks). After step s a row keeps
  ceil(M * (1 - (s+1)/steps)) masks (linear) or ceil(M * cos(pi/2 * (s+1)/steps)) (cosine), none after the
  last. Each step predicts every masked position (argmax at temperature 0, else a draw at that temperature
  among the top_k / top_p tokens as in `filter_logits`; mask_id itself is never predicted) and commits the
  ones whose chosen token has the highest probability, ties to the lower position. Committed and unmasked
  positions never change; positions where `fixed` (B,T) is true are left alone even if they hold mask_id.
  """
  if int(steps) != steps or steps < 1:
    raise ValueError(f'steps must be an integer >= 1, got {steps}')
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
  _check_sampling(temperature, top_k, top_p)
  tokens = tokens.astype(jnp.int32)
  gen = _generable(tokens, mask_id, fixed)
  total = gen.sum(axis=1, dtype=jnp.int32)

  def body(s, x):
    masked = gen & (x == mask_id)  # mask_id is never predicted, so committed positions drop out for good
    count = masked.sum(axis=1, dtype=jnp.int32)
    tok, conf = _predict(logits_fn, x, _fraction(count, total), mask_id, jax.random.fold_in(rng, s), temperature,
                         top_k, top_p)
    commit_n = count - remaining_masks(total, s, steps, schedule)  # (B,)
    order = jnp.argsort(-jnp.where(masked, conf, -1.0), axis=1, stable=True)  # masked first, confident first
    rank = _scatter_last(jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape), order)
    commit = masked & (rank < commit_n[:, None])
    return jnp.where(commit, tok, x)

  return lax.fori_loop(0, steps, body, tokens)


def single_pass(logits_fn: MaskedLogitsFn, tokens: Array, mask_id: int, rng: Array, temperature: float = 0.0,
                fixed: Array | None = None, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Fill every mask_id position of tokens (B,T) from one logits_fn call (t = 1 for rows with masks).

  For time-as-depth models, whose one pass through the depth runs the whole reverse process.
  """
  _check_sampling(temperature, top_k, top_p)
  tokens = tokens.astype(jnp.int32)
  gen = _generable(tokens, mask_id, fixed)
  total = gen.sum(axis=1, dtype=jnp.int32)
  tok, _ = _predict(logits_fn, tokens, _fraction(total, total), mask_id, rng, temperature, top_k, top_p)
  return jnp.where(gen, tok, tokens)
