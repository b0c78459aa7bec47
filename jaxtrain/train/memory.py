"""Memory per device of a run's train step: the one definition `jaxtrain check` predicts and `jaxtrain estimate`
measures.

What must fit a device is the peak of the compiled train step as XLA's `memory_analysis()` states it:

    peak = arguments + outputs - aliased + temporaries

arguments: the state (the weights, or with LoRA the frozen and possibly quantized base, the adapters, optimizer
state for what trains, step and rng) and the batch; outputs: the new state and the metrics, the state written
over the donated old one (aliased: counted once); temporaries: gradients, activations and XLA's workspace.
`estimate` compiles the step and reads the four figures (`Measured`, split by `parts`); `check` compiles nothing
and predicts them (`predict`): the state exactly from the abstract state training builds (`state.build`, so LoRA
and QLoRA are counted as they train), the temporaries from `activation_bytes`, the gradients of what trains and
a weight-sized workspace. tests/test_memory.py holds the prediction against the compiled step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxtrain import models, sharding
from jaxtrain.adapters import lora
from jaxtrain.models import flops
from jaxtrain.train import optim, state
from jaxtrain.train.checkpoint import abstract_with_shardings

BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask')  # int32 (rows, seq_len) each
DEFINITION = 'arguments + outputs - aliased + temporaries'


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings (the largest shard where a
  dimension splits unevenly)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the state, exactly


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Bytes per device of the train state as training builds it (exact), and its parameter counts (global)."""
  weights: int  # what the model reads: every parameter, or with LoRA the frozen base (QLoRA: codes and scales)
  adapters: int  # LoRA adapters, the trained parameters of a LoRA run; 0 without LoRA
  optimizer: int  # for the trained parameters only
  other: int  # step counter and rng key
  trained_params: int  # parameters that take gradients
  frozen_params: int  # parameters of the frozen base (0 without LoRA)
  dense_weights: int  # the model's weights unquantized in param_dtype (what a QLoRA base dequantizes to)
  quantize: str  # lora.quantize: 'none', 'nf4' or 'int8'

  @property
  def lora(self) -> bool:
    return self.frozen_params > 0

  @property
  def trained(self) -> int:
    """Bytes of the trained parameters (the size of their gradients)."""
    return self.adapters if self.lora else self.weights

  @property
  def total(self) -> int:
    return self.weights + self.adapters + self.optimizer + self.other


class StepState:
  """The train state of `config` built as `train.run` builds it (`state.build`: LoRA adapters over a frozen base,
  quantized with QLoRA, optimizer state for what trains), all abstract: nothing is allocated and nothing compiles.

  `built`, `tx` and `schedule` are what `train.jit_steps` takes; `abstract` is the whole state (the frozen base
  included) as ShapeDtypeStructs carrying their shardings; `bytes` its `StateBytes`."""

  def __init__(self, config: ml_collections.ConfigDict, mc: models.ModelConfig, mesh: jax.sharding.Mesh,
               execution: models.Execution | None = None):
    cfg = copy.deepcopy(config)
    cfg.init.from_hf = ''  # the config is resolved (the architecture is in config.model): shapes need no weights
    self.config, self.mc, self.mesh = cfg, mc, mesh
    self.execution = models.execution.resolve(execution, mc)
    self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
      self.built = state.build(cfg, mc, self.tx, mesh, self.execution)  # raises LoraError as training does
      full = jax.eval_shape(self.built.complete, self.built.abstract)  # adds the frozen base (LoRA), abstractly
    self.abstract = abstract_with_shardings(full, self.built.shardings)
    _, specs, shapes = models.describe(mc)
    dense = abstract_with_shardings(shapes, sharding.param_shardings(specs, shapes, mesh))
    self.lora = 'frozen' in self.abstract
    a = self.abstract
    blocks = dense.get('blocks', {})
    # One block of the stacked blocks, and the weights outside them (embedding, head, final norm).
    self.block_bytes = device_bytes(blocks) // max(mc.num_layers, 1)
    self.bytes = StateBytes(
        weights=device_bytes(a['frozen'] if self.lora else a['params']),
        adapters=device_bytes(a['params']) if self.lora else 0, optimizer=device_bytes(a['opt_state']),
        other=device_bytes({k: v for k, v in a.items() if k not in ('params', 'opt_state', 'frozen')}),
        trained_params=models.count_params(a['params']),
        frozen_params=models.count_params(shapes) if self.lora else 0, dense_weights=device_bytes(dense),
        quantize=cfg.lora.quantize if self.lora else 'none')
    self.unstacked_bytes = self.bytes.dense_weights - device_bytes(blocks)

  @property
  def description(self) -> str:
    return self.built.description

  def lora_flops(self) -> flops.LoraFlops | None:
    """What trains, for `flops.flops_per_token` (None: every parameter)."""
    return lora.flops_of(self.abstract['params']) if self.lora else None


# ----------------------------------------------------------------------------- the prediction (check)


def activation_bytes(mc: models.ModelConfig, rows: int, seq_len: int, tensor: int, fsdp: int = 1,
                     execution: models.Execution | None = None) -> int:
  """Analytic estimate of the activations one device keeps for the backward pass of one micro-batch.

  With c the compute dtype's bytes, tokens = rows * seq_len, and head / MLP / vocab dimensions split over
  the `tensor` axis (when it divides them), one block's backward reads, per token:
    6D                 the block input and mid-block residual, both norms' outputs and intermediates (six
                       D-wide stacks in XLA's buffer assignment of the remat none step)
    (N + 2K)H + NH     q, k, v and the attention output before the o projection
    6F                 gate, up, silu(gate) * up and the pieces of silu's derivative (six F-wide stacks)
  times c, plus 2 * N * seq_len float32 values per token: XLA's attention keeps the masked scores and the
  softmax (a fused kernel such as cuDNN's keeps none, so this term is an upper bound on GPU); with
  `execution.attention_impl='cpu_fused'` N float32 values per token instead (the kernel keeps the rows'
  log-sum-exp). c and the attention come from `execution` (default: this backend's, XLA attention).
  Across L layers:
    remat none:       L * block, plus with fsdp > 1 each layer's gathered weights, L * ((2N + 2K)HD + 3DF) * c
                      (the scan saves what the forward gathered rather than gathering again)
    remat full:       L * D * c (only layer inputs) + 1 block (recomputed one layer at a time)
    remat save_dots:  L * (3D + (N + 2K)H + 2F) * c (input and the outputs of weight matmuls) + 1 block
  plus the head: the final norm output D * c and float32 logits, their softmax and gradient, 3 * 4V per token.

  Checked by tests/test_memory.py against `memory_analysis()` of the compiled train step on CPU (float32,
  d_model 128-256, seq 128-256, meshes data 8 and 2x2x2, every remat mode, full training, LoRA and QLoRA):
  with the rest of `predict`, the total came within 15% of XLA's peak.
  """
  d, n, k, h, f, v = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim, mc.vocab_size
  ex = models.execution.resolve(execution, mc)
  c = np.dtype(ex.compute_dtype).itemsize

  def split(dim: int) -> float:  # sharding.spec_for replicates a dimension the tensor axis does not divide
    return dim / tensor if dim % tensor == 0 else dim

  tokens = rows * seq_len
  nq, nkv = split(n), split(k)  # heads one device holds
  scores = nq * 4 if ex.attention_impl == 'cpu_fused' else nq * seq_len * 2 * 4
  block = tokens * c * (6 * d + (2 * nq + 2 * nkv) * h + 6 * split(f)) + tokens * scores
  gathered = 0
  if mc.remat == 'none':
    layers = mc.num_layers * block
    if fsdp > 1:  # the backward reads each layer's weights as gathered in the forward: the scan saves them
      gathered = mc.num_layers * c * d * ((2 * nq + 2 * nkv) * h + 3 * split(f))
  elif mc.remat == 'full':
    layers = mc.num_layers * tokens * d * c + block
  else:  # save_dots
    saved = 3 * d + (nq + 2 * nkv) * h + 2 * split(f)
    layers = mc.num_layers * tokens * c * saved + block
  head = tokens * (d * c + 3 * 4 * split(v))
  return int(layers + head + gathered)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """`check`'s estimate of the compiled step's peak per device, split by what holds the bytes."""
  state: StateBytes  # exact
  batch: int  # exact
  gradients: int  # the trained parameters' size, twice with gradient accumulation
  activations: int  # `activation_bytes`
  workspace: int  # XLA's weight copies (see `predict`)
  rows: int  # of the micro-batch on one device

  @property
  def temporaries(self) -> int:
    return self.gradients + self.activations + self.workspace

  @property
  def total(self) -> int:
    """The predicted peak: the state and batch are the arguments; the outputs alias the donated state."""
    return self.state.total + self.batch + self.temporaries


def predict(ss: StepState, rows: int, seq_len: int, accum_steps: int) -> Prediction:
  """The peak of `ss`'s train step for `rows` rows of `seq_len` tokens per device, without compiling it.

  The workspace: with every parameter trained, one weight-sized buffer (XLA's backward holds weight copies laid
  out for the transposed matmuls and the embedding's scatter-add gradient, and Adam writes its new moments
  before they replace the donated state; tests/test_memory.py misses by up to 17% on small models without it).
  With LoRA the weights take no gradient, but the backward still reads every frozen weight transposed (QLoRA:
  dequantized), the unquantized size of all of them with unrolled layers, of one block plus the weights outside
  the blocks when the layers are scanned (measured on CPU: 0.96-1.09 and 0.22-0.38 of the dense weights)."""
  b = ss.bytes
  if not b.lora or not ss.execution.scan_layers:
    workspace = b.dense_weights
  else:
    workspace = ss.block_bytes + ss.unstacked_bytes
  mesh = ss.mesh
  act = activation_bytes(ss.mc, rows, seq_len, mesh.shape['tensor'], mesh.shape['fsdp'], ss.execution)
  return Prediction(state=b, batch=len(BATCH_KEYS) * rows * seq_len * 4,
                    # accumulation keeps a running sum beside each micro-batch's gradient
                    gradients=b.trained * (2 if accum_steps > 1 else 1), activations=act, workspace=workspace,
                    rows=rows)


# ----------------------------------------------------------------------------- the measurement (estimate)


@dataclasses.dataclass(frozen=True)
class Measured:
  """XLA's memory analysis of the train step compiled for `rows` rows per device (bytes per device)."""
  rows: int
  argument: int  # state + batch
  output: int  # new state + metrics
  alias: int  # outputs written over donated arguments
  temp: int  # gradients, activations and workspace
  oom: bool = False  # the compiler itself refused: the program cannot fit the device

  @property
  def total(self) -> int | float:
    """The peak per device (`DEFINITION`): the donated state is written over the old one, so aliased bytes count
    once. Infinite when the compile failed."""
    return math.inf if self.oom else self.argument + self.output - self.alias + self.temp


def parts(m: Measured, b: StateBytes) -> list[tuple[str, int]]:
  """`m.total` split into (name, bytes) rows that sum to it exactly: the state's parts (exact, from the abstract
  state), the rest of the arguments (batch, step, rng), the outputs that overwrite nothing (the metrics), the
  temporaries (gradients, activations, workspace: XLA does not split them). Empty when the compile failed."""
  if m.oom:
    return []
  return [('weights', b.weights), ('adapters', b.adapters), ('optimizer state', b.optimizer),
          ('batch, step, rng', m.argument - b.weights - b.adapters - b.optimizer),
          ('outputs', m.output - m.alias), ('temporaries', m.temp)]


def format_bytes(n: float) -> str:
  """'1.234 GiB', '12.3 MiB' or '4.5 KiB'; infinite: a compile the compiler refused."""
  if n == math.inf:
    return 'compile refused (out of memory)'
  if abs(n) >= 2 ** 30:
    return f'{n / 2 ** 30:.3f} GiB'
  return f'{n / 2 ** 20:.1f} MiB' if abs(n) >= 2 ** 20 else f'{n / 2 ** 10:.1f} KiB'


def verdict(total: float, budget: int) -> str:
  """'fits the budget of B: F free' or 'does not fit the budget of B: O over': the one test (total <= budget) and
  wording of `check` and `estimate`."""
  of = f'the budget of {format_bytes(budget)} ({budget / 1e9:,.3f} GB)'
  if total <= budget:
    return f'fits {of}: {format_bytes(budget - total)} free'
  return f'does not fit {of}' + ('' if total == math.inf else f': {format_bytes(total - budget)} over')
