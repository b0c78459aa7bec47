"""Step-time breakdown of the training loop on the default configs: data wait, host overhead, device compute.

  .venv/bin/python benchmarks/host_overhead.py                       # the four shipped configs, 40 steps each
  .venv/bin/python benchmarks/host_overhead.py --configs=configs/tiny.py --steps=20
  .venv/bin/python benchmarks/host_overhead.py --set=log.wandb=disabled     # without the wandb sink

Each config trains for --steps steps in a fresh temporary workdir through the real entry points
(`train.run`, or `stackwise_run.run` for the StackWise job: its first stage), logging every step. Before and
after the loop, the job's own compiled train step runs back to back on one batch of the job's data, blocking
only once at the end: the mean of the two is the device compute per step with no host work in between. From
the loop's logged per-step wall times (median over the steps after the first three):

  data wait      = the logged `data_wait_s` (time `next(data)` blocked the loop)
  device compute = the back-to-back time per step
  host overhead  = loop step time - device compute - data wait (dispatch, metrics, logging, provenance,
                   checkpoint bookkeeping, and on CPU the host threads competing with XLA's for the cores)

Evaluation and checkpoint saves are switched off for the measured steps so they do not land in them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from stackwise_compare import override

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = ('configs/stackwise.py', 'configs/llama.py', 'configs/tiny.py', 'configs/lora_sft.py')


def load_config(spec: str) -> Any:
  """The ConfigDict of 'configs/NAME.py[:ARG]', as `--config=` would give it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default=','.join(CONFIGS), help='comma-separated config specs (PATH[:ARG])')
  p.add_argument('--steps', type=int, default=40, help='training steps per config (first 3 not counted)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a config override for every config, e.g. log.wandb=disabled (repeatable)')
  a = p.parse_args()
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  import jax

  from jaxtrain import data
  from jaxtrain.train import loop as train

  probes: dict[str, float] = {}
  real_fit = train.fit

  def probing_fit(config, job, workdir, mesh, tokenizer):
    """Times the job's step back to back on one batch of its data before and after the real loop (the mean
    of the two brackets drift in the machine's speed), and runs the loop in between."""
    batch = next(iter(data.make_dataset(config.data, tokenizer, split='train', seed=job.seed,
                                        batch_size=config.data.batch_size)))
    batch = {k: v for k, v in batch.items() if not k.startswith('doc_') or k in job.keep_keys}
    k = train.steps_per_call(config)  # full calls of k steps, as the loop runs them

    def back_to_back(state):
      for _ in range(2):  # compile (the first time), then one warm call
        state, m = train.run_steps(job.train_step.at(0), state, [batch] * k, k, mesh)
      jax.block_until_ready(m)
      n = max(5, a.steps // 2 // k)
      t = time.perf_counter()
      for _ in range(n):
        state, m = train.run_steps(job.train_step.at(0), state, [batch] * k, k, mesh)
      jax.block_until_ready((state, m))
      return (time.perf_counter() - t) / (n * k)

    before = back_to_back(job.built.create())
    summary = real_fit(config, job, workdir, mesh, tokenizer)
    after = back_to_back(jax.tree.map(lambda x: x.copy(), summary.state))  # the step donates its input
    probes['device'] = (before + after) / 2
    return summary

  train.fit = probing_fit
  rows = []
  for spec in a.configs.split(','):
    config = load_config(spec)
    with config.unlocked():
      config.log.every = 1
      config.log.plot = False
      config.train.eval_every = 0
      config.train.eval_batches = 1
      config.checkpoint.every = 10 ** 9
      if config.stackwise.num_stacks:
        config.stackwise.stages = 1  # the first stage only, a.steps long
        config.stackwise.stage_steps = ()
      config.train.steps = a.steps
      override(config, a.set)
    with tempfile.TemporaryDirectory() as workdir:
      probes.clear()  # the runners validate the config first (jaxtrain.config.validate.prepare)
      if config.stackwise.num_stacks:
        from jaxtrain.stackwise import job as stackwise_run
        stackwise_run.run(config, workdir)
      else:
        train.run(config, workdir)
      records = []
      for path in _metric_files(workdir):
        with open(path, encoding='utf-8') as f:
          records += [r for r in map(json.loads, f) if 'step_time' in r]
    records = records[3:]  # the first steps include compilation and the pipeline filling up
    step = statistics.median(r['step_time'] for r in records)
    wait = statistics.median(r['data_wait_s'] for r in records)
    device = probes['device']
    host = step - device - wait  # negative when the machine sped up between the brackets: noise, shown as is
    rows.append((spec, config.data.batch_size, config.data.seq_len, len(records), step, device, wait, host))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}; medians over steps 4..'
        f'{a.steps}\n')
  print('| config | batch x seq | steps | loop step (s) | device compute (s) | data wait | host overhead |')
  print('|---|---|---|---|---|---|---|')
  for spec, b, t, n, step, device, wait, host in rows:
    print(f'| {spec} | {b} x {t} | {n} | {step:.4f} | {device:.4f} | {wait / step:.2%} | {host / step:.2%} |')


def _metric_files(workdir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(workdir):
    out += [os.path.join(root, f) for f in files if f == 'metrics.jsonl']
  return sorted(out)


if __name__ == '__main__':
  main()
