"""Generate text with a run's model: `jaxtrain generate --workdir=RUN [--prompt=TEXT ...] [--max_tokens=N]
[--temperature=T --seed=S] [--steps=N]` (`jaxtrain.stackwise.inference`).

  jaxtrain generate --workdir=runs/stackwise                      # the final rack, the run's sample settings
  jaxtrain generate --workdir=runs/stackwise --prompt='def f(' --prompt='import ' --max_tokens=48 --steps=32
  jaxtrain generate --workdir=runs/tiny --temperature=0.8 --top_p=0.9 --seed=1 --format=jsonl

A plain run samples its newest checkpoint (or --step); a StackWise run the rack of its last saved stage (or
--stage) the way its objective trained it: KV-cache decoding (clm), iterative unmasking in --steps model calls
(masked diffusion, MLM) or one pass through the depth (time-as-depth diffusion). Settings left out take
the run's own `sample` section and its train.seed, so a plain `jaxtrain generate` of a StackWise run repeats
the samples its job printed. The same seed gives the same text. Output: one `sample PROMPT -> TEXT` line per
prompt after a header, or (--format=jsonl) one JSON object per prompt with the token ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import TYPE_CHECKING

from absl import flags

from jaxtrain.cli import common

if TYPE_CHECKING:  # the command imports JAX only once its flags parse
  import ml_collections

  from jaxtrain.data import Tokenizer
  from jaxtrain.data.chat import ChatEncoder
  from jaxtrain.stackwise.inference import Rack, Settings

_SETTINGS = ('max_tokens', 'temperature', 'top_k', 'top_p', 'steps', 'schedule', 'seed')
_UNMASKING = ('steps', 'schedule')  # flags of iterative unmasking only


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory: a plain run (checkpoints/) or a StackWise run (rack/).', required=True)
  flags.DEFINE_multi_string('prompt', None, 'Text to continue; repeat the flag for several prompts (default: the '
                            "run's sample.prompts). An empty prompt asks a causal model for a new document.",
                            flag_values=fv)
  flags.DEFINE_integer('max_tokens', None, "Tokens to generate per prompt (default: the run's sample.max_tokens).",
                       flag_values=fv)
  flags.DEFINE_float('temperature', None, "Softmax temperature, 0 greedy (default: the run's sample.temperature).",
                     flag_values=fv)
  flags.DEFINE_integer('top_k', None, "Draw among the k most likely tokens; 0 off (default: the run's).",
                       flag_values=fv)
  flags.DEFINE_float('top_p', None, "Nucleus: draw among the most likely tokens holding this much probability; "
                     "1 off (default: the run's).", flag_values=fv)
  flags.DEFINE_integer('steps', None, 'Masked-diffusion and MLM racks: unmasking steps, model calls that each '
                       "commit the most confident tokens (default: the run's sample.steps).", flag_values=fv)
  flags.DEFINE_enum('schedule', None, ('linear', 'cosine'), 'Masked-diffusion and MLM racks: share of the masks '
                    "left after each step (default: the run's sample.schedule).", flag_values=fv)
  flags.DEFINE_integer('seed', None, "Random seed of the draws (default: the run's train.seed).", flag_values=fv)
  flags.DEFINE_integer('step', None, 'Plain run: the checkpoint step (default: the newest).', flag_values=fv)
  flags.DEFINE_integer('stage', None, 'StackWise run: the stage whose rack samples (default: the last saved).',
                       flag_values=fv)
  flags.DEFINE_boolean('stop_at_eos', True, 'Causal models: end a sample at the end of its document (EOS).',
                       flag_values=fv)
  flags.DEFINE_boolean('chat', True, "Chat runs (a chat, alpaca or sharegpt source): send each prompt as a user "
                       "turn through the run's chat template and end the sample at the end of the assistant's turn; "
                       '--nochat: continue the raw text.', flag_values=fv)
  flags.DEFINE_enum('format', 'text', ('text', 'jsonl'), 'text: a header and one line per prompt; jsonl: one JSON '
                    'object per prompt (prompt, prompt_ids, ids, text).', flag_values=fv)


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.stackwise import inference

  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes about restoring are not for the user
  loaded = inference.load_run(fv['workdir'].value, fv['step'].value, fv['stage'].value)
  r = loaded.rack
  if r.method != 'iterative unmasking':  # a flag that would change nothing is a mistake worth one line
    given = [f'--{k}' for k in _UNMASKING if fv[k].present]
    if given:
      raise inference.SampleError(f'{", ".join(given)}: only iterative unmasking (masked diffusion with '
                                  f'time=input, MLM) takes it; this model ({r.objective}) samples by {r.method}')
  if not r.obj.causal and fv['stop_at_eos'].present:
    raise inference.SampleError(f'--stop_at_eos: only causal models end at EOS; this rack ({r.objective}) fills a '
                                'fixed number of tokens')
  settings = inference.Settings.from_config(loaded.config)
  settings = dataclasses.replace(settings, stop_at_eos=fv['stop_at_eos'].value,
                                 **{k: fv[k].value for k in _SETTINGS if fv[k].value is not None})
  settings.check(loaded.window, r.obj.causal)
  prompts = fv['prompt'].value if fv['prompt'].value is not None else list(loaded.config.sample.prompts)
  encoder = chat_encoder(loaded.config, loaded.tokenizer)
  if encoder is None and fv['chat'].present:
    raise inference.SampleError(f'--{"" if fv["chat"].value else "no"}chat: this run trained on no chat source; '
                                'its prompts are plain text already')
  stop_ids, texts, template, turn = [], list(prompts), '', None
  if encoder is not None and fv['chat'].value:
    texts = [encoder.render([{'role': 'user', 'content': p}], add_generation_prompt=True) for p in prompts]
    turn = encoder.end_of_turn()
    stop_ids = [loaded.tokenizer.encode(turn)[0]] if turn else []
    template = f', chat template {encoder.name}'
  if fv['prompt'].present:  # the user's own prompts: one that does not fit is a mistake, not something to cut
    room = loaded.window - settings.max_tokens
    for p, text in zip(prompts, texts, strict=True):
      n = len(loaded.tokenizer.encode(text))
      if n > room:
        raise inference.SampleError(
            f'--prompt={p[:40] + "..." if len(p) > 40 else p!r}: {n} tokens{template and " with the chat template"}'
            f', but the model trained on {loaded.window}-token rows, which hold the prompt and the '
            f'{settings.max_tokens} new tokens: give at most {room} prompt tokens (a shorter prompt or a '
            'smaller --max_tokens)')
  samples = inference.generate(r, loaded.tokenizer, texts, settings, loaded.window, stop_ids=stop_ids)
  if loaded.note:
    print(loaded.note, file=sys.stderr, flush=True)
  for p, s in zip(prompts, samples, strict=True):
    if s.cut:
      print(f'note: prompt {p[:40]!r}: its first {s.cut} tokens were cut to fit the {loaded.window}-token '
            f'window with {settings.max_tokens} new tokens', file=sys.stderr, flush=True)
  if fv['format'].value == 'jsonl':
    for p, s in zip(prompts, samples, strict=True):
      print(json.dumps({'prompt': p, **({'templated': s.prompt} if template else {}), 'prompt_ids': s.prompt_ids,
                        'ids': s.ids, 'text': s.text}), flush=True)
    return
  print(f'{loaded.what}: {r.objective}{template}, {describe(r, settings, turn)}', flush=True)
  for p, s in zip(prompts, samples, strict=True):
    print(f'sample {p!r} -> {s.text!r}', flush=True)


def chat_encoder(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ChatEncoder | None:
  """The chat encoder of a run whose first chat source (chat, alpaca or sharegpt records) set its template;
  None for a run without one."""
  from jaxtrain.data import chat, sources

  specs = [s for s in sources.source_specs(config.data) if s.format in sources.CHAT_FORMATS]
  return chat.ChatEncoder(tokenizer, specs[0].template) if specs else None


def describe(r: Rack, settings: Settings, turn: str | None = None) -> str:
  """How the samples were drawn, e.g. 'iterative unmasking in 16 steps (cosine), greedy, seed 0'."""
  s = settings
  how = r.method
  if how == 'iterative unmasking':
    how += f' in {s.steps} steps ({s.schedule})'
  draw = 'greedy' if s.temperature == 0 else f'temperature {s.temperature:g}'
  if s.temperature and s.top_k:
    draw += f', top_k {s.top_k}'
  if s.temperature and s.top_p < 1:
    draw += f', top_p {s.top_p:g}'
  stop = f', ending at {turn + " or " if turn else ""}EOS' if r.obj.causal and s.stop_at_eos else ''
  return f'{how}, {s.max_tokens} tokens{stop}, {draw}, seed {s.seed}'
