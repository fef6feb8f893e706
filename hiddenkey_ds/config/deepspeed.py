"""ds_configs/*.json + a recipe -> the DeepSpeed config dict handed to ``deepspeed.initialize``.

The JSON files hold DeepSpeed-only settings (ZeRO stage, buckets, offload). Everything the recipe decides
(batch sizes, clipping, precision, optimizer, LR schedule) is filled from the recipe here; in the JSON such a
key is absent or ``"auto"``. Raw DeepSpeed does not understand ``"auto"`` (that is a transformers Trainer
convention), so nothing ``"auto"`` may survive resolution, and a JSON value that contradicts the recipe is an
error rather than a silent winner.

The optimizer is DeepSpeed's own block: ``AdamW`` with ``torch_adam`` (torch.optim.AdamW) where DeepSpeed's
fused/CPU Adam kernels are not available (no CUDA device), DeepSpeed's kernels otherwise (``train.torch_adam``
overrides).

The LR schedule is not DeepSpeed's: it is transformers' (hiddenkey_ds.training.schedules), handed to
``deepspeed.initialize(lr_scheduler=...)``. DeepSpeed's Warmup* schedulers cannot express the recipe's schedules
exactly (at least 2 warmup steps, a first step at lr 0, and WarmupDecayLR decays only the span max - min), so a
``"scheduler"`` block in the JSON is refused.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.resources import resource_dir

DS_CONFIG_DIR = resource_dir("ds_configs")  # the checkout's ds_configs/, or the copy a wheel ships
BUILTIN_DS_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")

# Settings that are DeepSpeed-only but whose DeepSpeed default is unhelpful for us: DeepSpeed prints every
# 10 steps and times every phase by default; the loop does its own logging.
_QUIET = {"steps_per_print": 10**9, "wall_clock_breakdown": False}


def find_ds_config(name: str) -> Path:
    """``run.deepspeed`` as a file: a path (relative to the working directory), or a name in ds_configs/."""
    candidates = [Path(name).expanduser(), DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise RecipeError(
        f"run.deepspeed: no DeepSpeed config {name!r} (looked at {', '.join(str(c) for c in candidates)}) "
        f"(hint: one of {', '.join(BUILTIN_DS_CONFIGS)} or a path to a JSON file)"
    )


def load_ds_json(name: str) -> dict[str, Any]:
    path = find_ds_config(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"run.deepspeed: {path} is not valid JSON: {err} (hint: a DeepSpeed config is a JSON "
                          f"text file; one of {', '.join(BUILTIN_DS_CONFIGS)} works as is)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"run.deepspeed: {path} holds a {type(data).__name__}, not a JSON object")
    return data


def zero_stage(ds: dict[str, Any]) -> int:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return int(stage) if not isinstance(stage, str) else -1


def _default_torch_adam() -> bool:
    import torch

    return not torch.cuda.is_available()


def recipe_owned_settings(recipe: Any, world_size: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed settings the recipe decides, as DeepSpeed spells them."""
    train = recipe.train
    lr = train.lr
    torch_adam = train.torch_adam if train.torch_adam is not None else _default_torch_adam()
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.global_batch(world_size),
        "gradient_clipping": train.clipping,
        "bf16": {"enabled": recipe.model.dtype == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay,
            "torch_adam": torch_adam}},
    }


def _merge(ours: dict[str, Any], theirs: dict[str, Any], prefix: str, problems: list[str], source: str) -> None:
    """Fill ``theirs`` with ``ours`` in place: absent or "auto" -> ours; equal -> fine; different -> problem."""
    for key, value in ours.items():
        where = f"{prefix}{key}"
        if key not in theirs or theirs[key] == "auto":
            theirs[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(theirs[key], dict):
            _merge(value, theirs[key], f"{where}.", problems, source)
        elif theirs[key] != value:
            problems.append(
                f"run.deepspeed: {source} sets {where}={json.dumps(theirs[key])} but the recipe gives "
                f"{json.dumps(value)} (hint: recipes own this setting: remove it from the JSON or write \"auto\")"
            )


def _leftover_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leftover_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def resolve_ds_config(recipe: Any, world_size: int, total_steps: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for ``recipe`` on ``world_size`` ranks, with no "auto" left.

    ``total_steps`` is the run's optimizer steps; it defaults to ``recipe.train.max_steps`` and must be given
    for an ``epochs`` recipe (``recipe.train.total_steps(len(train_ds), world_size)``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total_steps = total_steps if total_steps is not None else recipe.train.max_steps
    if total_steps is None:
        raise ValueError(
            "train.epochs is set, so the step count depends on the data: pass "
            "total_steps=recipe.train.total_steps(len(train_ds), world_size)"
        )
    source = str(find_ds_config(recipe.run.deepspeed))
    ds = load_ds_json(recipe.run.deepspeed)
    problems: list[str] = []
    if "scheduler" in ds:
        problems.append(
            f"run.deepspeed: {source} has a \"scheduler\" block, but the LR schedule comes from the recipe "
            "(hint: remove it and set train.scheduler / train.warmup)"
        )
    _merge(recipe_owned_settings(recipe, world_size, total_steps), ds, "", problems, source)
    for key, value in _QUIET.items():
        ds.setdefault(key, value)
    problems += [
        f"run.deepspeed: {source} leaves {key}=\"auto\", which the recipe does not fill and DeepSpeed does not "
        "understand (hint: give it a value)"
        for key in _leftover_auto(ds)
    ]
    if problems:
        raise RecipeError(problems)
    return ds
