"""What `jaxtrain eval` writes: RUN/eval/STEP.json (everything), STEP.md (readable), STEP_positions.png (loss
by position per set); with --all-steps curve.json and curve.png (loss by step per set); and the console table.
A StackWise run's rack writes RUN/eval/stage_K.json, .md and _positions.png, and its curve is by stage.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from jaxtrain import paths

# What the loss column is, by objective (the record's `definitions` say it in full).
LOSS_NAMES = {'clm': 'next-token cross-entropy (nats/token)',
              'diffusion': 'the masked-diffusion ELBO (nats/token, an upper bound: ppl and bits/byte are bounds too)',
              'mlm': 'masked-token cross-entropy (nats/token; no likelihood, no bits/byte)'}


def eval_dir(workdir: str) -> str:
  return paths.in_run(workdir, paths.EVAL)


def point(record: dict) -> tuple[str, str]:
  """(what was scored, in words: 'step 30' or 'stage 1'; the stem of its files: '30' or 'stage_1')."""
  if 'stage' in record:
    return f'stage {record["stage"]}', f'stage_{record["stage"]}'
  return f'step {record["step"]}', str(record['step'])


def _num(x: float, digits: int = 4) -> str:
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.{digits}f}'


def _count(x: float) -> str:
  return f'{x:,.0f}' if float(x).is_integer() else f'{x:,.2f}'


def _scored(s: dict) -> str:
  """How much of the set was scored, said plainly (never a silent truncation)."""
  share = s['tokens'] / s['set_tokens'] if s['set_tokens'] else 1.0
  if s['complete']:
    return f'all {s["pieces"]:,} pieces'
  if 'masked' in s:  # a masked rack's tokens are the masked (or maskable) ones, not the set's loss tokens
    return f'{s["pieces_scored"]:,} of {s["pieces"]:,} pieces'
  return f'{s["pieces_scored"]:,} of {s["pieces"]:,} pieces (~{share:.1%} of {s["set_tokens"]:,} tokens)'


def console(record: dict) -> str:
  """The compact table printed on stdout."""
  objective = record.get('objective', 'clm')
  masked = objective != 'clm'  # a masked rack: its masked-token CE beside the loss
  rows = [('set', 'tokens', 'loss', 'ppl', 'bits/byte') + (('mCE',) if masked else ()) + ('scored',)]
  for name, s in record['sets'].items():
    rows.append((name, _count(s['tokens']), _num(s['loss']), _num(s['ppl'], 2), _num(s['bits_per_byte']))
                + ((_num(s['masked_ce']),) if masked else ()) + (_scored(s),))
  for name in ('micro', 'macro'):
    m = record[name]
    rows.append((name, _count(m['tokens']) if 'tokens' in m else '', _num(m['loss']), _num(m['ppl'], 2),
                 _num(m['bits_per_byte'])) + ((_num(m['masked_ce']) if 'masked_ce' in m else '',) if masked else ())
                + ('',))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  label, _ = point(record)
  lines = [f'eval {record["run"]} {label}: {record["model"]}; batches of {record["rows"]} x '
           f'{record["seq_len"]} tokens, {_budget(record)}']
  if masked or 'stage' in record:
    lines.append(f'  loss: {LOSS_NAMES[objective]}')
  last = len(rows[0]) - 1
  for r in rows:  # names and the scored note left-aligned, numbers right-aligned
    cells = zip(r, widths, strict=True)
    lines.append('  ' + '  '.join(c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(cells)))
  note = in_run_line(record)
  if note:
    lines.append(note)
  return '\n'.join(line.rstrip() for line in lines)


def _batches(n: int) -> str:
  return f'{n} batch' + ('' if n == 1 else 'es')


def _budget(record: dict) -> str:
  n = record['max_batches']
  return f'up to {n} per set' if n else 'every batch of each set'


def in_run_line(record: dict) -> str:
  """The run's own eval loss at this step (stage) beside this evaluation's, when the run logged one."""
  r = record.get('in_run')
  if not r or r.get('logged_eval_loss') is None:
    return ''
  how = (f'the same {_batches(r["batches"])}: difference {r["difference"]:.1e}' if r['comparable'] else
         f'not the same batches: {r["why"]}')
  mce = ''
  if r.get('logged_eval_masked_ce') is not None:
    mce = f'; eval mCE {r["logged_eval_masked_ce"]:.6f} there, {r["masked_ce"]:.6f} here'
  return (f'in-run eval_loss at {point(record)[0]} ({r.get("logged_in") or "metrics.jsonl"}): '
          f'{r["logged_eval_loss"]:.6f}; here {r["loss"]:.6f} on {r["set"]} ({how}){mce}')


def _escape(text: str) -> str:
  return repr(text)[1:-1].replace('|', '\\|').replace('`', "'")


def _buckets(pos: dict[str, list]) -> list[tuple[str, float]]:
  """Mean loss over position ranges (0 where it is scored: masked racks), 1, 2-3, 4-7, ... (a line of the .md;
  the whole curve is in the .json)."""
  out, lo = [], 1
  if pos['position'] and pos['position'][0] == 0:
    out.append(('0', pos['loss'][0]))
  while pos['position'] and lo <= pos['position'][-1]:
    hi = 2 * lo - 1
    sel = [(loss, n) for p, loss, n in zip(pos['position'], pos['loss'], pos['tokens'], strict=True) if lo <= p <= hi]
    if sel:
      out.append((f'{lo}' if lo == hi else f'{lo}-{hi}', sum(loss * n for loss, n in sel) / sum(n for _, n in sel)))
    lo *= 2
  return out


def markdown(record: dict) -> str:
  """STEP.md: a table of every set with micro and macro, then per set its numbers and top-loss tokens."""
  label, step = point(record)
  masked = record.get('objective', 'clm') != 'clm'  # a masked rack: its masked-token CE beside the loss
  mce_head, mce_rule = (' mCE |', '--:|') if masked else ('', '')

  def mce(m: dict) -> str:
    return (f' {_num(m["masked_ce"]) if "masked_ce" in m else ""} |') if masked else ''
  out = [f'# Evaluation of {record["run"]} at {label}', '',
         f'{record["model"]}; checkpoint `{record["checkpoint"]}`; batches of {record["rows"]} x {record["seq_len"]} '
         f'tokens, {_budget(record)} (a smaller set is scored whole, each piece once); '
         f'{record["timings"]["total_s"]:.1f} s.', '',
         f'| set | tokens | bytes | loss | ppl | bits/byte |{mce_head} scored |',
         f'|---|--:|--:|--:|--:|--:|{mce_rule}---|']
  for name, s in record['sets'].items():
    out.append(f'| {name} | {_count(s["tokens"])} | {_count(s["bytes"])} | {_num(s["loss"])} | {_num(s["ppl"], 2)} '
               f'| {_num(s["bits_per_byte"])} |{mce(s)} {_scored(s)} |')
  micro, mac = record['micro'], record['macro']
  out.append(f'| **micro** | {_count(micro["tokens"])} | {_count(micro["bytes"])} | {_num(micro["loss"])} | '
             f'{_num(micro["ppl"], 2)} | {_num(micro["bits_per_byte"])} |{mce(micro)} token-weighted over sets |')
  out.append(f'| **macro** | | | {_num(mac["loss"])} | {_num(mac["ppl"], 2)} | {_num(mac["bits_per_byte"])} |'
             f'{mce({})} mean over {mac["sets"]} set{"s" if mac["sets"] > 1 else ""} |')
  note = in_run_line(record)
  if note:
    out += ['', note[0].upper() + note[1:] + '.']
  defs = record['definitions']
  out += ['', f'Loss: {defs["loss"]}. Bits per byte: {defs["bits_per_byte"]}.'
          + (f' mCE: {defs["masked_ce"]}.' if 'masked_ce' in defs else ''), '']
  for name, s in record['sets'].items():
    out += [f'## {name}', '', f'{s["kind"]} set: {s["where"]}; {_batches(s["batches"])}, {_scored(s)}; '
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
  label, stem = point(record)
  base = os.path.join(directory, stem)
  _write(base + '.json', json.dumps(record, indent=1))
  _write(base + '.md', markdown(record))
  png = _plot({name: s['positions'] for name, s in record['sets'].items()}, base + '_positions.png',
              'position of the target token in its document (its seq_len piece)', 'mean loss (nats/token)',
              f'{record["run"]} {label}: loss by position', key='position')
  return [base + '.json', base + '.md'] + ([png] if png else [])


def write_curve(workdir: str, records: Sequence[dict]) -> list[str]:
  """RUN/eval/curve.json and curve.png: loss (and bits per byte) by step (a StackWise run's: by stage), per set
  and micro/macro."""
  unit = 'stage' if 'stage' in records[0] else 'step'
  records = sorted(records, key=lambda r: r[unit])
  steps = [r[unit] for r in records]
  curve: dict[str, Any] = {'run': records[0]['run'], f'{unit}s': steps, 'sets': {}}
  for name in records[0]['sets']:
    curve['sets'][name] = {k: [r['sets'][name][k] for r in records] for k in ('loss', 'bits_per_byte', 'tokens')}
  for name in ('micro', 'macro'):
    curve[name] = {k: [r[name][k] for r in records] for k in ('loss', 'bits_per_byte')}
  curve['in_run_eval_loss'] = [(r.get('in_run') or {}).get('logged_eval_loss') for r in records]
  directory = eval_dir(workdir)
  path = os.path.join(directory, 'curve.json')
  _write(path, json.dumps(curve, indent=1))
  lines = {name: {unit: steps, 'loss': v['loss']} for name, v in curve['sets'].items()}
  lines['micro'] = {unit: steps, 'loss': curve['micro']['loss']}
  png = _plot(lines, os.path.join(directory, 'curve.png'), unit, 'eval loss (nats/token)',
              f'{curve["run"]}: eval loss by {"stage" if unit == "stage" else "checkpoint"}', key=unit, marker='o')
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
