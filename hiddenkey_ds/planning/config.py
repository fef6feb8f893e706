"""What the memory estimate depends on, and how a recipe becomes it.

`PlanConfig` holds every input of the estimate (model shape, precision, LoRA, ZeRO, batch, the dropout method)
plus the rules it shares with hiddenkey_ds.method (which layers carry dropout, what the two passes share).
`config_from_recipe` reads a loaded recipe and its resolved DeepSpeed config into one; `shape_for` finds a
model's shape without loading (or building) the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from hiddenkey_ds.method.config import REBUILD_MASK_BYTES
from hiddenkey_ds.models.shapes import LINEAR_MODULES, ModelShape, resolve_shape, shape_from_config

GIB = 1024**3
PATTERNS = ("element", "column", "span")


@dataclass(frozen=True)
class PlanConfig:
    """Everything the estimate depends on. Build it with `config_from_recipe` or directly (tests)."""

    shape: ModelShape
    dtype: str = "bf16"                       # bf16 | fp32: base weights, LoRA, activations
    quantization: str = "none"                # none | 4bit | 8bit (frozen base linear layers)
    double_quant: bool = True
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    supervised_tokens: int | None = None      # per sequence; None = seq_len - 1 (every position)
    padded: bool = True                       # batches carry a padding mask (stock sdpa keeps a bool mask)
    gradient_checkpointing: bool = False
    dual_pass: bool = False                   # consistency loss: two stochastic passes
    consistency_grad: str = "one_branch"      # one_branch: pass 2 without grad; both: [h; h] with grad
    dropout_layers: str | tuple[int, ...] = "latter_half"  # dropout.layers: the decoder layers with dropout
    key_dropout: bool = False                 # DropKey: sdpa with an additive (B, H, S, S) logit mask
    key_pattern: str = "column"               # DropKey keep-mask: element (B, H, S, S); column, span (B, H, 1, S)
    attention_dropout: bool = False           # DropAttention: materialized attention weights
    attention_pattern: str = "element"        # DropAttention keep-mask, shaped as DropKey's
    hidden_dropout: bool = False              # element keep-mask on every MLP output
    hidden_pattern: str = "element"
    loss_chunk_tokens: int = 1024
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    device: str = "gpu"                       # gpu | cpu (cpu: no CUDA context, buckets count touched pages only)
    # DeepSpeed zero_optimization settings (DeepSpeed's defaults)
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    memory_efficient_linear: bool = True
    param_persistence_threshold: int = 100_000
    ds_config_name: str | None = None
    rebuild_mask_bytes: int = REBUILD_MASK_BYTES  # hiddenkey_ds.method's rule (a parameter so probes can move it)

    def __post_init__(self) -> None:
        checks = {
            "dtype": self.dtype in ("bf16", "fp32"),
            "quantization": self.quantization in ("none", "4bit", "8bit"),
            "zero_stage": self.zero_stage in (0, 1, 2, 3),
            "device": self.device in ("gpu", "cpu"),
            "key_pattern": self.key_pattern in PATTERNS,
            "attention_pattern": self.attention_pattern in PATTERNS,
            "hidden_pattern": self.hidden_pattern in PATTERNS,
            "consistency_grad": self.consistency_grad in ("one_branch", "both"),
            "offload_param": not self.offload_param or self.zero_stage == 3,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PlanConfig.{name}={getattr(self, name)!r} is not supported "
                                 "(offload_param needs zero_stage=3)" if name == "offload_param" else
                                 f"PlanConfig.{name}={getattr(self, name)!r} is not supported")
        for name in ("micro_batch", "grad_accum", "seq_len", "lora_r", "loss_chunk_tokens", "nodes",
                     "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.lora_targets) - set(LINEAR_MODULES)
        if unknown:
            raise ValueError(f"lora target_modules {sorted(unknown)} are not LLaMA linear layers "
                             f"({', '.join(LINEAR_MODULES)})")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    @property
    def passes(self) -> int:
        return 2 if self.dual_pass else 1

    @property
    def dropout_active(self) -> bool:
        return self.key_dropout or self.attention_dropout or self.hidden_dropout

    def dropout_layer_indices(self) -> list[int]:
        """The decoder layers hiddenkey_ds.method applies dropout to (DropoutConfig.layer_indices' rule)."""
        if not self.dropout_active:
            return []
        from hiddenkey_ds.method.config import DropoutConfig

        spec = list(self.dropout_layers) if isinstance(self.dropout_layers, tuple) else self.dropout_layers
        return DropoutConfig(layers=spec).layer_indices(self.shape.layers)

    def shared_prefix(self) -> int:
        """Layers the two passes share, run once (HiddenKeyObjective._shared_prefix): those before the first
        layer with dropout, unless PEFT's lora_dropout makes the passes differ earlier."""
        selected = self.dropout_layer_indices()
        if not self.dual_pass or not selected or self.lora_dropout > 0:
            return 0
        return min(selected)

    def grad_rows(self, layer: int) -> int:
        """Sequences a decoder layer runs with autograd recording: the micro-batch, doubled from the shared
        prefix on when both passes back-propagate ([h; h]); with one_branch the second pass replays without grad."""
        doubled = self.dual_pass and self.consistency_grad == "both" and layer >= self.shared_prefix()
        return self.micro_batch * (2 if doubled else 1)



# -- recipe -> PlanConfig ---------------------------------------------------------------------------------------

def shape_for(name: str) -> ModelShape:
    """model.name -> shape. builtin: models read their cached build's config.json when one exists (plan never
    builds a model: that takes minutes), else their definition in hiddenkey_ds.models.builtin / the table."""
    if name.startswith("builtin:"):
        from hiddenkey_ds.models.builtin import BuiltinModelError, builtin_config

        try:
            config = builtin_config(name)
        except BuiltinModelError as err:
            raise ValueError(str(err)) from None  # the planner reports bad input as ValueError, exit 2
        if config is not None:
            return shape_from_config(config, name)
    return resolve_shape(name)


def config_from_recipe(recipe, ds: dict, nodes: int, gpus_per_node: int, gpu_mem_gib: float,
                       shape: ModelShape | None = None, seq_len: int | None = None,
                       supervised_tokens: int | None = None, device: str = "gpu") -> PlanConfig:
    """A PlanConfig from a loaded recipe and its resolved DeepSpeed config."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    targets = recipe.lora.target_modules
    targets = LINEAR_MODULES if targets == "all-linear" else tuple(targets)
    dropout = recipe.dropout
    seq = seq_len or recipe.data.max_length
    if supervised_tokens is None and recipe.data.format == "classification":
        supervised_tokens = min(seq - 1, 8)  # a verbalizer answer + EOS; sft supervises up to every position
    return PlanConfig(
        shape=shape or shape_for(recipe.model.name),
        dtype=recipe.model.dtype,
        quantization=recipe.model.quantization,
        double_quant=recipe.model.double_quant,
        lora_r=recipe.lora.r,
        lora_targets=targets,
        lora_dropout=recipe.lora.dropout,
        zero_stage=stage,
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None),
        offload_param=zero.get("offload_param", {}).get("device", "none") not in ("none", None),
        micro_batch=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum,
        seq_len=seq,
        supervised_tokens=supervised_tokens,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        dual_pass=dropout.dual_pass,
        consistency_grad=dropout.consistency_grad,
        dropout_layers=tuple(dropout.layers) if isinstance(dropout.layers, list) else dropout.layers,
        key_dropout=dropout.key.rate > 0,
        key_pattern=dropout.key.pattern,
        attention_dropout=dropout.attention.rate > 0,
        attention_pattern=dropout.attention.pattern,
        hidden_dropout=dropout.hidden.rate > 0,
        hidden_pattern=dropout.hidden.pattern,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_mem_gib=gpu_mem_gib,
        device=device,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
        memory_efficient_linear=bool(zero.get("memory_efficient_linear", True)),
        param_persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        ds_config_name=recipe.run.deepspeed,
    )
