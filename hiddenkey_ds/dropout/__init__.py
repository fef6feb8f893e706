"""The unified dropout framework (where x pattern x compensation) applied to transformers models.

The config classes import without torch or transformers (recipe validation stays fast); the functions that
touch a model are imported on first use."""
from __future__ import annotations

import importlib
from typing import Any

from hiddenkey_ds.dropout.config import PRESETS, AttentionDropout, DropoutConfig, HiddenDropout, KeyDropout

_LAZY = {name: "hiddenkey_ds.dropout.apply" for name in
         ("DropoutHandle", "apply_dropout", "decoder_layers", "dropout_handle", "remove_dropout", "unwrap_model")}

__all__ = ["PRESETS", "AttentionDropout", "DropoutConfig", "HiddenDropout", "KeyDropout", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hiddenkey_ds.dropout' has no attribute {name!r}")
