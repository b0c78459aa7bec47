"""Peak host memory of `jaxtrain.hf.load_params` on a Llama checkpoint, against loading the files whole.

  .venv/bin/python benchmarks/hf_load_memory.py                  # ~125M params, float32, ~100 MB shards
  .venv/bin/python benchmarks/hf_load_memory.py --layers=2 --vocab=8192 --shard=20MB   # quick

Builds a random `transformers.LlamaForCausalLM` locally (nothing is downloaded) and saves it sharded in a
temp dir, then loads it in a fresh process per method and reads the process's peak RSS (VmHWM in
/proc/self/status; `getrusage`'s ru_maxrss is no good here, as a spawned child inherits the parent's RSS at
spawn time as its floor), minus the RSS just before loading (jax and jaxtrain imported, backend up):

- `hf.load_params`: headers first, then file by file in row blocks of 16 MiB into one host buffer per
  stacked parameter, each put on the device when complete (on CPU the device array adopts the 64-byte
  aligned buffer instead of copying it; on an accelerator the buffer is dropped after the transfer);
- reference: every file read whole (`safetensors.numpy.load_file`), then the jaxtrain tree assembled in
  numpy and put on the device; what a straightforward converter does.

On CPU the "device" is host memory too, so both peaks include the loaded parameters themselves: 1.0x model
size is the floor. Needs the dev extra (torch). Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxtrain import hf, hf_layout, models

def status(field):  # kB lines of /proc/self/status: VmRSS now, VmHWM the peak of this address space
  line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
  return int(line.split()[1]) * 1024

hf_dir, method = sys.argv[1], sys.argv[2]
mc = hf.model_config(hf_dir)
jnp.zeros(1).block_until_ready()  # backend up before the baseline
base = status('VmRSS')
t = time.perf_counter()
if method == 'hf.load_params':
  params = hf.load_params(hf_dir, mc)
else:
  import safetensors.numpy
  tensors = {}
  for f in hf.safetensors_files(hf_dir):
    tensors.update(safetensors.numpy.load_file(f))
  _, _, shapes = models.describe(mc)
  params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
  def get(path):
    node = params
    for key in path:
      node = node[key]
    return node
  for tensor in hf_layout.layout(mc):
    dsts = [get(p) if layer is None else get(p)[layer] for p, layer in tensor.parts]
    whole = tensors[tensor.name]
    hf_layout.fill(tensor, dsts, slice(None), whole.reshape(tensor.shape[0] if whole.ndim > 1 else 1, -1))
  del tensors
  params = jax.device_put(params)
jax.block_until_ready(params)
seconds = time.perf_counter() - t
peak = status('VmHWM')
print(json.dumps({'base': base, 'peak': peak, 'after': status('VmRSS'), 'seconds': seconds,
                  'param_bytes': sum(int(x.nbytes) for x in jax.tree.leaves(params))}))
'''


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--d_model', type=int, default=768)
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--kv_heads', type=int, default=4)
  p.add_argument('--mlp', type=int, default=2048)
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--shard', default='100MB', help='max_shard_size for save_pretrained')
  return p.parse_args()


def build(args: argparse.Namespace, path: str) -> int:
  """Saves a random float32 Llama (untied) to `path`; returns its weight bytes."""
  import torch
  import transformers
  cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
  with torch.device('cpu'):
    model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(path, max_shard_size=args.shard)
  return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
  args = parse_args()
  with tempfile.TemporaryDirectory(prefix='hf-load-memory-') as path:
    model_bytes = build(args, path)
    files = [f for f in os.listdir(path) if f.endswith('.safetensors')]
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    print(f'model: {model_bytes / 1e6:.0f} MB float32 ({model_bytes // 4 / 1e6:.1f}M params) in {len(files)} '
          f'safetensors files\n')
    print('| method | peak RSS - RSS before (MB) | / model bytes | load time (s) |\n|---|---|---|---|')
    for method in ('hf.load_params', 'reference: load_file every file, assemble, device_put'):
      proc = subprocess.run([sys.executable, '-c', CHILD, path, method], capture_output=True, text=True, env=env,
                            check=False)
      if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      assert r['param_bytes'] == model_bytes, (r['param_bytes'], model_bytes)
      grown = r['peak'] - r['base']
      print(f"| {method} | {grown / 1e6:.0f} | {grown / model_bytes:.2f}x | {r['seconds']:.1f} |", flush=True)


if __name__ == '__main__':
  main()
