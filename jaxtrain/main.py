"""`python -m jaxtrain.main --config=configs/NAME.py[:ARG] [--workdir=DIR] [--config.KEY=VALUE]`: the same as
`jaxtrain train ...` (jaxtrain/cli/train.py)."""

import sys


def run_main() -> None:
  from jaxtrain import cli
  cli.main(['jaxtrain', 'train', *sys.argv[1:]])


if __name__ == '__main__':
  run_main()
