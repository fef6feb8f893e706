"""Per-GPU memory of a training run, before it is queued: `estimate(PlanConfig) -> MemoryPlan`.

The estimate is an explicit sum of what a LoRA/QLoRA step under DeepSpeed keeps in device memory at its
peak, term by term, so that every number can be checked against a measurement (tests/test_plan.py and
benchmarks/plan_vs_measured.py do, on CPU). It adds four groups, each computed by one step below from the
byte formulas in hiddenkey_ds.planning.memory:

* model states (`model_states`): the frozen base (bf16 / 4-bit / 8-bit; partitioned over ranks only by ZeRO-3),
  the LoRA parameters, their gradients and AdamW states (partitioned from ZeRO-1 / ZeRO-2 on, or offloaded);
* activations saved for backward (`saved_activations`), derived per decoder layer from what autograd keeps for
  a LLaMA layer with frozen base weights and LoRA adapters (RMSNorm's fp32 input, the LoRA inputs, q/k/v/out of
  attention, the four MLP intermediates, dropout keep-masks) and, with gradient checkpointing, one layer input
  per layer plus one recomputed layer. HiddenKey's costs live here: the dual pass runs [x; x] as one forward
  (2x tokens), and DropKey hands sdpa an additive (batch, heads, seq, seq) logit mask per layer that sdpa keeps
  for backward;
* the transient peak (`transient_peak`): the largest short-lived working set, among the chunked supervised loss
  head (hiddenkey_ds.method.objective: one checkpointed chunk of logits at a time), a layer's backward, building
  a DropKey mask and the second pass's replay;
* framework overhead (`framework_overhead`): ZeRO-3's gathered parameters, DeepSpeed's gradient buckets, the
  CUDA context + NCCL, allocator fragmentation.

Pure: no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hiddenkey_ds.planning.config import GIB, PlanConfig
from hiddenkey_ds.planning.memory import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    activation_bytes_per_token_layer,
    attention_mask_bytes_per_layer,
    backward_working_bytes_per_token,
    dropkey_build_bytes,
    dropout_mask_bytes,
    linear_weight_bytes,
    lora_param_count,
    lora_tensor_sizes,
    loss_head_bytes,
    replay_bytes,
    stage3_working_set,
    zero3_saves_linear_inputs,
)
from hiddenkey_ds.planning.table import format_gib, format_plan, format_ranks

if TYPE_CHECKING:  # suggest.py sizes its candidates with estimate(): imported at run time only where needed
    from hiddenkey_ds.planning.suggest import Suggestion


@dataclass(frozen=True)
class Row:
    name: str
    bytes: float
    note: str = ""
    counted: bool = True  # False: an "of which" line, already inside the rows above


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


# -- model states: weights, gradients, optimizer ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStates:
    """What a rank keeps for the whole run, in bytes on the GPU unless said otherwise."""

    weight_kind: str          # how the frozen linear layers are stored, for the row's name
    base: float               # the frozen base on this rank
    base_full: float          # the whole frozen base
    base_note: str
    partitioned: float        # ZeRO-3: the whole size of the tensors it partitions (0.0 below stage 3)
    lora_params: int          # trainable parameters of the whole model
    lora: float               # LoRA parameters on this rank
    gradients: float
    optimizer: float          # AdamW states on the GPU (0.0 when offloaded)
    optimizer_full: float     # AdamW states wherever they live
    cpu: float                # host memory per rank for offloaded states


def model_states(cfg: PlanConfig) -> ModelStates:
    s, d, n = cfg.shape, cfg.dtype_bytes, cfg.world_size
    stage = cfg.zero_stage
    wb = linear_weight_bytes(cfg)
    weight_kind = {"none": cfg.dtype, "4bit": "4-bit NF4" + (" + double quant" if cfg.double_quant else ""),
                   "8bit": "8-bit"}[cfg.quantization]

    linear = s.layers * s.linear_params_per_layer * wb
    embed_head = (s.embedding_params + s.head_params) * d      # never quantized
    norms = (s.layers * s.norm_params_per_layer + s.hidden) * d
    base_full = linear + embed_head + norms
    if stage == 3:
        # tensors above stage3_param_persistence_threshold are partitioned; norms stay whole on every rank
        persistent = norms if s.hidden <= cfg.param_persistence_threshold else 0.0
        partitioned = base_full - persistent
        base = persistent + (0.0 if cfg.offload_param else partitioned / n)
        base_note = (f"offloaded to CPU; {format_gib(persistent)} small tensors stay" if cfg.offload_param else
                     f"partitioned over {format_ranks(n)} by ZeRO-3 ({format_gib(base_full)} whole)")
    else:
        partitioned = 0.0
        base = base_full
        base_note = f"whole on every rank (ZeRO-{stage} partitions only trainable state)"

    n_lora = lora_param_count(cfg)
    if stage == 3:
        small = sum(x for x in lora_tensor_sizes(cfg) if x <= cfg.param_persistence_threshold)
        lora_local = small + (n_lora - small) / n
    else:
        lora_local = n_lora
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
    cpu_bytes = (opt_full if cfg.offload_optimizer else 0.0) + (
        (base_full - (norms if stage == 3 else 0.0)) / n if cfg.offload_param else 0.0)
    return ModelStates(weight_kind=weight_kind, base=base, base_full=base_full, base_note=base_note,
                       partitioned=partitioned, lora_params=n_lora, lora=lora_local * d, gradients=grad_bytes,
                       optimizer=0.0 if cfg.offload_optimizer else opt_full, optimizer_full=opt_full, cpu=cpu_bytes)


# -- activations saved for backward --------------------------------------------------------------------------------

def layer_views(cfg: PlanConfig) -> list[tuple[PlanConfig, int]]:
    """Each decoder layer as (the config it runs with, the sequences it runs with grad): a layer with dropout
    (dropout.layers) keeps its masks, one without runs stock attention; a dual pass runs the layers before the
    first dropout layer once, then either replays the rest without grad (one_branch: nothing kept) or runs them
    on [h; h] (both: twice the rows kept)."""
    selected = set(cfg.dropout_layer_indices())
    plain = replace(cfg, key_dropout=False, attention_dropout=False, hidden_dropout=False)
    return [(cfg if i in selected else plain, cfg.grad_rows(i)) for i in range(cfg.shape.layers)]


def layer_saved_bytes(view: PlanConfig, rows: int) -> float:
    """What one decoder layer keeps for backward: its per-token tensors and its (S x S) masks."""
    return activation_bytes_per_token_layer(view, rows) * rows * view.seq_len + attention_mask_bytes_per_layer(
        view, rows)


def first_layer_unsaved_bytes(cfg: PlanConfig, first_view: PlanConfig, first_rows: int) -> float:
    """What the per-layer formula counts for the first decoder layer but autograd does not keep there: its input
    is the frozen embedding's output, which needs no gradient."""
    s, d = cfg.shape, cfg.dtype_bytes
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
        return attn * first_tokens + attention_mask_bytes_per_layer(fv, first_rows)
    if cfg.lora_dropout > 0:
        # the first layer's q/k/v input (the frozen embedding, normed) needs no gradient: there the dropout
        # keeps no mask and ZeRO-3's linear no base-layer input (without lora_dropout that input is the
        # adapters' own, counted once either way)
        first = len(qkv_adapted) * dropout_mask_bytes(cfg) + (d if zero3_saves_linear_inputs(cfg) else 0)
        return s.hidden * first * first_tokens
    return 0


def supervised_tokens_per_pass(cfg: PlanConfig) -> int:
    per_sequence = cfg.supervised_tokens if cfg.supervised_tokens is not None else cfg.seq_len - 1
    return cfg.micro_batch * per_sequence


@dataclass(frozen=True)
class SavedActivations:
    saved: float              # what the step keeps: `checkpointed` with gradient checkpointing, else `full`
    full: float               # without checkpointing
    checkpointed: float       # with checkpointing: one input per layer
    per_layer: float          # the largest layer's saved tensors (recomputed once under checkpointing)
    head_inputs: float        # the supervised hidden states the loss head's chunks keep


def saved_activations(cfg: PlanConfig, views: list[tuple[PlanConfig, int]]) -> SavedActivations:
    s, d = cfg.shape, cfg.dtype_bytes
    per_layers = [layer_saved_bytes(v, r) for v, r in views]
    # after the last layer: the supervised hidden states of each pass (inputs of the checkpointed head chunks,
    # which keep pass 2's too); each layer counts both RMSNorms' fp32 inputs, but the first layer's input norm
    # keeps none (its input, the frozen embedding, needs no gradient) and the final norm keeps one of its rows
    head_inputs = cfg.passes * supervised_tokens_per_pass(cfg) * s.hidden * d
    first_view, first_rows = views[0]
    last_rows = views[-1][1]
    decoder_saved = (sum(per_layers) + (4 * s.hidden + 4) * cfg.seq_len * (last_rows - first_rows)
                     - first_layer_unsaved_bytes(cfg, first_view, first_rows))
    full = decoder_saved + head_inputs
    # with checkpointing: one layer input per layer (the first included: checkpointing makes the embedding
    # output require grad) and the final RMSNorm's input
    checkpointed = (sum(r for _, r in views) * cfg.seq_len * s.hidden * d
                    + (4 * s.hidden + 4) * last_rows * cfg.seq_len + head_inputs)
    return SavedActivations(saved=checkpointed if cfg.gradient_checkpointing else full, full=full,
                            checkpointed=checkpointed, per_layer=max(per_layers), head_inputs=head_inputs)


def dropout_layer_rows(cfg: PlanConfig) -> int:
    """The sequences the first layer with dropout runs with grad (its masks are sized by them)."""
    selected = cfg.dropout_layer_indices()
    return cfg.grad_rows(min(selected)) if selected else cfg.micro_batch


# -- the transient peak: working sets that never coexist ------------------------------------------------------------

@dataclass(frozen=True)
class TransientPeak:
    loss_head: float          # one checkpointed chunk of the supervised head, with its gradients
    recompute: float          # gradient checkpointing: the layer recomputed for its backward
    backward: float           # the gradients alive while one layer back-propagates
    mask_build: float         # a layer building its DropKey mask
    replay: float             # one_branch: the second pass's forward without grad

    @property
    def bytes(self) -> float:
        return max(self.loss_head, self.recompute + self.backward, self.mask_build, self.replay)


def transient_peak(cfg: PlanConfig, views: list[tuple[PlanConfig, int]], acts: SavedActivations) -> TransientPeak:
    has_dropout_layers = bool(cfg.dropout_layer_indices())
    max_tokens = max(r for _, r in views) * cfg.seq_len
    return TransientPeak(
        loss_head=loss_head_bytes(cfg, supervised_tokens_per_pass(cfg)),
        recompute=acts.per_layer if cfg.gradient_checkpointing else 0.0,
        backward=backward_working_bytes_per_token(cfg) * max_tokens,
        mask_build=dropkey_build_bytes(cfg, dropout_layer_rows(cfg)) if has_dropout_layers else 0.0,
        replay=replay_bytes(cfg) if cfg.dual_pass and cfg.consistency_grad == "one_branch" else 0.0,
    )


# -- framework overhead ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameworkOverhead:
    gathered: float           # ZeRO-3: parameters gathered at once (a row of its own)
    buffers: float            # DeepSpeed's gradient buckets plus the 4-bit dequantization buffer
    dequant: float            # of which the dequantization buffer
    context: float            # CUDA context + NCCL
    fragmentation: float      # allocator slack on the dynamic part

    @property
    def bytes(self) -> float:
        """The "framework overhead" row (the gathered parameters are a row of their own)."""
        return self.buffers + self.context + self.fragmentation


def framework_overhead(cfg: PlanConfig, states: ModelStates, dynamic: float) -> FrameworkOverhead:
    """`dynamic`: the bytes that come and go each step (saved activations + transient peak)."""
    s, d, stage = cfg.shape, cfg.dtype_bytes, cfg.zero_stage
    if stage == 3:
        gathered = stage3_working_set(cfg, states.partitioned, s.linear_params_per_layer * linear_weight_bytes(cfg))
    else:
        gathered = 0.0
    buffers = 0.0
    if stage in (1, 2) and cfg.contiguous_gradients:
        # one (two with overlap_comm) reduce buckets of reduce_bucket_size elements; on a GPU the caching
        # allocator holds all of it, on CPU only the pages the gradients touch become resident
        bucket = cfg.reduce_bucket_size if cfg.device == "gpu" else min(cfg.reduce_bucket_size, states.lora_params)
        buffers = bucket * d * (2 if cfg.overlap_comm else 1)
    elif stage == 3 and cfg.contiguous_gradients:
        bucket = cfg.reduce_bucket_size if cfg.device == "gpu" else min(cfg.reduce_bucket_size, states.lora_params)
        buffers = bucket * d
    dequant = 0.0
    if cfg.quantization != "none":
        # bitsandbytes dequantizes one weight to the compute dtype per matmul (and again in backward)
        dequant = max(a * b for a, b in s.linear_shapes().values()) * d
        buffers += dequant
    return FrameworkOverhead(gathered=gathered, buffers=buffers, dequant=dequant,
                             context=CUDA_CONTEXT_BYTES if cfg.device == "gpu" else 0.0,
                             fragmentation=FRAGMENTATION * dynamic if cfg.device == "gpu" else 0.0)


# -- the rows -------------------------------------------------------------------------------------------------------

def _rows(cfg: PlanConfig, states: ModelStates, acts: SavedActivations, peak: TransientPeak,
          overhead: FrameworkOverhead) -> list[Row]:
    s, n, stage = cfg.shape, cfg.world_size, cfg.zero_stage
    chunk = min(cfg.loss_chunk_tokens, supervised_tokens_per_pass(cfg))
    act_note = (f"{s.layers} layers (up to {format_gib(acts.per_layer)} each) = {format_gib(acts.full)}; with "
                f"gradient checkpointing {format_gib(acts.checkpointed)} (+{format_gib(acts.per_layer)} recomputed "
                "layer)")
    backward = peak.backward + peak.recompute
    rows = [
        Row(f"base weights ({states.weight_kind})", states.base, states.base_note),
        Row(f"LoRA parameters ({cfg.dtype})", states.lora, f"{states.lora_params / 1e6:.2f}M trainable, "
            f"r={cfg.lora_r} on {','.join(cfg.lora_targets)}"),
        Row("gradients", states.gradients,
            f"partitioned over {format_ranks(n)}" if stage >= 2 else "whole on every rank"),
        Row("AdamW states (fp32 master, m, v)", states.optimizer,
            f"offloaded: {format_gib(states.optimizer_full)} in CPU RAM" if cfg.offload_optimizer else
            (f"partitioned over {format_ranks(n)}" if stage >= 1 else "whole on every rank")),
        Row("activations" + (" (checkpointed)" if cfg.gradient_checkpointing else ""), acts.saved, act_note),
        Row("transient peak", peak.bytes,
            f"max(loss head {format_gib(peak.loss_head)} [chunk {chunk} tok x vocab {s.vocab}], backward "
            f"{format_gib(backward)}"
            + (f", DropKey mask build {format_gib(peak.mask_build)}" if peak.mask_build else "")
            + (f", second pass replayed without grad {format_gib(peak.replay)}" if peak.replay else "") + ")"),
    ]
    if stage == 3:
        rows.append(Row("ZeRO-3 gathered parameters", overhead.gathered,
                        f"kept gathered within stage3_max_reuse_distance={cfg.max_reuse_distance:.0e} + prefetch "
                        f"bucket {cfg.prefetch_bucket_size:.0e}"))
    rows.append(Row("framework overhead", overhead.bytes,
                    f"DeepSpeed buckets {format_gib(overhead.buffers - overhead.dequant)}" +
                    (f", 4-bit dequant buffer {format_gib(overhead.dequant)}" if overhead.dequant else "") +
                    (f", CUDA context+NCCL {format_gib(overhead.context)}, fragmentation {FRAGMENTATION:.0%} of "
                     f"dynamic {format_gib(overhead.fragmentation)}" if cfg.device == "gpu" else "")))
    selected = cfg.dropout_layer_indices()
    if (cfg.key_dropout or cfg.attention_dropout) and selected:
        rows.append(_attention_masks_row(cfg, len(selected)))
    return rows


def _attention_masks_row(cfg: PlanConfig, dropout_layers: int) -> Row:
    """The (S x S) masks of DropKey / DropAttention: already inside the activations, shown on their own."""
    rows = dropout_layer_rows(cfg)
    layer_masks = attention_mask_bytes_per_layer(cfg, rows)
    masks_total = layer_masks * (1 if cfg.gradient_checkpointing else dropout_layers)
    pattern = cfg.attention_pattern if cfg.attention_dropout else cfg.key_pattern
    return Row("  of which DropKey/DropAttention (S x S) masks", masks_total,
               f"{format_gib(layer_masks)}/layer x {dropout_layers} dropout layers: {rows} x {cfg.shape.heads} "
               f"heads x {cfg.seq_len}^2, {pattern}", counted=False)


def _dual_pass_row(cfg: PlanConfig, plan: MemoryPlan) -> Row:
    """What HiddenKey's second pass adds: this plan minus the same run with one pass."""
    single = estimate(replace(cfg, dual_pass=False), suggest=False)
    how = ("the second pass replays without grad" if cfg.consistency_grad == "one_branch"
           else f"[h; h] with grad from layer {cfg.shared_prefix()}")
    return Row("  of which HiddenKey dual pass", plan.total_bytes - single.total_bytes,
               f"{how}: {plan.total_bytes / single.total_bytes:.2f}x the single-pass total", counted=False)


def estimate(cfg: PlanConfig, suggest: bool = True) -> MemoryPlan:
    """Peak memory of one training step per GPU (rank), as rows that sum to the total; with `suggest`, a plan
    that does not fit carries the cheapest change that makes it fit."""
    states = model_states(cfg)
    views = layer_views(cfg)
    acts = saved_activations(cfg, views)
    peak = transient_peak(cfg, views, acts)
    overhead = framework_overhead(cfg, states, dynamic=acts.saved + peak.bytes)
    plan = MemoryPlan(cfg, _rows(cfg, states, acts, peak, overhead), states.cpu,
                      per_layer_activation_bytes=acts.per_layer, checkpointed_activation_bytes=acts.checkpointed,
                      full_activation_bytes=acts.full,
                      extras={"decoder_saved": acts.saved - acts.head_inputs, "head_inputs": acts.head_inputs,
                              "head": peak.loss_head, "backward": peak.backward, "recompute": peak.recompute,
                              "mask_build": peak.mask_build, "replay": peak.replay, "buffers": overhead.buffers,
                              "context": overhead.context, "fragmentation": overhead.fragmentation})
    if cfg.dual_pass:
        plan.rows.append(_dual_pass_row(cfg, plan))
    if suggest and not plan.fits:
        from hiddenkey_ds.planning.suggest import suggest_fix  # suggest.py imports this module

        plan.suggestion = suggest_fix(cfg)
    return plan
