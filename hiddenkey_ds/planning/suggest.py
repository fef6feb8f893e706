"""When a plan does not fit: the cheapest change of the recipe that does.

The candidates are every combination of a built-in ds_config (ZeRO stage, CPU offload), a smaller micro-batch
at the same global batch, gradient checkpointing and a 4-bit base; each is sized with the same estimate and
ranked by a heuristic slow-down (the COST_* table), ties going to the most headroom.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

from hiddenkey_ds.planning.config import GIB, PlanConfig
from hiddenkey_ds.planning.estimate import estimate

# Relative slow-down of each change the suggester may propose (heuristic ranks, cheapest first): LoRA's
# optimizer state is tiny so ZeRO-1/2 cost ~nothing; ZeRO-3 re-gathers the frozen base in forward and
# backward; checkpointing recomputes one forward; offload moves the base over PCIe every step; 4-bit changes
# the method (QLoRA) and dequantizes every matmul.
COST_STAGE = {0: 0.0, 1: 0.01, 2: 0.02, 3: 0.25}
COST_OFFLOAD = 1.0
COST_HALVE_MICRO_BATCH = 0.10
COST_CHECKPOINTING = 0.33
COST_4BIT = 0.50
DS_CONFIG_FOR = {(0, False): "zero0", (1, False): "zero1", (2, False): "zero2", (3, False): "zero3",
                 (3, True): "zero3_offload"}


@dataclass(frozen=True)
class Suggestion:
    overrides: tuple[str, ...]   # recipe key=value overrides that make it fit
    description: str
    total_bytes: float
    cost: float


def _candidates(cfg: PlanConfig) -> Iterator[PlanConfig]:
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
