"""Generate text with a run's model: `jaxtrain generate --workdir=RUN [--prompt=TEXT ... | --prompts=FILE]
[--num_samples=N] [--compare_base] [--max_tokens=N] [--temperature=T --seed=S] [--steps=N] [--out=PATH]`
(`jaxtrain.stackwise.inference`).

  jaxtrain generate --workdir=runs/stackwise                      # the final rack, the run's sample settings
  jaxtrain generate --workdir=runs/stackwise --prompt='def f(' --prompt='import ' --max_tokens=48 --steps=32
  jaxtrain generate --workdir=runs/tiny --temperature=0.8 --top_p=0.9 --seed=1 --format=jsonl
  jaxtrain generate --workdir=runs/sft --prompts=questions.jsonl --num_samples=3 --temperature=0.7 --compare_base

A plain run samples its newest checkpoint (or --step); a StackWise run the rack of its last saved stage (or
--stage) the way its objective trained it: KV-cache decoding (clm), iterative unmasking in --steps model calls
(masked diffusion, MLM) or one pass through the depth (time-as-depth diffusion). Settings left out take
the run's own `sample` section and its train.seed, so a plain `jaxtrain generate` of a StackWise run repeats
the samples its job printed. The same seed gives the same text.

--prompts reads a .jsonl file (one object per line: {"prompt": TEXT} or, for a chat run, {"messages": [{"role":
"user", "content": ...}, ...]}; other fields are ignored) or a .txt file (one prompt per line); blank lines are
skipped. --num_samples draws N samples per prompt (sample 1 is what N=1 gives). --compare_base (LoRA and QLoRA
runs) also generates from the base model the adapters were trained on, same prompts, same keys.

Output: one `sample PROMPT -> TEXT` line per sample after a header (`base PROMPT -> TEXT` beside it with
--compare_base), or (--format=jsonl) one JSON object per sample with the token ids; and always a record
RUN/generate/<time>.json with a readable .md beside it (or --out=PATH: PATH.json and PATH.md), named on stderr.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from absl import flags

from jaxtrain.cli import common

if TYPE_CHECKING:  # the command imports JAX only once its flags parse
  import ml_collections

  from jaxtrain.data import Tokenizer
  from jaxtrain.data.chat import ChatEncoder
  from jaxtrain.stackwise.inference import Loaded, Rack, Sample, Settings

_SETTINGS = ('max_tokens', 'temperature', 'top_k', 'top_p', 'steps', 'schedule', 'seed')
_UNMASKING = ('steps', 'schedule')  # flags of iterative unmasking only
_PROMPT_FILES = ('.jsonl', '.txt')


def define(fv: flags.FlagValues) -> None:
  common.define_workdir(fv, 'Run directory: a plain run (checkpoints/) or a StackWise run (rack/).', required=True)
  flags.DEFINE_multi_string('prompt', None, 'Text to continue; repeat the flag for several prompts (default: the '
                            "run's sample.prompts). An empty prompt asks a causal model for a new document.",
                            flag_values=fv)
  flags.DEFINE_string('prompts', None, 'A file of prompts: .jsonl, one object per line with "prompt" (text) or, '
                      'for a chat run, "messages" (a conversation to answer); or .txt, one prompt per line. '
                      'Blank lines are skipped; taken after any --prompt.', flag_values=fv)
  flags.DEFINE_integer('num_samples', 1, 'Samples per prompt, each from its own key (needs --temperature > 0 or '
                       "a run's sample.temperature > 0); sample 1 is the one --num_samples=1 gives.", flag_values=fv)
  flags.DEFINE_boolean('compare_base', False, 'LoRA and QLoRA runs: also generate from the base model the adapters '
                       'were trained on (unquantized, as the export merges into it), same prompts and keys, and '
                       "print and record its answer beside the adapted model's.", flag_values=fv)
  flags.DEFINE_string('out', None, 'Where the record goes: PATH.json and PATH.md (default: '
                      'WORKDIR/generate/<time>.json and .md). Existing files are not overwritten.', flag_values=fv)
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
  flags.DEFINE_enum('format', 'text', ('text', 'jsonl'), 'text: a header and one line per sample; jsonl: one JSON '
                    'object per sample (prompt, sample, prompt_ids, ids, text; base with --compare_base).',
                    flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt as the user gave it: plain `text`, or chat `messages` (a .jsonl line); `where` names it in a
  message (`--prompt=...`, `--prompts=FILE line N`, or '' for the run's own sample.prompts)."""

  text: str | None = None
  messages: list[dict[str, Any]] | None = None
  where: str = ''

  @property
  def label(self) -> str:
    """What the console shows: the text, or the content of the conversation's last message."""
    return self.text if self.messages is None else str(self.messages[-1].get('content', ''))

  def record(self) -> dict[str, Any]:
    return {'prompt': self.text} if self.messages is None else {'messages': self.messages}


def read_prompts(path: str) -> list[Prompt]:
  """The prompts of a .jsonl or .txt file; SampleError (one line naming the file and line) for a missing,
  unreadable or empty file or a line that is not a prompt. Chat messages are checked later, against the
  run's template."""
  from jaxtrain.stackwise.inference import SampleError

  ext = os.path.splitext(path)[1].lower()
  if ext not in _PROMPT_FILES:
    raise SampleError('--prompts', path, 'give a .jsonl file (one {"prompt": ...} or {"messages": [...]} object '
                      'per line) or a .txt file (one prompt per line)')
  if not os.path.isfile(path):
    raise SampleError('--prompts', path, 'no such file' if not os.path.exists(path) else 'is not a file')
  try:
    with open(path, encoding='utf-8-sig') as f:  # -sig: a byte-order mark some editors write is not text
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise SampleError('--prompts', path, f'cannot be read as UTF-8 text ({e})') from None
  prompts = []
  for n, line in enumerate(lines, start=1):
    where = f'--prompts={path} line {n}'
    if not line.strip():
      continue
    if ext == '.txt':
      prompts.append(Prompt(text=line, where=where))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise SampleError(f'{where}: not JSON ({e.msg} at column {e.colno}); each line is one object such as '
                        '{"prompt": "def f("}') from None
    if not isinstance(obj, dict) or ('prompt' in obj) == ('messages' in obj):
      got = f'an object with fields {sorted(obj)[:6]}' if isinstance(obj, dict) else f'a JSON {type(obj).__name__}'
      both = isinstance(obj, dict) and 'prompt' in obj
      raise SampleError(f'{where}: {got}; expected an object with either "prompt" (text) or "messages" (a chat '
                        f'conversation){", not both" if both else ""}')
    if 'prompt' in obj and not isinstance(obj['prompt'], str):
      raise SampleError(f'{where}: "prompt" is a {type(obj["prompt"]).__name__}; expected a string')
    if 'messages' in obj and not (isinstance(obj['messages'], list) and obj['messages']):
      raise SampleError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    prompts.append(Prompt(text=obj.get('prompt'), messages=obj.get('messages'), where=where))
  if not prompts:
    raise SampleError('--prompts', path, 'holds no prompt (every line is blank)')
  return prompts


def output_paths(fv: flags.FlagValues) -> tuple[str, str]:
  """(json, md) paths of the record: --out=PATH (a .json/.md suffix is dropped), else WORKDIR/generate/<time>;
  refuses an --out whose files exist or whose folder is a file, before anything runs."""
  from jaxtrain import paths
  from jaxtrain.stackwise.inference import SampleError

  if fv['out'].value is not None:
    stem = re.sub(r'\.(json|md)$', '', fv['out'].value)
    if not os.path.basename(stem):
      raise SampleError('--out', fv['out'].value, 'give a file path such as answers or out/answers.json')
    found = [p for p in (stem + '.json', stem + '.md') if os.path.exists(p)]
    if found:
      raise SampleError('--out', fv['out'].value, f'{" and ".join(found)} exist already; choose another path')
    parent = os.path.dirname(os.path.abspath(stem))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise SampleError('--out', fv['out'].value, f'{parent} is a file, not a folder')
    return stem + '.json', stem + '.md'
  folder = paths.in_run(fv['workdir'].value, paths.GENERATE)
  stem = os.path.join(folder, time.strftime('%Y%m%d-%H%M%S'))
  k, name = 1, stem
  while os.path.exists(name + '.json') or os.path.exists(name + '.md'):  # two commands in one second
    k += 1
    name = f'{stem}-{k}'
  return name + '.json', name + '.md'


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.stackwise import inference

  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes about restoring are not for the user
  if fv['num_samples'].value < 1:
    raise inference.SampleError('--num_samples', fv['num_samples'].value, 'must be >= 1')
  own = [Prompt(text=p, where=f'--prompt={p[:40] + "..." if len(p) > 40 else p!r}')
         for p in fv['prompt'].value or []]
  if fv['prompts'].value is not None:
    own += read_prompts(fv['prompts'].value)
  json_path, md_path = output_paths(fv)
  loaded = inference.load_run(fv['workdir'].value, fv['step'].value, fv['stage'].value, fv['compare_base'].value)
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
  prompts = own or [Prompt(text=p) for p in loaded.config.sample.prompts]
  encoder = chat_encoder(loaded.config, loaded.tokenizer)
  if encoder is None and fv['chat'].present:
    raise inference.SampleError(f'--{"" if fv["chat"].value else "no"}chat: this run trained on no chat source; '
                                'its prompts are plain text already')
  chat = encoder is not None and fv['chat'].value
  texts = [templated(p, encoder if chat else None) for p in prompts]
  stop_ids, template, turn = [], '', None
  if chat:
    turn = encoder.end_of_turn()
    stop_ids = [loaded.tokenizer.encode(turn)[0]] if turn else []
    template = f', chat template {encoder.name}'
  room = loaded.window - settings.max_tokens
  for p, text in zip(prompts, texts, strict=True):
    n = len(loaded.tokenizer.encode(text))
    if p.where and n > room:  # the user's own prompts: one that does not fit is a mistake, not something to cut
      raise inference.SampleError(
          f'{p.where}: {n} tokens{template and " with the chat template"}, but the model trained on '
          f'{loaded.window}-token rows, which hold the prompt and the {settings.max_tokens} new tokens: give at '
          f'most {room} prompt tokens (a shorter prompt or a smaller --max_tokens)')
  n = fv['num_samples'].value
  began = time.perf_counter()
  samples = inference.generate(r, loaded.tokenizer, texts, settings, loaded.window, stop_ids=stop_ids, num_samples=n)
  base = (inference.generate(loaded.base, loaded.tokenizer, texts, settings, loaded.window, stop_ids=stop_ids,
                             num_samples=n) if loaded.base is not None else None)
  seconds = time.perf_counter() - began
  if loaded.note:
    print(loaded.note, file=sys.stderr, flush=True)
  for s in samples[::n]:
    if s.cut:
      print(f'note: prompt {s.prompt[:40]!r}: its first {s.cut} tokens were cut to fit the {loaded.window}-token '
            f'window with {settings.max_tokens} new tokens', file=sys.stderr, flush=True)
  how = describe(r, settings, turn)
  record = build_record(fv['workdir'].value, loaded, prompts, samples, base, how, settings, n, template, seconds)
  write_record(record, json_path, md_path)
  wrote = f'wrote {json_path} and {md_path}'
  if fv['format'].value == 'jsonl':
    for i, s in enumerate(samples):
      line = {**prompts[i // n].record(), **({'templated': s.prompt} if template else {}), 'sample': s.sample,
              'prompt_ids': s.prompt_ids, 'ids': s.ids, 'text': s.text}
      if base is not None:
        line['base'] = {'ids': base[i].ids, 'text': base[i].text}
      print(json.dumps(line), flush=True)
    print(wrote, file=sys.stderr, flush=True)  # stdout holds the samples only
    return
  print(f'{loaded.what}: {r.objective}{template}, {how}', flush=True)
  for i, s in enumerate(samples):
    label = f'{prompts[i // n].label!r}' + (f' [{s.sample + 1}/{n}]' if n > 1 else '')
    print(f'sample {label} -> {s.text!r}', flush=True)
    if base is not None:
      print(f'base   {label} -> {base[i].text!r}', flush=True)
  print(wrote, file=sys.stderr, flush=True)


def templated(p: Prompt, encoder: ChatEncoder | None) -> str:
  """The text the model is given: a chat run's prompt as a user turn, or its messages, through the template
  (ready for the assistant's answer); a plain prompt as it is. SampleError for messages a run without a chat
  template cannot take, or that its template rejects."""
  from jaxtrain.stackwise.inference import SampleError

  if encoder is None:
    if p.messages is not None:
      raise SampleError(f'{p.where}: "messages" need a chat run (a chat, alpaca or sharegpt source) and --chat; '
                        'give this model a plain {"prompt": TEXT}')
    return p.text
  try:
    return encoder.render(p.messages or [{'role': 'user', 'content': p.text}], add_generation_prompt=True)
  except ValueError as e:
    raise SampleError(f'{p.where}: {e}') from None


def build_record(workdir: str, loaded: Loaded, prompts: list[Prompt], samples: list[Sample], base: list[Sample] | None,
                 how: str, settings: Settings, n: int, template: str, seconds: float) -> dict[str, Any]:
  """The .json record: the run, the model, how it sampled, and per prompt its ids and samples (and the base
  model's beside them)."""
  entries = []
  for k, p in enumerate(prompts):
    mine = samples[k * n:(k + 1) * n]
    entry = {**p.record(), **({'templated': mine[0].prompt} if template else {}), 'prompt_ids': mine[0].prompt_ids,
             'cut': mine[0].cut, 'samples': [{'ids': s.ids, 'text': s.text} for s in mine]}
    if base is not None:
      entry['base'] = [{'ids': s.ids, 'text': s.text} for s in base[k * n:(k + 1) * n]]
    entries.append(entry)
  tokens = sum(len(s.ids) for s in samples + (base or []))
  return {'workdir': os.path.abspath(workdir),
          'model': loaded.what, 'objective': loaded.rack.objective, 'how': how,
          'chat_template': template.removeprefix(', chat template ') or None,
          'settings': dict(dataclasses.asdict(settings), num_samples=n), 'compare_base': base is not None,
          'prompts': entries,
          'timing': {'seconds': round(seconds, 3), 'new_tokens': tokens,
                     'tokens_per_s': round(tokens / seconds, 1) if seconds > 0 else None,
                     'note': 'wall time of the generation calls, compilation included'}}


def _cell(text: str) -> str:
  """A sample as one Markdown table cell: HTML-escaped (chat tokens such as <|im_end|> stay visible), pipes
  and line breaks kept, and spaces a cell would trim or collapse (indentation, runs, a sample of spaces only)
  kept as &nbsp;."""
  out = html.escape(text, quote=False).replace('|', '&#124;')
  out = re.sub(r'^ +| {2,}| +$', lambda m: '&nbsp;' * len(m.group()), out, flags=re.M)
  return out.replace('\n', '<br>') or ' '


def markdown(record: dict[str, Any]) -> str:
  """The readable .md of a record: the settings, then per prompt the prompt and a table of its samples
  (adapted beside base with --compare_base)."""
  t = record['timing']
  lines = [f'# jaxtrain generate: {record["model"]}', '',
           f'{record["objective"]}{", chat template " + record["chat_template"] if record["chat_template"] else ""}'
           f', {record["how"]}; {record["settings"]["num_samples"]} sample(s) per prompt.', '',
           f'{t["new_tokens"]} new tokens in {t["seconds"]:.2f} s ({t["tokens_per_s"]} tokens/s, compilation '
           'included).', '']
  for k, e in enumerate(record['prompts'], start=1):
    shown = e.get('templated', e['prompt'] if 'prompt' in e else json.dumps(e['messages'], ensure_ascii=False))
    fence = '`' * max(3, 1 + max((len(m) for m in re.findall('`+', shown)), default=0))
    lines += [f'## Prompt {k}', '', fence + 'text', shown, fence, '']
    if 'base' in e:
      lines += ['| # | adapted | base |', '|---|---|---|']
      lines += [f'| {j} | {_cell(a["text"])} | {_cell(b["text"])} |'
                for j, (a, b) in enumerate(zip(e['samples'], e['base'], strict=True), start=1)]
    else:
      lines += ['| # | sample |', '|---|---|']
      lines += [f'| {j} | {_cell(a["text"])} |' for j, a in enumerate(e['samples'], start=1)]
    lines.append('')
  return '\n'.join(lines)


def write_record(record: dict[str, Any], json_path: str, md_path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1, ensure_ascii=False)
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(markdown(record))


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
