"""The StackWise job: `python -m jaxtrain.main --config=configs/stackwise.py` (see `jaxtrain.stackwise`).

Runs the planned stages one after another, each through `train.fit` in WORKDIR/stages/<k>/ (so a stage
resumes mid-way like any run), merges what the stage trained into the rack, saves the rack per stack in
WORKDIR/rack/ (only stacks whose contents changed are written), then prints a per-stage summary, the
evaluation of the final rack and a few samples (`jaxtrain generate --workdir=WORKDIR` draws more the same way;
`jaxtrain export` writes a causal rack as a Hugging Face model).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections

from jaxtrain import paths
from jaxtrain import data, sharding
from jaxtrain.stackwise import inference, objectives, plan as stackwise
from jaxtrain.train import execution, loop as train, optim, resume, runstatus
from jaxtrain.config import validate as config_validate
from jaxtrain.models.validate import check_vocab
from jaxtrain.models import rack
from jaxtrain.stackwise.checkpoint import StackCheckpointer

KEEP_KEYS = ('doc_ids', 'doc_chunks')  # masks are keyed by sample id
# What "loss" (train and eval, per stage and final) is for each objective: one name, explained once.
LOSS_MEANING = {'diffusion': 'the masked-diffusion ELBO bound', 'mlm': 'masked-token CE', 'clm': 'next-token CE'}


def parts_of(host_rack: dict, stacks: list[int]) -> dict[str, Any]:
  """The rack as named parts for the per-stack checkpoint: 'shared.<name>' for each shared parameter group
  (a frozen embedding is then not rewritten with a trained head) and 'stack<i>' for the trained stacks."""
  parts = {f'shared.{k}': v for k, v in host_rack['shared'].items()}
  parts.update({f'stack{i}': host_rack['stacks'][str(i)] for i in stacks})
  return parts


def restore_rack(store: StackCheckpointer, stage: int, rd: rack.RackDef, host_rack: dict) -> tuple[dict, list[int]]:
  """The rack saved after `stage` (stacks not yet trained keep their initial values) and its trained stacks."""
  names = list(store.manifest(stage)['parts'])
  abstract = {n: (rd.shared_shapes[n[len('shared.'):]] if n.startswith('shared.') else rd.stack_shapes)
              for n in names}
  parts = stackwise.host(store.restore(stage, abstract))
  out = {'shared': {n[len('shared.'):]: v for n, v in parts.items() if n.startswith('shared.')},
         'stacks': dict(host_rack['stacks'])}
  trained = sorted(int(n[len('stack'):]) for n in names if n.startswith('stack'))
  for i in trained:
    out['stacks'][str(i)] = parts[f'stack{i}']
  return out, trained


def run(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> dict[str, Any]:
  """Trains the rack stage by stage in `workdir`, resuming after the last saved stage (and inside the
  current stage from its own checkpoints). Returns {'stages': [per-stage records], 'eval', 'samples'}.
  Validates first, as `jaxtrain.train.run` does, and trains the config `prepare` returns."""
  config = config_validate.prepare(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = data.load_tokenizer(config.data)
  check_vocab(config.model, tokenizer.vocab_size)
  train.check_data(config, tokenizer)  # before any write
  rd, obj = stackwise.rack_setup(config, tokenizer.vocab_size, execution.plan(config))  # before any write
  stages = stackwise.plan(config)
  schedule = stackwise.depth_schedule(config)
  if start_over:
    resume.start_over(workdir, paths.STACKWISE_HISTORY)
  # WORKDIR/config.json is shared by the rack and every stage's checkpoints; each stage's state is compared
  # with its own checkpoints when the stage starts (`Checkpointer.restore_latest`).
  # The stages' lengths follow train.steps, so a rack cannot be resumed with another one.
  resume.check(config, workdir, [paths.RACK] + [os.path.join(paths.STAGES, str(s.index), paths.CHECKPOINTS)
                                                 for s in stages], fixed=('train.steps',))
  train.write_config(config, workdir, tokenizer)  # + WORKDIR/tokenizer/, the copy an export reads
  primary = jax.process_index() == 0
  store = StackCheckpointer(paths.in_run(workdir, paths.RACK))
  host_rack = stackwise.initial_rack(rd, config.train.seed, tokenizer.vocab_size)
  trained: list[int] = []
  last = store.latest()
  if last is not None:
    host_rack, trained = restore_rack(store, last, rd, host_rack)
  records: list[dict] = []
  # WORKDIR/run.json: the whole job's status and stage (each stage's fit writes stages/K/run.json too).
  with runstatus.Recording(workdir, sum(s.steps for s in stages), kind='stackwise', enabled=primary,
                           extra={'stage_steps': [s.steps for s in stages], 'stage': None}) as status:
    for stage in stages:
      if last is not None and stage.index <= last:
        meta = store.manifest(stage.index).get('meta') or {}
        records.append(dict(meta, resumed=True))
        continue
      if stage.index > 0:
        new = str(stage.new[0])
        if config.stackwise.new_stack_init == 'copy':
          neighbour = stage.new[0] + (-1 if config.stackwise.direction == 'append' else 1)
          host_rack['stacks'][new] = host_rack['stacks'][str(neighbour)]
        elif config.stackwise.new_stack_init == 'identity':
          host_rack['stacks'][new] = stackwise.identity_init(host_rack['stacks'][new])
      status.update(stage=stage.index)
      start = time.perf_counter()
      tx, lr_schedule = optim.make_optimizer(config.optim, stage.steps)
      with jax.set_mesh(mesh):
        built = stackwise.build_stage(config, rd, stage, host_rack, tx, mesh)
        loss_fn = stackwise.make_loss_fn(config, rd, obj, stage, schedule)
        train_step, eval_step = train.jit_steps(config, built, tx, lr_schedule, mesh, loss_fn)
        train_flops, eval_flops = stage_flops(config, rd, stage)
        job = train.Job(built, train.FixedStep(train_step, train_flops), eval_step, stage.steps,
                        config.train.seed + stage.index, train_flops, eval_flops, KEEP_KEYS, stage.name)
        # The run's WORKDIR/STOP (not the stage directory's) stops the stage at its next step, saved and resumable.
        result = train.fit(config, job, paths.stage_dir(workdir, stage.index), mesh, tokenizer,
                           stop_file=paths.in_run(workdir, paths.STOP))
        if result.stopped:
          reason, where = result.stopped
          if primary:
            print(f'stopped by {reason} in {stage.name}: checkpoint {where}; run the same command to resume',
                  flush=True)
          done = sum(s.steps for s in stages[:stage.index]) + max(result.losses, default=result.start_step)
          status.end('stopped', done, f'stopped by {reason} in {stage.name}; rerun the same command to resume')
          return {'stages': records, 'eval': None, 'samples': [], 'stopped': result.stopped}
        state = result.state
        host_rack, changed = stackwise.merge_stage(config, stage, host_rack, state['params'])
      trained = sorted(set(trained) | set(stage.order))
      losses = result.losses
      record = {'stage': stage.index, 'stacks': list(stage.order), 'new': list(stage.new), 'steps': stage.steps,
                'ratio': stage.ratio, 'trained_params': rack.count(built.abstract['params']),
                'loss_first': losses[min(losses)] if losses else None,
                'loss_last': losses[max(losses)] if losses else None,
                'eval_loss': result.eval['eval_loss'], 'eval_masked_ce': masked_ce(result.eval),
                'seconds': round(time.perf_counter() - start, 1),
                'changed': changed,
                'early_stop': result.early_stop}  # train.early_stop ended the stage; the next one starts
      report = store.save(stage.index, parts_of(host_rack, trained), meta=record)
      record['bytes_written'] = report.bytes_written
      record['parts_written'] = list(report.written)
      records.append(record)
      del state, result  # the stage's device arrays go before the next stage builds its own
    status.end('done', sum(s.steps for s in stages))
  result = {'stages': records, 'eval': records[-1]['eval_loss'] if records else None, 'stopped': None}
  result['samples'] = samples(config, rd, obj, stages[-1], host_rack, tokenizer, schedule) if primary else []
  if primary:
    print(stage_table(records, obj), flush=True)
    for prompt, text in result['samples']:
      print(f'sample {prompt!r} -> {text!r}', flush=True)
    final = stages[-1]
    print(f'stackwise: {len(stages)} stages, rack stacks {list(final.order)}; final eval loss '
          f'{result["eval"]:.4f} nats/token ({LOSS_MEANING[obj.kind]}; ppl {"<= " if obj.kind == "diffusion" else ""}'
          f'{math.exp(min(result["eval"], 50)):.2f}); rack saved in {store.directory}/stage_{final.index}.json',
          flush=True)
    # What a user can do with the rack next (a causal rack is also a Hugging Face model).
    export = f'; export: jaxtrain export --workdir={workdir} --format=hf --out=DIR' if obj.causal else ''
    print(f'more samples: jaxtrain generate --workdir={workdir} [--prompt=TEXT --max_tokens=N]{export}', flush=True)
  return result


def stage_flops(config: ml_collections.ConfigDict, rd: rack.RackDef, stage: stackwise.Stage) -> tuple[float, float]:
  keys = tuple(rd.shared_shapes)
  trains = stackwise.trained_shared(config, stage, keys)
  head_trains = any(k in trains for k in ('lm_head', 'final_norm')) or (
      config.model.tie_embeddings and 'embed' in trains)
  input_trains = 'embed' in trains and not stackwise.stops_after_prefix(config, stage) or stage.trunk_ranks
  first = -1 if input_trains else stage.order.index(stage.new[0])
  return stackwise.stage_flops(rd.rc.block, config.data.seq_len, stage, head_trains, first)


def masked_ce(ev: dict) -> float | None:
  """Mean cross-entropy over the masked tokens of an evaluation (masked objectives): unweighted, so it varies
  far less between evaluations than the 1/t-weighted ELBO, which a few lightly masked samples dominate."""
  if 'eval_masked' not in ev or not ev['eval_masked']:
    return None
  return ev['eval_masked_ce'] / ev['eval_masked']


def stage_table(records: list[dict], obj: objectives.Objective) -> str:
  """A fixed-width per-stage summary. "loss" is the objective's loss everywhere (the stages' own lines, this
  table, the final line): `LOSS_MEANING` says once what it is."""
  lines = [f'stages (loss: {LOSS_MEANING[obj.kind]}, nats/token; eval mCE: unweighted CE of the masked tokens)',
           f'{"stage":>5} {"stacks":<14} {"new":<6} {"ratio":>5} {"trained":>9} {"steps":>5} '
           f'{"loss first->last":>26} {"eval loss":>9} {"eval mCE":>8} {"sec":>6} {"written":>9}']
  for r in records:
    ratio = '-' if r.get('ratio') is None else f'{r["ratio"]:.2f}'
    written = f'{r.get("bytes_written", 0) / 2**20:.1f}MiB' if 'bytes_written' in r else '(saved)'
    first, last = r.get('loss_first'), r.get('loss_last')
    losses = f'{first:.3f} -> {last:.3f}' if first is not None else '-'
    lines.append(f'{r["stage"]:>5} {str(r["stacks"]):<14} {str(r["new"]):<6} {ratio:>5} '
                 f'{r["trained_params"] / 1e6:>8.3f}M {r["steps"]:>5} {losses:>26} {r["eval_loss"]:>9.3f} '
                 f'{_maybe(r.get("eval_masked_ce")):>8} '
                 f'{r["seconds"]:>6.1f} {written:>9}')
  return '\n'.join(lines)


def samples(config: ml_collections.ConfigDict, rd: rack.RackDef, obj: objectives.Objective,
            stage: stackwise.Stage, host_rack: dict, tokenizer: data.Tokenizer,
            schedule: tuple[float, ...] | None) -> list[tuple[str, str]]:
  """(prompt, continuation) for each `sample.prompts`, generated as the rack's objective trained it
  (`inference.generate`, the generator `jaxtrain generate --workdir=RUN` uses: same settings, same text)."""
  r = inference.Rack(rd, obj, stage.order, host_rack, schedule)
  got = inference.generate(r, tokenizer, list(config.sample.prompts), inference.Settings.from_config(config),
                           config.data.seq_len, prefix='config.sample.')
  return [(s.prompt, s.text) for s in got]


def _maybe(x: float | None) -> str:
  return '-' if x is None else f'{x:.3f}'
