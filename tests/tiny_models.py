"""Tiny random decoders of the three architectures the dropout framework is tested on."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 97
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
               attn_implementation="sdpa")
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_COMMON, **extra, **overrides}))
    return model.to(dtype).eval()


def padded_batch(side: str, seed: int = 0, batch: int = 3, seq: int = 12):
    """input_ids + attention_mask with rows padded on `side` ("left", "right" or "none")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if side != "none":
        for row, pad in enumerate([0, 3, 5][:batch]):
            if pad:
                if side == "left":
                    mask[row, :pad] = 0
                else:
                    mask[row, seq - pad:] = 0
    return ids, mask


TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-lora.yaml"


def tiny_recipe(*overrides: str):
    """recipes/tiny-lora.yaml with key=value overrides, its output directory not checked."""
    from hiddenkey_ds.config import load_recipe

    return load_recipe(TINY_RECIPE, list(overrides), check_output_dir=False)
