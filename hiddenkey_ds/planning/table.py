"""The plan as `hiddenkey-ds plan` prints it: a header, one line per row with its notes, the total against the
GPU's memory, and the suggestion when it does not fit."""
from __future__ import annotations

from typing import TYPE_CHECKING

from hiddenkey_ds.planning.config import GIB

if TYPE_CHECKING:  # estimate.py imports this module for its notes
    from hiddenkey_ds.planning.estimate import MemoryPlan


def format_ranks(n: int) -> str:
    return f"{n} rank" + ("s" if n != 1 else "")


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    cfg, s = plan.config, plan.config.shape
    lines = [
        (f"model {s.name}: {format_count(s.total_params)} params, {s.layers} layers, hidden {s.hidden}, "
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
        lines.append(f"host RAM for offloaded state: {format_gib(plan.cpu_bytes)} per rank")
    if not plan.fits:
        sug = plan.suggestion
        if sug is None:
            lines.append("no combination of ZeRO-3 + offload, micro-batch 1, checkpointing and 4-bit fits: "
                         "add GPUs (ZeRO-3 divides the base by the world size) or shorten data.max_length")
        else:
            lines.append(f"cheapest change that fits: {sug.description} -> {format_gib(sug.total_bytes)}")
            lines.append(f"  overrides: {' '.join(sug.overrides)}")
    return "\n".join(lines)
