"""StackWise: a rack of transformer stacks trained stage by stage on the embedded corpus (the main job).

  python -m jaxtrain.main --config=configs/stackwise.py                      # make run
  python -m jaxtrain.main --config=configs/stackwise.py:objective=clm
  python -m jaxtrain.main --config=configs/stackwise.py:direction=prepend,time=depth
  python -m jaxtrain.main --config=configs/stackwise.py:trunk=qlora,stack_rank=16
  python -m jaxtrain.main --config=configs/stackwise.py:direction=joint      # end-to-end baseline
  python -m jaxtrain.main --config=configs/stackwise.py:size=125m --workdir=runs/sw125m

Arguments (`:key=value,...`):
  size       cpu (default) | 125m
  objective  diffusion (default: masked diffusion, ELBO-weighted) | mlm | clm (causal decoder, KV-cache sampling)
  direction  append (default) | prepend (frozen suffix + head, new stacks in front) | joint (all stacks at once)
  trunk      frozen (default) | lora | qlora (NF4 trunk + adapters)
  time       input (default: t embedded, sinusoidal) | depth (stack k tied to a mask ratio; one-pass sampling)
  attention  gqa (default) | mla (multi-head latent attention)
  stack_rank 0 (default: the new stack trains every weight) | r > trunk_rank: dual LoRA

Sizes:
  cpu   4 stacks x 1 block, d_model 128, 4 heads (GQA 4/2), vocab 4096, seq 128 x batch 16, 4 stages x 300 steps.
  125m  6 stacks x 2 blocks, d_model 768, 12 heads, 32k vocab, seq 1024 x batch 64, 6 stages x 2000 steps
        (accelerator; not yet measured: no GPU was available to the session that wrote this).

Expected on a 2-core CPU (`make run` from a fresh clone, 2026-12-01): 6 min 39 s wall including the install,
about 80 s per stage; eval ELBO about 6.6 nats/token after stage 0 and for the final rack (measured 6.64 and
6.55 on 2026-12-07; 16 eval batches; uniform guessing is 8.35). At this size the
end-to-end baseline (`direction=joint`, same tokens) reaches a better ELBO (docs/benchmarks.md, "StackWise").
Samples are still mostly repeated tokens. The same job with 150
steps per stage took 3 min 48 s. A rerun gives the same losses (tested on tiny racks).
"""

from jaxtrain.config import args as configargs
from jaxtrain.config.defaults import base_config

SIZES = {
    #        stacks blocks d_model heads kv  mlp   vocab  seq   batch steps/stage lr
    'cpu': (4, 1, 128, 4, 2, 384, 4096, 128, 16, 300, 3e-3),
    '125m': (6, 2, 768, 12, 12, 2048, 32768, 1024, 64, 2000, 1e-3),
}
DEFAULTS = {'size': 'cpu', 'objective': 'diffusion', 'direction': 'append', 'trunk': 'frozen', 'time': 'input',
            'attention': 'gqa', 'stack_rank': '0'}
CHOICES = {'size': tuple(SIZES), 'objective': ('diffusion', 'mlm', 'clm'),
           'direction': ('append', 'prepend', 'joint'), 'trunk': ('frozen', 'lora', 'qlora'),
           'time': ('input', 'depth'), 'attention': ('gqa', 'mla')}


def get_config(arg=None):
  args = configargs.parse(arg, DEFAULTS, CHOICES)
  stacks, blocks, d_model, heads, kv, mlp, vocab, seq, batch, steps, lr = SIZES[args['size']]
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim = stacks * blocks, d_model, heads, kv, mlp
  m.attention = args['attention']
  # An untied head keeps training in every append stage while the embedding a frozen trunk reads stays fixed.
  m.tie_embeddings = False
  if m.attention == 'mla':
    head_dim = d_model // heads
    m.mla_kv_rank, m.mla_q_rank = d_model // 2, 0
    m.mla_nope_dim, m.mla_rope_dim, m.mla_v_dim = head_dim // 2, head_dim // 2, head_dim
  c.data.tokenizer_vocab_size, c.data.seq_len, c.data.batch_size = vocab, seq, batch
  c.objective.kind = args['objective']
  c.objective.time = args['time']
  w = c.stackwise
  w.num_stacks = stacks
  w.direction = args['direction']
  w.trunk = args['trunk']
  w.stack_rank = int(args['stack_rank'])
  w.trunk_rank = 4
  if w.stack_rank and w.stack_rank <= w.trunk_rank:
    w.trunk_rank = max(1, w.stack_rank // 2)
  stages = 1 if w.direction == 'joint' else stacks
  c.train.steps = steps * stages if w.direction != 'joint' else steps * stacks
  c.optim.lr, c.optim.warmup_steps = lr, min(20, steps // 5)
  c.train.eval_every = 0  # each stage evaluates at its end
  c.train.eval_batches = 16  # the 1/t-weighted ELBO is noisy: a few lightly masked samples dominate it
  c.checkpoint.every = steps
  c.log.every = 25
  c.log.wandb = 'disabled'
  return c
