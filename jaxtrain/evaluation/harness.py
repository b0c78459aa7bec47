"""lm-evaluation-harness backend: `jaxtrain eval --harness=TASKS` and the `jaxtrain` model of lm-eval.

  jaxtrain eval --workdir=runs/tiny --harness=jaxtrain_local               # the two tasks shipped in tasks/
  jaxtrain eval --model-dir=/tmp/tiny-hf --harness=jaxtrain_python_choice --limit=10

  from jaxtrain.evaluation import harness                                  # from Python
  lm = harness.model_class()(workdir='runs/tiny')                          # also registered as 'jaxtrain'
  lm_eval.simple_evaluate(model=lm, tasks=['jaxtrain_local'], task_manager=harness.task_manager([])[0])

The model is a run's checkpoint (newest or --step; a LoRA or QLoRA run through its own param transform, as
`score.Scorer` restores it, with the run's own tokenizer) or a Hugging Face directory read by `jaxtrain.hf`
(`jaxtrain export` output, Llama, Qwen, Mistral, GPT-2). Its window (`max_length`) is the run's data.seq_len,
or the directory's max_position_embeddings (as lm-eval's HF backend reads it); --max-length overrides both.

  loglikelihood           requests (context + continuation, left-truncated to the window as lm-eval's HF
                          backend does) packed first-fit into the rows of fixed-shape batches [rows, window],
                          one segment per request; one jitted function returns every segment's summed
                          log-probability and whether greedy decoding gives it (one compile for all requests)
  loglikelihood_rolling   lm-eval's rolling windows of a text (each token predicted once), packed the same way
  generate_until          `stackwise.inference.generate` (KV cache, fixed shapes, batched rows): greedy, or
                          sampled for do_sample; cut at the first stop string (`until`) or EOS

Tokenization follows lm-eval's HF backend: a run's text is encoded without special tokens (as it trained);
a Hugging Face directory's with its tokenizer's defaults (a Llama tokenizer adds BOS). An empty context is
the prefix token (BOS, else EOS). lm_eval is imported only here and only when used, so `import jaxtrain`
works without it; a missing lm-eval is one line naming `pip install 'jaxtrain[eval]'`.

Tasks: the names in the shipped folder tasks/ and in each --include-path folder are found without reading
lm-eval's ~15,000 built-in task files (seconds); any other name is looked up among those. A relative
`data_files` (or `data_dir`) in a local task's YAML is read relative to that YAML file, from any working
directory: the task's config is loaded here and the paths made absolute before lm-eval builds it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import models
from jaxtrain.evaluation import EvalError
from jaxtrain.models import ModelConfig

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tasks')
HARNESS = 'harness'  # RUN/eval/harness/: what `jaxtrain eval --harness` writes
# Tokens per packed batch: rows = BATCH_TOKENS // window (at least 1). Small batches waste less on the last,
# partly filled one; on CPU 1024-2048 scored the shipped task's requests fastest (benchmarks/harness.py).
BATCH_TOKENS = 2048
MAX_SEGMENTS = 256  # requests one row holds at most (the per-segment outputs are [rows, this])
DEFAULT_MAX_GEN = 256  # max_gen_toks of a task that names none (lm-eval's HF backend's default)
_INSTALL = "pip install 'jaxtrain[eval]'"


def lm_eval() -> Any:
  """The lm_eval module; an EvalError saying how to install it when it is missing."""
  try:
    import lm_eval as module
    import lm_eval.api.model  # noqa: F401  (the submodules the backend needs)
    import lm_eval.api.registry  # noqa: F401
    import lm_eval.models.utils  # noqa: F401
    import lm_eval.tasks  # noqa: F401
  except ImportError as e:
    raise EvalError('--harness', valid=f'needs lm-evaluation-harness, which is not installed ({e}): {_INSTALL}'
                    ) from None
  return module


# ---------------------------------------------------------------------------------------------------------
# The model: a run's checkpoint or a Hugging Face directory, as full Transformer parameters on one device


@dataclasses.dataclass
class Model:
  """What the harness scores: Transformer `params` (on device) of architecture `mc`, run as `execution`;
  `tokenizer` a transformers tokenizer; `add_special` what lm-eval's HF backend passes as add_special_tokens by
  default (False for a run: it trained without them; None for a Hugging Face directory: its defaults);
  `prefix_id` the token an empty context stands for; `window` the tokens a request holds; `what` a line
  naming it; `out_dir` where results go; `step` the checkpoint (None for a directory)."""

  params: Any
  mc: ModelConfig
  execution: Any
  tokenizer: Any
  eos_id: int
  prefix_id: int
  add_special: bool | None
  window: int
  what: str
  out_dir: str
  step: int | None = None


def _check_window(max_length: int | None) -> None:
  if max_length is not None and max_length < 2:
    raise EvalError('--max-length', max_length, 'expected at least 2 tokens (a context and a continuation)')


def _check_positions(mc: Any, max_length: int | None) -> None:
  """A learned position table (GPT-2) has no row past its length: a longer window would read clamped rows."""
  if max_length is not None and mc.positions == 'learned' and max_length > mc.max_positions:
    raise EvalError('--max-length', max_length, f'the model has learned positions for {mc.max_positions} tokens '
                    f'only; give at most {mc.max_positions}')


def resolve_run(workdir: str, step: int | None = None, best: bool = False) -> tuple[Any, int]:
  """(the run's config, the checkpoint step to score: `step`, the run's best with `best`, else the newest) of
  the plain, LoRA or QLoRA run in `workdir`. Reads no weights. One-line EvalError for a directory that is no
  run, a StackWise run, no checkpoint or an unknown step."""
  from jaxtrain.train import export, rundir

  if not os.path.isdir(workdir):
    raise EvalError('--workdir', workdir, 'no such directory; give a run directory (it holds config.json)')
  config = rundir.load_config(workdir, EvalError)
  if config.stackwise.num_stacks:
    raise EvalError(f'--workdir={workdir} is a StackWise run', valid='export its rack (`jaxtrain export '
                    f'--workdir={workdir} --out=DIR`, clm racks) and evaluate that with --model-dir=DIR')
  steps = export.checkpoint_steps(workdir)
  if not steps:
    raise EvalError(f'--workdir={workdir} holds no complete checkpoint in {workdir}/checkpoints; train first')
  if step is not None and step not in steps:
    raise EvalError('--step', step, f'no such checkpoint in {workdir}/checkpoints; available: '
                    f'{", ".join(map(str, steps))}')
  if best:
    from jaxtrain.train import earlystop
    return config, earlystop.best_checkpoint(workdir, steps)
  return config, steps[-1] if step is None else step


def load_run(workdir: str, step: int | None = None, max_length: int | None = None, best: bool = False) -> Model:
  """Checkpoint `step` of the run in `workdir` (`resolve_run`), its adapters applied by the run's own param
  transform (as `score.Scorer` restores it), with the run's tokenizer; window data.seq_len (or `max_length`)."""
  from jaxtrain.data import tokenizer as tokenizer_lib
  from jaxtrain.evaluation.score import Scorer
  from jaxtrain.models import execution as execution_lib
  from jaxtrain.train import rundir

  _check_window(max_length)
  config, step = resolve_run(workdir, step, best)
  tokenizer = rundir.load_tokenizer(config, workdir)
  scorer = Scorer(config, tokenizer, workdir)  # the run's state layout and transform (LoRA, QLoRA)
  _check_positions(scorer.mc, max_length)  # the model's (an init.from_hf run's: its checkpoint's architecture)
  with jax.set_mesh(scorer.mesh):
    weights = scorer.weights(step)
    transform = scorer.built.transform
    # The parameters the run's forward pass sees, computed once (adapters merged, a 4-bit base dequantized).
    params = weights['params'] if transform is None else jax.jit(
        lambda w: transform(w['params'], w.get('frozen'), None))(weights)
    params = jax.device_get(params)
  params = jax.device_put(params, jax.devices()[0])
  mc = scorer.mc
  window = int(max_length or config.data.seq_len)
  return Model(params, mc, execution_lib.from_model(config.model, mc), tokenizer_lib.as_transformers(tokenizer),
               tokenizer.eos_id, tokenizer.eos_id, False, window,
               f'checkpoint step {step} of {workdir} ({scorer.describe(step)})',
               os.path.join(workdir, 'eval', HARNESS), step)


def check_hf(model_dir: str) -> ModelConfig:
  """The architecture of the Hugging Face directory `model_dir`, its weights' names and shapes checked and its
  tokenizer present; reads no weights. One-line EvalError (or HfError) otherwise."""
  from jaxtrain.hf import config as hf_config, weights as hf_weights

  if not os.path.isdir(model_dir):
    raise EvalError('--model-dir', model_dir, 'no such directory; give a Hugging Face model directory (config.json, '
                    '*.safetensors and the tokenizer files, as `jaxtrain export` writes)')
  mc = hf_config.model_config(model_dir)
  hf_weights.check_weights(model_dir, mc)
  if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ('tokenizer.json', 'tokenizer_config.json')):
    raise EvalError('--model-dir', model_dir, 'holds no tokenizer (tokenizer.json); `jaxtrain export` writes it '
                    'beside the weights')
  return mc


def load_hf(model_dir: str, max_length: int | None = None) -> Model:
  """The Hugging Face model in `model_dir` (`jaxtrain export` output, or any architecture `jaxtrain.hf`
  reads) with its own tokenizer; window max_position_embeddings (2048 when it names none) or `max_length`."""
  import ml_collections

  from jaxtrain import data
  from jaxtrain.data import tokenizer as tokenizer_lib
  from jaxtrain.hf import weights as hf_weights
  from jaxtrain.models import execution as execution_lib

  _check_window(max_length)
  mc = check_hf(model_dir)
  _check_positions(mc, max_length)
  tokenizer = data.load_tokenizer(ml_collections.ConfigDict({'tokenizer': model_dir}))
  hf_tok = tokenizer_lib.as_transformers(tokenizer)
  params = jax.device_put(hf_weights.load_params(model_dir, mc), jax.devices()[0])
  prefix = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else tokenizer.eos_id
  window = int(max_length or mc.max_positions or 2048)
  return Model(params, mc, execution_lib.default(mc), hf_tok, tokenizer.eos_id, prefix, None, window,
               f'the Hugging Face model in {model_dir} ({models.count_params(params) / 1e6:.2f}M params)',
               os.path.join(model_dir, 'eval', HARNESS))


# ---------------------------------------------------------------------------------------------------------
# Packing requests into fixed-shape batches, and the one jitted scoring function


def pack(lengths: Sequence[int], rows: int, width: int, segments: int = MAX_SEGMENTS) -> list[list[list[int]]]:
  """Request indices placed in batches of `rows` rows of `width` tokens, each row holding at most `segments`
  requests: first-fit decreasing (longest first, each into the first row of the open batch with room; a
  batch closes when a request fits none of its rows). Every length must be 1..width."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches: list[list[list[int]]] = []
  room: list[int] = []
  for i in order:
    n = lengths[i]
    if not 1 <= n <= width:
      raise ValueError(f'request {i} holds {n} tokens; rows hold 1..{width}')
    row = next((r for r in range(len(room)) if room[r] >= n and len(batches[-1][r]) < segments), None)
    if row is None:
      if not batches or len(batches[-1]) == rows:
        batches.append([])
        room = []
      batches[-1].append([])
      room.append(width)
      row = len(room) - 1
    batches[-1][row].append(i)
    room[row] -= n
  return batches


def batch_arrays(seqs: Sequence[tuple[list[int], int]], batch: list[list[int]], rows: int, width: int
                 ) -> dict[str, np.ndarray]:
  """The arrays of one packed batch: `seqs[i]` = (tokens of request i: its input then one more token, the
  number of final tokens scored); row r holds the requests `batch[r]` one after the other as segments 1, 2,
  ... with positions from 0; `targets` the next token at each position and `scored` 1 where it counts."""
  out = {k: np.zeros((rows, width), np.int32) for k in ('tokens', 'segment_ids', 'positions', 'targets', 'scored')}
  for r, members in enumerate(batch):
    at = 0
    for s, i in enumerate(members, start=1):
      ids, n_scored = seqs[i]
      n = len(ids) - 1
      sl = slice(at, at + n)
      out['tokens'][r, sl], out['targets'][r, sl] = ids[:-1], ids[1:]
      out['segment_ids'][r, sl], out['positions'][r, sl] = s, np.arange(n)
      out['scored'][r, at + n - n_scored:at + n] = 1
      at += n
  return out


def make_segment_fn(graphdef: Any, segments: int) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
  """`fn(params, batch) -> (logprob (rows, segments), greedy (rows, segments))`: per segment s + 1 of each row,
  the summed log-probability of its scored targets and whether each is the argmax of its logits (lm-eval's
  is_greedy). Jitted: one compile for every batch of one shape."""
  def fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    from jaxtrain.train import losses

    logits = models.apply(graphdef, params, batch)  # (B, T, V) float32
    ce, _ = losses.token_cross_entropy(logits, batch['targets'])
    scored = batch['scored'].astype(jnp.float32)
    missed = (jnp.argmax(logits, axis=-1) != batch['targets']).astype(jnp.float32) * scored
    member = (batch['segment_ids'][..., None] == jnp.arange(1, segments + 1)).astype(jnp.float32)  # (B, T, S)
    logprob = -jnp.einsum('bt,bts->bs', ce * scored, member, precision=jax.lax.Precision.HIGHEST)
    return logprob, jnp.einsum('bt,bts->bs', missed, member) == 0
  return jax.jit(fn)


class Engine:
  """A model's scoring and generation: `loglikelihoods` of token requests in packed batches of
  [rows, window], and `generate` through the KV-cache sampler. `compiles` counts the scoring programs."""

  def __init__(self, model: Model, batch_tokens: int = BATCH_TOKENS):
    self.model = model
    self.width = model.window
    self.rows = max(1, batch_tokens // self.width)
    self.segments = min(self.width, MAX_SEGMENTS)
    graphdef, _, _ = models.describe(model.mc, model.execution)
    self.fn = make_segment_fn(graphdef, self.segments)
    self.seconds = 0.0
    self.counts = {'loglikelihood': 0, 'loglikelihood_rolling': 0, 'generate_until': 0}

  @property
  def compiles(self) -> int:
    return self.fn._cache_size()  # pylint: disable=protected-access

  def loglikelihoods(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) per (context ids, continuation
    ids): the last window + 1 tokens of context + continuation (lm-eval's left truncation), scored together."""
    seqs = []
    for k, (ctx, cont) in enumerate(requests):
      if not cont or not ctx:
        raise ValueError(f'request {k}: a context and a continuation of at least one token each are needed')
      if len(cont) > self.width:
        raise EvalError(f'a continuation of {len(cont)} tokens', valid=f'is longer than the window of {self.width} '
                        'tokens; give a larger --max-length')
      seqs.append(((ctx + cont)[-(self.width + 1):], len(cont)))
    t = time.perf_counter()
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    for batch in pack([len(s) - 1 for s, _ in seqs], self.rows, self.width, self.segments):
      logprob, greedy = jax.device_get(self.fn(self.model.params, batch_arrays(seqs, batch, self.rows, self.width)))
      for r, members in enumerate(batch):
        for s, i in enumerate(members):
          out[i] = (float(logprob[r, s]), bool(greedy[r, s]))
    self.seconds += time.perf_counter() - t
    return out  # type: ignore[return-value]

  def generate(self, contexts: Sequence[list[int]], max_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """The new token ids of each context (ending at EOS, which is kept), `max_tokens` at most, by KV-cache
    decoding in the window (a longer context keeps its last tokens). Greedy at temperature 0."""
    from jaxtrain.stackwise import inference

    settings = inference.Settings(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed)
    try:
      settings.check(self.width, True, prefix='')
    except inference.SampleError as e:
      raise EvalError(f'generation: {e.line()}') from None
    if not contexts:
      return []
    t = time.perf_counter()
    # Whole batches of the sampler's rows (copies of the first context fill the last): one compiled shape for
    # any number of contexts, where `inference.generate` would size a smaller last group to fit.
    n = len(contexts)
    padded = list(contexts) + [contexts[0]] * (-n % inference.BATCH)
    samples = inference.generate(self.rack, _Ids(padded, self.model), [str(i) for i in range(len(padded))],
                                 settings, self.width)
    self.seconds += time.perf_counter() - t
    return [list(s.ids) for s in samples[:n]]

  @functools.cached_property
  def rack(self) -> Any:
    """The model as the causal rack of one stack that `inference.generate` decodes."""
    from jaxtrain.stackwise import inference
    return inference.from_transformer(self.model.params, self.model.mc, self.model.execution)


class _Ids:
  """The tokenizer `inference.generate` sees: prompt k (the string 'k') encodes to the ids given, so contexts
  are tokenized once, by the harness's rules; decoding is the model's own."""

  def __init__(self, contexts: Sequence[list[int]], model: Model):
    self.contexts, self.eos_id, self.vocab_size = contexts, model.eos_id, len(model.tokenizer)
    self._decode = model.tokenizer.decode

  def encode(self, prompt: str) -> list[int]:
    return list(self.contexts[int(prompt)])

  def decode(self, ids: Sequence[int]) -> str:
    return self._decode(list(ids))


# ---------------------------------------------------------------------------------------------------------
# The lm-eval model


@functools.cache
def model_class() -> type:
  """`JaxtrainLM`, lm-eval's TemplateLM over a run or a Hugging Face directory, registered as model 'jaxtrain'
  (`lm_eval.simple_evaluate(model='jaxtrain', model_args='workdir=RUN')` after this is called once)."""
  lm_eval()
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models import utils as model_utils

  @register_model('jaxtrain')
  class JaxtrainLM(TemplateLM):
    """`JaxtrainLM(workdir=RUN [, step=N])` or `JaxtrainLM(model_dir=DIR)`; `max_length` overrides the window,
    `batch_tokens` the tokens per packed batch; `model`: an already loaded `Model`."""

    def __init__(self, workdir: str | None = None, model_dir: str | None = None, step: int | None = None,
                 max_length: int | None = None, batch_tokens: int = BATCH_TOKENS, model: Model | None = None,
                 **unused: Any):
      super().__init__()
      if unused:
        raise EvalError(f'model_args {", ".join(sorted(unused))}', valid='the jaxtrain model takes workdir, '
                        'model_dir, step, max_length and batch_tokens')
      if model is None:
        if (workdir is None) == (model_dir is None):
          raise EvalError('model_args', valid='give workdir=RUN or model_dir=DIR (one of them)')
        model = load_run(workdir, step, max_length) if workdir else load_hf(model_dir, max_length)
      self.model = model
      self.engine = Engine(model, int(batch_tokens))
      self.tokenizer = model.tokenizer

    @property
    def eot_token_id(self) -> int:
      return self.model.eos_id

    @property
    def prefix_token_id(self) -> int:
      return self.model.prefix_id

    @property
    def max_length(self) -> int:
      return self.model.window

    @property
    def max_gen_toks(self) -> int:
      return min(DEFAULT_MAX_GEN, self.model.window - 1)

    @property
    def tokenizer_name(self) -> str:
      return self.model.tokenizer.name_or_path.replace('/', '__')

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
      """As lm-eval's HF backend: the model's default special tokens unless told, none before a BOS already
      in the text."""
      add = self.model.add_special if add_special_tokens is None else add_special_tokens
      if add_special_tokens is None and self.model.tokenizer.bos_token and string.startswith(
          self.model.tokenizer.bos_token):
        add = False
      return self.model.tokenizer.encode(string, **({} if add is None else {'add_special_tokens': add}))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
      return self.model.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
      for key, _, cont in requests:
        if key is not None and not cont:  # lm-eval's HF backend asserts here: a task's mistake, said in one line
          context, continuation = key
          raise EvalError(f'an lm-eval request: the continuation {continuation!r} after the context '
                          f'{context[-40:]!r} has no token of its own (the tokenizer merges it into the context\'s '
                          "last token, and only the tokens after the context's are scored)", valid="separate them "
                          'in the task (e.g. target_delimiter: " ", or a context ending in a newline)')
      out = self.engine.loglikelihoods([(list(ctx), list(cont)) for _, ctx, cont in requests])
      for (key, _, _), answer in zip(requests, out, strict=True):
        if key is not None:  # rolling windows carry no key: their sums are cached per text
          self.cache_hook.add_partial('loglikelihood', key, answer)
      self.engine.counts['loglikelihood'] += sum(key is not None for key, _, _ in requests)
      return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
      """Each text's log-likelihood over lm-eval's rolling windows of the model's window (every token
      predicted once, from the prefix token on), all windows of all texts packed together."""
      windows, owner = [], []
      for k, (text,) in enumerate(req.args for req in requests):
        for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
            context_len=1)):
          windows.append((None, ctx, cont))
          owner.append(k)
      sums = [0.0] * len(requests)
      for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
        sums[k] += logprob
      for req, total in zip(requests, sums, strict=True):
        self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
      self.engine.counts['loglikelihood_rolling'] += len(requests)
      return sums

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
      """Each context's continuation, greedy unless do_sample, up to max_gen_toks tokens, cut before the
      first stop string (`until`, and the EOS text); requests with the same settings generate together."""
      groups: dict[str, list[int]] = {}
      for k, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
      out: list[str] = [''] * len(requests)
      eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
      for members in groups.values():
        kwargs = model_utils.normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
        until = model_utils.handle_stop_sequences(kwargs.pop('until', None), eos=eos)
        max_tokens = int(kwargs.pop('max_gen_toks'))
        temperature, do_sample = float(kwargs.pop('temperature', 0.0)), kwargs.pop('do_sample')
        sampling = {'temperature': temperature if do_sample else 0.0,
                    'top_k': int(kwargs.pop('top_k', 0) or 0), 'top_p': float(kwargs.pop('top_p', 1.0) or 1.0),
                    'seed': int(kwargs.pop('seed', 0) or 0)}
        if kwargs:
          raise EvalError(f'generation_kwargs {", ".join(sorted(kwargs))}', valid='the jaxtrain model takes until, '
                          'max_gen_toks, do_sample, temperature, top_k, top_p and seed')
        contexts = [self.tok_encode(requests[k].args[0]) or [self.prefix_token_id] for k in members]
        for k, ids in zip(members, self.engine.generate(contexts, max_tokens, **sampling), strict=True):
          text = model_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
          out[k] = text
          self.cache_hook.add_partial('generate_until', requests[k].args, text)
      self.engine.counts['generate_until'] += len(requests)
      return out

  return JaxtrainLM


# ---------------------------------------------------------------------------------------------------------
# Tasks: local folders first, lm-eval's built-in ones only when a name is not local


def _absolute(value: Any, base: pathlib.Path) -> Any:
  """data_files (a path, a list, or {split: path or list}) with relative local paths made absolute from `base`."""
  if isinstance(value, str):
    return value if '://' in value or os.path.isabs(os.path.expanduser(value)) else str(base / value)
  if isinstance(value, list):
    return [_absolute(v, base) for v in value]
  if isinstance(value, dict):
    return {k: _absolute(v, base) for k, v in value.items()}
  return value


def _anchor_local_paths(tm: Any, roots: Sequence[str]) -> None:
  """The tasks of `tm` whose YAML lies under `roots`, with relative data_files/data_dir made absolute from the
  YAML's folder: their entries carry that config (lm-eval builds a task from an entry's config when it has
  no YAML path), so the task reads the same files from any working directory."""
  from lm_eval.tasks._index import Entry, Kind
  from lm_eval.tasks._yaml_loader import load_yaml

  resolved = [pathlib.Path(r).resolve() for r in roots]
  for name, entry in list(tm.task_index.items()):
    path = entry.yaml_path
    if entry.kind is not Kind.TASK or path is None or not any(path.resolve().is_relative_to(r) for r in resolved):
      continue
    kwargs = (entry.cfg or {}).get('dataset_kwargs') or {}
    if not any(k in kwargs for k in ('data_files', 'data_dir')):
      continue
    cfg = load_yaml(path, resolve_func=True, recursive=True)
    dataset_kwargs = dict(cfg.get('dataset_kwargs') or {})
    for key in ('data_files', 'data_dir'):
      if key in dataset_kwargs:
        dataset_kwargs[key] = _absolute(dataset_kwargs[key], path.resolve().parent)
    cfg['dataset_kwargs'] = dataset_kwargs
    tm.task_index[name] = Entry(name=name, kind=entry.kind, yaml_path=None, cfg=cfg, tags=entry.tags)


def _builtin_mentions(names: Sequence[str]) -> list[str]:
  """The names that appear at all in the text of lm-eval's built-in task YAMLs: a name found nowhere there
  is surely not a built-in task, group or tag (reading the text takes a second; indexing it, ~15 s)."""
  import lm_eval.tasks as tasks_pkg

  left = set(names)
  for path in pathlib.Path(tasks_pkg.__file__).parent.rglob('*.yaml'):
    text = path.read_text(encoding='utf-8', errors='replace')
    left -= {n for n in left if n in text}
    if not left:
      break
  return [n for n in names if n not in left]


def check_include_paths(include_paths: Sequence[str]) -> None:
  for p in include_paths:
    if not os.path.isdir(p):
      raise EvalError('--include-path', p, 'no such directory; give a folder of lm-eval task YAML files')


def task_manager(names: Sequence[str], include_paths: Sequence[str] = (), say: Callable[[str], Any] = print
                 ) -> tuple[Any, list[str]]:
  """(an lm-eval TaskManager that knows `names`, the local task names) over the shipped tasks/, the
  `include_paths` and, only when some name is not local, lm-eval's built-in tasks. One-line EvalError for an
  include path that is no folder or a name no task, group or tag has (listing the local ones)."""
  lm_eval()
  from lm_eval.tasks import TaskManager

  check_include_paths(include_paths)
  roots = [TASKS_DIR, *[os.path.abspath(p) for p in include_paths]]
  tm = TaskManager(include_path=roots, include_defaults=False)
  local = list(tm.all_tasks)
  missing = [n for n in names if n not in local]
  if missing:
    unknown = [n for n in missing if n not in _builtin_mentions(missing)]
    if not unknown:
      say(f'looking up {", ".join(missing)} among lm-eval\'s built-in tasks (indexing them takes a few seconds)')
      tm = TaskManager(include_path=roots, include_defaults=True)
      unknown = [n for n in missing if n not in tm.all_tasks]
    if unknown:
      close = sorted({c for n in unknown for c in difflib.get_close_matches(n, list(tm.all_tasks), 3, 0.75)})
      raise EvalError('--harness', ','.join(unknown), 'no such lm-eval task, group or tag; local tasks: '
                      f'{", ".join(local)}' + (f'; did you mean {", ".join(close)}?' if close else '') +
                      '; other folders of task YAMLs: --include-path=DIR')
  _anchor_local_paths(tm, roots)
  return tm, local


def load_tasks(tm: Any, names: Sequence[str]) -> list[Any]:
  """The lm-eval Task and Group objects of `names` (a tag: its tasks), their datasets read. A task that does not
  load (a data file missing, a malformed YAML, a dataset that is not local while offline) is one EvalError."""
  out = []
  for name in names:
    try:
      loaded = tm.load([name])
    except Exception as e:  # lm-eval, jinja and datasets raise many types for a broken task
      reason = ' '.join(str(e).split())[:300] or type(e).__name__
      raise EvalError('--harness', name, f'the task does not load ({type(e).__name__}: {reason})') from None
    group = loaded['groups'].get(name)
    out += [group] if group is not None else list(loaded['tasks'].values())
  return out


# ---------------------------------------------------------------------------------------------------------
# What `jaxtrain eval --harness` does


def parse_tasks(text: str) -> list[str]:
  names = [n.strip() for n in text.split(',') if n.strip()]
  if not names:
    raise EvalError('--harness', text, 'expected comma-separated lm-eval task names, e.g. jaxtrain_local')
  return list(dict.fromkeys(names))


def results_path(model: Model, names: Sequence[str], limit: int | None) -> str:
  """OUT_DIR/[STEP-]TASKS[-limitN].json (tasks joined by '+', hashed when long)."""
  tasks = '+'.join(names)
  if len(tasks) > 80:
    tasks = '+'.join(names[:2]) + f'+{len(names) - 2}more-' + hashlib.sha1(tasks.encode()).hexdigest()[:8]
  stem = (f'{model.step}-' if model.step is not None else '') + tasks + (f'-limit{limit}' if limit else '')
  return os.path.join(model.out_dir, stem + '.json')


def evaluate(*, workdir: str | None = None, model_dir: str | None = None, tasks: str, step: int | None = None,
             best: bool = False, include_paths: Sequence[str] = (), limit: int | None = None,
             max_length: int | None = None, say: Callable[[str], Any] = print) -> dict:
  """Runs lm-eval `tasks` (comma-separated names) on checkpoint `step` of the run in `workdir` (default: the
  newest; `best`: its best by train.early_stop.metric) or on the Hugging Face model in `model_dir`, `limit`
  examples per task at most; writes the harness's results JSON (and the per-example samples beside it) and
  prints its table. Every mistake raises its
  one-line EvalError before anything is written. Returns the results."""
  if (workdir is None) == (model_dir is None):
    raise EvalError('--harness', valid='give the model: --workdir=RUN (a run\'s checkpoint) or --model-dir=DIR (a '
                    'Hugging Face directory, e.g. `jaxtrain export` output), one of them')
  if model_dir is not None and (step is not None or best):
    raise EvalError('--best' if best else f'--step={step}', valid='chooses a checkpoint of --workdir; a --model-dir '
                    'holds one model')
  if best and step is not None:
    raise EvalError(f'--best and --step={step}', valid='choose one: the best checkpoint, or a step')
  if limit is not None and limit < 1:
    raise EvalError('--limit', limit, 'expected at least 1 example per task')
  _check_window(max_length)
  names = parse_tasks(tasks)
  check_include_paths(include_paths)
  # Everything that can be wrong with the model, before lm-eval's imports (seconds) and its task files.
  if workdir is not None:
    step = resolve_run(workdir, step, best)[1]
  else:
    check_hf(model_dir)
  evaluator = lm_eval()
  tm, _ = task_manager(names, include_paths, say)
  built = load_tasks(tm, names)  # the data of each task read now: a broken task fails before the model loads
  t0 = time.perf_counter()
  model = load_run(workdir, step, max_length) if workdir is not None else load_hf(model_dir, max_length)
  lm = model_class()(model=model)
  from lm_eval.utils import handle_non_serializable, make_table

  results = evaluator.simple_evaluate(model=lm, tasks=built, task_manager=tm, limit=limit, log_samples=True)
  engine = lm.engine
  results['jaxtrain'] = {
      'model': model.what, 'step': model.step, 'window': model.window, 'batch': [engine.rows, engine.width],
      'segments_per_row': engine.segments, 'score_compiles': engine.compiles, 'requests': engine.counts,
      'model_seconds': round(engine.seconds, 3), 'total_seconds': round(time.perf_counter() - t0, 3),
      'include_paths': [os.path.abspath(p) for p in include_paths], 'limit': limit}
  samples = results.pop('samples', {})
  path = results_path(model, names, limit)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write(path, json.dumps(results, indent=1, default=handle_non_serializable))
  lines = [json.dumps({'task': task, **s}, default=handle_non_serializable) for task, rows in samples.items()
           for s in rows]
  _write(path[:-len('.json')] + '_samples.jsonl', '\n'.join(lines) + '\n')
  say(f'lm-eval {", ".join(names)} on {model.what}; window {model.window} tokens, batches of {engine.rows} x '
      f'{engine.width}' + (f', at most {limit} examples per task' if limit else ''))
  say(make_table(results).rstrip())
  if results.get('groups'):
    say(make_table(results, 'groups').rstrip())
  say(f'wrote {path} and {os.path.basename(path)[:-len(".json")]}_samples.jsonl beside it')
  return results


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
