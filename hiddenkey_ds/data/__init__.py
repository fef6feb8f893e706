"""Task data: templates (shared with evaluation), loading, tokenizing, batching.

    from hiddenkey_ds.data import build_datasets, make_collator, make_sampler
    train_ds, eval_ds, report = build_datasets(recipe, tokenizer)

Attributes are imported lazily: `hiddenkey_ds.data.templates` must stay importable without loading
`datasets` or torch (the lm-eval task generator only needs the templates).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TaskTemplate": "templates", "TEMPLATES": "templates", "SKIPPED": "templates", "get_template": "templates",
    "template_for": "templates", "custom_template": "templates",
    "load_splits": "loading", "DataReport": "stats", "SplitReport": "stats",
    "build_datasets": "pipeline", "encode_pair": "encoding",
    "make_collator": "batching", "make_sampler": "batching", "ShardSampler": "batching",
    "TOY_SST2": "toy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hiddenkey_ds.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hiddenkey_ds.data.{_EXPORTS[name]}"), name)
