"""Per-set tallies of per-token cross-entropy, and what they say about a set.

What counts (the definitions the report states), by objective:
  loss           nats per scored token: sum of cross-entropy x loss weight / the scored tokens.
                 clm (a decoder, a causal rack): the weight is training's (`losses.next_token_targets`: the next
                 token is a real token of the same document, times its loss mask) and the scored tokens are
                 the weights' sum: next-token cross-entropy; perplexity exp(loss).
                 diffusion (a masked-diffusion rack): the weight is 1/t on the tokens masked at ratio t and the
                 scored tokens are every maskable token: the ELBO per token (`objectives.loss_sums`), an upper
                 bound on the nats per token; exp(loss) bounds the perplexity.
                 mlm (a masked-LM rack): weight 1 on the masked tokens, which are the scored tokens: the mean
                 masked-token cross-entropy (no likelihood: no bits per byte).
  bits per byte  total nats / ln 2 / bytes, bytes = the UTF-8 bytes of the scored tokens, each token counted by
                 the text it stands for (`Tokenizer.token_bytes`; special tokens such as EOS have none, their
                 nats still count); a bound for diffusion
  masked CE      (masked objectives) unweighted mean cross-entropy of the masked tokens, the job's "eval mCE"
  by position    mean loss of the scored tokens at each position within their document's piece (clm: 1 is the
                 second token, the first is never predicted)
  top tokens     the scored tokens with the largest total loss
  chat           (clm) predictions of loss-masked tokens (the assistant's) vs the other tokens of a document
                 (system, user, tool turns and template markers), which training never learns from
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

TOP = 20


OBJECTIVES = ('clm', 'diffusion', 'mlm')


class Tally:
  """Sums over the scored tokens of one set (or of several, by `merged`), for a vocabulary of
  `len(token_bytes)` ids, rows of `seq_len` positions and a model trained with `objective` (see the module
  docstring: what the loss, the scored tokens and a token's position are)."""

  def __init__(self, token_bytes: np.ndarray, seq_len: int, objective: str = 'clm'):
    if objective not in OBJECTIVES:
      raise ValueError(f'objective {objective!r}; valid: {", ".join(OBJECTIVES)}')
    self.token_bytes = np.asarray(token_bytes, np.int64)
    self.seq_len, self.objective = seq_len, objective
    vocab = len(self.token_bytes)
    self.nats = self.tokens = self.bytes = 0.0
    self.other_nats = self.other_tokens = 0.0
    self.masked_nats = self.masked = 0.0
    self.pos_nats, self.pos_tokens = np.zeros(seq_len), np.zeros(seq_len)
    self.tok_nats, self.tok_count = np.zeros(vocab), np.zeros(vocab)

  def add(self, out: dict[str, np.ndarray], positions: np.ndarray) -> None:
    """One batch: the score function's fetched outputs ('ce', 'weights', 'targets'; 'count' the scored tokens
    where they are not the weights; 'scored' for clm) and the batch's `positions` (B, T)."""
    ce = np.asarray(out['ce'], np.float64)
    w = np.asarray(out['weights'], np.float64)
    count = np.asarray(out['count'], np.float64).ravel() if 'count' in out else w.ravel()
    targets = np.asarray(out['targets']).ravel()
    wce = (ce * w).ravel()
    self.nats += float(wce.sum())
    self.tokens += float(count.sum())
    self.bytes += float((self.token_bytes[targets] * count).sum())
    if self.objective == 'clm':
      # The prediction at t is of the token at t + 1: its position in the document's piece.
      target_pos = np.concatenate([positions[:, 1:], np.zeros_like(positions[:, :1])], axis=1).ravel()
    else:  # a masked token is predicted where it stands
      target_pos = np.asarray(positions).ravel()
      hit = w > 0  # masked (a masked token's weight is 1/t or 1)
      self.masked_nats += float((ce * hit).sum())
      self.masked += float(hit.sum())
    if 'scored' in out:
      other = np.asarray(out['scored'], np.float64) * (w == 0)  # scored, but outside the loss mask
      self.other_nats += float((ce * other).sum())
      self.other_tokens += float(other.sum())
    self.pos_nats += np.bincount(target_pos, weights=wce, minlength=self.seq_len)[:self.seq_len]
    self.pos_tokens += np.bincount(target_pos, weights=count, minlength=self.seq_len)[:self.seq_len]
    self.tok_nats += np.bincount(targets, weights=wce, minlength=len(self.tok_nats))[:len(self.tok_nats)]
    self.tok_count += np.bincount(targets, weights=count, minlength=len(self.tok_nats))[:len(self.tok_nats)]

  @classmethod
  def merged(cls, tallies: Sequence[Tally]) -> Tally:
    """One tally of all the tokens of `tallies` (micro averages)."""
    out = cls(tallies[0].token_bytes, tallies[0].seq_len, tallies[0].objective)
    for t in tallies:
      for name in ('nats', 'tokens', 'bytes', 'other_nats', 'other_tokens', 'masked_nats', 'masked'):
        setattr(out, name, getattr(out, name) + getattr(t, name))
      for name in ('pos_nats', 'pos_tokens', 'tok_nats', 'tok_count'):
        setattr(out, name, getattr(out, name) + getattr(t, name))
    return out

  def metrics(self) -> dict[str, float]:
    """loss, perplexity, bits per byte (nan for mlm: its loss is no likelihood), tokens, bytes, nats; for the
    masked objectives also masked_ce and masked (tokens)."""
    loss = self.nats / self.tokens if self.tokens else math.nan
    out = {'loss': loss, 'ppl': math.exp(min(loss, 50.0)) if self.tokens else math.nan,
           'bits_per_byte': self.nats / math.log(2) / self.bytes if self.bytes and self.objective != 'mlm' else
           math.nan, 'tokens': self.tokens, 'bytes': self.bytes, 'nats': self.nats}
    if self.objective != 'clm':
      out['masked_ce'] = self.masked_nats / self.masked if self.masked else math.nan
      out['masked'] = self.masked
    return out

  def positions(self) -> dict[str, list]:
    """Mean loss by position of the target token within its piece, at the positions that hold any."""
    at = np.flatnonzero(self.pos_tokens)
    return {'position': at.tolist(), 'loss': (self.pos_nats[at] / self.pos_tokens[at]).tolist(),
            'tokens': self.pos_tokens[at].tolist()}

  def top_tokens(self, decode: Any, k: int = TOP) -> list[dict[str, Any]]:
    """The `k` target tokens of largest total loss: id, text (`decode([id])`), count, total and mean loss."""
    order = np.argsort(-self.tok_nats, kind='stable')[:k]
    return [{'id': int(i), 'token': decode([int(i)]), 'count': float(self.tok_count[i]),
             'total': float(self.tok_nats[i]), 'mean': float(self.tok_nats[i] / self.tok_count[i])}
            for i in order if self.tok_count[i] > 0]

  def chat(self) -> dict[str, dict[str, float]] | None:
    """Loss on loss-masked (assistant) vs other tokens; None when every scored token is loss-masked."""
    if not self.other_tokens:
      return None
    return {'assistant': {'tokens': self.tokens, 'loss': self.nats / self.tokens if self.tokens else math.nan},
            'other': {'tokens': self.other_tokens, 'loss': self.other_nats / self.other_tokens}}


def macro(per_set: Sequence[dict[str, float]]) -> dict[str, float]:
  """Unweighted means over sets of loss and bits per byte (perplexity of the mean loss)."""
  loss = float(np.mean([m['loss'] for m in per_set]))
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)),
          'bits_per_byte': float(np.mean([m['bits_per_byte'] for m in per_set])), 'sets': len(per_set)}
