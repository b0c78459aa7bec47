"""Prints the README's config table, generated from jaxtrain/config/defaults.py; `--write` puts it into
README.md between the `<!-- config-table:start -->` and `<!-- config-table:end -->` markers.

    python docs/config_table.py [--write] [--readme=PATH]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxtrain.config import table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--write', action='store_true', help=f'rewrite the block of {table.README} between the markers')
  parser.add_argument('--readme', default=table.README, help='the README to rewrite (default: %(default)s)')
  args = parser.parse_args(argv)
  missing = table.undocumented()
  if missing:
    print(f'keys without a comment in defaults.py: {", ".join(missing)}', file=sys.stderr)
    return 1
  if args.write:
    print(f'{args.readme}: ' + ('config table rewritten' if table.write(args.readme) else 'config table up to date'))
  else:
    sys.stdout.write(table.markdown())
  return 0


if __name__ == '__main__':
  sys.exit(main())
