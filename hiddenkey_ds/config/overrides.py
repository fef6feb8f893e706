"""`a.b.c=value` command-line overrides, applied to the raw recipe mapping before validation."""
from __future__ import annotations

from typing import Any

import yaml

from hiddenkey_ds.config.keys import check_key


def parse_value(text: str) -> Any:
    """A YAML scalar or flow collection: `0.1`, `true`, `null`, `[q_proj, v_proj]`, `{a: 1}`.

    YAML 1.1 reads `3e-4` (no dot) as the string "3e-4"; no custom resolver for it: the schema's float fields
    coerce such strings (pydantic's lax mode), which tests/test_config.py checks for recipes and overrides."""
    if text.strip() == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (e.g. `a: b` in a path): keep the string, the schema judges it


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set each override in ``raw`` (in place, in order); return the problems found."""
    problems: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected KEY=VALUE (hint: e.g. train.lr=3e-4 or lora.target_modules=[q_proj,v_proj])")
            continue
        parts = key.split(".")
        problem = check_key(parts)
        if problem:
            problems.append(f"override {problem}")
            continue
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    f"override {key}: {'.'.join(parts[: depth + 1])} is {child!r} in the recipe, not a section"
                )
                break
            node = child
        else:
            node[parts[-1]] = parse_value(value)
    return problems
