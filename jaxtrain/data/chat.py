"""Chat templates and assistant-only loss masks for supervised fine-tuning on `messages` records.

A record is a list of messages {"role": system|user|assistant|tool, "content": str} (assistant messages may
carry OpenAI/Hugging Face style `tool_calls`, tool messages a `tool_call_id`), or a dict holding such a list
under "messages" and optionally tool definitions under "tools". `ChatEncoder` turns one into
`(ids int32[n], loss_mask int32[n])`: 1 exactly on what the assistant generates (its content, its tool calls
and its end-of-turn token), 0 on system/user/tool turns and on template scaffolding (BOS, role headers, the
newline after an end-of-turn token).

Templates. `jaxtrain.data.chat_templates.TEMPLATES` holds Jinja chat templates for five families, written to
render what each family's published template renders, with the special tokens spelled out (not
`bos_token`), so they work with any tokenizer that has those tokens (`special_tokens`, `add_special_tokens`).
Each wraps what the assistant produces in `{% generation %}...{% endgeneration %}`, so transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` yields the mask in one pass: a token is masked
when its characters overlap a generation span. Deliberate choices, where a published template is silent or
lossy, are listed in `TEMPLATE_NOTES`.

Two ways to mask (`mask=`):
  'generation'  the generation-tag spans of one rendering (exact; needs tags in the template);
  'turns'       for a template without tags (a tokenizer's own `chat_template`, usually): for every assistant
                message i, render messages[:i] with the generation prompt (P) and messages[:i+1] (F); the
                assistant span is F[len(P):], less whitespace after its final special token (the newline after
                <|im_end|>). Caveat: this assumes the template is prefix-stable, i.e. rendering a prefix of the
                conversation gives a prefix of the full rendering. Templates that move text as the chat grows
                (Mistral puts the system prompt and tool definitions before the *last* user turn) are not, and
                the encoder raises ValueError instead of guessing: the record is skipped.
'auto' (default) picks 'generation' when the template has tags, else 'turns'. Both paths map character spans
to tokens by the same overlap rule, so they give identical masks on the shipped templates (tested).

EOS and truncation. Every sample ends with the tokenizer's EOS (appended unless the rendering already ends
with it), the document boundary the packer relies on. Its loss is 1 only when the sample is `complete` and
ends with an assistant turn: a sample the split strategy will cut must not teach the model to stop there,
so the pipeline passes complete=False, or calls `mark_incomplete` on an already encoded sample.

Text in a message that spells a special token ('<|im_end|>' in user content) is encoded as that token, as
transformers does: records that may hold such text should be cleaned before encoding.

Bad records (no messages, unknown role, non-string content, malformed tool calls, no assistant turn, or a
conversation the template rejects) raise ValueError naming the problem; `jaxtrain.data.prepare` counts and
skips them. Config mistakes (unknown template, missing special tokens) raise `DataError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from jaxtrain.data.sources import DataError, source_specs
from jaxtrain.data.chat_templates import (GENERATION_TAG, OWN_TEMPLATE, TEMPLATES, special_tokens,
                                          template_names, without_generation_tags)
from jaxtrain.data.tokenizer import Tokenizer


ROLES = ('system', 'user', 'assistant', 'tool')


MASK_MODES = ('auto', 'generation', 'turns')


def add_special_tokens(tokenizer: Tokenizer, template_name: str) -> Tokenizer:
  """A copy of `tokenizer` that also holds `special_tokens(template_name)` (new ids after the old vocabulary).

  The model's embedding and head must grow to the new `vocab_size`. The input tokenizer is left unchanged.
  """
  wanted = special_tokens(template_name)
  backend = getattr(tokenizer, '_backend', tokenizer)  # a jaxtrain Tokenizer wraps one of the others
  if isinstance(backend, tokenizers.Tokenizer):
    clone = tokenizers.Tokenizer.from_str(backend.to_str())
    clone.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in wanted])
  else:
    clone = copy.deepcopy(backend)
    clone.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in wanted], special_tokens=True)
  return Tokenizer(clone, eos_id=tokenizer.eos_id, path=tokenizer.path)


def run_template(cfg: Any) -> str | None:
  """The chat template a run's data renders with (`cfg`: the data section): the shipped template of its first
  chat source, without the {% generation %} tags (same text; engines other than transformers lack the tag).
  None for a run without chat sources or one using the tokenizer's own template (the tokenizer holds it)."""
  names = [s.template for s in source_specs(cfg) if s.format == 'chat']
  if not names or names[0] not in TEMPLATES:
    return None
  return without_generation_tags(TEMPLATES[names[0]])


def end_of_turn_token(tokenizer: Any) -> str | None:
  """The special token that ends an assistant turn in `tokenizer`'s own chat_template (<|im_end|>, <|eot_id|>,
  <end_of_turn>, ...), found by rendering a one-exchange conversation: what `generate` must stop at. None when
  the tokenizer has no chat template or the turn does not end with a special token."""
  try:
    return ChatEncoder(tokenizer, OWN_TEMPLATE, mask='turns').end_of_turn()
  except ValueError:  # DataError included: no chat template, no EOS
    return None


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
  if not isinstance(calls, list):
    raise ValueError(f'{where} has tool_calls of type {type(calls).__name__}; expected a list')
  out = []
  for k, call in enumerate(calls):
    if not isinstance(call, Mapping):
      raise ValueError(f'{where} tool call {k} is a {type(call).__name__}; expected an object')
    fn = call.get('function', call)  # the nested OpenAI/HF form, or a flat {"name", "arguments"}
    name = fn.get('name') if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
      raise ValueError(f'{where} tool call {k} has no function name')
    args = fn.get('arguments', {})
    if isinstance(args, str):  # OpenAI sends the arguments as JSON text; templates expect the object
      try:
        args = json.loads(args) if args.strip() else {}
      except json.JSONDecodeError:
        raise ValueError(f'{where} tool call {k} has arguments that are not JSON: {args[:60]!r}') from None
    if not isinstance(args, Mapping):
      raise ValueError(f'{where} tool call {k} has arguments of type {type(args).__name__}; expected an object')
    norm = {'type': 'function', 'function': {'name': name, 'arguments': dict(args)}}
    if call.get('id') is not None:
      norm['id'] = str(call['id'])
    out.append(norm)
  return out


def validate_messages(messages: Any, *, require_assistant: bool = True) -> list[dict[str, Any]]:
  """A normalised copy of `messages` (role, content, and tool_calls / tool_call_id / name where given), or a
  ValueError naming what is wrong: no messages, an unknown role, non-string content, malformed tool calls, or
  (with `require_assistant`) no assistant turn, which leaves nothing to train on."""
  if not isinstance(messages, (list, tuple)):
    raise ValueError(f'messages is a {type(messages).__name__}; expected a list of messages')
  if not messages:
    raise ValueError('the record has no messages')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise ValueError(f'message {i} is a {type(m).__name__}; expected an object with role and content')
    role = m.get('role')
    if role not in ROLES:
      raise ValueError(f'message {i} has unknown role {role!r}; expected one of {ROLES}')
    where = f'message {i} ({role})'
    norm: dict[str, Any] = {'role': role}
    calls = m.get('tool_calls')
    if calls:
      if role != 'assistant':
        raise ValueError(f'{where} has tool_calls; only assistant messages may call tools')
      norm['tool_calls'] = _tool_calls(calls, where)
    content = m.get('content')
    if content is None and 'tool_calls' in norm:
      content = ''  # a pure tool call: OpenAI sends content null
    if not isinstance(content, str):
      what = 'no content' if content is None else f'non-string content ({type(content).__name__})'
      raise ValueError(f'{where} has {what}; expected a string')
    norm['content'] = content
    for key in ('tool_call_id', 'name'):
      if m.get(key) is not None:
        if not isinstance(m[key], str):
          raise ValueError(f'{where} has a non-string {key} ({type(m[key]).__name__})')
        norm[key] = m[key]
    out.append(norm)
  if require_assistant and not any(m['role'] == 'assistant' for m in out):
    raise ValueError(f'the conversation has no assistant turn ({len(out)} messages); nothing to train on')
  return out


def _split_record(record: Any) -> tuple[Any, Any]:
  """(messages, tools) of a record: a messages list, or a dict with 'messages' and optional 'tools'."""
  if isinstance(record, Mapping):
    if 'messages' not in record:
      raise ValueError(f"the record has no 'messages' field (fields: {sorted(record)[:8]})")
    tools = record.get('tools')
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)):
      raise ValueError(f'the record has tools of type {type(tools).__name__}; expected a list of objects')
    return record['messages'], tools or None
  return record, None


def spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """int32 mask over tokens: 1 where a token's characters [start, end) overlap a span [a, b).

  The rule transformers applies to generation spans; a token straddling a span edge counts as inside.
  """
  bounds = np.asarray(offsets, np.int64).reshape(-1, 2)
  mask = np.zeros(len(bounds), bool)
  for a, b in spans:
    if b > a:
      mask |= (bounds[:, 0] < b) & (bounds[:, 1] > a)
  return mask.astype(np.int32)


def mark_incomplete(ids: np.ndarray, mask: np.ndarray, eos_id: int) -> np.ndarray:
  """`mask` with the loss on a trailing EOS removed: for a sample the split strategy cuts, whose end the model
  must not learn to predict. Returns a new array; ids are not changed."""
  mask = np.array(mask, copy=True)
  if len(ids) and int(ids[-1]) == int(eos_id):
    mask[-1] = 0
  return mask


class ChatEncoder:
  """Encodes chat records to (ids, loss mask) with a chat template.

  tokenizer  a `jaxtrain.data.Tokenizer`, a `tokenizers.Tokenizer` (EOS '<|endoftext|>') or a transformers fast
             tokenizer; it must already hold the template's special tokens (`add_special_tokens`).
  template   a name in `TEMPLATES`, or 'tokenizer' for the tokenizer's own `chat_template`.
  mask       'auto' | 'generation' | 'turns' (module docstring).
  key        the config key named in errors (e.g. 'data.sources.sft.template').

  Calling the encoder on a list of records returns one (ids, mask) pair each: the `prepare.Encoder` interface.
  """

  def __init__(self, tokenizer: Any, template: str = 'chatml', *, mask: str = 'auto', key: str = 'template'):
    import transformers  # Deferred: importing transformers costs seconds and only chat data needs it.

    backend = getattr(tokenizer, '_backend', tokenizer)
    if isinstance(backend, tokenizers.Tokenizer):
      backend = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    if not getattr(backend, 'is_fast', False):
      raise DataError(key, template, f'needs a fast tokenizer with offsets; got {type(backend).__name__}',
                      'use a tokenizer.json or a Hugging Face directory with one')
    self._hf = backend
    if template == OWN_TEMPLATE:
      text = getattr(backend, 'chat_template', None)
      if isinstance(text, dict):  # several named templates: the default one is the chat template
        text = text.get('default')
      if not isinstance(text, str) or not text:
        raise DataError(key, template, 'names the tokenizer\'s chat_template, but the tokenizer has none',
                        f'expected one of {tuple(TEMPLATES)}, or a tokenizer with a chat_template')
    elif template in TEMPLATES:
      text = TEMPLATES[template]
    else:
      raise DataError(key, template, 'is not a chat template', f'expected one of {template_names()}')
    self.name, self.template = template, text
    self._added = frozenset(backend.get_added_vocab())
    missing = [t for t in special_tokens(template) if t not in self._added]
    if missing:
      raise DataError(key, template, f'needs special tokens {missing} that the tokenizer lacks',
                      'add them with jaxtrain.data.chat.add_special_tokens (and grow the embedding to match), '
                      'or use a tokenizer of that model family')
    if mask not in MASK_MODES:
      raise DataError(f'{key} mask', mask, 'is not valid', f'expected one of {MASK_MODES}')
    has_tags = bool(GENERATION_TAG.search(text))
    if mask == 'generation' and not has_tags:
      raise DataError(f'{key} mask', mask, f'needs {{% generation %}} tags, which template {template!r} lacks',
                      "use mask='turns' or 'auto'")
    self.mask = ('generation' if has_tags else 'turns') if mask == 'auto' else mask
    eos_id = getattr(tokenizer, 'eos_id', None)
    if eos_id is None:
      eos_id = backend.eos_token_id if backend.eos_token_id is not None else backend.convert_tokens_to_ids(
          '<|endoftext|>')
    if eos_id is None or eos_id == backend.unk_token_id:
      raise DataError(key, template, 'cannot tell the tokenizer\'s EOS token', 'pass a jaxtrain.data.Tokenizer')
    self.eos_id = int(eos_id)

  @property
  def identity(self) -> dict[str, str]:
    """What decides this encoder's output besides the tokenizer: for cache fingerprints."""
    import transformers  # its Jinja filters (tojson) and masking rule shape the output too

    return {'template': self.name, 'sha256': hashlib.sha256(self.template.encode()).hexdigest()[:16],
            'mask': self.mask, 'transformers': transformers.__version__}

  def _apply(self, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> Any:
    import jinja2  # transformers' dependency; its TemplateError is what raise_exception raises

    try:
      return self._hf.apply_chat_template(messages, tools=tools, chat_template=self.template, **kwargs)
    except jinja2.TemplateError as e:
      raise ValueError(f'chat template {self.name!r} rejects the conversation: {e}') from None

  def render(self, messages: Any, *, tools: list[dict[str, Any]] | None = None,
             add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (validated; no assistant turn needed), without tokenizing."""
    return self._apply(validate_messages(messages, require_assistant=False), tools, tokenize=False,
                       add_generation_prompt=add_generation_prompt)

  def assistant_spans(self, messages: Any, *, tools: list[dict[str, Any]] | None = None) -> tuple[str, list]:
    """(rendered text, [start, end) character spans of the assistant's output) by turn-by-turn rendering."""
    msgs = validate_messages(messages)
    full = self._apply(msgs, tools, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
      if m['role'] != 'assistant':
        continue
      if i == 0:
        raise ValueError('message 0 is an assistant turn; turn-by-turn masking needs a turn before it')
      prompt = self._apply(msgs[:i], tools, tokenize=False, add_generation_prompt=True)
      upto = self._apply(msgs[:i + 1], tools, tokenize=False)
      if not upto.startswith(prompt) or not full.startswith(upto):
        raise ValueError(f'chat template {self.name!r} is not prefix-stable for this conversation (rendering '
                         f'messages[:{i + 1}] is not a prefix of the whole); turn-by-turn masking cannot place '
                         f'assistant turn {i}')
      spans.append((len(prompt), self._turn_end(upto, len(prompt))))
    return full, spans

  def end_of_turn(self) -> str | None:
    """The special token that ends an assistant turn in this template, found by rendering a one-exchange
    conversation; None when the turn does not end with a special token or the template rejects it."""
    try:
      text, spans = self.assistant_spans([{'role': 'user', 'content': 'Hi'},
                                          {'role': 'assistant', 'content': 'Hello'}])
    except ValueError:
      return None
    turn = text[spans[-1][0]:spans[-1][1]].rstrip()
    return next((t for t in sorted(self._added, key=len, reverse=True) if turn.endswith(t)), None)

  def _turn_end(self, text: str, start: int) -> int:
    # Whitespace after the turn's last special token (the '\n' after <|im_end|>) is scaffolding the model
    # never generates: generation stops at the token.
    stripped = text.rstrip()
    if len(stripped) > start and any(stripped.endswith(t) for t in self._added):
      return len(stripped)
    return len(text)

  def encode(self, messages: Any, *, tools: list[dict[str, Any]] | None = None,
             complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[n], loss_mask int32[n]) of one conversation, ending with EOS (see the module docstring)."""
    msgs = validate_messages(messages)
    if self.mask == 'generation':
      out = self._apply(msgs, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
      ids = np.asarray(out['input_ids'], np.int32)
      mask = np.asarray(out['assistant_masks'], np.int32)
    else:
      text, spans = self.assistant_spans(msgs, tools=tools)
      enc = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
      ids = np.asarray(enc['input_ids'], np.int32)
      mask = spans_to_mask(enc['offset_mapping'], spans)
    if len(ids) == 0 or int(ids[-1]) != self.eos_id:
      ids = np.append(ids, np.int32(self.eos_id))
      mask = np.append(mask, np.int32(0))
    mask[-1] = int(bool(complete) and msgs[-1]['role'] == 'assistant')
    return ids, mask

  def encode_record(self, record: Any, *, complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`encode` of a record: a messages list, or a dict with 'messages' and optional 'tools'."""
    messages, tools = _split_record(record)
    return self.encode(messages, tools=tools, complete=complete)

  def __call__(self, records: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_record` of each record: the `jaxtrain.data.prepare.Encoder` interface."""
    return [self.encode_record(r) for r in records]

  def __repr__(self) -> str:
    return f'ChatEncoder(template={self.name!r}, mask={self.mask!r}, eos_id={self.eos_id})'

