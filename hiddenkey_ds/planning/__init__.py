"""The per-GPU memory planner: `hiddenkey-ds plan RECIPE.yaml --gpus-per-node N --gpu-mem G`.

    config.py    PlanConfig (every input of the estimate), config_from_recipe, shape_for
    memory.py    the byte formula of each component (weights, LoRA, saved activations, masks, loss head, ...)
    estimate.py  estimate(PlanConfig) -> MemoryPlan: model states + activations + transient peak + overhead
    suggest.py   suggest_fix: the cheapest change (ZeRO stage, micro-batch, checkpointing, 4-bit) that fits
    table.py     format_plan: the table the command prints
    cli.py       the command line (`main`)

All of it is arithmetic on a model's shape: no torch, DeepSpeed or weights, so it runs on a login node.
"""
from hiddenkey_ds.planning.config import GIB, PlanConfig, config_from_recipe, shape_for
from hiddenkey_ds.planning.estimate import MemoryPlan, Row, estimate
from hiddenkey_ds.planning.memory import lora_param_count
from hiddenkey_ds.planning.suggest import Suggestion, suggest_fix
from hiddenkey_ds.planning.table import format_plan

__all__ = ["GIB", "MemoryPlan", "PlanConfig", "Row", "Suggestion", "config_from_recipe", "estimate", "format_plan",
           "lora_param_count", "shape_for", "suggest_fix"]
