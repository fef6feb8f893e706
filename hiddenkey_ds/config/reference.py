"""The recipe key reference (docs/recipes.md) generated from the schema, so docs and code cannot drift apart."""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hiddenkey_ds.config.keys import _submodel
from hiddenkey_ds.config.schema import SECTIONS

# DropoutConfig belongs to the core module and documents itself in docstrings; these lines give its keys
# the same one-line meaning every other key has.
DROPOUT_DOCS = {
    "dropout.preset": "starting point: none, dropkey, dropattention, hiddencut, hiddenkey, hiddenkey_nokl, custom; "
    "keys given next to it replace the preset's values",
    "dropout.key.rate": "DropKey: probability of dropping an attention logit / key column before softmax",
    "dropout.key.pattern": "element (per logit), column (a whole key for every query: HiddenKey) or span",
    "dropout.attention.rate": "DropAttention: probability of dropping an attention weight after softmax",
    "dropout.attention.pattern": "element, column or span",
    "dropout.attention.rescale": "none, inverted (1/(1-p)) or normalized (divide each row by the mass it kept)",
    "dropout.hidden.rate": "HiddenCut position: probability of dropping an MLP output unit of every decoder layer",
    "dropout.hidden.pattern": "element, column or span",
    "dropout.hidden.rescale": "none or inverted (1/(1-p))",
    "dropout.consistency": "none, kl or js: consistency loss between two stochastic passes ([x; x] in one forward)",
    "dropout.alpha": "weight of the consistency loss (> 0 exactly when consistency is not none)",
}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, dict):
        args = typing.get_args(annotation)
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every settable key."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _submodel(field.annotation)
            if sub is not None:
                walk(sub, f"{key}.")
                continue
            meaning = field.description or DROPOUT_DOCS.get(key, "")
            rows.append((key, _type_name(field.annotation), _default(field), meaning))

    for section, model in SECTIONS.items():
        walk(model, f"{section}.")
    return rows


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_, default, meaning in reference_rows():
        lines.append(f"| `{key}` | {type_} | {default} | {meaning} |")
    return "\n".join(lines)
