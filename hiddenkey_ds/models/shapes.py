"""Model shapes for the memory planner, without downloading anything.

`plan` needs only a decoder's shape (layers, widths, heads, vocabulary, tied embeddings). It reads a local
``config.json`` when the recipe names a directory, and otherwise looks the name up in a built-in table of
common LLaMA-family sizes, so that sizing a 70B job works on a login node with no network and no weights.
The table's numbers are the models' published ``config.json`` values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Decoder linear layers of the LLaMA family, as PEFT's target_modules names them.
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_PROJ + MLP_PROJ


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    head_dim: int | None = None  # None: hidden // heads (LLaMA); some configs set it explicitly

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder linear layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own weights (0 when tied to the input embedding)."""
        return 0 if self.tie_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        per_layer = self.linear_params_per_layer + self.norm_params_per_layer
        return self.layers * per_layer + self.embedding_params + self.head_params + self.hidden


# Published config.json values (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, vocab_size, tie_word_embeddings).
BUILTIN_SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("llama-2-7b", 32, 4096, 11008, 32, 32, 32000, False),
    ModelShape("llama-2-13b", 40, 5120, 13824, 40, 40, 32000, False),
    ModelShape("llama-2-70b", 80, 8192, 28672, 64, 8, 32000, False),
    ModelShape("llama-65b", 80, 8192, 22016, 64, 64, 32000, False),  # LLaMA-1 65B: the QLoRA paper's largest
    ModelShape("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, False),
    ModelShape("llama-3-70b", 80, 8192, 28672, 64, 8, 128256, False),
    ModelShape("mistral-7b", 32, 4096, 14336, 32, 8, 32000, False),
    ModelShape("smollm2-135m", 30, 576, 1536, 9, 3, 49152, True),
)}

# Hub ids and builtin: names -> table entries. Matched case-insensitively against the part after the last
# "/" so that org prefixes, -hf / -chat / -instruct suffixes and Llama 3.1/3.2 point releases of the same
# size resolve to the same shape.
_ALIASES: tuple[tuple[str, str], ...] = (
    (r"^llama-?2-7b", "llama-2-7b"),
    (r"^llama-?2-13b", "llama-2-13b"),
    (r"^llama-?2-70b", "llama-2-70b"),
    (r"^llama-65b", "llama-65b"),
    (r"^(meta-)?llama-?3(\.\d)?-8b", "llama-3-8b"),
    (r"^(meta-)?llama-?3(\.\d)?-70b", "llama-3-70b"),
    (r"^mistral-7b", "mistral-7b"),
    (r"^smollm2-135m", "smollm2-135m"),
)


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A shape from a transformers config dict (LLaMA-style keys)."""
    try:
        heads = int(config["num_attention_heads"])
        return ModelShape(
            name=name,
            layers=int(config["num_hidden_layers"]),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim"),
        )
    except KeyError as err:
        raise ValueError(f"{name}: config has no {err.args[0]!r}; plan understands LLaMA-style decoders") from None


def lookup(name: str) -> ModelShape | None:
    """The built-in shape for a hub id or builtin: name, or None."""
    key = name.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1].lower()
    if key in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[key]
    for pattern, target in _ALIASES:
        if re.match(pattern, key):
            return BUILTIN_SHAPES[target]
    return None


def resolve_shape(name: str) -> ModelShape:
    """A recipe's model.name -> its shape: a local directory's config.json first, then the built-in table."""
    path = Path(name).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name == "config.json" and config_file.is_file():
        return shape_from_config(json.loads(config_file.read_text()), str(path))
    shape = lookup(name)
    if shape is None:
        known = ", ".join(sorted(BUILTIN_SHAPES))
        raise ValueError(
            f"no shape for model {name!r}: not a directory with config.json and not in the built-in table "
            f"({known}) (hint: point model.name at a local model directory, or plan --config path/to/config.json)"
        )
    return shape
