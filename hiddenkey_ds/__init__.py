"""hiddenkey-ds: HiddenKey and the unified dropout framework for LoRA / QLoRA finetuning under DeepSpeed.

    from hiddenkey_ds.method import DropoutConfig, apply_dropout, HiddenKeyObjective

The layers, each a subpackage (docs/architecture.md): method <- config, data, models <- training <- evaluation,
experiments, planning.
"""
__version__ = "0.1.0"
