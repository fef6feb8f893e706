"""The unified dropout framework (where x pattern x compensation) applied to transformers models."""
from hiddenkey_ds.dropout.apply import DropoutHandle, apply_dropout, remove_dropout, unwrap_model
from hiddenkey_ds.dropout.config import PRESETS, AttentionDropout, DropoutConfig, HiddenDropout, KeyDropout

__all__ = [
    "PRESETS", "AttentionDropout", "DropoutConfig", "DropoutHandle", "HiddenDropout", "KeyDropout",
    "apply_dropout", "remove_dropout", "unwrap_model",
]
