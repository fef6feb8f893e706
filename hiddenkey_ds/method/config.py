"""The unified dropout framework as configuration: where x pattern x compensation, plus presets.

One `DropoutConfig` describes a point of the framework of "LoRA Meets Dropout under a Unified Framework"
(Wang et al., 2024). It is a pydantic model so that the recipe schema embeds it as is and every problem
is reported at start-up.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pattern = Literal["element", "column", "span"]

# DropKey masks above this size (per layer, bytes) are rebuilt in backward rather than kept for it: the memory
# planner (hiddenkey_ds/planning/memory.py) models the same rule, so it lives here, importable without torch.
REBUILD_MASK_BYTES = 64 * 2**20
Consistency = Literal["none", "kl", "js"]
ConsistencyGrad = Literal["one_branch", "both"]
LAYER_WORDS = ("all", "latter_half")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyDropout(_Strict):
    """DropKey: drop attention *logits* before softmax. No rescaling: softmax renormalizes the kept keys."""

    rate: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a logit / key column is dropped")
    pattern: Pattern = "column"


class AttentionDropout(_Strict):
    """DropAttention: drop attention *weights* after softmax."""

    rate: float = Field(0.0, ge=0.0, lt=1.0)
    pattern: Pattern = "element"
    # normalized = divide every attention row by the mass it kept (equal to DropKey in the forward pass)
    rescale: Literal["none", "inverted", "normalized"] = "normalized"


class HiddenDropout(_Strict):
    """HiddenCut's position: the MLP (FFN) output of every decoder layer, before the residual add."""

    rate: float = Field(0.0, ge=0.0, lt=1.0)
    pattern: Pattern = "element"
    rescale: Literal["none", "inverted"] = "inverted"


# Rates and weights follow the paper's LLaMA settings where it gives them; every value can be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "dropkey": {"key": {"rate": 0.1, "pattern": "element"}},
    "dropattention": {"attention": {"rate": 0.1, "pattern": "element", "rescale": "normalized"}},
    "hiddencut": {
        "hidden": {"rate": 0.1, "pattern": "span", "rescale": "inverted"},
        "consistency": "js",
        "alpha": 1.0,
    },
    "hiddenkey": {
        "key": {"rate": 0.1, "pattern": "column"},
        "hidden": {"rate": 0.1, "pattern": "element", "rescale": "inverted"},
        "consistency": "kl",
        "alpha": 1.0,
    },
    "hiddenkey_nokl": {
        "key": {"rate": 0.1, "pattern": "column"},
        "hidden": {"rate": 0.1, "pattern": "element", "rescale": "inverted"},
    },
}


class DropoutConfig(_Strict):
    """A point of the framework. Build one from a preset and override what you need::

        DropoutConfig(preset="hiddenkey", key={"rate": 0.2, "pattern": "column"}, alpha=0.5)

    Fields given explicitly replace the preset's value; a position block given partly keeps the preset's
    other settings for that position.
    """

    preset: Literal["none", "dropkey", "dropattention", "hiddencut", "hiddenkey", "hiddenkey_nokl", "custom"] = "none"
    key: KeyDropout = KeyDropout()
    attention: AttentionDropout = AttentionDropout()
    hidden: HiddenDropout = HiddenDropout()
    consistency: Consistency = "none"
    alpha: float = Field(0.0, ge=0.0, description="weight of the consistency loss between the two passes")
    # The paper regularizes decoder-only models (GPT2, LLaMA2) in the latter half of the layers only: dropping in
    # every layer gave little gain or degradation and was very rate-sensitive (noise amplified by a fragile
    # shallow forward pass).
    layers: str | list[int] = Field(
        "latter_half",
        description="decoder layers that get dropout: latter_half (the paper, for decoders), all, an inclusive "
        "0-based range 'A-B', or a list of indices",
    )
    # The paper back-propagates the consistency loss through one branch; the second pass is a no-grad branch.
    consistency_grad: ConsistencyGrad = Field(
        "one_branch",
        description="one_branch (the paper): the second pass runs without grad, loss = CE(pass 1) + alpha x "
        "C(p1, detached p2); both (R-Drop style): loss = mean CE of both passes + alpha x C, grads through both",
    )
    # Beyond the paper: models with attention sinks carry massive activations on their first token (SmolLM2-135M:
    # an MLP output of 27,000 in one channel); dropping it is most of the early-layer damage.
    keep_first_tokens: int = Field(
        0, ge=0, description="never drop the first N real tokens of each row (attention-sink protection): not as "
        "DropKey/DropAttention key columns, not in hidden dropout; 0 = the paper (no protection)",
    )
    # How column/span DropKey is computed; the semantics are the same either way (dropout/flex.py).
    key_kernel: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="column/span DropKey kernel: auto (fused FlexAttention kernel on CUDA when available, "
        "sdpa otherwise), sdpa (additive mask: the CPU path and the reference), flex (force the fused kernel; "
        "training needs CUDA)",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "none")
        if preset not in PRESETS:  # "custom" and typos: the Literal check reports the latter
            return data
        merged = dict(PRESETS[preset])
        for k, v in data.items():
            base = merged.get(k)
            # a position block given partly (e.g. only `rate`) keeps the preset's other settings
            merged[k] = {**base, **v} if isinstance(base, dict) and isinstance(v, dict) else v
        if data.get("consistency") == "none" and "alpha" not in data:
            merged["alpha"] = 0.0
        return merged

    @field_validator("alpha")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v == float("inf"):
            raise ValueError("alpha must be finite")
        return v

    @field_validator("layers")
    @classmethod
    def _layer_spec(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError(f"layers={v}: a list of distinct, non-negative layer indices (e.g. [12, 13, 14])")
            return sorted(v)
        if v in LAYER_WORDS:
            return v
        if re.fullmatch(r"\d+-\d+", v) and int(v.split("-")[0]) <= int(v.split("-")[1]):
            return v
        raise ValueError(f"layers={v!r}: use latter_half, all, an inclusive range like '12-29', or a list of indices")

    def layer_indices(self, n_layers: int) -> list[int]:
        """The 0-based indices of the decoder layers that get dropout in a model with `n_layers` layers."""
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "latter_half":
            return list(range(n_layers // 2, n_layers))
        chosen = list(range(int(self.layers.split("-")[0]), int(self.layers.split("-")[1]) + 1)) \
            if isinstance(self.layers, str) else list(self.layers)
        if chosen[-1] >= n_layers:
            raise ValueError(f"dropout.layers={self.layers}: the model has {n_layers} decoder layers "
                             f"(indices 0-{n_layers - 1}) (hint: latter_half or a range inside 0-{n_layers - 1})")
        return chosen

    @model_validator(mode="after")
    def _coherent(self) -> "DropoutConfig":
        if self.consistency != "none" and self.alpha == 0.0:
            raise ValueError(
                f"consistency={self.consistency!r} with alpha=0 runs two passes for nothing; "
                "set alpha > 0 (e.g. dropout.alpha=1.0) or consistency=none"
            )
        if self.consistency == "none" and self.alpha != 0.0:
            raise ValueError(
                f"alpha={self.alpha} has no effect with consistency='none'; "
                "set dropout.consistency=kl (or js), or alpha=0"
            )
        return self

    @model_validator(mode="after")
    def _kernel_applies(self) -> "DropoutConfig":
        if self.key_kernel == "flex" and not (self.key.rate > 0 and self.key.pattern in ("column", "span")
                                              and self.attention.rate == 0):
            raise ValueError(
                "key_kernel=flex fuses column/span DropKey (key.rate > 0) without DropAttention; this config has "
                f"key {self.key.pattern} p={self.key.rate:g}, attention p={self.attention.rate:g} "
                "(hint: key_kernel=auto picks the right kernel)"
            )
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DropoutConfig":
        return cls(preset=name, **overrides)

    # -- derived facts the rest of the package asks about ------------------------------------------
    @property
    def dual_pass(self) -> bool:
        """True when the loss needs two stochastic passes (run as one forward over [x; x])."""
        return self.consistency != "none"

    @property
    def touches_attention(self) -> bool:
        return self.key.rate > 0 or self.attention.rate > 0

    @property
    def touches_hidden(self) -> bool:
        return self.hidden.rate > 0

    @property
    def active(self) -> bool:
        return self.touches_attention or self.touches_hidden

    def describe(self) -> str:
        parts = []
        if self.key.rate:
            parts.append(f"key/{self.key.pattern} p={self.key.rate:g}")
        if self.attention.rate:
            parts.append(f"attention/{self.attention.pattern}/{self.attention.rescale} p={self.attention.rate:g}")
        if self.hidden.rate:
            parts.append(f"hidden/{self.hidden.pattern}/{self.hidden.rescale} p={self.hidden.rate:g}")
        if parts:
            parts.append(f"layers {self.layers if isinstance(self.layers, str) else self.layers}")
        if self.keep_first_tokens:
            parts.append(f"first {self.keep_first_tokens} tokens kept")
        if self.dual_pass:
            parts.append(f"{self.consistency} alpha={self.alpha:g} ({self.consistency_grad.replace('_', ' ')})")
        return f"{self.preset}: " + (", ".join(parts) if parts else "no dropout")
