"""The one place where every config key, its type and its default live.

Config files start from `base_config()` and change what they need; `jaxtrain.config.schema` (run by
`jaxtrain.config.validate`) rejects any key that is not defined here, so a typo is an error instead of a
silently new setting.

Each section is built by its own function below, whose docstring says what the section is for. Every key has
a comment: on its own line(s) directly above the key, or at the end of the key's line (or both); a comment
followed by a blank line is about the lines after it, not one key. The README's config table is generated from
these docstrings and comments (`python docs/config_table.py --write`; jaxtrain.config.table).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default configuration (a small Llama-style decoder on the embedded corpus)."""
  config = ml_collections.ConfigDict()
  config.model = _model()
  config.init = _init()
  config.lora = _lora()
  config.data = _data()
  config.optim = _optim()
  config.train = _train()
  config.checkpoint = _checkpoint()
  config.log = _log()
  config.objective = _objective()
  config.stackwise = _stackwise()
  config.sample = _sample()
  config.distributed = _distributed()
  config.mesh = _mesh()
  config.estimate = _estimate()
  config.curriculum = _curriculum()
  config.provenance = _provenance()
  return config


def _model() -> ml_collections.ConfigDict:
  """The decoder's architecture; the defaults are a small Llama."""
  model = ml_collections.ConfigDict()
  model.vocab_size = 0  # embedding rows; 0: the tokenizer's vocabulary rounded up to a multiple of 128.
  model.d_model = 256  # width of the residual stream.
  model.num_layers = 4  # transformer blocks (StackWise: the whole rack's depth).
  model.num_heads = 4  # query heads.
  model.num_kv_heads = 4  # key/value heads, a divisor of num_heads: == num_heads: MHA; 1: MQA; in between: GQA.
  model.head_dim = 0  # width of each head; 0: d_model // num_heads.
  model.mlp_dim = 768  # hidden width of the MLP.
  model.rope_theta = 10000.0  # RoPE base frequency (theta).
  model.norm_eps = 1e-5  # epsilon of RMSNorm / LayerNorm.
  model.tie_embeddings = True  # the output head reuses the token embedding matrix.
  model.qkv_bias = False  # Qwen2-style q/k/v projection bias.
  model.qk_norm = False  # Qwen3-style per-head RMSNorm on q and k.
  model.init_std = 0.02  # standard deviation of the random weight initialisation.
  # dtype the parameters are stored in: float32 | bfloat16 (the optimizer state stays float32 either way)
  model.param_dtype = 'float32'
  # dtype of activations and matmuls: auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16 | float16
  model.compute_dtype = 'auto'
  # activations recomputed in the backward pass (per block): none | full (all) | save_dots (keep matmul outputs)
  model.remat = 'none'
  # Layers under lax.scan. None (auto): unrolled on CPU, where it is faster (benchmarks/cpu_settings.py), unless
  # remat is on; lax.scan on accelerators, where compile time stays flat in depth. True/False force one.
  model.scan_layers = config_dict.placeholder(bool)
  model.attention_block = -1  # causal attention in query blocks of this size; 0: one call; -1: 128 on CPU, else 0.
  # auto: on CPU the fused C++ kernel (jaxtrain/kernels/cpu_attention.py, compiled on first use) where a C++
  # compiler (`CXX`, else g++) is on PATH, else XLA's ops (attention_block applies to those). xla | cpu_fused
  # force one.
  model.attention_impl = 'auto'
  # The keys from here to rope_original_max_positions switch architectures for imported Hugging Face families
  # (jaxtrain.hf); their defaults are Llama's.

  model.norm = 'rmsnorm'  # rmsnorm | layernorm (GPT-2: with bias)
  model.positions = 'rope'  # rope | learned (GPT-2: absolute positions, a max_positions x d_model table)
  model.max_positions = 0  # learned: table rows (>= data.seq_len); rope: only written to exported configs.
  model.mlp = 'swiglu'  # swiglu | gelu | gelu_tanh (GPT-2's gelu_new)
  model.mlp_bias = False  # biases on the MLP projections (GPT-2).
  model.attn_out_bias = False  # bias on the attention output projection (GPT-2).
  model.rope_scaling = 'none'  # none | linear | llama3 (Llama 3.1+ long-context frequencies)
  model.rope_factor = 8.0  # linear, llama3: how much longer than the original context.
  # llama3 only: wavelengths above rope_original_max_positions / this are scaled by rope_factor.
  model.rope_low_freq_factor = 1.0
  # llama3 only: wavelengths below rope_original_max_positions / this stay unscaled (in between: blended).
  model.rope_high_freq_factor = 4.0
  model.rope_original_max_positions = 8192  # llama3 only: the context the model was pretrained on, in tokens.
  # Mistral-style: a token attends to the last this many tokens (itself included); 0: off.
  model.sliding_window = 0
  # > 0: learnable per-block gains on the attention and MLP branches, starting at this value; 0: off.
  model.residual_gain = 0.0
  model.attention = 'gqa'  # gqa (MHA/GQA/MQA) | mla (DeepSeek-V2 multi-head latent attention; the mla_* keys)
  model.mla_q_rank = 0  # mla: query latent width; 0: queries projected directly.
  model.mla_kv_rank = 128  # mla: key/value latent width, what decoding caches; 0: no compression (per-head k, v).
  model.mla_nope_dim = 64  # mla: per-head query/key width without positions.
  model.mla_rope_dim = 32  # mla: per-head query/key width with rotary positions (one key shared by the heads); even.
  model.mla_v_dim = 0  # mla: per-head value width; 0: head_dim.
  return model


def _init() -> ml_collections.ConfigDict:
  """Where the starting weights come from (default: a fresh random init)."""
  init = ml_collections.ConfigDict()
  # a local Hugging Face model dir (config.json + *.safetensors): architecture and weights, and its tokenizer.json
  # when data.tokenizer is ''.
  init.from_hf = ''
  init.lora_from = ''  # a local PEFT adapter dir (adapter_config.json + adapter_model.safetensors) to start from.
  return init


def _lora() -> ml_collections.ConfigDict:
  """LoRA / QLoRA: adapters on the parameters whose path matches `targets`; everything else is frozen."""
  lora = ml_collections.ConfigDict()
  lora.rank = 0  # adapter rank; 0: LoRA off (full fine-tuning / pretraining).
  lora.alpha = 16.0  # adapter scale: the update is multiplied by alpha / rank (alpha / sqrt(rank) with rslora).
  lora.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank.
  lora.dropout = 0.0  # dropout probability on the adapter input (needs the factored product), in [0, 1).
  lora.targets = r'attn/(q|k|v|o)$|mlp/(gate|up|down)$'  # regex over parameter paths such as blocks/attn/q.
  lora.mode = 'auto'  # auto (factored) | merged (W + s*A@B) | factored (x@W + s*(x@A)@B)
  lora.quantize = 'none'  # QLoRA base weights: none | nf4 | int8
  lora.quant_block = 64  # QLoRA: values per absmax scale.
  lora.double_quant = True  # QLoRA: quantize the absmax scales too (8-bit, blocks of 256).
  return lora


def _data() -> ml_collections.ConfigDict:
  """What the model trains on: sources, tokenizer, batch shape, packing, bad-record limits."""
  data = ml_collections.ConfigDict()
  data.train = 'stdlib'  # 'stdlib' (embedded corpus) or comma-separated globs of .jsonl/.json/.parquet/.txt files.
  data.eval = ''  # globs of held-out files; '': a held-out split of `train` (by file for stdlib, else by document).
  data.eval_fraction = 0.05  # share of `train` held out for eval when data.eval is '', in [0, 1).
  # Named held-out sets, each evaluated with the run's eval (train.eval_every, train.eval_batches) and logged as
  # eval_loss/NAME and eval_ppl/NAME: 'NAME=GLOBS;NAME=GLOBS' (comma-separated globs, read whole in the first
  # source's format). '': none; eval_loss stays the held-out split of each source either way.
  data.eval_sets = ''
  data.text_field = 'text'  # field of JSON Lines / column of Parquet holding the document text.
  # '': byte-level BPE built locally on the train corpus and cached; else a tokenizer.json or a Hugging Face dir.
  data.tokenizer = ''
  data.tokenizer_vocab_size = 4096  # vocabulary size of the locally built tokenizer (data.tokenizer '' only).
  data.batch_size = 8  # global batch, in rows of seq_len tokens.
  data.seq_len = 256  # tokens per row: the context length trained on.
  data.max_files = 0  # stdlib only: use the first N files of the sorted list (0 = all); keeps tiny runs fast.
  # train: each source's seq_len pieces are shuffled in a window of this many before packing (0/1 = off).
  data.shuffle_window = 2048
  data.prefetch = 2  # batches prepared ahead in a background thread (0 = none).
  # How processes share the data: 'documents' (each reads a disjoint share: scales) or 'rows' (each builds
  # the same global batches and keeps its rows: per-step losses equal a single-process run to float
  # rounding, and checkpoints resume with any process count).
  data.process_split = 'documents'
  # A mixture of named sources, each a `jaxtrain.data.sources.source(path, ...)` section added by a config file
  # (weight, epochs, on_end, format text|chat|alpaca|sharegpt, template, ...). Empty: data.train/data.eval are
  # the one source. Each source is packed into rows of its own and the rows are mixed by their tokens: after
  # every step, each source's logged tokens/<source> is within (sources - 1) x seq_len tokens of its share of
  # all tokens so far (per process with process_split 'documents'); a finite source holds it until it ends.
  data.sources = ml_collections.ConfigDict()
  # > 0: source shares proportional to (source tokens)^(1/T), instead of their weights; 0: the weights.
  data.temperature = 0.0
  data.pack_buffer = 1024  # pieces each source's best-fit packer looks ahead over (more: fuller rows, more memory).
  data.intra_doc_mask = True  # packed documents attend only within themselves; False: across the row (ablation).
  # in bytes (default 64 MiB): records larger than this are skipped and counted as bad; 0: no limit.
  data.max_doc_bytes = 64 * 2**20
  data.max_bad_fraction = 0.01  # a source with more bad records than this share stops the run before it starts.
  # comma-separated blocklist files (`jaxtrain blocklist`): their documents are left out of training.
  data.exclude = ''
  return data


def _optim() -> ml_collections.ConfigDict:
  """AdamW with a weight-decay mask, global-norm clipping and a learning-rate schedule with linear warmup.

  The optimizer state (Adam's moments) is float32 whatever model.param_dtype is. The schedule follows the
  train step count, skipped non-finite steps included (a skipped step consumes its schedule step), so the
  logged lr is the applied one; the last trained step (train.steps) uses the final lr.
  """
  optim = ml_collections.ConfigDict()
  optim.lr = 3e-3  # peak learning rate (reached at the end of warmup).
  optim.schedule = 'cosine'  # constant | linear | cosine | wsd (warmup-stable-decay)
  # steps of linear warmup to lr (step i uses lr*(i+1)/warmup_steps); 0: none. Longer than train.steps: clamped
  # to train.steps, with a note at the start of the run.
  optim.warmup_steps = 20
  # final lr = lr * min_lr_ratio for linear/cosine/wsd, used by the last trained step, in [0, 1].
  optim.min_lr_ratio = 0.1
  optim.decay_fraction = 0.2  # wsd: share of the steps spent decaying, in [0, 1].
  optim.decay_shape = 'linear'  # wsd: linear | cosine | sqrt
  optim.b1 = 0.9  # AdamW decay rate of the first moment, in [0, 1).
  optim.b2 = 0.95  # AdamW decay rate of the second moment, in [0, 1).
  optim.eps = 1e-8  # AdamW epsilon, added to the denominator.
  optim.weight_decay = 0.1  # decoupled weight decay; 0: none.
  optim.no_decay = r'(norm|bias|embed|gain)'  # regex over parameter paths that get no weight decay.
  optim.clip_norm = 1.0  # global-norm gradient clipping threshold; 0 disables.
  return optim


def _train() -> ml_collections.ConfigDict:
  """The training loop: length, seed, gradient accumulation, evaluation, non-finite steps."""
  train = ml_collections.ConfigDict()
  train.steps = 200  # optimizer steps of the run (StackWise: of all stages together).
  train.seed = 0  # seed of the initialisation, the data order and the masks.
  train.accum_steps = 1  # micro-batches per step (lax.scan); data.batch_size is split between them.
  train.z_loss = 0.0  # weight of the z-loss (logsumexp^2) term; 0: off.
  train.eval_every = 100  # evaluate every this many steps; 0 disables periodic eval (the final eval still runs).
  train.eval_batches = 4  # held-out batches each evaluation averages over.
  # stop after this many consecutive non-finite steps (their updates are skipped), as read after each call of
  # steps_per_call steps; 0: never stop for them (they are still skipped; the header line and summary say so).
  train.max_bad_steps = 5
  # Train steps per compiled call (lax.scan over that many batches); 0: auto, 4 on CPU (XLA CPU zero-fills each
  # call's temporaries afresh: 4 a call ran the CPU benchmark step 13% faster), 1 on accelerators. Logs,
  # checkpoints and evaluations stay per step; stop requests and the non-finite check act after each call.
  train.steps_per_call = 0
  train.early_stop = _early_stop()
  return train


def _early_stop() -> ml_collections.ConfigDict:
  """Stop on a validation plateau or target (jaxtrain.train.earlystop), judged at each evaluation. The best
  checkpoint by `metric` is kept whatever checkpoint.keep says (`jaxtrain eval --best`, `jaxtrain export --best`)."""
  early_stop = ml_collections.ConfigDict()
  # an eval metric the run logs: eval_loss | eval_ppl, or METRIC/NAME for a set of data.eval_sets; '': off.
  early_stop.metric = ''
  early_stop.mode = 'min'  # min (lower is better) | max
  early_stop.patience = 3  # stop after this many evaluations without improvement; 0: never (target only).
  early_stop.min_delta = 0.0  # an improvement must beat the best by at least this (and by more than nothing).
  early_stop.target = config_dict.placeholder(float)  # stop at the first evaluation that reaches it; None: no target.
  return early_stop


def _checkpoint() -> ml_collections.ConfigDict:
  """Orbax checkpoints in WORKDIR/checkpoints; a run restarted in the same WORKDIR resumes from the newest."""
  checkpoint = ml_collections.ConfigDict()
  checkpoint.every = 100  # save every this many steps; 0: only at the end.
  checkpoint.keep = 3  # the newest this many checkpoints are kept, older ones deleted.
  checkpoint.async_save = True  # write checkpoints in the background while training goes on.
  return checkpoint


def _log() -> ml_collections.ConfigDict:
  """Metrics: WORKDIR/metrics.jsonl, Weights & Biases, the progress bar and the loss plot."""
  log = ml_collections.ConfigDict()
  log.every = 10  # log train metrics every this many steps.
  log.wandb = 'offline'  # Weights & Biases, in WORKDIR/wandb: disabled | offline | online
  log.wandb_project = 'jaxtrain'  # Weights & Biases project name.
  log.progress = True  # progress (first process only): a tqdm bar on a terminal, else a plain line per logged step.
  log.plot = True  # write WORKDIR/loss.png (train and eval loss per step) when the run ends.
  # per-device peak FLOP/s for MFU; 0: the table for known accelerators, else a CPU matmul probe.
  log.peak_flops = 0.0
  return log


def _objective() -> ml_collections.ConfigDict:
  """What the model learns. The plain decoder job trains clm; StackWise racks take any of the three."""
  objective = ml_collections.ConfigDict()
  # clm (causal next token) | mlm (fixed-ratio masked LM) | diffusion (masked diffusion, MDLM/LLaDA)
  objective.kind = 'clm'
  objective.mlm_ratio = 0.15  # mlm: share of the tokens masked.
  # diffusion: input (t ~ U(t_min, 1) per document, embedded) | depth (stack k at depth_schedule[k])
  objective.time = 'input'
  objective.time_embedding = 'sinusoidal'  # time=input: none | sinusoidal | learned
  # time=depth: one mask ratio per stack, heaviest first; (): 1.0 ... 0.15 (sqrt-spaced)
  objective.depth_schedule = ()
  objective.t_min = 1e-3  # smallest diffusion time (keeps the 1/t weight finite)
  return objective


def _stackwise() -> ml_collections.ConfigDict:
  """StackWise progressive training (jaxtrain.stackwise): a rack of num_stacks stacks trained stage by stage."""
  stackwise = ml_collections.ConfigDict()
  stackwise.num_stacks = 0  # 0: not a StackWise run. model.num_layers is the rack depth (a multiple of this).
  # append (new stacks on top) | prepend (frozen suffix + head, new stacks in front) | joint
  stackwise.direction = 'append'
  stackwise.stages = 0  # 0: one per stack; fewer leaves the front (prepend) or top (append) stacks untrained.
  stackwise.stage_steps = ()  # steps per stage; (): train.steps split evenly.
  stackwise.trunk = 'frozen'  # frozen | lora | qlora: what the already-trained stacks get during a stage.
  # qlora trunk storage: nf4 | int8 (block/double quant from the lora section); none: no qlora.
  stackwise.quantize = 'nf4'
  stackwise.trunk_rank = 4  # LoRA rank on trunk stacks (lora/qlora trunks).
  stackwise.stack_rank = 0  # > 0: the new stack trains through LoRA of this rank over its initial weights (dual LoRA).
  # constant | increasing (rank * (1 + stack index)) | list (trunk_ranks, stack_ranks)
  stackwise.rank_schedule = 'constant'
  stackwise.trunk_ranks = ()  # rank_schedule=list: the trunk LoRA rank of each stack (num_stacks entries).
  stackwise.stack_ranks = ()  # rank_schedule=list: the new-stack LoRA rank of each stack (num_stacks entries).
  stackwise.alpha_over_rank = 2.0  # adapter alpha = this * rank, so every adapter has the same scale.
  # identity (zeroed output projections) | random | copy (the neighbouring stack)
  stackwise.new_stack_init = 'identity'
  # prepend: weight of the MSE between a new stack's output and its suffix's expected input; 0: off.
  stackwise.consistency = 0.0
  return stackwise


def _sample() -> ml_collections.ConfigDict:
  """Samples generated and printed at the end of a StackWise run (jaxtrain.stackwise.job)."""
  sample = ml_collections.ConfigDict()
  sample.prompts = ('def ', 'import ', 'class ')  # the texts continued, one sample each.
  sample.max_tokens = 32  # tokens generated after each prompt
  sample.steps = 16  # diffusion: unmasking steps
  sample.schedule = 'cosine'  # diffusion: linear | cosine (share of masks left after each step)
  sample.temperature = 0.0  # softmax temperature; 0: greedy
  sample.top_k = 0  # sample among the k most likely tokens only; 0: off.
  sample.top_p = 1.0  # nucleus: the most likely tokens holding this much probability, in (0, 1]; 1: off.
  return sample


def _distributed() -> ml_collections.ConfigDict:
  """Multi-process runs; the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
  variables fill in whatever is left empty here."""
  distributed = ml_collections.ConfigDict()
  distributed.coordinator = ''  # host:port of process 0; '' = not distributed (unless auto or the env says so).
  distributed.num_processes = 0  # processes in the run; 0: JAX_NUM_PROCESSES.
  distributed.process_id = -1  # this process's index, from 0; -1: JAX_PROCESS_ID.
  distributed.auto = False  # let JAX detect the cluster (SLURM, TPU pods, ...).
  return distributed


def _mesh() -> ml_collections.ConfigDict:
  """Device mesh axis sizes (jaxtrain.sharding); their product is the device count, and one may be -1."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data parallelism (replicated parameters); -1: all devices not used by the other axes.
  mesh.fsdp = 1  # fully sharded data parallelism: the batch and the parameters' embed dim shard over it.
  mesh.tensor = 1  # tensor parallelism: the head, MLP and vocabulary dims shard over it.
  return mesh


def _estimate() -> ml_collections.ConfigDict:
  """`jaxtrain estimate`: the largest micro-batch that fits (compile-only) and the time/cost of a token budget."""
  estimate = ml_collections.ConfigDict()
  # per device, e.g. 80GB (10^9 bytes) or 80GiB (2^30); '': the device's own limit, if known.
  estimate.memory_budget = ''
  estimate.tokens = 0.0  # training tokens to price, e.g. 2e9; 0: no time/cost table.
  estimate.gpu = ''  # a key of price_per_hour; '': the detected device kind.
  estimate.mfu = 0.4  # assumed model FLOPs utilisation for the time estimate, in (0, 1].
  estimate.num_gpus = 0  # devices to price; 0: jax.device_count().
  estimate.max_rows = 4096  # the search's bound on the micro-batch (rows per device): each size tried costs a compile.
  # the search's bound on compiles (2-5 from the formula's start); reached, it reports the largest size verified.
  estimate.max_compiles = 8
  estimate.price_per_hour = _price_per_hour()
  return estimate


def _price_per_hour() -> ml_collections.ConfigDict:
  """USD per GPU (TPU: chip) hour. Placeholders in the style of public on-demand list prices (TPUs: Google
  Cloud's per-chip rates; GPUs: typical GPU-cloud rates, 2024-25), not quotes or measurements: edit them."""
  price = ml_collections.ConfigDict()
  price.h100 = 3.00  # NVIDIA H100, USD per GPU hour.
  price.h200 = 3.80  # NVIDIA H200, USD per GPU hour.
  price.a100 = 1.80  # NVIDIA A100, USD per GPU hour.
  price.v4 = 3.22  # TPU v4, USD per chip hour.
  price.v5e = 1.20  # TPU v5e, USD per chip hour.
  price.v5p = 4.20  # TPU v5p, USD per chip hour.
  price.v6e = 2.70  # TPU v6e (Trillium), USD per chip hour.
  return price


def _curriculum() -> ml_collections.ConfigDict:
  """Context-length curriculum (jaxtrain.train.curriculum, SkyLadder-style): the attention window (a sliding
  window within each document) widens from `start` to data.seq_len over the first `fraction` of train.steps."""
  curriculum = ml_collections.ConfigDict()
  curriculum.kind = 'none'  # none | linear | cosine | step
  curriculum.start = 32  # window of the first step, in tokens (itself included); <= data.seq_len.
  curriculum.fraction = 0.5  # share of train.steps after which the window is data.seq_len, in (0, 1].
  # step: steps each window is held; 0: the ramp split into max_variants - 1 stages.
  curriculum.steps_per_stage = 0
  curriculum.max_variants = 4  # at most this many distinct windows (each compiles one train step), evenly spaced; >= 2.
  return curriculum


def _provenance() -> ml_collections.ConfigDict:
  """Which documents trained each step (jaxtrain.train.recorder): WORKDIR/samples/ and loss-spike dumps in
  WORKDIR/spikes/."""
  provenance = ml_collections.ConfigDict()
  provenance.sidecar = True  # record each step's sample ids per row (`jaxtrain samples --workdir=DIR --step=N`).
  # a step whose loss or grad norm exceeds this x its rolling mean is dumped; 0: off; else > 1.
  provenance.spike_factor = 3.0
  provenance.spike_window = 50  # steps in the rolling means (spikes are kept out of them).
  provenance.spike_warmup = 20  # steps before spikes are looked for (non-finite steps are dumped from the first).
  provenance.max_dumps = 20  # at most this many WORKDIR/spikes/step_N.json per run (later spikes are only logged).
  return provenance
