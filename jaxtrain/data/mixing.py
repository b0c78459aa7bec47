"""Mixing named sources into one stream whose share of *tokens* per source follows target shares.

Two pieces:
  `mixture_weights`  target shares from explicit per-source weights, or temperature sampling over token counts
                     (p_i proportional to n_i^(1/T): T=1 proportional to size, larger T flatter, towards uniform).
  `Mix`              a grain IterDataset interleaving per-source IterDatasets of elements (dicts of numpy arrays:
                     seq_len pieces, or packed rows as the pipeline mixes) by a deterministic deficit rule.

Why a deficit rule rather than a seeded RNG: every next() emits one element of the active source furthest below
its target token share, i.e. the largest `share_i * T - tokens_i` where T is the tokens emitted so far by the
active sources (ties: sorted source names). The emitted shares are then exact up to a few elements, whatever the
mix of lengths: the source picked is never behind its target (deficits sum to 0), so no source gets ahead by more
than one longest element L, and none falls behind by more than (sources - 1) * L; this holds after every element,
so any prefix of the stream (the batches trained so far) has it. An RNG drawing per element drifts like sqrt(T)
instead, and drawing elements rather than tokens would give a source of long documents far more than its share.
The rule also needs no random state: the iterator state is just the token counters (plus the parents' states), so
resuming, and inspecting why a source was picked, is arithmetic. Within a source the order is the parent's own
(shuffle there, e.g. `MapDataset.shuffle().repeat()`): a reordering after the mix would undo the bound.

A finite parent ends by its policy: 'repeat' re-creates the parent's iterator (same order; an epoch is counted),
'drop' removes the source and the rule renormalises the others' shares (the deficit then runs over the tokens of
the remaining sources only), 'stop' ends the whole mixture with StopIteration, so a train loop finishes cleanly.
A parent's StopIteration is always handled here, never passed on from inside a parent's next(), and once the
mixture has ended it keeps raising StopIteration. When every source with a positive share is dropped it ends
too. Sources with share 0 are never read.

Changing the shares of a resumed `Mix` is allowed (the counters are cumulative), but then the rule first catches
up on the whole history, which can starve a source for a while; start a new mixture for a new schedule. A run
does not allow it: data.sources.*.weight is not among the keys a resume may change (train/resume.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np

from jaxtrain.data.sources import DataError
from jaxtrain.errors import UserError

POLICIES = ('repeat', 'drop', 'stop')
_POLICY_HINT = ("expected one of ('repeat', 'drop', 'stop'): 'repeat' restarts the source, 'drop' removes it "
                "and renormalises the others, 'stop' ends the mixture")
_WEIGHT_OR_T = 'expected a weight for every source (data.sources.<name>.weight) or data.temperature, not both'


def _weight_key(name: str) -> str:
  return f'data.sources.{name}.weight'


def _check_shares(names: list[str], weights: Mapping[str, Any]) -> dict[str, float]:
  """Validated, normalised shares: one finite non-negative number per name, not all zero."""
  missing = [n for n in names if n not in weights]
  if missing:
    raise DataError(_weight_key(missing[0]), None, 'is missing',
                    f'{_WEIGHT_OR_T}; sources: {names}, weights given for {sorted(map(str, weights))}')
  unknown = [n for n in weights if n not in names]
  if unknown:
    raise DataError(_weight_key(str(unknown[0])), weights[unknown[0]], 'names no source',
                    f'expected weights only for the sources {names}')
  values = {}
  for name in names:
    w = weights[name]
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
      raise DataError(_weight_key(name), w, 'is not a number', 'expected a finite weight >= 0')
    w = float(w)
    if not math.isfinite(w):
      raise DataError(_weight_key(name), w, 'is not finite', 'expected a finite weight >= 0')
    if w < 0:
      raise DataError(_weight_key(name), w, 'is negative', 'expected a finite weight >= 0 (0 leaves the source out)')
    values[name] = w
  total = math.fsum(values.values())
  if total <= 0:
    raise DataError('data.sources.*.weight', values, 'are all zero', 'expected at least one positive weight')
  return {name: w / total for name, w in values.items()}


def mixture_weights(token_counts: Mapping[str, int], weights: Mapping[str, float] | None,
                    temperature: float | None) -> dict[str, float]:
  """Target token shares per source (summing to 1), in the order of `token_counts`.

  Exactly one of `weights` (one finite value >= 0 per source, normalised here; 0 leaves a source out) and
  `temperature` (T > 0: share_i proportional to token_counts[i] ** (1 / T)) must be given. A source with no
  tokens gets share 0 under temperature sampling.
  """
  names = list(token_counts)
  if not names:
    raise DataError('data.sources', dict(token_counts), 'names no source', 'expected at least one named source')
  if weights is not None and temperature is not None:
    raise DataError('data.temperature', temperature, 'is set together with per-source weights', _WEIGHT_OR_T)
  if weights is None and temperature is None:
    raise DataError('data.temperature', None, 'is unset and no source has a weight', _WEIGHT_OR_T)
  if weights is not None:
    return _check_shares(names, weights)
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
    raise DataError('data.temperature', temperature, 'is not a number', 'expected a finite temperature > 0')
  t = float(temperature)
  if not math.isfinite(t) or t <= 0:
    raise DataError('data.temperature', temperature, 'is not valid',
                    'expected a finite temperature > 0 (1: proportional to tokens, larger: flatter; '
                    'equal weights for uniform)')
  counts = {}
  for name in names:
    n = token_counts[name]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise DataError(f'data.sources.{name}', n, 'has an invalid token count', 'expected an integer count >= 0')
    counts[name] = int(n)
  largest = max(counts.values())
  if largest == 0:
    raise DataError('data.sources', counts, 'hold no tokens', 'expected at least one source with tokens')
  # Ratios to the largest count are <= 1, so n ** (1 / T) cannot overflow for small T or huge corpora.
  powered = {name: (n / largest) ** (1.0 / t) for name, n in counts.items()}
  total = math.fsum(powered.values())
  return {name: p / total for name, p in powered.items()}


def is_state(state: Any) -> bool:
  """Whether `state` (a saved data-iterator position) is a `MixIterator.get_state()`: what a run's checkpoint
  holds since each source is packed on its own (an older jaxtrain saved its packer's state around the mixer)."""
  return isinstance(state, Mapping) and isinstance(state.get('parents'), Mapping) and 'tokens' in state


class Mix(grain.IterDataset):
  """Interleaves named parent IterDatasets so that each one's share of emitted tokens follows `shares`.

  `shares`: one finite value >= 0 per parent (normalised here; e.g. from `mixture_weights`). `on_end`: the
  policy when a finite parent ends, per name or one for all ('repeat', 'drop' or 'stop'). `length_key`: the
  element field whose first-axis length counts as the element's tokens; `length`: instead, a function of the
  element giving its tokens (e.g. the non-padding tokens of a packed row). Elements pass through unchanged.
  """

  def __init__(self, parents: Mapping[str, grain.IterDataset], shares: Mapping[str, float],
               on_end: Mapping[str, str] | str = 'repeat', *, length_key: str = 'tokens',
               length: Callable[[Any], int] | None = None):
    names = sorted(parents)  # Sorted: ties and the state do not depend on how the mapping was built.
    if not names:
      raise DataError('data.sources', dict(parents), 'names no source', 'expected at least one named source')
    for name in names:
      if not isinstance(parents[name], grain.IterDataset):
        raise TypeError(f'parents[{name!r}] is a {type(parents[name]).__name__}; expected a grain.IterDataset '
                        '(a MapDataset becomes one with .to_iter_dataset())')
    policies = {name: on_end for name in names} if isinstance(on_end, str) else dict(on_end)
    for name in names:
      if name not in policies:
        raise DataError(f'data.sources.{name}.on_end', None, 'is missing', _POLICY_HINT)
      if policies[name] not in POLICIES:
        raise DataError(f'data.sources.{name}.on_end', policies[name], 'is not valid', _POLICY_HINT)
    unknown = [n for n in policies if n not in parents]
    if unknown:
      raise DataError(f'data.sources.{unknown[0]}.on_end', policies[unknown[0]], 'names no source',
                      f'expected policies only for the sources {names}')
    super().__init__([parents[name] for name in names])
    self.names = tuple(names)
    self.shares = _check_shares(names, shares)
    self.on_end = {name: policies[name] for name in names}
    self.length_key = length_key
    self.length = length
    self._by_name = {name: parents[name] for name in names}

  def __iter__(self) -> MixIterator:
    return MixIterator(self)

  def __str__(self) -> str:
    return f'Mix(shares={self.shares}, on_end={self.on_end})'


class MixIterator(grain.DatasetIterator):
  """Iterator of `Mix`. State: the parents' states, tokens/elements/epochs per source, dropped sources, ended."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, mix: Mix):
    self._mix = mix
    self._iters = {name: mix._by_name[name].__iter__() for name in mix.names}
    super().__init__([self._iters[name] for name in mix.names])
    zero = dict.fromkeys(mix.names, 0)
    self._tokens, self._elements, self._epochs = dict(zero), dict(zero), dict(zero)
    self._dropped = dict.fromkeys(mix.names, False)
    self._final = dict.fromkeys(mix.names)  # State of a dropped parent, frozen when it ended.
    self._ended = False

  # --------------------------------------------------------------------------- selection

  def _pick(self) -> str | None:
    """The active source furthest below its share of the active sources' tokens; None when none is left."""
    shares = self._mix.shares
    active = [n for n in self._mix.names if shares[n] > 0 and not self._dropped[n]]
    if not active:
      return None
    total_share = math.fsum(shares[n] for n in active)
    total_tokens = sum(self._tokens[n] for n in active)
    # share * T / S - t, scaled by S > 0 to keep a division out of the comparison; max keeps the first of ties.
    return max(active, key=lambda n: shares[n] * total_tokens - total_share * self._tokens[n])

  def _length(self, name: str, element: Any) -> int:
    if self._mix.length is not None:
      return int(self._mix.length(element))
    try:
      tokens = element[self._mix.length_key]
    except (KeyError, TypeError, IndexError):
      raise ValueError(f'source {name!r} yielded an element without {self._mix.length_key!r} '
                       f'({type(element).__name__}); expected dicts of numpy arrays') from None
    shape = np.shape(tokens)
    if not shape:
      raise ValueError(f'source {name!r} yielded a scalar {self._mix.length_key!r}; expected a 1-D token array')
    return int(shape[0])

  def _restart(self, name: str) -> None:
    """A fresh iterator of the parent in place of the exhausted one, adopted into this pipeline."""
    old = self._iters[name]
    new = self._mix._by_name[name].__iter__()
    # What grain's DatasetIterator.__init__ does for the first iterators: share one context (dataset options
    # set downstream reach every node).
    to_visit = [new]
    while to_visit:
      node = to_visit.pop()
      node._ctx = self._ctx
      to_visit.extend(node._parents)
    self._iters[name] = new
    self._parents = tuple(self._iters[n] for n in self._mix.names)
    old.close()

  def _drop(self, name: str) -> None:
    self._final[name] = self._iters[name].get_state()
    self._dropped[name] = True
    self._iters[name].close()  # Frees a parent's threads or processes; it is never read again.

  def __next__(self) -> Any:
    self._assert_not_closed()
    restarted = set()
    while not self._ended:
      name = self._pick()
      if name is None:
        self._ended = True
        break
      try:
        element = next(self._iters[name])
      except StopIteration:
        self._epochs[name] += 1
        policy = self._mix.on_end[name]
        if policy == 'stop':
          self._ended = True
        elif policy == 'drop':
          self._drop(name)
        elif name in restarted:  # A fresh iterator that yields nothing would loop forever.
          raise DataError(f'data.sources.{name}.on_end', 'repeat', 'is set for a source that yields no element',
                          "expected a source with at least one element, or on_end='drop' or 'stop'") from None
        else:
          self._restart(name)
          restarted.add(name)
        continue
      self._tokens[name] += self._length(name, element)
      self._elements[name] += 1
      return element
    raise StopIteration

  # --------------------------------------------------------------------------- state and statistics

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable dict: the parents' states, per-source counters, dropped sources, and whether ended."""
    names = self._mix.names
    return {
        'parents': {n: self._final[n] if self._dropped[n] else self._iters[n].get_state() for n in names},
        'tokens': dict(self._tokens),
        'elements': dict(self._elements),
        'epochs': dict(self._epochs),
        'dropped': dict(self._dropped),
        'ended': self._ended,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `get_state()` of an iterator of an identically built `Mix` (same sources)."""
    names = list(self._mix.names)
    if not is_state(state):
      raise UserError('the data-iterator state being restored', valid='was written by a different data pipeline '
                      '(an older jaxtrain); resume with the version that wrote it, or --start_over to move the '
                      'old run aside and train from step 0')
    saved = sorted(state['parents'])
    if saved != names:
      raise DataError('data.sources', names, f"differ from the restored data-iterator state's sources {saved}",
                      'resume with the sources the checkpoint was written with, or --start_over to move the old '
                      'run aside and train from step 0')
    for name in names:
      dropped = bool(state['dropped'][name])
      if dropped and not self._dropped[name]:
        self._final[name] = state['parents'][name]
        self._dropped[name] = True
        self._iters[name].close()
      elif not dropped:
        if self._dropped[name]:  # Rewinding to before a drop: the closed iterator cannot be reused.
          self._dropped[name] = False
          self._final[name] = None
          self._restart(name)
        self._iters[name].set_state(state['parents'][name])
      else:
        self._final[name] = state['parents'][name]
      self._tokens[name] = int(state['tokens'][name])
      self._elements[name] = int(state['elements'][name])
      self._epochs[name] = int(state['epochs'][name])
    self._ended = bool(state['ended'])

  def stats(self) -> dict[str, dict[str, Any]]:
    """Per source: tokens and elements emitted, epochs completed (parent ends seen), dropped, the observed
    token share and the current target share (renormalised over the sources still active)."""
    total = sum(self._tokens.values())
    shares = self._mix.shares
    active = math.fsum(shares[n] for n in self._mix.names if not self._dropped[n])
    return {
        n: {
            'tokens': self._tokens[n],
            'elements': self._elements[n],
            'epochs': self._epochs[n],
            'dropped': self._dropped[n],
            'share': self._tokens[n] / total if total else 0.0,
            'target': 0.0 if self._dropped[n] or active == 0 else shares[n] / active,
        }
        for n in self._mix.names
    }

  def __str__(self) -> str:
    return f'MixIterator(sources={list(self._mix.names)})'
