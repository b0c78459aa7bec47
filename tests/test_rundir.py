"""A run directory is self-contained: it keeps the tokenizer it trained with (WORKDIR/tokenizer/), its config is
read back completely (named sources included), and every export ships exactly that tokenizer, with the chat
template and the end-of-turn token a chat fine-tune needs in transformers."""

import json
import os

import pytest
import transformers

from jaxtrain import cli, data
from jaxtrain.data import chat_templates
from jaxtrain.train import export, rundir

TEXTS = ['import os\nprint(os.getcwd())', 'How do I sort a list in Python?  Use sorted().', 'naïve café ✓ 42']
CHAT = [{'role': 'user', 'content': 'What does os.getcwd return?'},
        {'role': 'assistant', 'content': 'The current working directory.'}]


def train(workdir, config, *overrides):
  cli.main(['jaxtrain', 'train', f'--config={config}', f'--workdir={workdir}', '--config.train.eval_every=0',
            '--config.train.eval_batches=1', '--config.optim.warmup_steps=1', '--config.log.plot=False',
            '--config.log.progress=False', *overrides])


def exported(workdir, out, fmt='hf'):
  cli.main(['jaxtrain', 'export', f'--workdir={workdir}', f'--out={out}', f'--format={fmt}'])
  return transformers.AutoTokenizer.from_pretrained(out)


@pytest.mark.slow
def test_a_chat_fine_tune_exports_its_own_tokenizer_and_template(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'sft')
  train(workdir, 'configs/lora_sft.py', '--config.train.steps=2', '--config.checkpoint.every=2',
        '--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
        '--config.model.num_kv_heads=1', '--config.model.mlp_dim=64', '--config.data.seq_len=64',
        '--config.data.batch_size=8', '--config.lora.rank=2', '--config.data.tokenizer_vocab_size=512')
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  config = export.load_run_config(workdir)
  assert json.loads(config.to_json_best_effort()) == saved  # every section, data.sources.sft included
  assert config.data.sources.sft.format == 'chat' and config.data.sources.sft.template == 'chatml'
  assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer.json'))
  trained_with = data.load_tokenizer(config.data)  # as the run built it (from the corpus, cached)

  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'empty-cache'))  # nothing cached: nothing may be rebuilt
  hf = exported(workdir, str(tmp_path / 'merged'))
  peft = exported(workdir, str(tmp_path / 'adapter'), 'peft')
  assert not os.path.exists(tmp_path / 'empty-cache' / 'tokenizers')
  specials = '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|><|endoftext|>'
  for tok in (hf, peft):
    assert len(tok) == trained_with.vocab_size
    for text in TEXTS + [specials]:
      assert tok.encode(text, add_special_tokens=False) == trained_with.encode(text), text
    assert tok.eos_token_id == trained_with.eos_id
  template = chat_templates.without_generation_tags(chat_templates.TEMPLATES['chatml'])
  for out in ('merged', 'adapter'):
    assert json.load(open(tmp_path / out / 'tokenizer_config.json'))['chat_template'] == template
  end = trained_with.encode('<|im_end|>')
  assert len(end) == 1
  generation = json.load(open(tmp_path / 'merged' / 'generation_config.json'))
  assert generation['eos_token_id'] == [trained_with.eos_id, end[0]]
  # transformers renders the run's chat format and generate() stops at the end of the assistant's turn.
  prompt = hf.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
  assert prompt == '<|im_start|>user\nWhat does os.getcwd return?<|im_end|>\n<|im_start|>assistant\n'
  ids = hf.apply_chat_template(CHAT, tokenize=False)
  assert hf.encode(ids, add_special_tokens=False) == trained_with.encode(ids)
  assert end[0] in transformers.GenerationConfig.from_pretrained(tmp_path / 'merged').eos_token_id


@pytest.mark.slow
def test_a_plain_run_exports_its_tokenizer_without_the_cache_and_old_runs_fall_back(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'plain')
  train(workdir, 'configs/tiny.py', '--config.train.steps=2', '--config.checkpoint.every=2')
  config = export.load_run_config(workdir)
  trained_with = data.load_tokenizer(config.data)
  monkeypatch.setenv('JAXTRAIN_CACHE', str(tmp_path / 'empty-cache'))
  tok = exported(workdir, str(tmp_path / 'hf'))
  assert not os.path.exists(tmp_path / 'empty-cache' / 'tokenizers')
  for text in TEXTS + ['<|endoftext|>']:
    assert tok.encode(text, add_special_tokens=False) == trained_with.encode(text), text
  assert 'chat_template' not in json.load(open(tmp_path / 'hf' / 'tokenizer_config.json'))
  assert json.load(open(tmp_path / 'hf' / 'generation_config.json'))['eos_token_id'] == trained_with.eos_id
  assert rundir.load_tokenizer(config, workdir).path == os.path.join(workdir, 'tokenizer')
  capsys.readouterr()

  # A run from before runs kept their tokenizer: today's behaviour (rebuilt from the corpus), with a note.
  monkeypatch.delenv('JAXTRAIN_CACHE')
  os.rename(os.path.join(workdir, 'tokenizer'), os.path.join(workdir, 'tokenizer.moved'))
  tok = exported(workdir, str(tmp_path / 'hf-old'))
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
  assert len(err) == 1 and 'holds no copy of its tokenizer' in err[0]
  assert tok.encode(TEXTS[0], add_special_tokens=False) == trained_with.encode(TEXTS[0])


def test_load_config_keeps_named_sources_and_unknown_keys(tmp_path):
  from jaxtrain.config.defaults import base_config
  saved = json.loads(base_config().to_json_best_effort())
  saved['data']['sources'] = {'a': {'path': 'x.jsonl', 'format': 'chat', 'template': 'llama3'}}
  saved['future'] = {'key': 1}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = rundir.load_config(str(tmp_path))
  assert config.data.sources.a.template == 'llama3' and config.data.sources.a.weight == 1.0  # source defaults
  assert config.future.key == 1
  (tmp_path / 'empty').mkdir()
  with pytest.raises(rundir.RunDirError, match='has no config.json'):
    rundir.load_config(str(tmp_path / 'empty'))
