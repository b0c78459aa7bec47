"""The `estimate` section (`jaxtrain estimate`, and `jaxtrain check`'s verdict): a memory budget per device and the
prices of a token budget.

`parse_bytes` reads sizes such as 80GB or 80GiB; `resolve` says what budget applies (the configured one, else
the device's own limit); `check` validates the section before anything runs.
"""

from __future__ import annotations

import re
from typing import Any

from jaxtrain.errors import ConfigError

# Units of estimate.memory_budget: decimal (SI) ones are powers of 1000, binary (IEC) ones powers of 1024.
BYTE_UNITS = {'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'TB': 10 ** 12,
              'KiB': 2 ** 10, 'MiB': 2 ** 20, 'GiB': 2 ** 30, 'TiB': 2 ** 40}
SIZE_HELP = ('a size such as 80GB or 80GiB: a number and one of B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, '
             'GiB, TiB (powers of 1024)')


def parse_bytes(text: str) -> int:
  """'80GB' -> 80 * 10**9, '80GiB' -> 80 * 2**30, '1.5TB', '512 MiB' (units in any case). Raises ValueError."""
  m = re.fullmatch(r'\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]+)\s*', text)
  unit = {u.lower(): u for u in BYTE_UNITS}.get(m.group(2).lower()) if m else None
  if unit is None:
    raise ValueError(f'{text!r} is not {SIZE_HELP}')
  size = round(float(m.group(1)) * BYTE_UNITS[unit])
  if size <= 0:
    raise ValueError(f'{text!r} must be more than 0 bytes')
  return size


def resolve(text: str) -> tuple[int, str] | None:
  """(bytes per device, where the figure came from) of `estimate.memory_budget`, or for '' the device's own limit;
  None where the device reports none (CPUs)."""
  if text:
    return parse_bytes(text), 'estimate.memory_budget'
  import jax  # only here: validating the section needs no backend
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):  # what JAX's allocator may use (GPU: 75% of memory unless configured)
    return int(stats['bytes_limit']), f'the bytes_limit of {device.device_kind}'
  return None


def check(e: Any) -> None:
  """The `estimate` section. Raises ConfigError."""
  if e.memory_budget:
    try:
      parse_bytes(e.memory_budget)
    except ValueError as error:
      raise ConfigError('estimate.memory_budget', e.memory_budget, f"must be '' (the device's memory) or "
                        f'{SIZE_HELP}' + (' above 0' if 'more than 0' in str(error) else '')) from None
  for key in ('tokens', 'num_gpus'):
    if not e[key] >= 0:
      raise ConfigError(f'estimate.{key}', e[key], 'must be >= 0')
  for key in ('max_rows', 'max_compiles'):
    if not e[key] > 0:
      raise ConfigError(f'estimate.{key}', e[key], 'must be > 0')
  if not 0 < e.mfu <= 1:
    raise ConfigError('estimate.mfu', e.mfu, 'must be in (0, 1]')
  if e.gpu and e.gpu not in e.price_per_hour:
    raise ConfigError('estimate.gpu', e.gpu, f"must be '' (the detected device) or one of "
                      f'{", ".join(e.price_per_hour.keys())}')
  for key, price in e.price_per_hour.items():
    if not price >= 0:
      raise ConfigError(f'estimate.price_per_hour.{key}', price, 'must be >= 0 (USD per GPU-hour)')
