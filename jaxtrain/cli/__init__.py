"""The `jaxtrain` command line (also `python -m jaxtrain COMMAND` and `python -m jaxtrain.cli COMMAND`):

  jaxtrain train --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.KEY=VALUE] [--preflight] [--start_over]
                                          train a model (`python -m jaxtrain.main ...` is the same)
  jaxtrain check --config=...             validate a config, preview tokenization, print parameters and memory
  jaxtrain estimate --config=... [--memory-budget=80GB] [--tokens=2e9] [--gpu=h100]
                                          largest micro-batch that fits (compile-only); time and cost of tokens
  jaxtrain analyze --config=... [--out=DIR]
                                          per-source statistics: lengths, duplicates, chat turns, a seq_len
  jaxtrain export --workdir=RUN --out=DIR [--step=N | --stage=K] [--format=hf|peft] [--dtype=bfloat16]
                  [--max_shard_mb=N]      a checkpoint (or a causal StackWise rack) as a Hugging Face model
                                          (or PEFT adapters)
  jaxtrain eval --workdir=RUN [--step=N | --all-steps] [--data=NAME=GLOB ...] [--batches=N]
                                          score checkpoints on the held-out sets: loss, bits per byte, per token
  jaxtrain eval --workdir=RUN | --model-dir=DIR --harness=TASKS [--include-path=DIR] [--limit=N]
                                          lm-evaluation-harness tasks (RUN/eval/harness/STEP-TASKS.json)
  jaxtrain merge-adapters --adapters=A,B --weights=0.7,0.3 [--method=ties --density=0.5] --out=DIR [--base=HF]
                                          combine PEFT LoRA adapters (also `--adapters A B --weights 0.7 0.3`)
  jaxtrain blocklist --workdir=RUN [--out=FILE] [--min-count=N]
                                          loss-spike dumps of a run -> a blocklist file for data.exclude
  jaxtrain generate --workdir=RUN [--prompt=TEXT ...] [--max_tokens=N] [--temperature=T --seed=S] [--steps=N]
                                          generate text with a run's model (a StackWise rack by its objective)
  jaxtrain samples --workdir=RUN --step=N the sample ids of each row of one train step of a run
  jaxtrain runs [DIR] [--json]           the runs under DIR (default runs/): status, steps, losses, exports

One module per command here (train.py, check.py, ...); `common.py` holds what they share: absl flags, the
setup (config, workdir, log level, distributed start) and the one error handler. `jaxtrain COMMAND --help`
lists a command's flags. Exit status: 0 done; 1 stopped by non-finite steps, or nothing fits (estimate; check
given a memory budget); 2 a user mistake, reported in one line `error: ...` on stderr.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module of jaxtrain.cli, summary for `jaxtrain --help`)
COMMANDS = {
    'train': ('train', 'train a model (python -m jaxtrain.main)'),
    'check': ('check', 'validate a config, preview tokenization, print params and memory'),
    'analyze': ('analyze', 'per-source statistics: lengths, duplicates, chat turns, a suggested seq_len'),
    'estimate': ('estimate', 'largest micro-batch that fits a memory budget (compile-only); time and cost of a '
                 'token budget'),
    'merge-adapters': ('merge_adapters', 'combine PEFT LoRA adapters (linear, ties, dare) into one, or into the '
                       'base model'),
    'export': ('export', 'write a checkpoint as a Hugging Face model (or PEFT adapters)'),
    'eval': ('evaluate', "score a run's checkpoints on its held-out sets (and more files): loss, bits per byte, "
             'loss by position and token'),
    'blocklist': ('blocklist', 'loss-spike dumps of a run -> a blocklist file of their documents (for data.exclude)'),
    'generate': ('generate', "generate text with a run's model (a StackWise rack as its objective samples)"),
    'samples': ('samples', 'the sample ids (documents) of each row of one train step of a run'),
    'runs': ('runs', 'the runs under a directory (default runs/): status, steps, latest losses, best metric, '
             'exports'),
}


def main(argv: list[str] | None = None) -> None:
  """`jaxtrain COMMAND [flags]`; argv[0] is the program. Returns when the command succeeds, else exits."""
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print('usage: jaxtrain COMMAND [flags]   (jaxtrain COMMAND --help: its flags)\n\ncommands:')
    for name, (_, text) in COMMANDS.items():
      print(f'  {name:15s} {text}')
    if len(argv) < 2:
      print(f'error: no command given; expected one of {", ".join(COMMANDS)}', file=sys.stderr)
      sys.exit(2)
    sys.exit(0)
  name = argv[1]
  if name not in COMMANDS:
    print(f'error: unknown command {name!r}; valid: {", ".join(COMMANDS)}', file=sys.stderr)
    sys.exit(2)
  from jaxtrain.cli import common
  common.run(name, importlib.import_module(f'jaxtrain.cli.{COMMANDS[name][0]}'), argv[1:])


if __name__ == '__main__':
  main()
