"""Combine PEFT LoRA adapters (linear, ties, dare_linear, dare_ties) into one adapter, or into the base model:
`jaxtrain merge-adapters --adapters=A,B --weights=0.7,0.3 [--method=ties --density=0.5] --out=DIR [--base=HF]`
(`jaxtrain.hf.merge`). The lists may also be given space-separated: `--adapters A B --weights 0.7 0.3`."""

from __future__ import annotations

from absl import flags

from jaxtrain.errors import UserError

LISTS = ('adapters', 'weights')  # list flags that also take their values space-separated


def define(fv: flags.FlagValues) -> None:
  from jaxtrain.hf.merge import METHODS, SIGN_METHODS
  flags.DEFINE_list('adapters', None, 'PEFT LoRA adapter dirs.', required=True, flag_values=fv)
  flags.DEFINE_list('weights', None, 'One weight per adapter.', required=True, flag_values=fv)
  flags.DEFINE_enum('method', 'linear', METHODS, 'How the adapters combine (PEFT add_weighted_adapter).',
                    flag_values=fv)
  flags.DEFINE_float('density', None, 'Fraction of values kept by ties / dare_*, in (0, 1].', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed of the DARE pruning masks.', flag_values=fv)
  flags.DEFINE_enum('majority-sign-method', 'total', SIGN_METHODS, 'ties / dare_ties sign vote.', flag_values=fv)
  flags.DEFINE_string('out', None, 'New output dir.', required=True, flag_values=fv)
  flags.DEFINE_string('base', '', 'Hugging Face model dir: write base + merged adapter as a model.', flag_values=fv)


def normalize(argv: list[str]) -> list[str]:
  """`--adapters A B C` -> `--adapters=A,B,C` (and --weights): the values up to the next `--flag` or `--`."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg == '--':
      return out + argv[i:]
    if arg.lstrip('-') in LISTS and arg.startswith('-'):
      values = []
      while i + 1 < len(argv) and not argv[i + 1].startswith('--'):
        values.append(argv[i + 1])
        i += 1
      arg = f'{arg}={",".join(values)}' if values else arg
    out.append(arg)
    i += 1
  return out


def main(fv: flags.FlagValues) -> None:
  from jaxtrain.hf import merge

  try:
    weights = [float(w) for w in fv['weights'].value]
  except ValueError:
    raise UserError('--weights', ','.join(fv['weights'].value), 'must be numbers, one per adapter') from None
  print(merge.merge(fv['adapters'].value, weights, fv['out'].value, fv['method'].value, fv['density'].value,
                    fv['majority-sign-method'].value, fv['seed'].value, fv['base'].value), flush=True)
