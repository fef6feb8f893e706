"""What keys the schema has: for override paths, error locations and "did you mean" hints."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

from hiddenkey_ds.config.schema import SECTIONS

# Names users bring from HF TrainingArguments / other trainers, mapped to ours.
FOREIGN_NAMES = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "warmup_ratio": "train.warmup",
    "warmup_steps": "train.warmup",
    "lr_scheduler_type": "train.scheduler",
    "max_grad_norm": "train.max_grad_norm",
    "model_name_or_path": "model.name",
    "torch_dtype": "model.dtype",
    "bf16": "model.dtype",
    "load_in_4bit": "model.quantization",
    "load_in_8bit": "model.quantization",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "dataset": "data.path",
    "dataset_name": "data.path",
    "zero_stage": "run.deepspeed",
    "deepspeed_config": "run.deepspeed",
}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (unwrapping Optional), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _is_mapping(annotation: Any) -> bool:
    if typing.get_origin(annotation) is dict or annotation is dict:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return False


def leaf_keys() -> list[str]:
    """Every settable dotted key, e.g. ``train.lr``, ``dropout.key.rate``."""
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _submodel(field.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    for section, model in SECTIONS.items():
        walk(model, f"{section}.")
    return out


def suggest(parts: list[str]) -> str:
    """A hint for an unknown key ``parts`` (its path components)."""
    last = parts[-1]
    if last in FOREIGN_NAMES:
        return f"did you mean {FOREIGN_NAMES[last]}?"
    if len(parts) == 1:  # a key without its section, e.g. `lr=` for `train.lr=`
        owners = [k for k in leaf_keys() if k.split(".", 1)[1] == last]
        if owners:
            return f"did you mean {' or '.join(owners)}?"
    foreign = difflib.get_close_matches(last, list(FOREIGN_NAMES), n=1, cutoff=0.85)
    if foreign:
        return f"did you mean {FOREIGN_NAMES[foreign[0]]}?"
    # the deepest known model along the path gives the candidate siblings
    model: type[BaseModel] | None = None
    known: list[str] = []
    candidates: list[str] = list(SECTIONS)
    for part in parts[:-1]:
        fields = SECTIONS if model is None else model.model_fields
        if part not in fields:
            break
        sub = SECTIONS[part] if model is None else _submodel(model.model_fields[part].annotation)
        if sub is None:
            break
        model, known = sub, [*known, part]
        candidates = list(model.model_fields)
    prefix = ".".join(known)
    close = difflib.get_close_matches(last, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean {'.'.join([*known, close[0]])}?"
    # maybe the key exists in another section (e.g. `lr=` instead of `train.lr=`)
    dotted = ".".join(parts)
    full = leaf_keys()
    matches = [k for k in full if k.endswith("." + last)] or difflib.get_close_matches(dotted, full, n=1, cutoff=0.75)
    if matches:
        return f"did you mean {matches[0]}?"
    where = f"{prefix}" if prefix else "the top level"
    return f"valid keys in {where}: {', '.join(candidates)}"


def check_key(parts: list[str]) -> str | None:
    """None if ``parts`` names a settable key, else a problem description with a hint."""
    model: type[BaseModel] | None = None
    for i, part in enumerate(parts):
        fields = SECTIONS if model is None else model.model_fields
        if part not in fields:
            hint = suggest(parts[: i + 1])
            rest = parts[i + 1:]
            if rest and hint.startswith("did you mean ") and " or " not in hint:
                hint = f"{hint[:-1]}.{'.'.join(rest)}?"  # `trian.lr` -> `train.lr`, not just `train`
            return f"{'.'.join(parts)}: unknown key (hint: {hint})"
        if model is None:
            model = SECTIONS[part]
            continue
        annotation = model.model_fields[part].annotation
        sub = _submodel(annotation)
        if sub is not None:
            model = sub
            continue
        if i < len(parts) - 1 and not _is_mapping(annotation):
            here = ".".join(parts[: i + 1])
            return f"{'.'.join(parts)}: {here} is a value, not a section (hint: {here}=VALUE)"
        return None
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict (a dumped recipe) as {dotted key: leaf value}."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def dotted_location(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the user's dotted key, without pydantic's union/validator tags."""
    out: list[str] = []
    fields: dict[str, Any] = dict(SECTIONS)  # name -> sub-model class or field info
    state = "model"  # "model": items are field names; "leaf": items are union tags; "free": items are data
    for item in loc:
        if isinstance(item, int):
            out[-1:] = [f"{out[-1]}[{item}]"] if out else [f"[{item}]"]
        elif state == "free":
            out.append(str(item))
        elif state == "model":
            out.append(str(item))
            entry = fields.get(item)
            if entry is None:  # an unknown key (extra_forbidden): the message names it
                state = "leaf"
            elif isinstance(entry, type) and issubclass(entry, BaseModel):
                fields = dict(entry.model_fields)
            else:
                sub = _submodel(entry.annotation)
                if sub is not None:
                    fields = dict(sub.model_fields)
                else:
                    state = "free" if _is_mapping(entry.annotation) else "leaf"
    return ".".join(out)
