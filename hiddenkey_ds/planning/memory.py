"""The byte formulas of the memory estimate, one per component a LoRA/QLoRA step under DeepSpeed keeps on a GPU.

Each function answers one question about one tensor family (the frozen weights' bytes per element, the LoRA
tensors, what autograd saves per token in a decoder layer, the (S x S) attention masks, the loss head's chunk,
ZeRO-3's gathered parameters, ...); hiddenkey_ds.planning.estimate adds them up. tests/test_plan.py holds them
to autograd's saved tensors and benchmarks/plan_vs_measured.py to measured peaks. Pure arithmetic: no torch.
"""
from __future__ import annotations

from hiddenkey_ds.planning.config import GIB, PlanConfig

# Bytes per weight of a quantized linear layer (bitsandbytes). 4-bit: 0.5 byte + one absmax per 64-weight
# block (fp32 = 4/64; double quantization stores it as 8 bits + one fp32 per 256 blocks).
_WEIGHT_BYTES_4BIT = 0.5 + 4 / 64
_WEIGHT_BYTES_4BIT_DQ = 0.5 + 1 / 64 + 4 / (64 * 256)
_WEIGHT_BYTES_8BIT = 1.0  # int8 + one fp32 scale per row (negligible)

# Device-only constants that a CPU measurement cannot check; typical values, stated as such in the output.
CUDA_CONTEXT_BYTES = int(1.0 * GIB)   # CUDA context + cuBLAS workspace + NCCL communicators
FRAGMENTATION = 0.10                  # caching-allocator slack on the dynamic (activation) part


def linear_weight_bytes(cfg: PlanConfig) -> float:
    """Bytes per weight of the frozen decoder linear layers (quantized or in the compute dtype)."""
    if cfg.quantization == "4bit":
        return _WEIGHT_BYTES_4BIT_DQ if cfg.double_quant else _WEIGHT_BYTES_4BIT
    if cfg.quantization == "8bit":
        return _WEIGHT_BYTES_8BIT
    return cfg.dtype_bytes


def lora_param_count(cfg: PlanConfig) -> int:
    shapes = cfg.shape.linear_shapes()
    return cfg.shape.layers * sum(cfg.lora_r * (shapes[m][0] + shapes[m][1]) for m in cfg.lora_targets)


def lora_tensor_sizes(cfg: PlanConfig) -> list[int]:
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


def stage3_working_set(cfg: PlanConfig, partitioned_bytes: float, layer_bytes: float) -> float:
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
