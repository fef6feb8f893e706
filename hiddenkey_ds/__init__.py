"""hiddenkey-ds: HiddenKey and the unified dropout framework for LoRA / QLoRA finetuning under DeepSpeed.

    from hiddenkey_ds.dropout import DropoutConfig, apply_dropout
    from hiddenkey_ds.objective import HiddenKeyObjective
"""
__version__ = "0.1.0"
