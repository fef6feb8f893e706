"""The unified dropout framework as configuration: where x pattern x compensation, plus presets.

One `DropoutConfig` describes a point of the framework of "LoRA Meets Dropout under a Unified Framework"
(Wang et al., 2024). It is a pydantic model so that the recipe schema embeds it as is and every problem
is reported at start-up.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pattern = Literal["element", "column", "span"]

# DropKey masks above this size (per layer, bytes) are rebuilt in backward rather than kept for it: the memory
# planner (hiddenkey_ds/plan.py) models the same rule, so it lives here, importable without torch.
REBUILD_MASK_BYTES = 64 * 2**20
Consistency = Literal["none", "kl", "js"]


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
        if self.dual_pass:
            parts.append(f"{self.consistency} alpha={self.alpha:g}")
        return f"{self.preset}: " + (", ".join(parts) if parts else "no dropout")
