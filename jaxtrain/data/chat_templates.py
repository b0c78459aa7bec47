"""The chat templates jaxtrain ships: Jinja templates for five families (chatml, llama3, mistral, gemma, qwen),
the special tokens each writes, and notes on where a template deliberately departs from its family's
published one. Each wraps what the assistant produces in `{% generation %}...{% endgeneration %}` so the
assistant mask comes from one rendering (`jaxtrain.data.chat`)."""

from __future__ import annotations

import re


from jaxtrain.data.sources import DataError


OWN_TEMPLATE = 'tokenizer'  # template name meaning "the tokenizer's own chat_template"


GENERATION_TAG = re.compile(r'\{%-?\s*generation\s*-?%\}')


GENERATION_TAGS = re.compile(r'\{%-?\s*(end)?generation\s*-?%\}')


_CHATML = r"""
{%- if tools %}
  {{- raise_exception('chatml renders no tool definitions; describe the tools in the system prompt') }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'assistant' %}
    {{- '<|im_start|>assistant\n' }}
    {%- generation %}
      {{- message.content or '' }}
      {%- for call in message.tool_calls or [] %}
        {%- set fn = call.function if call.function is defined else call %}
        {%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}
        {{- '<tool_call>\n' + {'name': fn.name, 'arguments': fn.arguments} | tojson + '\n</tool_call>' }}
      {%- endfor %}
      {{- '<|im_end|>' }}
    {%- endgeneration %}
    {{- '\n' }}
  {%- else %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


_LLAMA3 = r"""
{%- if tools %}
  {{- raise_exception('llama3 renders no tool definitions; describe the tools in the system prompt') }}
{%- endif %}
{{- '<|begin_of_text|>' }}
{%- for message in messages %}
  {{- '<|start_header_id|>' + ('ipython' if message.role == 'tool' else message.role) + '<|end_header_id|>\n\n' }}
  {%- if message.role == 'assistant' %}
    {%- generation %}
      {%- if message.tool_calls %}
        {%- if message.tool_calls | length != 1 %}
          {{- raise_exception('This model only supports single tool-calls at once!') }}
        {%- endif %}
        {%- if message.content %}
          {{- raise_exception('llama3 renders a tool call without content; got both') }}
        {%- endif %}
        {%- set call = message.tool_calls[0] %}
        {%- set fn = call.function if call.function is defined else call %}
        {{- '{"name": "' + fn.name + '", "parameters": ' + fn.arguments | tojson + '}' }}
      {%- else %}
        {{- message.content | trim }}
      {%- endif %}
      {{- '<|eot_id|>' }}
    {%- endgeneration %}
  {%- else %}
    {{- message.content | trim + '<|eot_id|>' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""


_MISTRAL = r"""
{%- if messages[0].role == 'system' %}
  {%- set system_message = messages[0].content %}
  {%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(turns=0, last_user=-1) %}
{%- for message in loop_messages %}
  {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
  {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
    {%- if (message.role == 'user') != (ns.turns % 2 == 0) %}
      {{- raise_exception('After the optional system message, conversation roles must alternate '
                          'user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
  {%- endif %}
{%- endfor %}
{{- '<s>' }}
{%- for message in loop_messages %}
  {%- if message.role == 'user' %}
    {%- if tools and loop.index0 == ns.last_user %}
      {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
    {%- endif %}
    {%- if system_message is defined and loop.index0 == ns.last_user %}
      {{- '[INST] ' + system_message + '\n\n' + message.content + '[/INST]' }}
    {%- else %}
      {{- '[INST] ' + message.content + '[/INST]' }}
    {%- endif %}
  {%- elif message.role == 'assistant' %}
    {%- generation %}
      {%- if message.tool_calls %}
        {%- if message.content %}
          {{- raise_exception('mistral renders a tool call without content; got both') }}
        {%- endif %}
        {{- '[TOOL_CALLS] [' }}
        {%- for call in message.tool_calls %}
          {%- set fn = call.function if call.function is defined else call %}
          {%- if call.id is not string or call.id | length != 9 %}
            {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
          {%- endif %}
          {{- {'name': fn.name, 'arguments': fn.arguments, 'id': call.id} | tojson }}
          {%- if not loop.last %}{{- ', ' }}{%- endif %}
        {%- endfor %}
        {{- ']</s>' }}
      {%- else %}
        {{- ' ' + message.content | trim + '</s>' }}
      {%- endif %}
    {%- endgeneration %}
  {%- elif message.role == 'tool' %}
    {%- if message.tool_call_id is not string or message.tool_call_id | length != 9 %}
      {{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
    {%- endif %}
    {{- '[TOOL_RESULTS] {"content": ' + message.content + ', "call_id": "' + message.tool_call_id
        + '"}[/TOOL_RESULTS]' }}
  {%- else %}
    {{- raise_exception('Only user, assistant and tool roles are supported, with the exception of an initial '
                        'optional system message!') }}
  {%- endif %}
{%- endfor %}
"""


_GEMMA = r"""
{%- if tools %}
  {{- raise_exception('gemma renders no tool definitions; describe the tools in the system prompt') }}
{%- endif %}
{{- '<bos>' }}
{%- if messages[0].role == 'system' %}
  {%- set first_user_prefix = messages[0].content + '\n\n' %}
  {%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set first_user_prefix = '' %}
  {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in loop_messages %}
  {%- if message.role == 'system' %}
    {{- raise_exception('System role is only supported as the first message') }}
  {%- endif %}
  {%- set continued = message.role == 'tool' and not loop.first and loop.previtem.role == 'tool' %}
  {%- if not continued %}
    {%- set role = 'model' if message.role == 'assistant' else 'user' %}
    {%- if (role == 'user') != (ns.turns % 2 == 0) %}
      {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
  {%- endif %}
  {%- if message.role == 'assistant' %}
    {%- generation %}
      {{- (message.content or '') | trim }}
      {%- for call in message.tool_calls or [] %}
        {%- set fn = call.function if call.function is defined else call %}
        {%- if (message.content or '') | trim or not loop.first %}{{- '\n' }}{%- endif %}
        {{- {'name': fn.name, 'parameters': fn.arguments} | tojson }}
      {%- endfor %}
      {{- '<end_of_turn>' }}
    {%- endgeneration %}
    {{- '\n' }}
  {%- elif message.role == 'tool' %}
    {{- ('\n' if continued else '') + '```tool_output\n' + message.content | trim + '\n```' }}
    {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<end_of_turn>\n' }}{%- endif %}
  {%- else %}
    {{- message.content | trim + '<end_of_turn>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""


_QWEN_DEFAULT_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'


_QWEN = r"""
{%- if tools %}
  {{- '<|im_start|>system\n' + (messages[0].content if messages[0].role == 'system' else 'DEFAULT_SYSTEM') }}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
  {%- for tool in tools %}{{- '\n' + tool | tojson }}{%- endfor %}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
  {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' }}
  {{- '\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- else %}
  {{- '<|im_start|>system\nDEFAULT_SYSTEM<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- elif message.role == 'assistant' %}
    {{- '<|im_start|>assistant\n' }}
    {%- generation %}
      {{- message.content or '' }}
      {%- for call in message.tool_calls or [] %}
        {%- set fn = call.function if call.function is defined else call %}
        {%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}
        {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + fn.arguments | tojson + '}\n</tool_call>' }}
      {%- endfor %}
      {{- '<|im_end|>' }}
    {%- endgeneration %}
    {{- '\n' }}
  {%- elif message.role == 'tool' %}
    {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
    {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
""".replace('DEFAULT_SYSTEM', _QWEN_DEFAULT_SYSTEM)


TEMPLATES: dict[str, str] = {name: text.strip() for name, text in (
    ('chatml', _CHATML), ('llama3', _LLAMA3), ('mistral', _MISTRAL), ('gemma', _GEMMA), ('qwen', _QWEN))}


_SPECIAL_TOKENS = {
    'chatml': ('<|im_start|>', '<|im_end|>'),
    'llama3': ('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'),
    'mistral': ('<s>', '</s>', '[INST]', '[/INST]', '[TOOL_CALLS]', '[AVAILABLE_TOOLS]', '[/AVAILABLE_TOOLS]',
                '[TOOL_RESULTS]', '[/TOOL_RESULTS]'),
    'gemma': ('<bos>', '<start_of_turn>', '<end_of_turn>'),
    'qwen': ('<|im_start|>', '<|im_end|>', '<tool_call>', '</tool_call>'),
}


TEMPLATE_NOTES: dict[str, str] = {
    'chatml': '<|im_start|>{role}\\n{content}<|im_end|>\\n for every role (tool turns keep role "tool"); '
              'tool calls in Hermes style, <tool_call>\\n{json}\\n</tool_call>; no BOS.',
    'llama3': 'Llama 3 turns (<|begin_of_text|>, headers, content trimmed, <|eot_id|>); tool calls and tool results '
              '(an "ipython" turn) as in Llama 3.1, one call per message; no 3.1 date preamble.',
    'mistral': 'Mistral tokenizer v3 (7B-Instruct-v0.3, Mixtral-8x22B): system prompt and [AVAILABLE_TOOLS] before '
               'the last user turn (as mistral-common does), " answer</s>", [TOOL_CALLS] with 9-character ids, '
               '[TOOL_RESULTS] {"content": <raw tool output>, "call_id": ...}; not prefix-stable with a system '
               'prompt and several user turns.',
    'gemma': 'Gemma 2/3 turns, system prompt folded into the first user turn; no tool tokens: tool calls are '
             'JSON {"name", "parameters"} lines of the model turn and results a user turn of ```tool_output '
             'blocks (Google\'s function-calling guide).',
    'qwen': 'Qwen2.5: ChatML with the default system prompt when none is given, tool definitions in the system '
            'turn, <tool_call> JSON in assistant turns, consecutive tool results in one user turn.',
}


def template_names() -> tuple[str, ...]:
  """Names accepted by `ChatEncoder`: the shipped templates plus 'tokenizer' (the tokenizer's own)."""
  return (*TEMPLATES, OWN_TEMPLATE)


def special_tokens(template_name: str) -> list[str]:
  """The special tokens `TEMPLATES[template_name]` writes, which a tokenizer must hold as single added tokens.

  'tokenizer' (the tokenizer's own template) needs none beyond what the tokenizer already has.
  """
  if template_name == OWN_TEMPLATE:
    return []
  if template_name not in TEMPLATES:
    raise DataError('template', template_name, 'is not a chat template', f'expected one of {template_names()}')
  return list(_SPECIAL_TOKENS[template_name])


def without_generation_tags(template: str) -> str:
  """`template` with its {% generation %} / {% endgeneration %} tags removed: it renders the same text."""
  return GENERATION_TAGS.sub('', template)

