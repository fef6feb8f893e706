"""The method: the unified dropout framework (where x pattern x compensation) applied to a transformers model,
and the HiddenKey objective (two stochastic passes + bidirectional KL). The paper, and nothing else: no
DeepSpeed, no recipes, no files.

    from hiddenkey_ds.method import DropoutConfig, apply_dropout, HiddenKeyObjective

The config classes import without torch or transformers (recipe validation stays fast); what touches a model is
imported on first use."""
from __future__ import annotations

import importlib
from typing import Any

from hiddenkey_ds.method.config import PRESETS, AttentionDropout, DropoutConfig, HiddenDropout, KeyDropout

_LAZY = {name: "hiddenkey_ds.method.apply" for name in
         ("DropoutHandle", "apply_dropout", "decoder_layers", "dropout_handle", "remove_dropout", "unwrap_model")}
_LAZY.update({name: "hiddenkey_ds.method.objective" for name in ("HiddenKeyObjective", "LossOutput")})
_LAZY.update({name: "hiddenkey_ds.method.heads" for name in ("UnsupportedModelError", "head_problem", "logit_transform")})

__all__ = ["PRESETS", "AttentionDropout", "DropoutConfig", "HiddenDropout", "KeyDropout", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hiddenkey_ds.method' has no attribute {name!r}")
