"""`jaxtrain eval`'s scoring throughput against the training step's forward pass on the same shapes.

  .venv/bin/python benchmarks/eval_throughput.py                        # tiny and small decoders, 3 rounds
  .venv/bin/python benchmarks/eval_throughput.py --sizes=small --rounds=5

For each size, one process builds the model of configs/tiny.py with the size's shapes (fresh parameters: the
numbers do not matter, the work does) and reads up to --batches batches of the run's held-out set the way
`jaxtrain eval` reads them (`evaluation.sets.read`). Then, in alternating rounds over those same host batches:

  eval      what `jaxtrain eval` does per set (`evaluation.run.score_sets`): place each batch, run the jitted
            score function, fetch its per-token outputs and add them to the set's tallies (loss, bytes, loss by
            position, per-token totals), the next batch dispatched before the last one's outputs are fetched
  eval before  the same, as `jaxtrain eval` scored before this benchmark (kept here to show the change): each
            key of a batch placed on the devices by itself (5 transfers instead of 1 stacked array) and one
            batch in flight instead of 4
  forward   the run's own in-loop eval step (`train.loop.jit_steps`: the forward-only jitted loss, summed on
            device), every batch placed and dispatched, blocking once at the end: device throughput with no
            host work between batches

Tokens/s count every position of every batch (rows x seq_len), the same for both. The figure of merit is
eval / forward in tokens/s (goal >= 0.9). Both compile before the timed rounds; medians over rounds. On a
shared machine the wall time of a round moves with the other processes, so the table also gives the ratio of
process CPU time (`time.process_time`: every thread of this process, XLA's included), which they disturb far
less: the work each path does per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# name: (d_model, layers, heads, kv heads, mlp, seq_len, batch)
SIZES = {'tiny': (32, 2, 4, 2, 64, 64, 8), 'small': (256, 4, 8, 4, 768, 256, 8)}


def config_for(size: str):
  from configs.tiny import get_config
  d, layers, heads, kv, mlp, seq, batch = SIZES[size]
  c = get_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = d, layers, heads, kv, mlp
  c.data.seq_len, c.data.batch_size = seq, batch
  return c


def measure(size: str, batches: int, rounds: int) -> dict:
  import jax

  from jaxtrain import data, sharding
  from jaxtrain.evaluation import run as eval_run, sets as sets_lib
  from jaxtrain.evaluation.score import Scorer, make_score_fn
  from jaxtrain.evaluation.stats import Tally
  from jaxtrain.train import loop, optim

  config = config_for(size)
  tokenizer = data.load_tokenizer(config.data)
  scorer = Scorer(config, tokenizer, tempfile.mkdtemp(prefix='eval_throughput_'))
  spec = sets_lib.run_sets(config, tokenizer)[0]
  evset = sets_lib.read(spec, tokenizer, rows=scorer.rows, seed=config.train.seed, max_batches=batches)
  token_bytes = tokenizer.token_bytes()
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  mesh = scorer.mesh
  with jax.set_mesh(mesh):
    state = scorer.built.create()
    weights = {'params': state['params']}
    _, eval_step = loop.jit_steps(config, scorer.built, tx, schedule, mesh)
    keys = ('tokens', 'segment_ids', 'positions', 'loss_mask')

    def forward() -> None:
      out = [eval_step(state, sharding.to_global({k: b[k] for k in keys}, mesh)) for b in evset.batches]
      jax.block_until_ready(out)

    def evaluate() -> None:
      eval_run.score_sets(scorer, weights, [evset], token_bytes)

    by_key = jax.jit(make_score_fn(scorer.built.graphdef, scorer.built.transform),
                     in_shardings=({'params': scorer.built.shardings['params']},
                                   {k: scorer.batch_sh for k in scorer.keys}), out_shardings=scorer.batch_sh)

    def before() -> None:
      tally, pending = Tally(token_bytes, scorer.seq_len), None
      for b in evset.batches:
        out = by_key(weights, sharding.to_global({k: b[k] for k in scorer.keys}, mesh)), b['positions']
        if pending is not None:
          tally.add(jax.device_get(pending[0]), pending[1])
        pending = out
      tally.add(jax.device_get(pending[0]), pending[1])

    paths = {'eval': evaluate, 'eval before': before, 'forward': forward}
    for fn in paths.values():
      fn()  # compiles
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
      for name, fn in (list(paths.items()) if r % 2 == 0 else list(paths.items())[::-1]):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)
  positions = len(evset.batches) * scorer.rows * scorer.seq_len
  return {'size': size, 'shape': SIZES[size], 'batches': len(evset.batches), 'positions': positions,
          'rounds': times, 'wall': {k: statistics.median(v) for k, v in times.items()},
          'cpu': {k: statistics.median(v) for k, v in cpu.items()}}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='tiny,small', help=f'comma-separated, of {", ".join(SIZES)}')
  p.add_argument('--batches', type=int, default=8, help='batches of the held-out set scored per round')
  p.add_argument('--rounds', type=int, default=5)
  a = p.parse_args()
  os.chdir(REPO)
  results = [measure(s, a.batches, a.rounds) for s in a.sizes.split(',')]
  print('| size (d_model, layers, seq x batch) | path | tokens/s | over forward (tokens/s) | over forward (per '
        'CPU-second) | per-round seconds | goal |')
  print('|---|---|--:|--:|--:|---|---|')
  for r in results:
    d, layers, _, _, _, seq, batch = r['shape']
    for name in ('eval', 'eval before', 'forward'):
      wall, cpu = r['wall'][name], r['cpu'][name]
      ratio = '' if name == 'forward' else f'{r["wall"]["forward"] / wall:.2f}'
      per_cpu = '' if name == 'forward' else f'{r["cpu"]["forward"] / cpu:.2f}'
      print(f'| {r["size"]} ({d}, {layers}, {seq} x {batch}), {r["batches"]} batches | {name} | '
            f'{r["positions"] / wall:,.0f} | {ratio} | {per_cpu} | {", ".join(f"{x:.3f}" for x in r["rounds"][name])} '
            f'| {">= 0.90" if name == "eval" else ""} |')


if __name__ == '__main__':
  main()
