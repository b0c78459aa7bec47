"""Chat templates and assistant-only loss masks (jaxtrain.data.chat).

Every expected rendering below is written by hand from each family's published format, as segments of
(text, trained): the mask is checked token by token against them (each token's characters must all carry
its mask value), and by decoding each run of equal mask values.
"""

import json

import grain
import numpy as np
import pytest
import transformers

from jaxtrain.data import chat, chat_templates, prepare
from jaxtrain.data.sources import DataError
from jaxtrain.data.tokenizer import EOS, Tokenizer, build_bpe

NAMES = tuple(chat_templates.TEMPLATES)
QWEN_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'
ADD = {'type': 'function', 'function': {
    'name': 'add', 'description': 'Add two integers.',
    'parameters': {'type': 'object', 'properties': {'a': {'type': 'integer'}, 'b': {'type': 'integer'}},
                   'required': ['a', 'b']}}}


def _call(a, b, call_id):
  return {'id': call_id, 'type': 'function', 'function': {'name': 'add', 'arguments': {'a': a, 'b': b}}}


# system, a tool call and its result, then two more turns: every kind of message once.
CONV = [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'What is 2+3?'},
    {'role': 'assistant', 'content': None, 'tool_calls': [_call(2, 3, 'abc123xyz')]},
    {'role': 'tool', 'tool_call_id': 'abc123xyz', 'name': 'add', 'content': '5'},
    {'role': 'assistant', 'content': '2+3 is 5.'},
    {'role': 'user', 'content': 'Thanks!'},
    {'role': 'assistant', 'content': 'You are welcome.'},
]
# Two calls in one turn, two results in a row.
TWO_CALLS = [
    {'role': 'user', 'content': 'Add 1+2 and 3+4.'},
    {'role': 'assistant', 'content': '', 'tool_calls': [_call(1, 2, 'aaaaaaaa1'), _call(3, 4, 'aaaaaaaa2')]},
    {'role': 'tool', 'tool_call_id': 'aaaaaaaa1', 'content': '3'},
    {'role': 'tool', 'tool_call_id': 'aaaaaaaa2', 'content': '7'},
    {'role': 'assistant', 'content': '3 and 7.'},
]
SHORT = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]
MULTI = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'},
         {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'See you.'}]
SYSTEM_SHORT = [{'role': 'system', 'content': 'Be kind.'}, *SHORT]

Q = '{"name": "add", "arguments": {"a": 2, "b": 3}}'  # a call as chatml/qwen/mistral write it
P = '{"name": "add", "parameters": {"a": 2, "b": 3}}'  # ... and llama3/gemma
F, T = False, True

EXPECTED = {  # CONV
    'chatml': [
        ('<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n'
         '<|im_start|>assistant\n', F),
        (f'<tool_call>\n{Q}\n</tool_call><|im_end|>', T),
        ('\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n', F),
        ('2+3 is 5.<|im_end|>', T),
        ('\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n', F),
        ('You are welcome.<|im_end|>', T),
        ('\n', F)],
    'llama3': [
        ('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>'
         '<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>'
         '<|start_header_id|>assistant<|end_header_id|>\n\n', F),
        (f'{P}<|eot_id|>', T),
        ('<|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
         F),
        ('2+3 is 5.<|eot_id|>', T),
        ('<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|><|start_header_id|>assistant<|end_header_id|>'
         '\n\n', F),
        ('You are welcome.<|eot_id|>', T)],
    'mistral': [  # the system prompt goes before the last user turn
        ('<s>[INST] What is 2+3?[/INST]', F),
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "abc123xyz"}]</s>', T),
        ('[TOOL_RESULTS] {"content": 5, "call_id": "abc123xyz"}[/TOOL_RESULTS]', F),
        (' 2+3 is 5.</s>', T),
        ('[INST] You are terse.\n\nThanks![/INST]', F),
        (' You are welcome.</s>', T)],
    'gemma': [  # the system prompt is folded into the first user turn
        ('<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n', F),
        (f'{P}<end_of_turn>', T),
        ('\n<start_of_turn>user\n```tool_output\n5\n```<end_of_turn>\n<start_of_turn>model\n', F),
        ('2+3 is 5.<end_of_turn>', T),
        ('\n<start_of_turn>user\nThanks!<end_of_turn>\n<start_of_turn>model\n', F),
        ('You are welcome.<end_of_turn>', T),
        ('\n', F)],
    'qwen': [
        ('<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n'
         '<|im_start|>assistant\n', F),
        (f'<tool_call>\n{Q}\n</tool_call><|im_end|>', T),
        ('\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n', F),
        ('2+3 is 5.<|im_end|>', T),
        ('\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n', F),
        ('You are welcome.<|im_end|>', T),
        ('\n', F)],
}

Q12, Q34 = (f'{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}' for a, b in ((1, 2), (3, 4)))
EXPECTED_TWO_CALLS = {  # llama3 allows one call per turn
    'chatml': [
        ('<|im_start|>user\nAdd 1+2 and 3+4.<|im_end|>\n<|im_start|>assistant\n', F),
        (f'<tool_call>\n{Q12}\n</tool_call>\n<tool_call>\n{Q34}\n</tool_call><|im_end|>', T),
        ('\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n', F),
        ('3 and 7.<|im_end|>', T), ('\n', F)],
    'mistral': [
        ('<s>[INST] Add 1+2 and 3+4.[/INST]', F),
        ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "aaaaaaaa1"}, '
         '{"name": "add", "arguments": {"a": 3, "b": 4}, "id": "aaaaaaaa2"}]</s>', T),
        ('[TOOL_RESULTS] {"content": 3, "call_id": "aaaaaaaa1"}[/TOOL_RESULTS]'
         '[TOOL_RESULTS] {"content": 7, "call_id": "aaaaaaaa2"}[/TOOL_RESULTS]', F),
        (' 3 and 7.</s>', T)],
    'gemma': [
        ('<bos><start_of_turn>user\nAdd 1+2 and 3+4.<end_of_turn>\n<start_of_turn>model\n', F),
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}\n{"name": "add", "parameters": {"a": 3, "b": 4}}'
         '<end_of_turn>', T),
        ('\n<start_of_turn>user\n```tool_output\n3\n```\n```tool_output\n7\n```<end_of_turn>\n'
         '<start_of_turn>model\n', F),
        ('3 and 7.<end_of_turn>', T), ('\n', F)],
    'qwen': [
        (f'<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nAdd 1+2 and 3+4.<|im_end|>\n'
         '<|im_start|>assistant\n', F),
        (f'<tool_call>\n{Q12}\n</tool_call>\n<tool_call>\n{Q34}\n</tool_call><|im_end|>', T),
        ('\n<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n7\n</tool_response><|im_end|>\n'
         '<|im_start|>assistant\n', F),
        ('3 and 7.<|im_end|>', T), ('\n', F)],
}

EXPECTED_SHORT = {  # no system prompt: qwen adds its default one, the others none
    'chatml': '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n',
    'llama3': ('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>'),
    'mistral': '<s>[INST] Hi[/INST] Hello.</s>',
    'gemma': '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n',
    'qwen': (f'<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
             '<|im_start|>assistant\nHello.<|im_end|>\n'),
}
EXPECTED_PROMPT = {  # SHORT[:1] with the generation prompt: what a model continues from
    'chatml': '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
    'llama3': ('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
               '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    'mistral': '<s>[INST] Hi[/INST]',
    'gemma': '<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n',
    'qwen': f'<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
}


@pytest.fixture(scope='module')
def base() -> Tokenizer:
  texts = ['What is 2+3? 2+3 is 5. You are terse. You are welcome. Thanks! Add 1+2 and 3+4. 3 and 7.',
           '{"name": "add", "arguments": {"a": 2, "b": 3}} tool_output system user assistant model ipython',
           'def hello(world):\n    return world + 1\n' * 4]
  backend = build_bpe(iter(texts), 400)
  return Tokenizer(backend, eos_id=backend.token_to_id(EOS), path='<test>')


@pytest.fixture(scope='module')
def toks(base) -> dict[str, Tokenizer]:
  return {name: chat.add_special_tokens(base, name) for name in NAMES}


def _segments_with_eos(segments):
  """Adds the trained EOS every complete sample ends with and merges neighbours with the same label."""
  merged = []
  for text, trained in [*segments, (EOS, True)]:
    if merged and merged[-1][1] == trained:
      merged[-1] = (merged[-1][0] + text, trained)
    else:
      merged.append((text, trained))
  return merged


def _check_mask(tok: Tokenizer, ids: np.ndarray, mask: np.ndarray, segments) -> None:
  backend = tok._backend
  text = ''.join(t for t, _ in segments)
  assert ids.tolist() == backend.encode(text, add_special_tokens=False).ids + [tok.eos_id]
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and set(np.unique(mask)) <= {0, 1}
  # Token by token: all characters of a token carry the token's mask value.
  labels = np.concatenate([np.full(len(t), int(trained)) for t, trained in segments])
  offsets = backend.encode(text, add_special_tokens=False).offsets
  for k, (s, e) in enumerate(offsets):
    assert (labels[s:e] == mask[k]).all(), (k, text[s:e], mask[k])
  # And as text: each run of equal mask values decodes to one expected segment.
  cuts = np.flatnonzero(np.diff(mask)) + 1
  runs = [(tok.decode(r), bool(m[0])) for r, m in zip(np.split(ids, cuts), np.split(mask, cuts), strict=True)]
  assert runs == _segments_with_eos(segments)


# ----------------------------------------------------------------------------- templates and tokens


@pytest.mark.parametrize('name', NAMES)
def test_special_tokens_are_added_once_after_the_vocabulary(base, toks, name):
  wanted = chat_templates.special_tokens(name)
  assert all(t in chat_templates.TEMPLATES[name] for t in wanted)
  tok = toks[name]
  assert tok.vocab_size == base.vocab_size + len(wanted) and tok.eos_id == base.eos_id
  assert [tok.encode(t) for t in wanted] == [[base.vocab_size + k] for k in range(len(wanted))]
  assert len(base.encode(wanted[0])) > 1  # the input tokenizer is unchanged: still split into pieces
  again = chat.add_special_tokens(tok, name)  # idempotent: no duplicate ids
  assert again.vocab_size == tok.vocab_size
  # A transformers backend gets the same ids, and is copied too.
  hf = Tokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=base._backend), eos_id=base.eos_id, path='<hf>')
  grown = chat.add_special_tokens(hf, name)
  assert grown.vocab_size == tok.vocab_size and hf.vocab_size == base.vocab_size
  assert [grown.encode(t) for t in wanted] == [tok.encode(t) for t in wanted]


@pytest.mark.parametrize('name', NAMES)
def test_render_matches_the_published_format(toks, name):
  enc = chat.ChatEncoder(toks[name], name)
  assert enc.render(CONV) == ''.join(t for t, _ in EXPECTED[name])
  assert enc.render(SHORT) == EXPECTED_SHORT[name]
  assert enc.render(SHORT[:1], add_generation_prompt=True) == EXPECTED_PROMPT[name]


@pytest.mark.parametrize('name', NAMES)
def test_mask_is_one_exactly_on_assistant_output(toks, name):
  enc = chat.ChatEncoder(toks[name], name)
  assert enc.mask == 'generation'
  ids, mask = enc.encode(CONV)
  _check_mask(toks[name], ids, mask, EXPECTED[name])


@pytest.mark.parametrize('name', sorted(EXPECTED_TWO_CALLS))
def test_two_tool_calls_and_consecutive_results(toks, name):
  ids, mask = chat.ChatEncoder(toks[name], name).encode(TWO_CALLS)
  _check_mask(toks[name], ids, mask, EXPECTED_TWO_CALLS[name])


def test_llama3_rejects_two_calls_in_one_turn(toks):
  with pytest.raises(ValueError, match='single tool-calls'):
    chat.ChatEncoder(toks['llama3'], 'llama3').encode(TWO_CALLS)


@pytest.mark.parametrize('name', NAMES)
def test_hf_apply_chat_template_gives_the_mask_in_one_pass(base, toks, name):
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=toks[name]._backend)
  hf.chat_template = chat_templates.TEMPLATES[name]
  out = hf.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = chat.ChatEncoder(toks[name], name).encode(CONV)
  assert out['input_ids'] == ids[:-1].tolist() and out['assistant_masks'] == mask[:-1].tolist()
  # The tokenizer's own template ('tokenizer') with tags takes the same path, also through a transformers backend.
  own = chat.ChatEncoder(Tokenizer(hf, eos_id=base.eos_id, path='<hf>'), 'tokenizer')
  assert own.mask == 'generation'
  ids2, mask2 = own.encode(CONV)
  assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()


# ----------------------------------------------------------------------------- the turn-by-turn fallback


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('conv', ['CONV', 'TWO_CALLS', 'SHORT', 'MULTI', 'SYSTEM_SHORT'])
def test_turn_by_turn_masks_equal_generation_tags(toks, name, conv):
  messages = globals()[conv]
  tagged = chat.ChatEncoder(toks[name], name)
  turns = chat.ChatEncoder(toks[name], name, mask='turns')
  if name == 'llama3' and conv == 'TWO_CALLS':
    return  # rejected by the template on both paths (test above)
  if name == 'mistral' and conv == 'CONV':
    # Mistral moves the system prompt to the last user turn as the chat grows: not prefix-stable, and the
    # fallback says so rather than guessing.
    with pytest.raises(ValueError, match='not prefix-stable'):
      turns.encode(messages)
    return
  ids, mask = tagged.encode(messages)
  ids2, mask2 = turns.encode(messages)
  assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()
  assert mask.sum() > 1


@pytest.mark.parametrize('name', NAMES)
def test_tokenizer_template_without_tags_falls_back_to_turns(base, toks, name):
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=toks[name]._backend)
  hf.chat_template = chat_templates.without_generation_tags(chat_templates.TEMPLATES[name])
  template = chat_templates.TEMPLATES[name]
  assert template.count('generation %}') == 2 * template.count('endgeneration %}') > 0
  assert 'generation %}' not in hf.chat_template
  own = chat.ChatEncoder(Tokenizer(hf, eos_id=base.eos_id, path='<hf>'), 'tokenizer')
  assert own.mask == 'turns'
  ids, mask = own.encode(TWO_CALLS if name != 'llama3' else MULTI)
  _check_mask(toks[name], ids, mask, EXPECTED_TWO_CALLS[name] if name != 'llama3' else [
      ('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
       '<|start_header_id|>assistant<|end_header_id|>\n\n', F), ('Hello.<|eot_id|>', T),
      ('<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
       F), ('See you.<|eot_id|>', T)])
  with pytest.raises(DataError, match="needs \\{% generation %\\} tags"):
    chat.ChatEncoder(Tokenizer(hf, eos_id=base.eos_id, path='<hf>'), 'tokenizer', mask='generation')


def test_spans_to_mask_counts_straddling_tokens_as_inside():
  offsets = [(0, 2), (2, 5), (5, 6), (6, 9)]
  assert chat.spans_to_mask(offsets, [(3, 4)]).tolist() == [0, 1, 0, 0]
  assert chat.spans_to_mask(offsets, [(1, 3), (8, 9)]).tolist() == [1, 1, 0, 1]
  assert chat.spans_to_mask(offsets, [(5, 5)]).tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- tools, EOS, bad records


def test_tool_definitions_qwen_and_mistral(toks):
  conv = CONV[1:5]
  qwen = chat.ChatEncoder(toks['qwen'], 'qwen').render(conv, tools=[ADD])
  assert qwen.startswith(
      f'<|im_start|>system\n{QWEN_SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the user '
      'query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
      f'{json.dumps(ADD)}\n</tools>\n\nFor each function call, return a json object with function name and '
      'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
      '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n')
  mistral = chat.ChatEncoder(toks['mistral'], 'mistral')
  assert mistral.render(conv, tools=[ADD]).startswith(
      f'<s>[AVAILABLE_TOOLS] {json.dumps([ADD])}[/AVAILABLE_TOOLS][INST] What is 2+3?[/INST][TOOL_CALLS] [')
  ids, mask = mistral.encode_record({'messages': conv, 'tools': [ADD]})
  assert toks['mistral'].decode(ids[mask == 1]) == (
      '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "abc123xyz"}]</s> 2+3 is 5.</s>' + EOS)
  for name in ('chatml', 'llama3', 'gemma'):
    with pytest.raises(ValueError, match='renders no tool definitions'):
      chat.ChatEncoder(toks[name], name).encode(conv, tools=[ADD])


def test_tool_call_forms_render_alike(toks):
  enc = chat.ChatEncoder(toks['qwen'], 'qwen')
  want = enc.encode(CONV)
  as_text = [dict(m) for m in CONV]
  as_text[2] = {'role': 'assistant', 'tool_calls': [
      {'id': 'abc123xyz', 'type': 'function', 'function': {'name': 'add', 'arguments': '{"a": 2, "b": 3}'}}]}
  flat = [dict(m) for m in CONV]
  flat[2] = {'role': 'assistant', 'content': '', 'tool_calls': [{'name': 'add', 'arguments': {'a': 2, 'b': 3}}]}
  for conv in (as_text, flat):
    got = enc.encode(conv)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_final_eos_trained_only_on_complete_samples(toks):
  tok = toks['chatml']
  enc = chat.ChatEncoder(tok, 'chatml')
  ids, mask = enc.encode(SHORT)
  assert ids[-1] == tok.eos_id and mask[-1] == 1 and ids[-2] != tok.eos_id
  ids2, mask2 = enc.encode(SHORT, complete=False)
  assert ids2.tolist() == ids.tolist()
  assert mask2.tolist() == mask[:-1].tolist() + [0]
  assert chat.mark_incomplete(ids, mask, tok.eos_id).tolist() == mask2.tolist()
  assert mask[-1] == 1  # mark_incomplete copies
  # A conversation that ends on a user turn gets an EOS, but nothing teaches the model to end there.
  ids3, mask3 = enc.encode([*SHORT, {'role': 'user', 'content': 'Bye'}])
  assert ids3[-1] == tok.eos_id and mask3[-1] == 0 and mask3.sum() == mask.sum() - 1
  # Where the template already ends with the tokenizer's EOS (mistral's </s>), none is appended.
  mistral_tok = toks['mistral']
  eos_is_s = Tokenizer(mistral_tok._backend, eos_id=mistral_tok.encode('</s>')[0], path='<test>')
  ids4, mask4 = chat.ChatEncoder(eos_is_s, 'mistral').encode(SHORT)
  assert mistral_tok.decode(ids4) == EXPECTED_SHORT['mistral'] and mask4[-1] == 1
  assert chat.ChatEncoder(eos_is_s, 'mistral').encode(SHORT, complete=False)[1][-1] == 0


BAD = [
    ([], 'has no messages'),
    ('hello', 'expected a list of messages'),
    ({'text': 'hi'}, "no 'messages' field"),
    ([{'role': 'bot', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}], "unknown role 'bot'"),
    ([{'role': 'user', 'content': ['a']}, {'role': 'assistant', 'content': 'y'}], r'non-string content \(list\)'),
    ([{'role': 'user'}, {'role': 'assistant', 'content': 'y'}], 'has no content'),
    ([{'role': 'user', 'content': 'x'}, {'role': 'user', 'content': 'y'}], 'no assistant turn'),
    ([{'role': 'user', 'content': 'x'}, 'assistant'], 'message 1 is a str'),
    ([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'tool_calls': [{'function': {'arguments': '{}'}}]}],
     'has no function name'),
    ([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'tool_calls': [{'name': 'f', 'arguments': '{oops'}]}],
     'not JSON'),
    ([{'role': 'user', 'content': 'x', 'tool_calls': [{'name': 'f'}]}, {'role': 'assistant', 'content': 'y'}],
     'only assistant messages may call tools'),
]


@pytest.mark.parametrize('record,problem', BAD)
def test_bad_records_raise_value_error(toks, record, problem):
  enc = chat.ChatEncoder(toks['chatml'], 'chatml')
  with pytest.raises(ValueError, match=problem):
    enc([record])


@pytest.mark.parametrize('name,messages,problem', [
    ('gemma', [*SHORT, {'role': 'system', 'content': 'late'}, *SHORT], 'System role is only supported as the first'),
    ('gemma', [SHORT[0], *SHORT], 'must alternate'),
    ('mistral', [SHORT[0], *SHORT], 'must alternate'),
    ('mistral', [SHORT[0], {'role': 'assistant', 'tool_calls': [_call(1, 2, 'short')]}], 'length 9'),
    ('chatml', [{'role': 'assistant', 'content': 'first'}], None),
])
def test_template_rejections_are_value_errors(toks, name, messages, problem):
  if problem is None:  # an assistant-first chat: fine with tags, impossible turn by turn
    assert chat.ChatEncoder(toks[name], name).encode(messages)[1].sum() > 0
    with pytest.raises(ValueError, match='needs a turn before it'):
      chat.ChatEncoder(toks[name], name, mask='turns').encode(messages)
    return
  with pytest.raises(ValueError, match=problem) as info:
    chat.ChatEncoder(toks[name], name).encode(messages)
  assert f'chat template {name!r} rejects the conversation' in str(info.value)


def test_config_mistakes_raise_data_error(base, toks):
  with pytest.raises(DataError, match=r"template='vicuna' is not a chat template; expected one of \('chatml'"):
    chat.ChatEncoder(toks['chatml'], 'vicuna')
  with pytest.raises(DataError, match=r"needs special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
    chat.ChatEncoder(base, 'chatml', key='data.sources.sft.template')
  with pytest.raises(DataError, match='^data.sources.sft.template='):
    chat.ChatEncoder(base, 'chatml', key='data.sources.sft.template')
  with pytest.raises(DataError, match='the tokenizer has none'):
    chat.ChatEncoder(base, 'tokenizer')
  with pytest.raises(DataError, match='is not valid'):
    chat.ChatEncoder(toks['chatml'], 'chatml', mask='all')
  with pytest.raises(DataError, match='is not a chat template'):
    chat_templates.special_tokens('alpaca')
  assert chat_templates.special_tokens('tokenizer') == []


# ----------------------------------------------------------------------------- pipeline interfaces


def test_prepare_encoder_interface_skips_bad_records(toks, tmp_path):
  enc = chat.ChatEncoder(toks['gemma'], 'gemma')
  records = [CONV, SHORT, [{'role': 'user', 'content': 'no answer'}], {'messages': MULTI}]
  fp = prepare.fingerprint_of({'test': 'chat', **enc.identity})
  prepared = prepare.prepare(records, enc, fp, name='chat', root=str(tmp_path))
  assert len(prepared) == 3 and prepared.skipped == 1 and prepared.source_index.tolist() == [0, 1, 3]
  for k, record in zip(range(3), (CONV, SHORT, MULTI), strict=True):
    ids, mask = enc.encode(record)
    got_ids, got_mask = prepared[k]
    assert got_ids.tolist() == ids.tolist() and got_mask.tolist() == mask.tolist()


def test_grain_stage_resumes_bitwise(toks):
  enc = chat.ChatEncoder(toks['qwen'], 'qwen')
  records = [CONV, TWO_CALLS, SHORT, MULTI, SYSTEM_SHORT, CONV[1:5]] * 2

  def build():
    def encode(record):
      ids, mask = enc.encode_record(record)
      return {'tokens': ids, 'loss_mask': mask}
    return grain.MapDataset.source(records).shuffle(seed=7).repeat(2).map(encode).to_iter_dataset()

  it = iter(build())
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(9)]
  resumed = iter(build())
  resumed.set_state(state)
  for want in rest:
    got = next(resumed)
    for key in ('tokens', 'loss_mask'):
      assert got[key].dtype == np.int32 and got[key].tobytes() == want[key].tobytes()
  # The stream is the shuffled records, each encoded as on its own.
  first = next(iter(build()))
  assert any(first['tokens'].tolist() == enc.encode(r)[0].tolist() for r in records)


def test_encoder_identity_tracks_the_template(toks):
  a = chat.ChatEncoder(toks['chatml'], 'chatml').identity
  b = chat.ChatEncoder(toks['chatml'], 'chatml', mask='turns').identity
  c = chat.ChatEncoder(toks['qwen'], 'qwen').identity
  assert a['template'] == 'chatml' and a['sha256'] == b['sha256'] and a['mask'] != b['mask']
  assert c['sha256'] != a['sha256']
