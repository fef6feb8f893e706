"""`hiddenkey-ds plan RECIPE.yaml`: per-GPU memory of a training run, before it is queued.

The estimate is an explicit sum of what a LoRA/QLoRA step under DeepSpeed keeps in device memory at its
peak, term by term, so that every number can be checked against a measurement (tests/test_plan.py and
benchmarks/plan_vs_measured.py do, on CPU):

* model states: the frozen base (bf16 / 4-bit / 8-bit; partitioned over ranks only by ZeRO-3), the LoRA
  parameters, their gradients and AdamW states (partitioned from ZeRO-1 / ZeRO-2 on, or offloaded);
* activations saved for backward, derived per decoder layer from what autograd keeps for a LLaMA layer with
  frozen base weights and LoRA adapters (RMSNorm's fp32 input, the LoRA inputs, q/k/v/out of attention, the
  four MLP intermediates, dropout keep-masks) and, with gradient checkpointing, one layer input per layer plus
  one recomputed layer;
* HiddenKey's costs: the dual pass runs [x; x] as one forward (2x tokens), and DropKey hands sdpa an additive
  (batch, heads, seq, seq) logit mask per layer that sdpa keeps for backward;
* the chunked supervised loss head (hiddenkey_ds.method.objective): one checkpointed chunk of logits at a time;
* framework overhead: DeepSpeed's gradient buckets, the CUDA context + NCCL, allocator fragmentation.

`estimate(PlanConfig) -> MemoryPlan` is pure (no torch import); `main(argv)` is the CLI.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field, replace

from hiddenkey_ds.method.config import REBUILD_MASK_BYTES
from hiddenkey_ds.models.shapes import LINEAR_MODULES, ModelShape, resolve_shape

GIB = 1024**3

# Bytes per weight of a quantized linear layer (bitsandbytes). 4-bit: 0.5 byte + one absmax per 64-weight
# block (fp32 = 4/64; double quantization stores it as 8 bits + one fp32 per 256 blocks).
_WEIGHT_BYTES_4BIT = 0.5 + 4 / 64
_WEIGHT_BYTES_4BIT_DQ = 0.5 + 1 / 64 + 4 / (64 * 256)
_WEIGHT_BYTES_8BIT = 1.0  # int8 + one fp32 scale per row (negligible)

# Device-only constants that a CPU measurement cannot check; typical values, stated as such in the output.
CUDA_CONTEXT_BYTES = int(1.0 * GIB)   # CUDA context + cuBLAS workspace + NCCL communicators
FRAGMENTATION = 0.10                  # caching-allocator slack on the dynamic (activation) part

# Relative slow-down of each change the suggester may propose (heuristic ranks, cheapest first): LoRA's
# optimizer state is tiny so ZeRO-1/2 cost ~nothing; ZeRO-3 re-gathers the frozen base in forward and
# backward; checkpointing recomputes one forward; offload moves the base over PCIe every step; 4-bit changes
# the method (QLoRA) and dequantizes every matmul.
COST_STAGE = {0: 0.0, 1: 0.01, 2: 0.02, 3: 0.25}
COST_OFFLOAD = 1.0
COST_HALVE_MICRO_BATCH = 0.10
COST_CHECKPOINTING = 0.33
COST_4BIT = 0.50
PATTERNS = ("element", "column", "span")
DS_CONFIG_FOR = {(0, False): "zero0", (1, False): "zero1", (2, False): "zero2", (3, False): "zero3",
                 (3, True): "zero3_offload"}


@dataclass(frozen=True)
class PlanConfig:
    """Everything the estimate depends on. Build it with `config_from_recipe` or directly (tests)."""

    shape: ModelShape
    dtype: str = "bf16"                       # bf16 | fp32: base weights, LoRA, activations
    quantization: str = "none"                # none | 4bit | 8bit (frozen base linear layers)
    double_quant: bool = True
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    supervised_tokens: int | None = None      # per sequence; None = seq_len - 1 (every position)
    padded: bool = True                       # batches carry a padding mask (stock sdpa keeps a bool mask)
    gradient_checkpointing: bool = False
    dual_pass: bool = False                   # consistency loss: two stochastic passes
    consistency_grad: str = "one_branch"      # one_branch: pass 2 without grad; both: [h; h] with grad
    dropout_layers: str | tuple[int, ...] = "latter_half"  # dropout.layers: the decoder layers with dropout
    key_dropout: bool = False                 # DropKey: sdpa with an additive (B, H, S, S) logit mask
    key_pattern: str = "column"               # DropKey keep-mask: element (B, H, S, S); column, span (B, H, 1, S)
    attention_dropout: bool = False           # DropAttention: materialized attention weights
    attention_pattern: str = "element"        # DropAttention keep-mask, shaped as DropKey's
    hidden_dropout: bool = False              # element keep-mask on every MLP output
    hidden_pattern: str = "element"
    loss_chunk_tokens: int = 1024
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    device: str = "gpu"                       # gpu | cpu (cpu: no CUDA context, buckets count touched pages only)
    # DeepSpeed zero_optimization settings (DeepSpeed's defaults)
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    memory_efficient_linear: bool = True
    param_persistence_threshold: int = 100_000
    ds_config_name: str | None = None
    rebuild_mask_bytes: int = REBUILD_MASK_BYTES  # hiddenkey_ds.method's rule (a parameter so probes can move it)

    def __post_init__(self) -> None:
        checks = {
            "dtype": self.dtype in ("bf16", "fp32"),
            "quantization": self.quantization in ("none", "4bit", "8bit"),
            "zero_stage": self.zero_stage in (0, 1, 2, 3),
            "device": self.device in ("gpu", "cpu"),
            "key_pattern": self.key_pattern in PATTERNS,
            "attention_pattern": self.attention_pattern in PATTERNS,
            "hidden_pattern": self.hidden_pattern in PATTERNS,
            "consistency_grad": self.consistency_grad in ("one_branch", "both"),
            "offload_param": not self.offload_param or self.zero_stage == 3,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PlanConfig.{name}={getattr(self, name)!r} is not supported "
                                 "(offload_param needs zero_stage=3)" if name == "offload_param" else
                                 f"PlanConfig.{name}={getattr(self, name)!r} is not supported")
        for name in ("micro_batch", "grad_accum", "seq_len", "lora_r", "loss_chunk_tokens", "nodes",
                     "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.lora_targets) - set(LINEAR_MODULES)
        if unknown:
            raise ValueError(f"lora target_modules {sorted(unknown)} are not LLaMA linear layers "
                             f"({', '.join(LINEAR_MODULES)})")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    @property
    def passes(self) -> int:
        return 2 if self.dual_pass else 1

    @property
    def dropout_active(self) -> bool:
        return self.key_dropout or self.attention_dropout or self.hidden_dropout

    def dropout_layer_indices(self) -> list[int]:
        """The decoder layers hiddenkey_ds.method applies dropout to (DropoutConfig.layer_indices' rule)."""
        if not self.dropout_active:
            return []
        from hiddenkey_ds.method.config import DropoutConfig

        spec = list(self.dropout_layers) if isinstance(self.dropout_layers, tuple) else self.dropout_layers
        return DropoutConfig(layers=spec).layer_indices(self.shape.layers)

    def shared_prefix(self) -> int:
        """Layers the two passes share, run once (HiddenKeyObjective._shared_prefix): those before the first
        layer with dropout, unless PEFT's lora_dropout makes the passes differ earlier."""
        selected = self.dropout_layer_indices()
        if not self.dual_pass or not selected or self.lora_dropout > 0:
            return 0
        return min(selected)

    def grad_rows(self, layer: int) -> int:
        """Sequences a decoder layer runs with autograd recording: the micro-batch, doubled from the shared
        prefix on when both passes back-propagate ([h; h]); with one_branch the second pass replays without grad."""
        doubled = self.dual_pass and self.consistency_grad == "both" and layer >= self.shared_prefix()
        return self.micro_batch * (2 if doubled else 1)


@dataclass(frozen=True)
class Row:
    name: str
    bytes: float
    note: str = ""
    counted: bool = True  # False: an "of which" line, already inside the rows above


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]   # recipe key=value overrides that make it fit
    description: str
    total_bytes: float
    cost: float


@dataclass
class MemoryPlan:
    config: PlanConfig
    rows: list[Row]
    cpu_bytes: float                       # host memory per rank for offloaded states
    suggestion: Suggestion | None = None
    per_layer_activation_bytes: float = 0.0
    checkpointed_activation_bytes: float = 0.0
    full_activation_bytes: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(r.bytes for r in self.rows if r.counted)

    @property
    def capacity_bytes(self) -> float:
        return self.config.gpu_mem_gib * GIB

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r} (rows: {', '.join(r.name for r in self.rows)})")

    def format(self) -> str:
        return format_plan(self)


# -- the model ------------------------------------------------------------------------------------------------

def _linear_weight_bytes(cfg: PlanConfig) -> float:
    if cfg.quantization == "4bit":
        return _WEIGHT_BYTES_4BIT_DQ if cfg.double_quant else _WEIGHT_BYTES_4BIT
    if cfg.quantization == "8bit":
        return _WEIGHT_BYTES_8BIT
    return cfg.dtype_bytes


def lora_param_count(cfg: PlanConfig) -> int:
    shapes = cfg.shape.linear_shapes()
    return cfg.shape.layers * sum(cfg.lora_r * (shapes[m][0] + shapes[m][1]) for m in cfg.lora_targets)


def _lora_tensor_sizes(cfg: PlanConfig) -> list[int]:
    """numel of every LoRA A and B matrix (ZeRO-3 keeps tensors below the persistence threshold whole)."""
    shapes = cfg.shape.linear_shapes()
    return [cfg.lora_r * dim for m in cfg.lora_targets for dim in shapes[m]] * cfg.shape.layers


def zero3_saves_linear_inputs(cfg: PlanConfig) -> bool:
    """ZeRO-3 (zero.Init, and deepspeed.initialize at stage 3) replaces torch.nn.functional.linear for the rest
    of the process by its memory_efficient_linear autograd function, which saves the input of every linear
    layer, frozen ones included. bitsandbytes' 4/8-bit layers do not go through F.linear."""
    return cfg.zero_stage == 3 and cfg.memory_efficient_linear and cfg.quantization == "none"


def dropout_mask_bytes(cfg: PlanConfig) -> int:
    """What F.dropout keeps per element for backward: CUDA's fused kernel a bool mask; the CPU path
    multiplies by a noise tensor in the input's dtype and keeps that."""
    return 1 if cfg.device == "gpu" else cfg.dtype_bytes


def dropkey_rebuilds_mask(cfg: PlanConfig, sequences: int | None = None) -> bool:
    """Whether DropKey builds its mask inside a checkpoint (rebuilt in backward) or lets sdpa keep it: the
    rule of hiddenkey_ds.method.attention, on one layer's (sequences, heads, S, S) mask; `sequences` defaults to
    the rows a layer with dropout runs with grad."""
    if not cfg.key_dropout or cfg.attention_dropout:
        return False
    if sequences is None:
        selected = cfg.dropout_layer_indices()
        sequences = cfg.grad_rows(selected[0] if selected else 0)
    return sequences * cfg.shape.heads * cfg.seq_len ** 2 * cfg.dtype_bytes > cfg.rebuild_mask_bytes


def keep_mask_bytes(cfg: PlanConfig, sequences: int, pattern: str) -> int:
    """One layer's bool attention keep-mask (hiddenkey_ds.method.masks.attention_keep): a bit per logit for
    `element`, per key for `column` and `span`."""
    per_row = cfg.seq_len ** 2 if pattern == "element" else cfg.seq_len
    return sequences * cfg.shape.heads * per_row


def activation_bytes_per_token_layer(cfg: PlanConfig, rows: int | None = None) -> float:
    """Bytes one token keeps alive for backward in one decoder layer (without the (S x S) masks).

    What autograd saves when the base linear weights are frozen (a frozen nn.Linear saves nothing: its
    input gradient needs only the weight) and LoRA A/B train (lora_A saves its input, lora_B the rank-r
    output):"""
    s, d = cfg.shape, cfg.dtype_bytes
    h, i, q, kv, r = s.hidden, s.intermediate, s.q_dim, s.kv_dim, cfg.lora_r
    targets = set(cfg.lora_targets)
    drop = cfg.lora_dropout > 0
    every_input = zero3_saves_linear_inputs(cfg)

    # both RMSNorms keep their fp32 input and rsqrt (the first layer's input norm does not: its input, the
    # frozen embedding's output, needs no gradient; the final norm makes up for it, see estimate())
    total = 2 * (4 * h + 4)
    expanded = cfg.key_dropout or cfg.attention_dropout or cfg.padded
    if cfg.attention_dropout:
        # DropAttention materializes the weights: the matmuls keep q and the expanded k, v (the (S x S)
        # tensors are in attention_mask_bytes_per_layer)
        total += d * 3 * q
    else:
        # sdpa keeps q, k, v, its output and an fp32 logsumexp per head; k/v are expanded to every query head
        # whenever a mask is passed (stock sdpa with padding, or the DropKey path). The fused kernels lay their
        # output out as (B, S, H, d), so o_proj's input is that same storage. DropKey runs sdpa inside a
        # checkpoint: only its inputs are kept, the output and logsumexp are recomputed in backward
        total += d * (q + (2 * q if expanded else 2 * kv))
        total += 0 if dropkey_rebuilds_mask(cfg, rows) else d * q + 4 * s.heads
        # o_proj's input stays counted as sdpa's output storage (below): with DropKey's checkpoint it is kept only
        # by an adapted o_proj; the measured ZeRO-3 DropKey peaks (tests/test_plan.py) match without adding it
    # inputs of the linear layers, by the tensor they read: q/k/v share the normed x, gate/up the normed x
    for mods, width, shared_with_sdpa in (({"q_proj", "k_proj", "v_proj"}, h, False),
                                          ({"o_proj"}, q, not cfg.attention_dropout),
                                          ({"gate_proj", "up_proj"}, h, False), ({"down_proj"}, i, False)):
        adapted = mods & targets
        if drop:
            # lora_dropout > 0: each adapter keeps its own dropped copy of the input and the dropout's mask
            total += len(adapted) * width * (d + dropout_mask_bytes(cfg))
            total += width * d if every_input and not shared_with_sdpa else 0
        elif (adapted or every_input) and not shared_with_sdpa:
            total += width * d                             # one shared input tensor
    total += 3 * i * d                                     # gate (silu input), silu(gate), up
    total += len(targets) * r * d                          # lora_A outputs, saved by lora_B
    if cfg.hidden_dropout and cfg.hidden_pattern == "element":
        total += h * dropout_mask_bytes(cfg)               # F.dropout's mask on the MLP output
    return total


def attention_mask_bytes_per_layer(cfg: PlanConfig, sequences: int) -> float:
    """The (S x S) tensors one layer keeps for backward.

    DropAttention: its fp32 softmax output, fp32 masked weights and the renormalized weights in the compute dtype
    that the value matmul keeps, per (sequence, head), plus the bool keep-mask the product with the weights keeps
    (element: (B, H, S, S); column, span: (B, H, 1, S)). DropKey with a small mask: the additive (B, H, S, S) mask
    sdpa keeps, whatever the pattern (the keep-mask itself only builds it). DropKey with a mask large enough to
    be rebuilt in backward: the inputs of that checkpoint, i.e. the keep-mask, (B, H, S, S) for `element`
    (1 byte per logit: a 16 GiB difference to `column` on LLaMA-2-7B at 4 x 2048 tokens), and without padding
    the layer's own bool causal mask. Neither: a padding mask."""
    s2 = cfg.seq_len ** 2
    if cfg.attention_dropout:
        return sequences * cfg.shape.heads * s2 * (4 + 4 + cfg.dtype_bytes) + keep_mask_bytes(
            cfg, sequences, cfg.attention_pattern)
    if cfg.key_dropout:
        if not dropkey_rebuilds_mask(cfg, sequences):
            return sequences * cfg.shape.heads * s2 * cfg.dtype_bytes
        return keep_mask_bytes(cfg, sequences, cfg.key_pattern) + (0 if cfg.padded else s2)
    if cfg.padded:
        # stock sdpa with a padding mask: torch turns the bool (B, 1, S, S) mask into an additive one in the
        # compute dtype in every layer's call, and keeps that copy for backward (one per layer, no head axis)
        return sequences * s2 * cfg.dtype_bytes
    return 0.0


def dropkey_build_bytes(cfg: PlanConfig, sequences: int) -> float:
    """What building one layer's DropKey mask holds beyond the saved tensors (forward, and again in backward when
    it is rebuilt): the additive (B, H, S, S) mask unless sdpa keeps it anyway, and the all-dropped-row count's
    operand, an fp32 copy of the visibility for column/span keep-masks. `element` adds the (B, H, S, S) fill it
    is built from (compute dtype), the bool `visible & keep` of the count and, when the mask is kept rather than
    rebuilt, its own keep-mask (otherwise already saved as the checkpoint's input)."""
    if not cfg.key_dropout or cfg.attention_dropout:
        return 0.0
    d, s2 = cfg.dtype_bytes, cfg.seq_len ** 2
    rebuilt = dropkey_rebuilds_mask(cfg, sequences)
    logits = sequences * cfg.shape.heads * s2
    if cfg.key_pattern == "element":
        return logits * (d + 1 + (d if rebuilt else 1))
    return (logits * d if rebuilt else 0.0) + (sequences if cfg.padded else 1) * s2 * 4


def backward_working_bytes_per_token(cfg: PlanConfig) -> float:
    """Gradients alive at once while one layer back-propagates (its saved tensors are freed as it goes): two
    MLP-wide gradients (of silu(gate) and of up, made from the gradient of their product) and two fp32
    residual/RMSNorm gradients."""
    s, d = cfg.shape, cfg.dtype_bytes
    return 2 * s.intermediate * d + 2 * s.hidden * 4


def replay_bytes(cfg: PlanConfig) -> float:
    """one_branch: the second pass replays the layers from the first dropout layer without grad, after pass 1's
    forward: one layer's forward working set at a time (the MLP's gate, up and their product, fp32 RMSNorm
    temporaries) plus, in a DropKey layer, building its mask."""
    s, d = cfg.shape, cfg.dtype_bytes
    tokens = cfg.micro_batch * cfg.seq_len
    working = tokens * (3 * s.intermediate * d + 2 * s.hidden * 4)
    mask = 0.0
    if cfg.key_dropout and not cfg.attention_dropout:
        logits = cfg.micro_batch * s.heads * cfg.seq_len ** 2
        mask = logits * (d + 1 + (1 if cfg.key_pattern == "element" else 0) * (d + 1))
    return working + mask


def loss_head_bytes(cfg: PlanConfig, supervised_per_pass: int) -> float:
    """One checkpointed chunk of the supervised head, recomputed in backward with its gradients: the
    logits in the compute dtype, their fp32 copy and log-softmax, and their gradients; the consistency loss
    adds p = exp(logp) of both passes and the two differences."""
    c = min(cfg.loss_chunk_tokens, supervised_per_pass)
    v, d = cfg.shape.vocab, cfg.dtype_bytes
    fp32_copy = 4 if d != 4 else 0
    one_pass = d + fp32_copy + 4                # logits, .float(), log_softmax (saved)
    grads = 4 + 4 + d                           # grad of log_softmax, of the fp32 logits, of the logits
    per_token = cfg.passes * one_pass + grads
    if cfg.dual_pass:
        per_token += 4 * 4                      # p1, p2, p1 - p2, logp1 - logp2
    return c * v * per_token


def _stage3_working_set(cfg: PlanConfig, partitioned_bytes: float, layer_bytes: float) -> float:
    """Parameters gathered at once under ZeRO-3, from the second step on (the first records the trace).

    DeepSpeed keeps a gathered parameter instead of releasing it when the trace shows it used again within
    stage3_max_reuse_distance elements. A layer's weights come back in backward after the forward of the
    layers above it and the backward of the same layers, so the layers closer than about half the reuse
    distance to the forward/backward turn stay gathered: min(all, reuse/2 + one layer). On top, the prefetch
    bucket in flight (its all-gather staging)."""
    d = cfg.dtype_bytes  # element size of the stored (also 4-bit: quant storage = dtype) parameters
    retained = min(partitioned_bytes, cfg.max_reuse_distance / 2 * d + layer_bytes)
    staging = min(cfg.prefetch_bucket_size * d, partitioned_bytes)
    return retained + staging


def estimate(cfg: PlanConfig, suggest: bool = True) -> MemoryPlan:
    """Peak memory of one training step per GPU (rank), as rows that sum to the total."""
    s, d, n = cfg.shape, cfg.dtype_bytes, cfg.world_size
    stage = cfg.zero_stage
    wb = _linear_weight_bytes(cfg)
    weight_kind = {"none": cfg.dtype, "4bit": "4-bit NF4" + (" + double quant" if cfg.double_quant else ""),
                   "8bit": "8-bit"}[cfg.quantization]

    # -- model states ------------------------------------------------------------------------------
    linear = s.layers * s.linear_params_per_layer * wb
    embed_head = (s.embedding_params + s.head_params) * d      # never quantized
    norms = (s.layers * s.norm_params_per_layer + s.hidden) * d
    base_full = linear + embed_head + norms
    if stage == 3:
        # tensors above stage3_param_persistence_threshold are partitioned; norms stay whole on every rank
        persistent = norms if s.hidden <= cfg.param_persistence_threshold else 0.0
        partitioned = base_full - persistent
        base = persistent + (0.0 if cfg.offload_param else partitioned / n)
        base_note = (f"offloaded to CPU; {_gib(persistent)} small tensors stay" if cfg.offload_param else
                     f"partitioned over {_ranks(n)} by ZeRO-3 ({_gib(base_full)} whole)")
    else:
        base = base_full
        base_note = f"whole on every rank (ZeRO-{stage} partitions only trainable state)"

    n_lora = lora_param_count(cfg)
    if stage == 3:
        small = sum(x for x in _lora_tensor_sizes(cfg) if x <= cfg.param_persistence_threshold)
        lora_local = small + (n_lora - small) / n
    else:
        lora_local = n_lora
    lora_bytes = lora_local * d
    # gradients: ZeRO-0 keeps param.grad (+ DeepSpeed's fp32 accumulator under bf16); ZeRO-1 reduces whole
    # gradients and keeps an fp32 partition; ZeRO-2/3 keep only their partition
    grad_bytes = {0: n_lora * (d + (4 if d == 2 else 0)),
                  1: n_lora * d + n_lora * 4 / n,
                  2: n_lora * (d + 4) / n,
                  3: lora_local * d + n_lora * 4 / n}[stage]
    # AdamW: fp32 master + exp_avg + exp_avg_sq. ZeRO-1+ always keeps the fp32 partition; plain fp32 AdamW
    # (ZeRO-0) updates the parameters in place
    opt_per_param = 8 if (stage == 0 and d == 4) else 12
    opt_full = n_lora * opt_per_param / (n if stage >= 1 else 1)
    opt_bytes = 0.0 if cfg.offload_optimizer else opt_full
    cpu_bytes = (opt_full if cfg.offload_optimizer else 0.0) + (
        (base_full - (norms if stage == 3 else 0.0)) / n if cfg.offload_param else 0.0)

    # -- activations ---------------------------------------------------------------------------------
    # Layer by layer: a layer with dropout (dropout.layers) keeps its masks, one without runs stock attention;
    # a dual pass runs the layers before the first dropout layer once, then either replays the rest without grad
    # (one_branch: nothing kept) or runs them on [h; h] (both: twice the rows kept).
    selected = set(cfg.dropout_layer_indices())
    plain = replace(cfg, key_dropout=False, attention_dropout=False, hidden_dropout=False)
    views = [(cfg if i in selected else plain, cfg.grad_rows(i)) for i in range(s.layers)]
    sup_per_seq = cfg.supervised_tokens if cfg.supervised_tokens is not None else cfg.seq_len - 1
    sup_per_pass = cfg.micro_batch * sup_per_seq

    def layer_bytes(view: PlanConfig, rows: int) -> float:
        return activation_bytes_per_token_layer(view, rows) * rows * cfg.seq_len + attention_mask_bytes_per_layer(
            view, rows)

    per_layers = [layer_bytes(v, r) for v, r in views]
    per_layer = max(per_layers)
    dropout_rows = cfg.grad_rows(min(selected)) if selected else cfg.micro_batch
    layer_masks = attention_mask_bytes_per_layer(cfg, dropout_rows) if selected else 0.0
    # after the last layer: the supervised hidden states of each pass (inputs of the checkpointed head chunks,
    # which keep pass 2's too); each layer counts both RMSNorms' fp32 inputs, but the first layer's input norm
    # keeps none (its input, the frozen embedding, needs no gradient) and the final norm keeps one of its rows
    head_inputs = cfg.passes * sup_per_pass * s.hidden * d
    first_view, first_rows = views[0]
    last_rows = views[-1][1]
    decoder_saved = sum(per_layers) + (4 * s.hidden + 4) * cfg.seq_len * (last_rows - first_rows)
    first_tokens = first_rows * cfg.seq_len
    qkv_adapted = set(cfg.lora_targets) & {"q_proj", "k_proj", "v_proj"}
    if not qkv_adapted:
        # nothing in the first layer's attention needs a gradient before o_proj: no q/k/v, masks or logsumexp
        # kept there (its output only as o_proj's adapter input)
        fv = first_view
        qd = s.q_dim
        kvd = qd if (fv.key_dropout or fv.attention_dropout or fv.padded) else s.kv_dim
        attn = d * 3 * qd if fv.attention_dropout else d * (2 * qd + 2 * kvd) + 4 * s.heads
        if "o_proj" in cfg.lora_targets and not fv.attention_dropout:
            attn -= d * qd
        attn += s.hidden * d if zero3_saves_linear_inputs(cfg) else 0
        decoder_saved -= attn * first_tokens + attention_mask_bytes_per_layer(fv, first_rows)
    if cfg.lora_dropout > 0 and qkv_adapted:
        # the first layer's q/k/v input (the frozen embedding, normed) needs no gradient: there the dropout
        # keeps no mask and ZeRO-3's linear no base-layer input (without lora_dropout that input is the
        # adapters' own, counted once either way)
        first = len(qkv_adapted) * dropout_mask_bytes(cfg) + (d if zero3_saves_linear_inputs(cfg) else 0)
        decoder_saved -= s.hidden * first * first_tokens
    full_saved = decoder_saved + head_inputs
    # with checkpointing: one layer input per layer (the first included: checkpointing makes the embedding
    # output require grad) and the final RMSNorm's input
    ckpt_saved = (sum(r for _, r in views) * cfg.seq_len * s.hidden * d + (4 * s.hidden + 4) * last_rows * cfg.seq_len
                  + head_inputs)
    saved = ckpt_saved if cfg.gradient_checkpointing else full_saved
    mask_build = dropkey_build_bytes(cfg, dropout_rows) if selected else 0.0  # while a layer builds its mask
    recompute = per_layer if cfg.gradient_checkpointing else 0.0
    head = loss_head_bytes(cfg, sup_per_pass)
    max_tokens = max(r for _, r in views) * cfg.seq_len
    bwd = backward_working_bytes_per_token(cfg) * max_tokens
    replay = replay_bytes(cfg) if cfg.dual_pass and cfg.consistency_grad == "one_branch" else 0.0
    transient = max(head, recompute + bwd, mask_build, replay)
    tokens = max_tokens  # for the notes below
    dynamic = saved + transient

    # -- framework -----------------------------------------------------------------------------------
    if stage == 3:
        # `partitioned`: the whole (unpartitioned) size of the tensors ZeRO-3 partitions
        gathered = _stage3_working_set(cfg, partitioned, s.linear_params_per_layer * wb)
    else:
        gathered = 0.0
    buffers = 0.0
    if stage in (1, 2) and cfg.contiguous_gradients:
        # one (two with overlap_comm) reduce buckets of reduce_bucket_size elements; on a GPU the caching
        # allocator holds all of it, on CPU only the pages the gradients touch become resident
        bucket = cfg.reduce_bucket_size if cfg.device == "gpu" else min(cfg.reduce_bucket_size, n_lora)
        buffers = bucket * d * (2 if cfg.overlap_comm else 1)
    elif stage == 3 and cfg.contiguous_gradients:
        bucket = cfg.reduce_bucket_size if cfg.device == "gpu" else min(cfg.reduce_bucket_size, n_lora)
        buffers = bucket * d
    dequant = 0.0
    if cfg.quantization != "none":
        # bitsandbytes dequantizes one weight to the compute dtype per matmul (and again in backward)
        dequant = max(a * b for a, b in s.linear_shapes().values()) * d
        buffers += dequant
    context = CUDA_CONTEXT_BYTES if cfg.device == "gpu" else 0.0
    frag = FRAGMENTATION * dynamic if cfg.device == "gpu" else 0.0

    chunk = min(cfg.loss_chunk_tokens, sup_per_pass)
    act_note = (f"{s.layers} layers (up to {_gib(per_layer)} each) = {_gib(full_saved)}; with gradient "
                f"checkpointing {_gib(ckpt_saved)} (+{_gib(per_layer)} recomputed layer)")
    rows = [
        Row(f"base weights ({weight_kind})", base, base_note),
        Row(f"LoRA parameters ({cfg.dtype})", lora_bytes, f"{n_lora / 1e6:.2f}M trainable, r={cfg.lora_r} on "
            f"{','.join(cfg.lora_targets)}"),
        Row("gradients", grad_bytes, f"partitioned over {_ranks(n)}" if stage >= 2 else "whole on every rank"),
        Row("AdamW states (fp32 master, m, v)", opt_bytes,
            f"offloaded: {_gib(opt_full)} in CPU RAM" if cfg.offload_optimizer else
            (f"partitioned over {_ranks(n)}" if stage >= 1 else "whole on every rank")),
        Row("activations" + (" (checkpointed)" if cfg.gradient_checkpointing else ""), saved, act_note),
        Row("transient peak", transient,
            f"max(loss head {_gib(head)} [chunk {chunk} tok x vocab {s.vocab}], backward "
            f"{_gib(bwd + recompute)}" + (f", DropKey mask build {_gib(mask_build)}" if mask_build else "")
            + (f", second pass replayed without grad {_gib(replay)}" if replay else "") + ")"),
    ]
    if stage == 3:
        rows.append(Row("ZeRO-3 gathered parameters", gathered,
                        f"kept gathered within stage3_max_reuse_distance={cfg.max_reuse_distance:.0e} + prefetch "
                        f"bucket {cfg.prefetch_bucket_size:.0e}"))
    rows.append(Row("framework overhead", buffers + context + frag,
                    f"DeepSpeed buckets {_gib(buffers - dequant)}" +
                    (f", 4-bit dequant buffer {_gib(dequant)}" if dequant else "") +
                    (f", CUDA context+NCCL {_gib(context)}, fragmentation {FRAGMENTATION:.0%} of dynamic "
                     f"{_gib(frag)}" if cfg.device == "gpu" else "")))
    if (cfg.key_dropout or cfg.attention_dropout) and selected:
        masks_total = layer_masks * (1 if cfg.gradient_checkpointing else len(selected))
        pattern = cfg.attention_pattern if cfg.attention_dropout else cfg.key_pattern
        rows.append(Row("  of which DropKey/DropAttention (S x S) masks", masks_total,
                        f"{_gib(layer_masks)}/layer x {len(selected)} dropout layers: {dropout_rows} x {s.heads} "
                        f"heads x {cfg.seq_len}^2, {pattern}", counted=False))
    plan = MemoryPlan(cfg, rows, cpu_bytes, per_layer_activation_bytes=per_layer,
                      checkpointed_activation_bytes=ckpt_saved, full_activation_bytes=full_saved,
                      extras={"decoder_saved": saved - head_inputs, "head_inputs": head_inputs, "head": head,
                              "backward": bwd, "recompute": recompute, "mask_build": mask_build, "replay": replay,
                              "buffers": buffers,
                              "context": context, "fragmentation": frag})
    if cfg.dual_pass:
        single = estimate(replace(cfg, dual_pass=False), suggest=False)
        how = ("the second pass replays without grad" if cfg.consistency_grad == "one_branch"
               else f"[h; h] with grad from layer {cfg.shared_prefix()}")
        plan.rows.append(Row("  of which HiddenKey dual pass", plan.total_bytes - single.total_bytes,
                             f"{how}: {plan.total_bytes / single.total_bytes:.2f}x the single-pass total",
                             counted=False))
    if suggest and not plan.fits:
        plan.suggestion = suggest_fix(cfg)
    return plan


# -- the suggester ----------------------------------------------------------------------------------------------

def _candidates(cfg: PlanConfig):
    # every built-in ds_config, lower stages included: for LoRA, ZeRO-1/2's reduce buckets can cost more than
    # the trainable state they partition
    stages = [(st, False) for st in range(4)] + [(3, True)]
    if cfg.offload_param:
        stages = [(3, True)]
    batches = [m for m in range(cfg.micro_batch, 0, -1) if cfg.micro_batch % m == 0]
    for (stage, offload), mb, ckpt, quant in itertools.product(
            stages, batches, sorted({cfg.gradient_checkpointing, True}),
            [cfg.quantization] + (["4bit"] if cfg.quantization == "none" else [])):
        yield replace(cfg, zero_stage=stage, offload_param=offload, offload_optimizer=offload or cfg.offload_optimizer,
                      micro_batch=mb, grad_accum=cfg.grad_accum * cfg.micro_batch // mb,
                      gradient_checkpointing=ckpt, quantization=quant)


def _cost(base: PlanConfig, c: PlanConfig) -> float:
    cost = 0.0
    if c.zero_stage != base.zero_stage:
        cost += 0.005 + max(0.0, COST_STAGE[c.zero_stage] - COST_STAGE[base.zero_stage])
        if c.zero_stage == 3 and c.nodes > 1:
            cost += COST_STAGE[3]  # the all-gathers cross the slower inter-node network
    cost += COST_OFFLOAD * (c.offload_param and not base.offload_param)
    halvings = 0
    mb = base.micro_batch
    while mb > c.micro_batch:
        mb //= 2
        halvings += 1
    cost += COST_HALVE_MICRO_BATCH * max(halvings, 1 if c.micro_batch < base.micro_batch else 0)
    cost += COST_CHECKPOINTING * (c.gradient_checkpointing and not base.gradient_checkpointing)
    cost += COST_4BIT * (c.quantization != base.quantization)
    return cost


def _overrides(base: PlanConfig, c: PlanConfig) -> tuple[str, ...]:
    out = []
    if (c.zero_stage, c.offload_param) != (base.zero_stage, base.offload_param):
        out.append(f"run.deepspeed={DS_CONFIG_FOR[(c.zero_stage, c.offload_param)]}")
    if c.micro_batch != base.micro_batch:
        out += [f"train.micro_batch_size={c.micro_batch}", f"train.grad_accum={c.grad_accum}"]
    if c.gradient_checkpointing != base.gradient_checkpointing:
        out.append("model.gradient_checkpointing=true")
    if c.quantization != base.quantization:
        out.append("model.quantization=4bit")
    return tuple(out)


def _describe(base: PlanConfig, c: PlanConfig) -> str:
    parts = []
    if c.zero_stage != base.zero_stage or c.offload_param != base.offload_param:
        parts.append(f"ZeRO-{c.zero_stage}" + (" with CPU offload of parameters and optimizer" if c.offload_param
                                               else ""))
    if c.micro_batch != base.micro_batch:
        parts.append(f"micro-batch {c.micro_batch} x grad_accum {c.grad_accum} (same global batch)")
    if c.gradient_checkpointing != base.gradient_checkpointing:
        parts.append("gradient checkpointing (~1/3 more compute)")
    if c.quantization != base.quantization:
        parts.append("4-bit base (QLoRA: a different method, slower matmuls)")
    return " + ".join(parts)


def suggest_fix(cfg: PlanConfig) -> Suggestion | None:
    """The cheapest combination of ZeRO stage / offload, smaller micro-batch, checkpointing and 4-bit that
    fits, by the COST_* ranks above (ties: the one with the most headroom)."""
    best: tuple[float, float, PlanConfig] | None = None
    for c in _candidates(cfg):
        if c == cfg:
            continue
        total = estimate(c, suggest=False).total_bytes
        if total > cfg.gpu_mem_gib * GIB:
            continue
        key = (_cost(cfg, c), total)
        if best is None or key < best[:2]:
            best = (*key, c)
    if best is None:
        return None
    cost, total, c = best
    return Suggestion(_overrides(cfg, c), _describe(cfg, c), total, cost)


# -- recipe -> PlanConfig ---------------------------------------------------------------------------------------

def shape_for(name: str) -> ModelShape:
    """model.name -> shape. builtin: models read their cached build's config.json when one exists (plan never
    builds a model: that takes minutes), else their definition in hiddenkey_ds.models.builtin / the table."""
    from hiddenkey_ds.models.shapes import shape_from_config

    if name.startswith("builtin:"):
        from hiddenkey_ds.models import builtin as bm

        if name not in bm.BUILTINS:
            raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(bm.BUILTINS)}")
        directory, version, _ = bm.BUILTINS[name]
        built = bm.cache_root() / "models" / f"{directory}-v{version}"
        if bm._is_complete(built, version) and (built / "config.json").is_file():
            return replace(resolve_shape(str(built)), name=name)
        if name == "builtin:tiny-llama":
            return shape_from_config({**bm.TINY_CONFIG, "vocab_size": bm.TINY_VOCAB}, name)
    return resolve_shape(name)


def config_from_recipe(recipe, ds: dict, nodes: int, gpus_per_node: int, gpu_mem_gib: float,
                       shape: ModelShape | None = None, seq_len: int | None = None,
                       supervised_tokens: int | None = None, device: str = "gpu") -> PlanConfig:
    """A PlanConfig from a loaded recipe and its resolved DeepSpeed config."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    targets = recipe.lora.target_modules
    targets = LINEAR_MODULES if targets == "all-linear" else tuple(targets)
    dropout = recipe.dropout
    seq = seq_len or recipe.data.max_length
    if supervised_tokens is None and recipe.data.format == "classification":
        supervised_tokens = min(seq - 1, 8)  # a verbalizer answer + EOS; sft supervises up to every position
    return PlanConfig(
        shape=shape or shape_for(recipe.model.name),
        dtype=recipe.model.dtype,
        quantization=recipe.model.quantization,
        double_quant=recipe.model.double_quant,
        lora_r=recipe.lora.r,
        lora_targets=targets,
        lora_dropout=recipe.lora.dropout,
        zero_stage=stage,
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None),
        offload_param=zero.get("offload_param", {}).get("device", "none") not in ("none", None),
        micro_batch=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum,
        seq_len=seq,
        supervised_tokens=supervised_tokens,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        dual_pass=dropout.dual_pass,
        consistency_grad=dropout.consistency_grad,
        dropout_layers=tuple(dropout.layers) if isinstance(dropout.layers, list) else dropout.layers,
        key_dropout=dropout.key.rate > 0,
        key_pattern=dropout.key.pattern,
        attention_dropout=dropout.attention.rate > 0,
        attention_pattern=dropout.attention.pattern,
        hidden_dropout=dropout.hidden.rate > 0,
        hidden_pattern=dropout.hidden.pattern,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_mem_gib=gpu_mem_gib,
        device=device,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
        memory_efficient_linear=bool(zero.get("memory_efficient_linear", True)),
        param_persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        ds_config_name=recipe.run.deepspeed,
    )


# -- output -----------------------------------------------------------------------------------------------------

def _ranks(n: int) -> str:
    return f"{n} rank" + ("s" if n != 1 else "")


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    cfg, s = plan.config, plan.config.shape
    lines = [
        (f"model {s.name}: {_count(s.total_params)} params, {s.layers} layers, hidden {s.hidden}, "
         f"intermediate {s.intermediate}, heads {s.heads}/{s.kv_heads} kv, vocab {s.vocab}"),
        f"{cfg.nodes} node(s) x {cfg.gpus_per_node} GPU(s) = {cfg.world_size} ranks, {cfg.gpu_mem_gib:g} GiB each | "
        f"ZeRO-{cfg.zero_stage}" + (f" ({cfg.ds_config_name})" if cfg.ds_config_name else "") +
        f" | micro-batch {cfg.micro_batch} x {cfg.seq_len} tokens"
        + ((" x 2 passes (the second without grad)" if cfg.consistency_grad == "one_branch"
            else " x 2 passes ([h; h])") if cfg.dual_pass else "")
        + (" | gradient checkpointing" if cfg.gradient_checkpointing else ""),
        "",
        f"{'per GPU':<46} {'GiB':>8}  notes",
    ]
    for r in plan.rows:
        lines.append(f"{r.name:<46} {r.bytes / GIB:>8.2f}  {'(not added) ' if not r.counted else ''}{r.note}")
    total, cap = plan.total_bytes, plan.capacity_bytes
    lines.append(f"{'-' * 46} {'-' * 8}")
    verdict = (f"fits ({(cap - total) / GIB:.2f} GiB headroom)" if plan.fits
               else f"DOES NOT FIT (short by {(total - cap) / GIB:.2f} GiB)")
    lines.append(f"{'total':<46} {total / GIB:>8.2f}  of {cfg.gpu_mem_gib:g} GiB: {verdict}")
    if plan.cpu_bytes:
        lines.append(f"host RAM for offloaded state: {_gib(plan.cpu_bytes)} per rank")
    if not plan.fits:
        sug = plan.suggestion
        if sug is None:
            lines.append("no combination of ZeRO-3 + offload, micro-batch 1, checkpointing and 4-bit fits: "
                         "add GPUs (ZeRO-3 divides the base by the world size) or shorten data.max_length")
        else:
            lines.append(f"cheapest change that fits: {sug.description} -> {_gib(sug.total_bytes)}")
            lines.append(f"  overrides: {' '.join(sug.overrides)}")
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hiddenkey-ds plan",
        description="Estimate per-GPU memory of a recipe (with key=value overrides) and suggest the cheapest "
        "change that makes it fit.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_length)")
    p.add_argument("--supervised-tokens", type=int,
                   help="supervised tokens per sequence (default: 8 for classification, all for sft)")
    p.add_argument("--config", help="a model config.json to use instead of model.name's shape")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            print(f"hiddenkey-ds plan: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from hiddenkey_ds.config import RecipeError, load_recipe
    from hiddenkey_ds.config.deepspeed import resolve_ds_config

    world = args.nodes * args.gpus_per_node
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=world, check_output_dir=False)
        steps = recipe.train.max_steps or 1000  # only the LR schedule depends on it
        ds = resolve_ds_config(recipe, world, total_steps=steps)
        shape = None
        if args.config:
            import json

            from hiddenkey_ds.models.shapes import shape_from_config

            with open(args.config) as f:
                shape = shape_from_config(json.load(f), args.config)
        cfg = config_from_recipe(recipe, ds, args.nodes, args.gpus_per_node, args.gpu_mem, shape=shape,
                                 seq_len=args.seq_len, supervised_tokens=args.supervised_tokens)
    except (RecipeError, ValueError, OSError) as err:
        print(f"hiddenkey-ds plan: {err}", file=sys.stderr)
        return 2
    plan = estimate(cfg)
    print(f"plan for {args.recipe}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(plan.format())
    return 0 if plan.fits else 1
