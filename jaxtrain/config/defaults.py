"""The one place where every config key, its type and its default live.

Config files start from `base_config()` and change what they need; `jaxtrain.config.validate` rejects any
key that is not defined here, so a typo is an error instead of a silently new setting.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default configuration (a small Llama-style decoder on the embedded corpus)."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128.
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4  # == num_heads: MHA; 1: MQA; in between: GQA.
  m.head_dim = 0  # 0: d_model // num_heads.
  m.mlp_dim = 768
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = True
  m.qkv_bias = False  # Qwen2-style q/k/v projection bias.
  m.qk_norm = False  # Qwen3-style per-head RMSNorm on q and k.
  m.init_std = 0.02
  m.param_dtype = 'float32'
  m.compute_dtype = 'auto'  # auto: bfloat16 on accelerators, float32 on CPU.
  m.remat = 'none'  # none | full | save_dots
  # None (auto): unrolled on CPU, where it is faster (benchmarks/cpu_settings.py), unless remat is on; lax.scan
  # on accelerators, where compile time stays flat in depth. True/False force one.
  m.scan_layers = config_dict.placeholder(bool)
  m.attention_block = -1  # causal attention in query blocks of this size; 0: one call; -1: 128 on CPU, else 0.
  # auto: the fused C++ kernel on CPU (jaxtrain/models/cpu_attention.py) where a C++ compiler is on PATH, else
  # XLA's ops (attention_block applies to those). xla | cpu_fused force one.
  m.attention_impl = 'auto'
  # Architecture switches for imported Hugging Face families (jaxtrain.hf); the defaults are Llama.
  m.norm = 'rmsnorm'  # rmsnorm | layernorm (GPT-2: with bias)
  m.positions = 'rope'  # rope | learned (GPT-2: absolute positions, a max_positions x d_model table)
  m.max_positions = 0  # learned: table rows (>= data.seq_len); rope: only written to exported configs.
  m.mlp = 'swiglu'  # swiglu | gelu | gelu_tanh (GPT-2's gelu_new)
  m.mlp_bias = False  # biases on the MLP projections (GPT-2).
  m.attn_out_bias = False  # bias on the attention output projection (GPT-2).
  m.rope_scaling = 'none'  # none | linear | llama3 (Llama 3.1+ long-context frequencies)
  m.rope_factor = 8.0  # linear, llama3: how much longer than the original context.
  m.rope_low_freq_factor = 1.0  # llama3 only.
  m.rope_high_freq_factor = 4.0  # llama3 only.
  m.rope_original_max_positions = 8192  # llama3 only: the context the model was pretrained on.
  m.sliding_window = 0  # Mistral-style: a token attends to the last this many tokens (itself included); 0: off.
  m.residual_gain = 0.0  # > 0: learnable per-block gains on the attention and MLP branches, starting here; 0: off.
  m.attention = 'gqa'  # gqa (MHA/GQA/MQA) | mla (DeepSeek-V2 multi-head latent attention; the mla_* keys)
  m.mla_q_rank = 0  # query latent width; 0: queries projected directly.
  m.mla_kv_rank = 128  # key/value latent width, what decoding caches; 0: no compression (per-head k and v).
  m.mla_nope_dim = 64  # per-head query/key width without positions.
  m.mla_rope_dim = 32  # per-head query/key width with rotary positions (one key shared by the heads); even.
  m.mla_v_dim = 0  # per-head value width; 0: head_dim.

  # Where the starting weights come from (default: a fresh random init).
  c.init = i = ml_collections.ConfigDict()
  i.from_hf = ''  # a local Hugging Face model dir (config.json + *.safetensors): architecture and weights.
  i.lora_from = ''  # a local PEFT adapter dir (adapter_config.json + adapter_model.safetensors) to start from.

  # LoRA / QLoRA: adapters on the parameters whose path matches `targets`; everything else is frozen.
  c.lora = r = ml_collections.ConfigDict()
  r.rank = 0  # 0: LoRA off (full fine-tuning / pretraining).
  r.alpha = 16.0
  r.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank.
  r.dropout = 0.0  # dropout on the adapter input (needs the factored product).
  r.targets = r'attn/(q|k|v|o)$|mlp/(gate|up|down)$'  # regex over parameter paths such as blocks/attn/q.
  r.mode = 'auto'  # auto | merged (W + s*A@B) | factored (x@W + s*(x@A)@B)
  r.quantize = 'none'  # QLoRA base: none | nf4 | int8
  r.quant_block = 64  # values per absmax scale.
  r.double_quant = True  # quantize the absmax scales too (8-bit, blocks of 256).

  c.data = d = ml_collections.ConfigDict()
  d.train = 'stdlib'  # 'stdlib' (embedded corpus) or comma-separated globs of .jsonl/.json/.parquet/.txt files.
  d.eval = ''  # '' = a held-out split of `train` (by file for stdlib, by document otherwise).
  d.eval_fraction = 0.05
  d.text_field = 'text'  # field of JSON Lines / column of Parquet holding the document text.
  d.tokenizer = ''  # '' = byte-level BPE built locally on the train corpus and cached; else tokenizer.json or a dir.
  d.tokenizer_vocab_size = 4096  # only for the locally built tokenizer.
  d.batch_size = 8  # global batch, in rows of seq_len tokens.
  d.seq_len = 256
  d.max_files = 0  # stdlib only: use the first N files of the sorted list (0 = all); keeps tiny runs fast.
  d.shuffle_window = 2048  # train: seq_len pieces shuffled in a window before packing (0/1 = off).
  d.prefetch = 2  # batches prepared ahead in a background thread (0 = none).
  # How processes share the data: 'documents' (each reads a disjoint share: scales) or 'rows' (each builds
  # the same global batches and keeps its rows: per-step losses equal a single-process run to float
  # rounding, and checkpoints resume with any process count).
  d.process_split = 'documents'
  # A mixture of named sources, each a `jaxtrain.data.sources.source(path, ...)` section added by a config file
  # (weight, epochs, on_end, format text|chat, template, ...). Empty: data.train/data.eval are the one source.
  d.sources = ml_collections.ConfigDict()
  d.temperature = 0.0  # > 0: source shares proportional to (source tokens)^(1/T), instead of their weights.
  d.pack_buffer = 1024  # pieces the best-fit packer looks ahead over (more: fuller rows, longer reach).
  d.intra_doc_mask = True  # packed documents attend only within themselves; False: across the row (ablation).
  d.max_doc_bytes = 64 * 2**20  # records larger than this are skipped and counted as bad (0: no limit).
  d.max_bad_fraction = 0.01  # a source with more bad records than this share stops the run before it starts.
  d.exclude = ''  # comma-separated blocklist files (`jaxtrain blocklist`): their documents are left out of training.

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 3e-3
  o.schedule = 'cosine'  # constant | linear | cosine | wsd
  o.warmup_steps = 20
  o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio for linear/cosine/wsd.
  o.decay_fraction = 0.2  # wsd: share of the steps spent decaying.
  o.decay_shape = 'linear'  # wsd: linear | cosine | sqrt
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.no_decay = r'(norm|bias|embed|gain)'  # regex over parameter paths that get no weight decay.
  o.clip_norm = 1.0  # global-norm clipping; 0 disables.

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200
  t.seed = 0
  t.accum_steps = 1  # micro-batches per step (lax.scan); data.batch_size is split between them.
  t.z_loss = 0.0  # weight of the z-loss (logsumexp^2) term.
  t.eval_every = 100  # 0 disables periodic eval (the final eval still runs).
  t.eval_batches = 4
  t.max_bad_steps = 5  # stop after this many consecutive non-finite steps (their updates are skipped), as read
  # after each call of steps_per_call steps.
  # Train steps per compiled call (lax.scan over that many batches); 0: auto, 4 on CPU (XLA CPU zero-fills each
  # call's temporaries afresh: 4 a call ran the CPU benchmark step 13% faster), 1 on accelerators. Logs,
  # checkpoints and evaluations stay per step; stop requests and the non-finite check act after each call.
  t.steps_per_call = 0

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every = 100  # 0: only at the end.
  k.keep = 3
  k.async_save = True

  c.log = g = ml_collections.ConfigDict()
  g.every = 10
  g.wandb = 'offline'  # disabled | offline | online
  g.wandb_project = 'jaxtrain'
  g.progress = True
  g.plot = True
  g.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: the table for known accelerators, else a CPU matmul probe.

  # What the model learns. The plain decoder job trains clm; StackWise racks take any of the three.
  c.objective = b = ml_collections.ConfigDict()
  b.kind = 'clm'  # clm (causal next token) | mlm (fixed-ratio masked LM) | diffusion (masked diffusion, MDLM/LLaDA)
  b.mlm_ratio = 0.15
  b.time = 'input'  # diffusion: input (t ~ U(t_min, 1) per document, embedded) | depth (stack k at depth_schedule[k])
  b.time_embedding = 'sinusoidal'  # time=input: none | sinusoidal | learned
  b.depth_schedule = ()  # time=depth: one mask ratio per stack, heaviest first; (): 1.0 ... 0.15 (sqrt-spaced)
  b.t_min = 1e-3  # smallest diffusion time (keeps the 1/t weight finite)

  # StackWise progressive training (jaxtrain.stackwise): a rack of num_stacks stacks trained stage by stage.
  c.stackwise = w = ml_collections.ConfigDict()
  w.num_stacks = 0  # 0: not a StackWise run. model.num_layers is the rack depth (a multiple of this).
  w.direction = 'append'  # append (new stacks on top) | prepend (frozen suffix + head, new stacks in front) | joint
  w.stages = 0  # 0: one per stack; fewer leaves the front (prepend) or top (append) stacks untrained.
  w.stage_steps = ()  # steps per stage; (): train.steps split evenly.
  w.trunk = 'frozen'  # frozen | lora | qlora: what the already-trained stacks get during a stage.
  w.quantize = 'nf4'  # qlora trunk storage: nf4 | int8 (block/double quant from the lora section); none: no qlora.
  w.trunk_rank = 4  # LoRA rank on trunk stacks (lora/qlora trunks).
  w.stack_rank = 0  # > 0: the new stack trains through LoRA of this rank over its initial weights (dual LoRA).
  w.rank_schedule = 'constant'  # constant | increasing (rank * (1 + stack index)) | list (trunk_ranks, stack_ranks)
  w.trunk_ranks = ()
  w.stack_ranks = ()
  w.alpha_over_rank = 2.0  # adapter alpha = this * rank, so every adapter has the same scale.
  w.new_stack_init = 'identity'  # identity (zeroed output projections) | random | copy (the neighbouring stack)
  w.consistency = 0.0  # prepend: weight of the MSE between a new stack's output and its suffix's expected input.

  # Samples printed at the end of a StackWise run (and by `jaxtrain sample`).
  c.sample = a = ml_collections.ConfigDict()
  a.prompts = ('def ', 'import ', 'class ')
  a.max_tokens = 32  # tokens generated after each prompt
  a.steps = 16  # diffusion: unmasking steps
  a.schedule = 'cosine'  # diffusion: linear | cosine (share of masks left after each step)
  a.temperature = 0.0  # 0: greedy
  a.top_k = 0
  a.top_p = 1.0

  # Multi-process runs; the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
  # variables fill in whatever is left empty here.
  c.distributed = x = ml_collections.ConfigDict()
  x.coordinator = ''  # host:port of process 0; '' = not distributed (unless auto or the env says so).
  x.num_processes = 0
  x.process_id = -1
  x.auto = False  # let JAX detect the cluster (SLURM, TPU pods, ...).

  c.mesh = s = ml_collections.ConfigDict()
  s.data = -1  # -1: all devices not used by the other axes.
  s.fsdp = 1
  s.tensor = 1

  # `jaxtrain estimate`: the largest micro-batch that fits (compile-only) and the time/cost of a token budget.
  c.estimate = e = ml_collections.ConfigDict()
  e.memory_budget = ''  # per device, e.g. 80GB (10^9 bytes) or 80GiB (2^30); '': the device's own limit, if known.
  e.tokens = 0.0  # training tokens to price, e.g. 2e9; 0: no time/cost table.
  e.gpu = ''  # a key of price_per_hour; '': the detected device kind.
  e.mfu = 0.4  # assumed model FLOPs utilisation for the time estimate, in (0, 1].
  e.num_gpus = 0  # 0: jax.device_count().
  e.max_rows = 4096  # the search's bound on the micro-batch (rows per device): each size tried costs a compile.
  # USD per GPU (TPU: chip) hour. Placeholders in the style of public on-demand list prices (TPUs: Google
  # Cloud's per-chip rates; GPUs: typical GPU-cloud rates, 2024-25), not quotes or measurements: edit them.
  e.price_per_hour = p = ml_collections.ConfigDict()
  p.h100 = 3.00
  p.h200 = 3.80
  p.a100 = 1.80
  p.v4 = 3.22
  p.v5e = 1.20
  p.v5p = 4.20
  p.v6e = 2.70

  # Context-length curriculum (jaxtrain.train.curriculum, SkyLadder-style): the attention window (a sliding window
  # within each document) widens from `start` to data.seq_len over the first `fraction` of train.steps.
  c.curriculum = u = ml_collections.ConfigDict()
  u.kind = 'none'  # none | linear | cosine | step
  u.start = 32  # window of the first step, in tokens (itself included); <= data.seq_len.
  u.fraction = 0.5  # share of train.steps after which the window is data.seq_len, in (0, 1].
  u.steps_per_stage = 0  # step: steps each window is held; 0: the ramp split into max_variants - 1 stages.
  u.max_variants = 4  # at most this many distinct windows (each compiles one train step), evenly spaced; >= 2.

  # Which documents trained each step (jaxtrain.train.recorder): WORKDIR/samples/ and loss-spike dumps in WORKDIR/spikes/.
  c.provenance = v = ml_collections.ConfigDict()
  v.sidecar = True  # record each step's sample ids per row (`jaxtrain samples --workdir=DIR --step=N`).
  v.spike_factor = 3.0  # a step whose loss or grad norm exceeds this x its rolling mean is dumped; 0: off; else > 1.
  v.spike_window = 50  # steps in the rolling means (spikes are kept out of them).
  v.spike_warmup = 20  # steps before spikes are looked for (non-finite steps are dumped from the first).
  v.max_dumps = 20  # at most this many WORKDIR/spikes/step_N.json per run (later spikes are only logged).
  return c
