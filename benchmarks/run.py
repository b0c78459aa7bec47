"""Runs the benchmark scripts and writes their figures into docs/benchmarks.md.

  .venv/bin/python benchmarks/run.py                         # every benchmark, full size (over an hour on 2 cores)
  .venv/bin/python benchmarks/run.py --only=packing,prepare_cache
  .venv/bin/python benchmarks/run.py --quick --only=quant_error --doc=/tmp/b.md   # small sizes, another file
  .venv/bin/python benchmarks/run.py --list

Each benchmark is a script in this folder that prints Markdown tables and measures its comparison side by side
in one run. This runner executes it, then replaces the block between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` in the document with: the date, the machine (architecture, cores, memory, load
average, library versions), the exact command, and the tables the script printed. The prose around a block is
written by hand and stays; a benchmark whose markers are missing gets a new section at the end. A failing
script leaves its block untouched and makes the runner exit 1 after the others ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DOC = os.path.join(REPO, 'docs', 'benchmarks.md')


@dataclasses.dataclass(frozen=True)
class Bench:
  name: str
  script: str
  title: str  # heading of the section created when the document has no markers for it
  quick: tuple[str, ...] = ()  # arguments for --quick
  full: tuple[str, ...] = ()


BENCHMARKS = (
    Bench('throughput', 'throughput.py', 'Train-step throughput vs PyTorch (CPU)', ('--quick',),
          ('--rounds=2', '--steps=3')),
    Bench('cpu_settings', 'cpu_settings.py', 'XLA CPU options and model settings', ('--quick', '--only=scan'),
          ('--only=ynn_off,xnn,onednn,fast_math,scan,remat_full,attn_one_call,attn_block_256',)),
    Bench('step_breakdown', 'step_breakdown.py', 'Where the step time goes'),
    Bench('matmul_kernels', 'matmul_kernels.py', 'Matmul kernels: XLA CPU vs PyTorch',
          ('--quick', '--repeats=2', '--rounds=1'), ('--rounds=3',)),
    Bench('host_overhead', 'host_overhead.py', 'Step-time breakdown of the loop: data wait, host, device',
          ('--configs=configs/tiny.py', '--steps=12')),
    Bench('packing', 'packing.py', "Packing: best fit against grain's packers", ('--tokens=1e6',)),
    Bench('prepare_cache', 'prepare_cache.py', 'Prepare cache', ('--max_files=60',)),
    Bench('hf_load_memory', 'hf_load_memory.py', 'Hugging Face import: peak host memory',
          ('--layers=2', '--vocab=8192', '--shard=20MB')),
    Bench('lora_modes', 'lora_modes.py', 'LoRA and QLoRA: step time, memory, storage', ('--quick',)),
    Bench('quant_error', 'quant_error.py', 'QLoRA quantisation error', ('--d_model=256',)),
    Bench('checkpoint_blocking', 'checkpoint_blocking.py', 'Async checkpointing: how long a save blocks the loop',
          ('--d_model=256', '--layers=4', '--repeats=2')),
    Bench('stack_checkpoint_bytes', 'stack_checkpoint_bytes.py', 'StackWise: bytes written per stage',
          ('--stacks=3', '--d_model=128')),
    Bench('stackwise_memory', 'stackwise_memory.py', 'StackWise: training memory per stage',
          ('--stacks=3', '--d_model=64', '--seq=128')),
    Bench('stackwise_compare', 'stackwise_compare.py', 'StackWise: progressive versus end-to-end',
          ('--set=train.steps=40', '--reeval_batches=2')),
    Bench('generate', 'generate.py', 'Generation: KV-cache decoding vs transformers generate (CPU)',
          ('--quick', '--new_tokens=16', '--repeats=1')),
    Bench('harness', 'harness.py', "lm-evaluation-harness: loglikelihood requests/s vs lm-eval's HF backend (CPU)",
          ('--quick', '--repeat=1', '--repeats=1')),
    Bench('eval_throughput', 'eval_throughput.py', "Eval throughput: `jaxtrain eval` vs the training step's forward",
          ('--sizes=tiny', '--batches=4', '--rounds=3'), ('--batches=16', '--rounds=7')),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine_description() -> str:
  """One line: architecture, cores, memory, load average and the versions that decide the figures."""
  memory = ''
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      kib = int(re.search(r'MemTotal:\s+(\d+)', f.read()).group(1))
    memory = f', {kib / 2**20:.1f} GiB'
  except (OSError, AttributeError):
    pass
  load = f', load average {os.getloadavg()[0]:.1f}' if hasattr(os, 'getloadavg') else ''
  versions = ', '.join(f'{p} {v}' for p in ('jax', 'jaxlib', 'grain', 'torch', 'transformers')
                       if (v := _version(p)))
  return (f'{platform.machine()}, {os.cpu_count()} cores{memory}{load}; Python {platform.python_version()}, '
          f'{versions}')


def tables(stdout: str) -> str:
  """The Markdown tables (and the heading or caption line right above each) of a script's output."""
  lines = stdout.splitlines()
  keep: list[str] = []
  for i, line in enumerate(lines):
    if not line.startswith('|'):
      continue
    if i == 0 or not lines[i - 1].startswith('|'):  # a table starts here
      if keep:
        keep.append('')
      above = lines[i - 1].strip() if i else ''
      if above:
        keep += [above, '']
    keep.append(line)
  return '\n'.join(keep)


def block(bench: Bench, command: list[str], output: str, seconds: float, when: datetime.date) -> str:
  shown = ' '.join(['.venv/bin/python', f'benchmarks/{bench.script}', *map(shlex.quote, command[2:])])
  return (f'Generated by `benchmarks/run.py` on {when.isoformat()} in {seconds:.0f} s ({machine_description()}):\n\n'
          f'```bash\n{shown}\n```\n\n{tables(output) or "(the script printed no table)"}\n')


def splice(doc: str, name: str, content: str, title: str) -> str:
  """`doc` with the block of `name` replaced by `content`, or a new section holding it appended."""
  start, end = f'<!-- bench:{name} -->', f'<!-- /bench:{name} -->'
  pattern = re.compile(re.escape(start) + r'.*?' + re.escape(end), re.S)
  wrapped = f'{start}\n{content.rstrip()}\n{end}'
  if pattern.search(doc):
    return pattern.sub(lambda _: wrapped, doc, count=1)
  return doc.rstrip('\n') + f'\n\n## {title}\n\n{wrapped}\n'


def run_one(bench: Bench, quick: bool, extra: list[str]) -> tuple[list[str], str, float]:
  """(command, stdout, seconds) of one benchmark; raises CalledProcessError when it fails."""
  args = list(extra) if extra else list(bench.quick if quick else bench.full)
  command = [sys.executable, os.path.join(HERE, bench.script), *args]
  t = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
  return command, proc.stdout, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default='', help='comma-separated benchmark names (default: all)')
  parser.add_argument('--quick', action='store_true', help="each benchmark's small size (a check, not figures)")
  parser.add_argument('--args', default='', help='arguments for the one benchmark named by --only, instead of '
                      'its defaults')
  parser.add_argument('--doc', default=DOC, help='the Markdown file to update (default: docs/benchmarks.md)')
  parser.add_argument('--list', action='store_true', help='print the benchmarks and whether the document has '
                      'their markers')
  opts = parser.parse_args(argv)
  names = [n.strip() for n in opts.only.split(',') if n.strip()] or list(BY_NAME)
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    parser.error(f'--only={opts.only!r} names unknown benchmarks {unknown}; known: {", ".join(BY_NAME)}')
  if opts.args and len(names) != 1:
    parser.error(f'--args={opts.args!r} needs exactly one benchmark in --only, got {len(names)}')
  with open(opts.doc, encoding='utf-8') as f:
    doc = f.read()
  if opts.list:
    for b in BENCHMARKS:
      where = 'marked' if f'<!-- bench:{b.name} -->' in doc else 'new section'
      print(f'{b.name:24s} benchmarks/{b.script:28s} {where}')
    return 0
  failed = []
  for name in names:
    bench = BY_NAME[name]
    print(f'running {name} ...', file=sys.stderr, flush=True)
    try:
      command, out, seconds = run_one(bench, opts.quick, shlex.split(opts.args))
    except subprocess.CalledProcessError as e:
      print(f'{name} failed with exit status {e.returncode}: {e.stderr.strip().splitlines()[-1:]}', file=sys.stderr)
      failed.append(name)
      continue
    with open(opts.doc, encoding='utf-8') as f:  # read again: others may have edited it while this one ran
      doc = f.read()
    doc = splice(doc, name, block(bench, command, out, seconds, datetime.date.today()), bench.title)
    with open(opts.doc, 'w', encoding='utf-8') as f:  # after each benchmark: a later failure loses nothing
      f.write(doc)
    print(f'{name}: {seconds:.0f} s, written to {opts.doc}', file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
