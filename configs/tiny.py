"""A tiny decoder (2 layers, d_model 32) on 24 files of the embedded corpus: the config the tests use.

  python -m jaxtrain.main --config=configs/tiny.py --workdir=/tmp/tiny

Expected on a 2-core CPU (1 device): about 17 s wall time including tokenizer build and compilation;
train loss 6.22 -> 5.28 in 30 steps, eval loss 5.41 (ppl 223). Not measured on a GPU.
"""

from jaxtrain.config import args as configargs
from jaxtrain.config.defaults import base_config


def get_config(arg=None):
  configargs.parse(arg, {})  # takes no argument: `configs/tiny.py:size=1b` is an error, not ignored
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = 32, 2, 4, 2, 64
  d = c.data
  d.max_files, d.tokenizer_vocab_size, d.seq_len, d.batch_size = 24, 512, 64, 8
  d.eval_fraction = 0.2
  c.optim.lr, c.optim.warmup_steps = 1e-2, 3
  c.train.steps, c.train.eval_every, c.train.eval_batches = 30, 15, 2
  c.checkpoint.every = 10
  c.log.every, c.log.wandb, c.log.progress = 1, 'disabled', False
  return c
