"""What `jaxtrain eval` writes: RUN/eval/STEP.json (everything), STEP.md (readable), STEP_positions.png (loss
by position per set); with --all-steps curve.json and curve.png (loss by step per set); and the console table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from jaxtrain import paths

def eval_dir(workdir: str) -> str:
  return paths.in_run(workdir, paths.EVAL)


def _num(x: float, digits: int = 4) -> str:
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def _count(x: float) -> str:
  return f'{x:,.0f}' if float(x).is_integer() else f'{x:,.2f}'


def _scored(s: dict) -> str:
  """How much of the set was scored, said plainly (never a silent truncation)."""
  share = s['tokens'] / s['set_tokens'] if s['set_tokens'] else 1.0
  if s['complete']:
    return f'all {s["pieces"]:,} pieces'
  return f'{s["pieces_scored"]:,} of {s["pieces"]:,} pieces (~{share:.1%} of {s["set_tokens"]:,} tokens)'


def console(record: dict) -> str:
  """The compact table printed on stdout."""
  rows = [('set', 'tokens', 'loss', 'ppl', 'bits/byte', 'scored')]
  for name, s in record['sets'].items():
    rows.append((name, _count(s['tokens']), _num(s['loss']), _num(s['ppl'], 2), _num(s['bits_per_byte']),
                 _scored(s)))
  for name in ('micro', 'macro'):
    m = record[name]
    rows.append((name, _count(m['tokens']) if 'tokens' in m else '', _num(m['loss']), _num(m['ppl'], 2),
                 _num(m['bits_per_byte']), ''))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [f'eval {record["run"]} step {record["step"]}: {record["model"]}; batches of {record["rows"]} x '
           f'{record["seq_len"]} tokens, {_budget(record)}']
  for r in rows:  # names and the scored note left-aligned, numbers right-aligned
    cells = zip(r, widths, strict=True)
    lines.append('  ' + '  '.join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(cells)))
  note = in_run_line(record)
  if note:
    lines.append(note)
  return '\n'.join(line.rstrip() for line in lines)


def _budget(record: dict) -> str:
  n = record['max_batches']
  return f'up to {n} per set' if n else 'every batch of each set'


def in_run_line(record: dict) -> str:
  """The run's own eval loss at this step beside this evaluation's, when metrics.jsonl logged one."""
  r = record.get('in_run')
  if not r or r.get('logged_eval_loss') is None:
    return ''
  how = (f'the same {r["batches"]} batches: difference {r["difference"]:.1e}' if r['comparable'] else
         f'not the same batches: {r["why"]}')
  return (f'in-run eval_loss at step {record["step"]} (metrics.jsonl): {r["logged_eval_loss"]:.6f}; here '
          f'{r["loss"]:.6f} on {r["set"]} ({how})')


def _escape(text: str) -> str:
  return repr(text)[1:-1].replace('|', '\\|').replace('`', "'")


def _buckets(pos: dict[str, list]) -> list[tuple[str, float]]:
  """Mean loss over position ranges 1, 2-3, 4-7, ... (a line of the .md; the whole curve is in the .json)."""
  out, lo = [], 1
  while pos['position'] and lo <= pos['position'][-1]:
    hi = 2 * lo - 1
    sel = [(loss, n) for p, loss, n in zip(pos['position'], pos['loss'], pos['tokens'], strict=True) if lo <= p <= hi]
    if sel:
      out.append((f'{lo}' if lo == hi else f'{lo}-{hi}', sum(loss * n for loss, n in sel) / sum(n for _, n in sel)))
    lo *= 2
  return out


def markdown(record: dict) -> str:
  """STEP.md: a table of every set with micro and macro, then per set its numbers and top-loss tokens."""
  step = record['step']
  out = [f'# Evaluation of {record["run"]} at step {step}', '',
         f'{record["model"]}; checkpoint `{record["checkpoint"]}`; batches of {record["rows"]} x {record["seq_len"]} '
         f'tokens, {_budget(record)} (a smaller set is scored whole, each piece once); '
         f'{record["timings"]["total_s"]:.1f} s.', '',
         '| set | tokens | bytes | loss | ppl | bits/byte | scored |', '|---|--:|--:|--:|--:|--:|---|']
  for name, s in record['sets'].items():
    out.append(f'| {name} | {_count(s["tokens"])} | {_count(s["bytes"])} | {_num(s["loss"])} | {_num(s["ppl"], 2)} '
               f'| {_num(s["bits_per_byte"])} | {_scored(s)} |')
  micro, mac = record['micro'], record['macro']
  out.append(f'| **micro** | {_count(micro["tokens"])} | {_count(micro["bytes"])} | {_num(micro["loss"])} | '
             f'{_num(micro["ppl"], 2)} | {_num(micro["bits_per_byte"])} | token-weighted over sets |')
  out.append(f'| **macro** | | | {_num(mac["loss"])} | {_num(mac["ppl"], 2)} | {_num(mac["bits_per_byte"])} | '
             f'mean over {mac["sets"]} set{"s" if mac["sets"] > 1 else ""} |')
  note = in_run_line(record)
  if note:
    out += ['', note[0].upper() + note[1:] + '.']
  out += ['', 'Loss: nats per loss token. Bits per byte: total nats / ln 2 / UTF-8 bytes of the scored target '
          'tokens (special tokens have none).', '']
  for name, s in record['sets'].items():
    out += [f'## {name}', '', f'{s["kind"]} set: {s["where"]}; {s["batches"]} batches, {_scored(s)}; '
            f'{s["score_s"]:.2f} s.', '']
    if s['chat']:
      c = s['chat']
      out += [f'Assistant (loss-masked) tokens: loss {_num(c["assistant"]["loss"])} over '
              f'{_count(c["assistant"]["tokens"])}; other tokens: loss {_num(c["other"]["loss"])} over '
              f'{_count(c["other"]["tokens"])}.', '']
    buckets = _buckets(s['positions'])
    if buckets:
      out += ['Loss by position in the document: ' + ', '.join(f'{r}: {_num(v, 3)}' for r, v in buckets)
              + f' (whole curve in {step}.json, plot in {step}_positions.png).', '']
    out += ['| token | id | count | total loss | mean loss |', '|---|--:|--:|--:|--:|']
    out += [f'| `{_escape(t["token"])}` | {t["id"]} | {_count(t["count"])} | {t["total"]:.2f} | {t["mean"]:.3f} |'
            for t in s['top_tokens']]
    out.append('')
  return '\n'.join(out)


def write_step(workdir: str, record: dict) -> list[str]:
  """RUN/eval/STEP.json, STEP.md and STEP_positions.png; returns their paths."""
  directory = eval_dir(workdir)
  os.makedirs(directory, exist_ok=True)
  base = os.path.join(directory, str(record['step']))
  _write(base + '.json', json.dumps(record, indent=1))
  _write(base + '.md', markdown(record))
  png = _plot({name: s['positions'] for name, s in record['sets'].items()}, base + '_positions.png',
              'position of the target token in its document (its seq_len piece)', 'mean loss (nats/token)',
              f'{record["run"]} step {record["step"]}: loss by position', key='position')
  return [base + '.json', base + '.md'] + ([png] if png else [])


def write_curve(workdir: str, records: Sequence[dict]) -> list[str]:
  """RUN/eval/curve.json and curve.png: loss (and bits per byte) by step, per set and micro/macro."""
  records = sorted(records, key=lambda r: r['step'])
  steps = [r['step'] for r in records]
  curve: dict[str, Any] = {'run': records[0]['run'], 'steps': steps, 'sets': {}}
  for name in records[0]['sets']:
    curve['sets'][name] = {k: [r['sets'][name][k] for r in records] for k in ('loss', 'bits_per_byte', 'tokens')}
  for name in ('micro', 'macro'):
    curve[name] = {k: [r[name][k] for r in records] for k in ('loss', 'bits_per_byte')}
  curve['in_run_eval_loss'] = [(r.get('in_run') or {}).get('logged_eval_loss') for r in records]
  directory = eval_dir(workdir)
  path = os.path.join(directory, 'curve.json')
  _write(path, json.dumps(curve, indent=1))
  lines = {name: {'step': steps, 'loss': v['loss']} for name, v in curve['sets'].items()}
  lines['micro'] = {'step': steps, 'loss': curve['micro']['loss']}
  png = _plot(lines, os.path.join(directory, 'curve.png'), 'step', 'eval loss (nats/token)',
              f'{curve["run"]}: eval loss by checkpoint', key='step', marker='o')
  return [path] + ([png] if png else [])


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def _plot(lines: dict[str, dict[str, list]], path: str, xlabel: str, ylabel: str, title: str, key: str,
          marker: str = '') -> str | None:
  if not any(v[key] for v in lines.values()):
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, v in lines.items():
    ax.plot(v[key], v['loss'], marker=marker or None, label=name, lw=1, ls='--' if name == 'micro' else '-')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
