"""The `jaxtrain` console script: `jaxtrain train --config=...` (same as `python -m jaxtrain.main ...`),
`jaxtrain check --config=...` (same as `python -m jaxtrain.check ...`), `jaxtrain analyze --config=...` (same as
`python -m jaxtrain.analyze ...`), `jaxtrain estimate --config=...` (same as
`python -m jaxtrain.estimate ...`), `jaxtrain export --workdir=... --out=...` (same as `python -m jaxtrain.export
...`), `jaxtrain blocklist --workdir=...` and `jaxtrain samples --workdir=... --step=N` (same as
`python -m jaxtrain.provenance blocklist|samples ...`)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    'train': 'train a model (python -m jaxtrain.main)',
    'check': 'validate a config, preview tokenization, print params and memory',
    'analyze': 'per-source statistics: lengths, duplicates, chat turns, a suggested seq_len',
    'estimate': 'largest micro-batch that fits a memory budget (compile-only); time and cost of a token budget',
    'merge-adapters': 'combine PEFT LoRA adapters (linear, ties, dare) into one, or into the base model',
    'export': 'write a checkpoint as a Hugging Face model (or PEFT adapters)',
    'blocklist': 'loss-spike dumps of a run -> a blocklist file of their documents (for data.exclude)',
    'samples': 'the sample ids of each row of one train step of a run',
}
# The module whose run_main() each command calls ('module:function' names another function).
ENTRY_POINTS = {'train': 'jaxtrain.main', 'check': 'jaxtrain.cli.check', 'analyze': 'jaxtrain.data.analyze',
                'estimate': 'jaxtrain.cli.estimate',
                'merge-adapters': 'jaxtrain.adapters.merge', 'export': 'jaxtrain.hf.export',
                'blocklist': 'jaxtrain.train.recorder:blocklist_main',
                'samples': 'jaxtrain.train.recorder:samples_main'}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print('usage: jaxtrain COMMAND [flags]\n\ncommands:')
    for name, text in COMMANDS.items():
      print(f'  {name:15s} {text}')
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f'error: unknown command {command!r}; valid: {", ".join(COMMANDS)}', file=sys.stderr)
    sys.exit(2)
  sys.argv = [f'jaxtrain {command}'] + argv[2:]
  module, _, function = ENTRY_POINTS[command].partition(':')
  getattr(importlib.import_module(module), function or 'run_main')()


if __name__ == '__main__':
  main()
