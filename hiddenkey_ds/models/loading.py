"""Model loading: local paths, hub ids and builtin:* models; bf16/fp32 or 4-bit NF4; PEFT LoRA on top.

``load_model`` returns the PEFT model ready for ``deepspeed.initialize`` (through the objective): base frozen,
LoRA trainable, gradient checkpointing set up so that it works with PEFT and ZeRO-3, pad token set.

Under ZeRO-3 the loop must initialize torch.distributed first (``deepspeed.init_distributed()``) and pass the
resolved DeepSpeed config: transformers then builds the model inside ``deepspeed.zero.Init`` and each rank
holds only its partition instead of a full copy in host memory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hiddenkey_ds.models.builtin import BUILTINS, builtin_path

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}

# transformers finds the DeepSpeed config through a weak reference: the object must outlive from_pretrained
# (and stays attached to the returned model for the rest of the run).
_LIVE_DS_CONFIGS: list[Any] = []


class ModelLoadError(RuntimeError):
    pass


def resolve_model_path(name: str) -> str:
    """A directory ``from_pretrained`` can load: builtin:* -> its cached dir; local paths -> absolute; hub ids as is."""
    if name.startswith("builtin:"):
        return str(builtin_path(name))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model.name: {name!r} is a local path without config.json, not a Hugging Face model "
                                 "directory (hint: point model.name at the directory holding config.json and the weights)")
        return str(local.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"model.name: {name!r} looks like a local path but does not exist (hint: a hub id is 'owner/name'; "
            f"builtin models: {', '.join(BUILTINS)})"
        )
    return name  # a hub id: from_pretrained downloads or reads the HF cache


def _torch_dtype(recipe: Any):
    import torch

    return getattr(torch, DTYPES[recipe.model.dtype])


def load_tokenizer(recipe: Any):
    """The model's tokenizer, right-padded, with a pad token (LLaMA tokenizers ship none: eos stands in)."""
    from transformers import AutoTokenizer

    m = recipe.model
    path = resolve_model_path(m.name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {m.name!r} has neither a pad nor an eos token to pad with")
        # padded positions are masked out of attention and loss, so any id works; eos adds no new embedding
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(recipe: Any):
    """bitsandbytes settings for model.quantization, or None."""
    from transformers import BitsAndBytesConfig

    m = recipe.model
    if m.quantization == "none":
        return None
    if m.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = _torch_dtype(recipe)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.quant_type,
        bnb_4bit_use_double_quant=m.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # packed 4-bit weights stored in the compute dtype: ZeRO-3 partitions and gathers tensors of one
        # float dtype, and DeepSpeed's module.bfloat16() leaves them untouched
        bnb_4bit_quant_storage=dtype,
    )


def _zero_stage(ds_config: dict | None) -> int:
    if not ds_config:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _register_ds_config(ds_config: dict | None) -> Any:
    """Make transformers aware of ZeRO-3 before from_pretrained (and unaware otherwise)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if _zero_stage(ds_config) != 3:
        unset_hf_deepspeed_config()  # a stale ZeRO-3 config from an earlier load in this process must not leak
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ModelLoadError(
            "ZeRO-3 loading partitions the weights across ranks while they load, which needs torch.distributed: "
            "call deepspeed.init_distributed() before load_model"
        )
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    _LIVE_DS_CONFIGS.append(hf_ds_config)
    return hf_ds_config


def _device_map(recipe: Any, stage: int) -> Any:
    if recipe.model.device_map is not None:
        return recipe.model.device_map
    if recipe.model.quantization == "none" or stage == 3:
        return None  # DeepSpeed places the model (ZeRO-3: zero.Init already partitioned it)
    import torch

    if torch.cuda.is_available():
        # bitsandbytes quantizes while moving weights to the GPU: put each rank's copy on its own device
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def _enable_gradient_checkpointing(model: Any) -> None:
    # Reentrant checkpointing is what ZeRO-3 supports (its parameter fetch hooks re-run in recomputation);
    # with a frozen embedding no checkpointed input requires grad, so the reentrant function would see no
    # grad path and LoRA weights inside it would get none: enable_input_require_grads gives it one.
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not hasattr(model, "_require_grads_hook"):  # newer transformers already did it
        model.enable_input_require_grads()


def _disable_cpu_weight_repacking(model: Any) -> None:
    """bitsandbytes' CPU Linear4bit, in eval mode without grad, repacks its weight in place into an AVX512-BF16
    layout and flags the (shared) quant_state as packed. Under ZeRO-3 the weight it repacks is a temporary
    gathered copy: the repacked data is dropped on release, the flag stays, and every later gather feeds the
    original layout to the packed kernel, so the base weights silently change (ZeRO-3 QLoRA drifted from
    ZeRO-2 after the first evaluation). Training never repacks; evaluation keeps the training kernel."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(recipe: Any):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias=lora.bias, task_type="CAUSAL_LM",
    )


def load_model(recipe: Any, ds_config: dict | None = None) -> tuple[Any, Any]:
    """(peft_model, tokenizer) for ``recipe``, ready to train.

    ``ds_config`` is the resolved DeepSpeed config (``resolve_ds_config``); with ZeRO-3 it must be given so the
    model loads partitioned. The returned model is in train mode with ``use_cache`` off.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    m = recipe.model
    path = resolve_model_path(m.name)
    tokenizer = load_tokenizer(recipe)
    stage = _zero_stage(ds_config)
    hf_ds_config = _register_ds_config(ds_config)
    kwargs: dict[str, Any] = dict(
        dtype=_torch_dtype(recipe), revision=m.revision, trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
    )
    quant = quantization_config(recipe)
    if quant is not None:
        kwargs["quantization_config"] = quant
    device_map = _device_map(recipe, stage)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model.name={m.name!r} from {path!r}: {err}") from err

    if quant is not None:
        _disable_cpu_weight_repacking(model)
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Unlike peft.prepare_model_for_kbit_training we do not upcast every non-4-bit weight to fp32: in bf16
    # that only costs memory (embeddings + lm_head of a 70B model: GBs); stability needs fp32 only for fp16.
    for param in model.parameters():
        param.requires_grad_(False)
    if m.gradient_checkpointing:
        _enable_gradient_checkpointing(model)

    torch.manual_seed(recipe.run.seed)  # LoRA A matrices are random: same seed, same start on every rank
    try:
        peft_model = get_peft_model(model, lora_config(recipe))
    except ValueError as err:
        raise ModelLoadError(f"LoRA setup failed for lora.target_modules={recipe.lora.target_modules!r}: {err}") from err
    if hf_ds_config is not None:
        peft_model.hf_deepspeed_config = hf_ds_config  # keep it alive as long as the model
    peft_model.train()
    return peft_model, tokenizer


def trainable_parameter_summary(model: Any) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"
