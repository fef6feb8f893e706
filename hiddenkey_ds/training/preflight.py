"""Start-up checks that need more than the recipe file: the model (its path, its config, the LoRA target
modules) and the run directory (finished, unfinished, what a resume may change).

They run on every rank before torch.distributed, DeepSpeed, the tokenizer or the data are touched, so that a
mistake costs seconds, is reported once (rank 0) as a ``RecipeError`` with a hint, and leaves nothing on disk.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hiddenkey_ds.config import Recipe, RecipeError
from hiddenkey_ds.run_dir import CONFIG, FINISHED_MARKER


@dataclass
class RunDirState:
    finished: bool = False
    resume_from: Path | None = None                     # the newest complete checkpoint a resume continues from
    safe_changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, run's value, new value)


def _value(v: Any) -> str:
    return json.dumps(v)


def check_run_dir(recipe: Recipe) -> RunDirState:
    """What the run directory holds and whether this recipe may continue it."""
    from hiddenkey_ds.training.checkpoint import checkpoint_root, latest_checkpoint, recipe_changes

    run_dir = Path(recipe.run.output_dir)
    if (run_dir / FINISHED_MARKER).exists():
        return RunDirState(finished=True)  # load_recipe already refused it without run.resume=true
    root = checkpoint_root(run_dir)
    if not recipe.run.resume:
        if root.is_dir() and any(root.iterdir()):
            raise RecipeError([
                f"run.output_dir: {recipe.run.output_dir} holds checkpoints of an unfinished run (hint: pass "
                "run.resume=true to continue it, or choose another run.output_dir; nothing was touched)"
            ])
        return RunDirState()
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return RunDirState()  # nothing to continue from: a fresh start
    config = run_dir / CONFIG
    hint = (f"hint: resume with the run's own settings, e.g. `python -m hiddenkey_ds.train {config} "
            "run.resume=true`, or start a new run in another run.output_dir; only train.log_every, "
            "train.save_every, train.keep_checkpoints and eval.* may change on resume")
    try:
        old = Recipe.model_validate(yaml.safe_load(config.read_text()))
    except (OSError, yaml.YAMLError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RecipeError([f"run.resume: {run_dir} has checkpoints up to {latest.name} but its recipe {config} "
                           f"cannot be read ({first}), so a resume cannot be checked to continue the same run "
                           f"({hint})"]) from None
    unsafe, safe = recipe_changes(old.model_dump(mode="json"), recipe.model_dump(mode="json"))
    if unsafe:
        raise RecipeError(
            [f"run.resume: the recipe differs from the run being resumed ({config}) in {len(unsafe)} setting"
             f"{'s' if len(unsafe) != 1 else ''} that change the result; nothing was touched ({hint})"]
            + [f"{key}: {_value(a)} in the run, {_value(b)} now" for key, a, b in unsafe])
    return RunDirState(resume_from=latest, safe_changes=safe)


def check_model(recipe: Recipe) -> None:
    """The model exists, is a causal LM, has every LoRA target module, has what the method needs (a decoder stack
    and LM head; with dropout on, LLaMA-layout layers, every layer dropout.layers names, transformers' attention
    interface for key/attention dropout), the machine runs dropout.key_kernel, and LoRA does not wrap its LM head
    where the chunked loss would use it twice: from its config alone, on the meta device (no weights are read)."""
    import torch
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    from hiddenkey_ds.method.apply import layout_problems
    from hiddenkey_ds.models.builtin import BuiltinModelError
    from hiddenkey_ds.models.loading import ModelLoadError, lora_config, resolve_model_path

    m = recipe.model
    try:
        path = resolve_model_path(m.name)
    except (ModelLoadError, BuiltinModelError) as err:
        message = str(err)
        raise RecipeError([message if message.startswith("model.name") else f"model.name: {message}"]) from None
    try:
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError([
            f"model.name: cannot read the config of {m.name!r} ({first}) (hint: a hub id needs network access or "
            "the HF cache; offline, point model.name at a local model directory or use builtin:tiny-llama)"
        ]) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except ValueError as err:
        raise RecipeError([f"model.name: {m.name!r} is not a causal language model "
                           f"({str(err).splitlines()[0]}) (hint: LLaMA-family decoders are)"]) from None
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    targets = recipe.lora.target_modules
    if isinstance(targets, list):
        # PEFT's own check fails only when no target matches at all: a misspelt one next to a valid one would
        # silently train fewer adapters than the recipe says. Matching as PEFT does: the name or its last parts.
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise RecipeError([
                f"lora.target_modules: {', '.join(map(repr, missing))} match{'es' if len(missing) == 1 else ''} no "
                f"module of {m.name!r} (hint: this model's linear layers: {', '.join(linear)})"
            ])
    try:
        peft_model = get_peft_model(model, lora_config(recipe))
    except ValueError as err:
        raise RecipeError([
            f"lora.target_modules: {recipe.lora.target_modules} do not all exist in {m.name!r}: "
            f"{str(err).splitlines()[0]} (hint: this model's linear layers: {', '.join(linear)})"
        ]) from None
    problems = _structure_problems(peft_model, m.name) + layout_problems(peft_model, recipe.dropout) \
        + _kernel_problems(recipe) + _head_transform_problems(peft_model)
    if problems:
        raise RecipeError(problems)
    head = peft_model.get_output_embeddings()
    if isinstance(head, BaseTunerLayer):
        _check_head_used_once(recipe)


def _head_transform_problems(model) -> list[str]:
    """The chunked loss must apply what the model's own forward does after its LM head (soft-capping, logit
    scales): a model whose post-head step it does not know would train on other logits than lm-eval scores."""
    from hiddenkey_ds.method.heads import head_problem

    problem = head_problem(model)
    return [] if problem is None else [
        f"model.name: {problem} (hint: the loss would train on other logits than the model's forward, which lm-eval "
        "scores; use a model whose forward returns its LM head's output, optionally soft-capped or scaled as Gemma, "
        "Cohere and Granite do)"]


def _structure_problems(model, name: str) -> list[str]:
    """What the method's loss (hiddenkey_ds.method.objective) needs of every model, dropout or not: the decoder
    stack (get_decoder(), whose last_hidden_state the chunked head reads) and the LM head."""
    import torch

    from hiddenkey_ds.method.apply import unwrap_model

    base = unwrap_model(model)
    parts = {}
    for part, getter in (("decoder stack (get_decoder())", "get_decoder"),
                         ("LM head (get_output_embeddings())", "get_output_embeddings")):
        try:
            parts[part] = getattr(base, getter)()
        except (AttributeError, NotImplementedError):
            parts[part] = None
    missing = [part for part, module in parts.items() if not isinstance(module, torch.nn.Module)]
    if not missing:
        return []
    return [f"model.name: {name!r} ({type(base).__name__}) has no {' and no '.join(missing)}, which the chunked "
            "loss head computes the loss through (hint: use a decoder-only causal LM such as LLaMA, Mistral or "
            "Qwen2)"]


def _kernel_problems(recipe: Recipe) -> list[str]:
    """dropout.key_kernel=flex on a machine that cannot run the fused kernel's backward: known before any step."""
    if recipe.dropout.key_kernel != "flex":
        return []
    import torch

    from hiddenkey_ds.method import flex

    if not flex.available():
        return [f"dropout.key_kernel: flex needs FlexAttention (torch >= 2.5), this is torch {torch.__version__} "
                "(hint: dropout.key_kernel=auto picks the sdpa kernel here)"]
    if not torch.cuda.is_available():
        return [f"dropout.key_kernel: flex trains only on CUDA (FlexAttention has no backward on CPU in torch "
                f"{torch.__version__}) and this machine has no CUDA device (hint: dropout.key_kernel=auto uses the "
                "fused kernel where CUDA is available and sdpa elsewhere, with the same semantics)"]
    return []


def _check_head_used_once(recipe: Recipe) -> None:
    from hiddenkey_ds.config.validate import _lm_head_problems

    lora = recipe.lora.model_copy(update={"target_modules": ["lm_head"]})  # the head under any module name
    problems = _lm_head_problems(lora, recipe.dropout, recipe.train, recipe.data)
    if problems:
        raise RecipeError(problems)
