"""A causal StackWise rack as a Hugging Face model: `jaxtrain export --workdir=RUN --format=hf --out=DIR`.

A rack trained with objective=clm computes what one decoder with its stacks' blocks concatenated computes
(`jaxtrain.models.rack.to_transformer`), so it is written by the same `jaxtrain.hf.weights.save` as a plain
run: config.json for the transformers class its blocks map to (Llama for the default blocks), safetensors,
and the run's own tokenizer. Masked-objective racks (bidirectional denoisers) and blocks no transformers
class has (MLA attention, residual gains) are refused in one line before anything is read or written.
"""

from __future__ import annotations

import ml_collections

from jaxtrain import paths
from jaxtrain.hf import config as hf_config, weights as hf_weights
from jaxtrain.stackwise import inference, plan
from jaxtrain.stackwise.checkpoint import saved_stages
from jaxtrain.train import rundir, runstatus
from jaxtrain.train.export import ExportError, check_out


def export(workdir: str, out: str, step: int | None = None, stage: int | None = None, fmt: str = 'hf',
           dtype: str = 'float32', max_shard_bytes: int = 2 * 2 ** 30,
           config: ml_collections.ConfigDict | None = None) -> str:
  """Writes the rack of `stage` (default: the last saved) of the StackWise run in `workdir` to `out` as the
  Hugging Face causal LM it computes, with the run's tokenizer; returns a one-line summary. Raises
  ExportError for a rack that does not map, a `step` (plain runs only), a format other than hf or a
  non-empty `out`. `config`: the run's config if already read."""
  config = rundir.load_config(workdir, ExportError) if config is None else config
  if not config.stackwise.num_stacks:
    raise ExportError(f'--workdir={workdir} is not a StackWise run; jaxtrain.train.export exports plain runs')
  if fmt != 'hf':
    raise ExportError(f'--format={fmt}: a StackWise run has no separate adapters to export (a stage merges its '
                      'adapters into the rack); a causal (objective=clm) rack exports with --format=hf')
  if step is not None:
    raise ExportError(f'--step={step}: a StackWise run saves its rack per stage, not per step; choose one with '
                      '--stage=K (default: the last saved)')
  obj = config.objective
  if obj.kind != 'clm':
    what = obj.kind + (f' (time={obj.time})' if obj.kind == 'diffusion' else '')
    raise ExportError(f'--workdir={workdir} is a StackWise rack trained with objective {what}: a bidirectional '
                      'denoiser that no Hugging Face causal LM computes; only objective=clm racks export (as '
                      f'Llama, Qwen2/3, Mistral or GPT-2); sample this one with jaxtrain generate --workdir={workdir}')
  tokenizer = rundir.load_tokenizer(config, workdir)
  rd, _ = plan.rack_setup(config, tokenizer.vocab_size)
  try:
    target = hf_weights.export_target(inference.transformer_config(rd, range(rd.rc.num_stacks)))
  except hf_config.HfError as e:
    raise ExportError(f'--workdir={workdir}: its clm rack maps onto no Hugging Face model ({e.line()}); '
                      'exportable racks have attention=gqa and no residual gain; sample it with jaxtrain '
                      f'sample --workdir={workdir}') from None
  check_out(out)
  loaded = inference.load(workdir, stage, config, ExportError)
  params, mc = inference.transformer(loaded.rack)
  files = hf_weights.save(params, mc, loaded.tokenizer, out, max_shard_bytes=max_shard_bytes, dtype=dtype)
  saved = saved_stages(paths.in_run(workdir, paths.RACK))
  runstatus.record_export(workdir, out, fmt, dtype, stage=saved[-1] if stage is None else stage)  # `jaxtrain runs`
  note = '' if loaded.note is None else f' ({loaded.note.removeprefix("note: ")})'
  layers = f'{mc.num_layers} layer{"s" if mc.num_layers > 1 else ""}'
  return (f'exported {loaded.what} to {out} as {target.architecture} with {layers} ({dtype}, '
          f'{len(files)} safetensors file{"s" if len(files) > 1 else ""}, tokenizer {loaded.tokenizer.path}){note}')
