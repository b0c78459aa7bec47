"""The data pipeline over named sources: token-share mixing, chat sources with an assistant-only loss, end
policies, bad records skipped and counted, blocklists, the intra-document mask switch, resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from jaxtrain.data import DataError, load_tokenizer, make_dataset, pipeline, sample_ids, sources
from jaxtrain.data.sources import source
from jaxtrain.config.defaults import base_config

SEQ_LEN = 64


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpora')
  # 'short': many 6-10 word notes; 'long': fewer, 60-100 word documents. Token shares differ from doc shares.
  short = [{'text': f'note {i}: ' + ' '.join(f's{(i * 3 + k) % 17}' for k in range(6 + i % 5))} for i in range(120)]
  long = [{'text': f'essay {i}: ' + ' '.join(f'l{(i * 5 + k) % 29}' for k in range(60 + i % 41))} for i in range(30)]
  chats = [{'messages': [{'role': 'system', 'content': 'Be brief.'},
                         {'role': 'user', 'content': f'What is {i} plus {i}?'},
                         {'role': 'assistant', 'content': f'It is {2 * i}.'},
                         {'role': 'user', 'content': 'Thanks'},
                         {'role': 'assistant', 'content': 'You are welcome.'}]} for i in range(40)]
  return {'short': _write_jsonl(root / 'short.jsonl', short), 'long': _write_jsonl(root / 'long.jsonl', long),
          'chat': _write_jsonl(root / 'chat.jsonl', chats), 'root': root}


def _cfg(sources_: dict, **overrides):
  d = base_config().data
  d.tokenizer_vocab_size, d.seq_len, d.prefetch, d.eval_fraction = 320, SEQ_LEN, 0, 0.1
  d.pack_buffer = 256
  for name, s in sources_.items():
    d.sources[name] = s
  for k, v in overrides.items():
    d[k] = v
  return d


def _source_tokens(srcs, batches) -> dict[str, int]:
  """Real tokens per source in `batches`, by doc id range."""
  starts = np.cumsum([0] + [len(s.docs) for s in srcs])
  out = {s.name: 0 for s in srcs}
  for b in batches:
    ids = b['doc_ids'][b['segment_ids'] > 0]
    which = np.searchsorted(starts, ids, side='right') - 1
    for k, s in enumerate(srcs):
      out[s.name] += int((which == k).sum())
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize('temperature', [0.0, 2.0])
def test_mixture_follows_token_shares(corpora, temperature):
  cfg = _cfg({'short': source(corpora['short'], weight=3.0), 'long': source(corpora['long'], weight=1.0)},
             temperature=temperature)
  tok = load_tokenizer(cfg)
  srcs = pipeline.load_sources(cfg, tok, 'train')
  shares = pipeline.source_shares(cfg, srcs)
  if temperature:
    n = {s.name: s.prepared.total_tokens for s in srcs}
    p = {k: v ** 0.5 for k, v in n.items()}
    assert shares == pytest.approx({k: v / sum(p.values()) for k, v in p.items()})
  else:
    assert shares == pytest.approx({'short': 0.75, 'long': 0.25})
  batches = _take(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=8)), 60)
  # The stated tolerance: after every batch, each source's tokens are within (sources - 1) * seq_len of its
  # share of all tokens so far (the shuffle and packing windows read ahead within a source only).
  for k in range(1, len(batches) + 1):
    seen = _source_tokens(srcs, batches[:k])
    total = sum(seen.values())
    for name, share in shares.items():
      assert abs(seen[name] - share * total) <= SEQ_LEN, (k, seen, shares)
  # Sample ids name the source first.
  names = {n.split(':')[0] for b in batches[:5] for row in sample_ids(cfg, 'train', b) for n in row}
  assert names == {'short', 'long'}


def test_chat_source_trains_on_assistant_tokens_only(corpora):
  cfg = _cfg({'chat': source(corpora['chat'], format='chat', template='chatml')}, seq_len=256)
  tok = load_tokenizer(cfg)
  # The built tokenizer holds the template's special tokens as single ids.
  assert len(tok.encode('<|im_start|>')) == 1 and len(tok.encode('<|im_end|>')) == 1
  batch = next(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=4)))
  im_end = tok.encode('<|im_end|>')[0]
  for r in range(4):
    for s in range(1, batch['segment_ids'][r].max() + 1):
      seg = batch['segment_ids'][r] == s
      ids, mask = batch['tokens'][r][seg], batch['loss_mask'][r][seg]
      text = tok.decode(ids)
      # Masked tokens decode to exactly the assistant replies, each closed by its end-of-turn token.
      runs, current = [], []
      for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
          current.append(t)
        elif current:
          runs.append(tok.decode(current))
          current = []
      if current:
        runs.append(tok.decode(current))
      i = int(text.split('What is ')[1].split(' ')[0])
      # The newline after the last turn is scaffolding; the EOS of a complete conversation is learned.
      assert runs == [f'It is {2 * i}.<|im_end|>', 'You are welcome.<|im_end|>', '<|endoftext|>'], runs
      assert ids[mask == 1].tolist().count(im_end) == 2
      assert 'Be brief.' in text and mask[:len(tok.encode('<|im_start|>system\nBe brief.'))].sum() == 0


def test_finite_sources_end_by_policy(corpora):
  def stream(on_end, n=80):
    cfg = _cfg({'short': source(corpora['short'], weight=1.0), 'long': source(corpora['long'], weight=1.0,
                                                                             epochs=1, on_end=on_end)},
               shuffle_window=0)
    tok = load_tokenizer(cfg)
    srcs = pipeline.load_sources(cfg, tok, 'train')
    out = list(itertools.islice(make_dataset(cfg, tok, split='train', seed=0, batch_size=4), n))  # ends early
    return srcs, out, cfg, tok

  srcs, batches, _, _ = stream('stop', n=400)
  assert len(batches) < 400  # the mixture ended cleanly
  long_tokens = {s.name: s.prepared.total_tokens for s in srcs}['long']
  assert long_tokens * 0.9 <= _source_tokens(srcs, batches)['long'] <= long_tokens  # one epoch, never more
  srcs, batches, cfg, tok = stream('drop', n=160)
  assert len(batches) == 160  # 'short' goes on alone
  tail = _source_tokens(srcs, batches[-20:])
  assert tail['long'] == 0 and tail['short'] > 0
  assert _source_tokens(srcs, batches)['long'] == long_tokens
  # Resume across the drop: a state taken before it continues bitwise.
  it = iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=4))
  _take(it, 10)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 60)
  again = iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=4))
  again.set_state(state)
  for x, y in zip(_take(again, 60), expected, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_a_small_finite_source_keeps_its_share_until_it_ends(corpora):
  """Read-ahead does not dilute a source: with the default shuffle window (2,048 pieces, far more than 'short'
  holds) 'short' (one epoch, then dropped) gets half of every batch until its last token, then none."""
  cfg = _cfg({'short': source(corpora['short'], epochs=1, on_end='drop'), 'long': source(corpora['long'])})
  assert cfg.shuffle_window == 2048
  tok = load_tokenizer(cfg)
  srcs = pipeline.load_sources(cfg, tok, 'train')
  short_tokens = {s.name: s.prepared.total_tokens for s in srcs}['short']
  batches = _take(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=4)), 40)
  per_batch = [_source_tokens(srcs, [b])['short'] for b in batches]
  ended = int(np.flatnonzero(np.cumsum(per_batch) == short_tokens)[0]) + 1  # batches until 'short' ran out
  assert sum(per_batch) == short_tokens and not any(per_batch[ended:]) and 5 < ended < 30
  for k in range(1, ended):  # every batch before its last one: within one row of half the tokens
    seen = _source_tokens(srcs, batches[:k])
    assert abs(seen['short'] - seen['long']) <= 2 * SEQ_LEN, (k, seen)


def test_bad_records_are_skipped_counted_or_stop_the_run(corpora, tmp_path):
  good = [json.dumps({'text': f'fine document {i} ' + 'word ' * (i % 7)}) for i in range(200)]
  lines = good[:50] + ['{"text": broken', '{"body": "no text field"}', '{"text": 7}', '{"text": ""}'] + good[50:]
  raw = ('\n'.join(lines) + '\n').encode()
  raw += b'{"text": "bad utf-8 \xff\xfe here"}\n'
  path = tmp_path / 'mixed.jsonl'
  path.write_bytes(raw)
  cfg = _cfg({'web': source(str(path))}, max_bad_fraction=0.05)
  docs = sources.load_documents(sources.source_specs(cfg)[0].view, 'train')
  assert docs.bad.total == 4 and docs.bad.empty == 1
  reasons = sorted(docs.bad.counts)
  assert reasons[:2] == ["field 'text' holds a int where a string was expected", "no field 'text' (present: ['body'])"]
  assert reasons[2].startswith("not valid JSON or UTF-8 ('utf-8' codec can't decode byte 0xff")
  assert reasons[3].startswith('not valid JSON or UTF-8 (Expecting value')
  tok = load_tokenizer(cfg)
  (src,) = pipeline.load_sources(cfg, tok, 'train')
  report = pipeline.source_report([src])[0]
  assert report.startswith(f'web: {len(src.prepared)} documents') and '1 empty skipped' in report
  assert 'skipped 1 not valid JSON' in report
  next(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=2)))  # trains on the rest
  cfg.max_bad_fraction = 0.01  # 4 bad of ~204 is too many now
  with pytest.raises(DataError, match=r"data\.sources\.web\.path=.* has 4 bad records of 20\d \(2\.0%, more than "
                                      r"data\.max_bad_fraction=0\.01"):
    sources.load_documents(sources.source_specs(cfg)[0].view, 'train')
  # A record over data.max_doc_bytes is skipped too.
  cfg.max_bad_fraction, cfg.max_doc_bytes = 1.0, 44
  bad = sources.load_documents(sources.source_specs(cfg)[0].view, 'train').bad
  over = [json.dumps({'text': f'fine document {i} ' + 'word ' * (i % 7)}) for i in range(200)]
  assert bad.counts['a record over data.max_doc_bytes=44'] == sum(len(line) + 1 > 44 for line in over)


def test_blocklisted_documents_never_appear(corpora, tmp_path):
  cfg = _cfg({'short': source(corpora['short'])}, shuffle_window=0)
  tok = load_tokenizer(cfg)
  (src,) = pipeline.load_sources(cfg, tok, 'train')
  blocked = [f'short:{src.docs.name(i)}' for i in range(0, len(src.docs), 3)]
  (tmp_path / 'block.txt').write_text('# from a spike dump\n' + '\n'.join(blocked) + '\n')
  cfg.exclude = str(tmp_path / 'block.txt')
  seen = {n for b in _take(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=8)), 40)
          for row in sample_ids(cfg, 'train', b) for n in row}
  assert seen and not seen & set(blocked)
  assert len(seen) == len(src.docs) - len(blocked)
  # The run's data line says how many documents the blocklist removed.
  report = pipeline.source_report([src], pipeline.blocklist(cfg))[0]
  assert f'; {len(blocked)} excluded by data.exclude ({len(src.prepared) - len(blocked)} left)' in report, report
  assert 'excluded' not in pipeline.source_report([src])[0]


def test_intra_doc_mask_switch_and_eval_packing(corpora):
  cfg = _cfg({'short': source(corpora['short']), 'long': source(corpora['long'])})
  tok = load_tokenizer(cfg)
  masked = next(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=8)))
  cfg.intra_doc_mask = False
  open_ = next(iter(make_dataset(cfg, tok, split='train', seed=0, batch_size=8)))
  np.testing.assert_array_equal(masked['tokens'], open_['tokens'])
  np.testing.assert_array_equal(masked['positions'], open_['positions'])  # positions still restart
  assert masked['segment_ids'].max() > 1
  np.testing.assert_array_equal(open_['segment_ids'], (masked['segment_ids'] > 0).astype(np.int32))
  # Eval rows are packed by the same best-fit packer: as full as train rows.
  ev = _take(iter(make_dataset(cfg, tok, split='eval', seed=0, batch_size=8)), 4)
  assert np.mean([(b['segment_ids'] > 0).mean() for b in ev]) > 0.95
  assert max(b['segment_ids'].max() for b in ev) > 0


def test_source_settings_are_validated(corpora):
  with pytest.raises(DataError, match=r"data\.sources\.<name>\.wieght=2 is not a source setting"):
    source(corpora['short'], wieght=2)
  for settings, needle in (({'format': 'audio'}, r"data\.sources\.x\.format='audio' is not valid"),
                           ({'on_end': 'loop'}, r"data\.sources\.x\.on_end='loop' is not valid"),
                           ({'epochs': -1}, r"data\.sources\.x\.epochs=-1 is not valid")):
    with pytest.raises(DataError, match=needle):
      sources.source_specs(_cfg({'x': source(corpora['short'], **settings)}))
  cfg = _cfg({'a': source(corpora['short'], weight=-1.0), 'b': source(corpora['long'])})
  tok = load_tokenizer(_cfg({'a': source(corpora['short']), 'b': source(corpora['long'])}))
  with pytest.raises(DataError, match=r'data\.sources\.a\.weight=-1\.0'):
    pipeline.source_shares(cfg, pipeline.load_sources(cfg, tok, 'train'))
