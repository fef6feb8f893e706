"""The fused DropKey path: column and span DropKey as one FlexAttention kernel (the CUDA path of `key`).

On a GPU the sdpa path's additive float mask takes `scaled_dot_product_attention` off its flash kernel (to
the memory-efficient or math kernel) and computes the masked upper triangle. Column and span DropKey are a
per-(row, head, key) mask on top of causal attention, which FlexAttention compiles into one kernel that skips
fully masked blocks:

    block mask  (what may be looked at)  causal + padding, from the mask transformers hands the layer; it does
                                         not depend on the layer, so it is built once per forward and shared by
                                         every layer (cached on the mask tensor's identity)
    score_mod   (what DropKey changes)   a dropped visible key's logit - DROPKEY_FILL, unless its query row has
                                         no kept visible key: the layer's keep-mask (B, H, K) and that row flag
                                         (B, H, Q) are the only per-layer inputs

Semantics are the sdpa path's (`attention._dropkey_mask`), tested against it: a dropped visible key gets the
finite fill, invisible keys (future, padding) are excluded, a query row whose visible keys are all dropped
keeps them, and the keep-mask is whatever the attention function drew (`torch.rand` on the device, so
gradient checkpointing replays it). One difference, on rows that see no key at all (only left-padding
queries): the sdpa path averages every value there, FlexAttention returns 0; no real token and no loss term
reads those rows, so gradients are the same.

Element DropKey ((B, H, Q, K) masks) and DropAttention (which needs the weights) stay on the explicit path.
FlexAttention has a CPU forward but no CPU backward (torch 2.13): `auto` uses it on CUDA only; on CPU it
serves the equivalence tests (forward, eager).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the sdpa path only
    create_block_mask = flex_attention = None

_compiled: Any = None
# block masks of the last few visibility masks: (weakref to the mask or None for plain causal, key, entry)
_CACHE: list[tuple[Any, tuple, dict]] = []
_CACHE_SIZE = 4


def available() -> bool:
    """FlexAttention is importable (torch >= 2.5)."""
    return flex_attention is not None


def fuses(pattern: str) -> bool:
    """Key-dropout patterns the fused path implements: one bit per (row, head, key)."""
    return pattern in ("column", "span")


def use_fused(kernel: str, keep: torch.Tensor | None, query: torch.Tensor, dropout: float) -> bool:
    """The dispatch rule for a DropKey-only layer (no DropAttention) whose keep-mask is `keep`.

    `auto`: fused on CUDA for column/span masks when FlexAttention is available, the sdpa path otherwise;
    `sdpa`: never; `flex`: always (an error where FlexAttention cannot run it)."""
    if kernel == "sdpa" or keep is None or keep.shape[-2] != 1 or dropout > 0:
        if kernel == "flex" and (keep is None or keep.shape[-2] != 1):
            raise ValueError("dropout.key_kernel=flex fuses column/span DropKey only; element masks use sdpa")
        if kernel == "flex" and dropout > 0:
            raise ValueError("dropout.key_kernel=flex: FlexAttention has no attention-probability dropout "
                             f"(the model passes dropout={dropout}); use key_kernel=sdpa or auto")
        return False
    if kernel == "flex":
        if not available():
            raise RuntimeError(f"dropout.key_kernel=flex needs FlexAttention (torch >= 2.5), this is torch "
                               f"{torch.__version__}; use key_kernel=auto or sdpa")
        if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError(f"dropout.key_kernel=flex: FlexAttention has no backward on CPU in torch "
                               f"{torch.__version__}; use key_kernel=auto (sdpa on CPU) or train on a GPU")
        return True
    return query.device.type == "cuda" and available()


def _flex(compile: bool):
    """The compiled FlexAttention (the fused kernel), or the eager one (the unfused reference, CPU tests)."""
    global _compiled
    if not compile:
        return flex_attention
    if _compiled is None:
        # default dynamic=None: the first call specializes on its shapes, the first change of sequence length
        # recompiles once with dynamic shapes, later lengths reuse that kernel
        _compiled = torch.compile(flex_attention)
    return _compiled


# -- the layer-independent part: which keys a query may look at ----------------------------------------------
def _causal_mod(offset: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset
    return mask_mod


def _padded_causal_mod(offset: int, real: torch.Tensor):
    batched = real.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & real[b if batched else 0, kv_idx]
    return mask_mod


def _dense_mod(visible: torch.Tensor):
    batched = visible.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        return visible[b if batched else 0, 0, q_idx, kv_idx]
    return mask_mod


def _structure(visible: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> dict:
    """Block mask + how to find all-dropped rows, for one visibility mask; built once per forward.

    entry["real"]: (B, K) bool when visibility is exactly causal & key padding (then a row's visible keys are
    the real ones up to its position, and all-dropped rows are a prefix count); None for other masks
    (sliding windows, ...), which take the general count."""
    offset = k_len - q_len  # queries are the last q_len positions (as attention._visible)
    if visible is None:
        block = create_block_mask(_causal_mod(offset), None, None, q_len, k_len, device=device)
        return {"block": block, "real": torch.ones(1, k_len, dtype=torch.bool, device=device)}
    causal = (torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset)
    real = visible[:, 0].any(dim=1)                                            # (Bv, K): keys someone sees
    structured = bool(torch.equal(visible[:, 0], causal[None] & real[:, None, :]))
    batch = visible.shape[0] if visible.shape[0] > 1 else None
    # causal & padding: the kernel's partial blocks read a (B, K) vector instead of the (B, Q, K) mask
    mask_mod = _padded_causal_mod(offset, real.contiguous()) if structured else _dense_mod(visible)
    block = create_block_mask(mask_mod, batch, None, q_len, k_len, device=device)
    return {"block": block, "real": real if structured else None}


def block_structure(visible: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> dict:
    """`_structure`, cached on the identity of `visible` (the same mask object reaches every layer of a
    forward) or on (q_len, k_len, device) for plain causal attention."""
    key = (q_len, k_len, str(device))
    for ref, k, entry in _CACHE:
        # a dead weakref returns None: compare identities only for a live mask
        if k == key and (ref is None if visible is None else (ref is not None and ref() is visible)):
            return entry
    entry = _structure(visible, q_len, k_len, device)
    _CACHE.insert(0, (None if visible is None else weakref.ref(visible), key, entry))
    del _CACHE[_CACHE_SIZE:]
    return entry


def clear_cache() -> None:
    _CACHE.clear()


# -- the layer's part: the keep-mask and the rows that keep everything -------------------------------------------
def rows_without_kept_key(structure: dict, visible: torch.Tensor | None, keep: torch.Tensor,
                          q_len: int) -> torch.Tensor:
    """Bool (B, H, Q): query rows whose visible keys are all dropped (they keep them)."""
    k_len = keep.shape[-1]
    real = structure["real"]
    if real is None:  # a general visibility mask: count kept visible keys per row
        from hiddenkey_ds.method.attention import _rows_without_kept_key

        return _rows_without_kept_key(visible, keep)
    kept = keep[:, :, 0, :] & real[:, None, :]                                 # (B, H, K) kept real keys
    # index of the first kept real key (K if none): a row sees keys up to its position + offset
    first = (kept.cumsum(dim=-1) == 0).sum(dim=-1)                             # (B, H)
    pos = torch.arange(q_len, device=keep.device) + (k_len - q_len)
    return pos[None, None, :] < first[:, :, None]


def dropkey_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      visible: torch.Tensor | None, keep: torch.Tensor | None, scaling: float | None,
                      compile: bool | None = None) -> torch.Tensor:
    """Column/span DropKey attention, (B, H, Q, D) like `attention._dropkey_attention`.

    `visible`: bool (B|1, 1, Q, K) as `attention._visible` returns it, or None for plain causal attention
    (transformers' mask function returns None without padding); `keep`: bool (B, H, 1, K) or None (no
    DropKey: plain masked attention, for comparisons). `compile` defaults to True on CUDA: the fused kernel;
    False runs FlexAttention's eager reference (CPU, forward only)."""
    from hiddenkey_ds.method.attention import DROPKEY_FILL

    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    structure = block_structure(visible, q_len, k_len, query.device)
    score_mod = None
    if keep is not None:
        keep_bhk = keep[:, :, 0, :].expand(batch, heads, k_len).contiguous()
        norow = rows_without_kept_key(structure, visible, keep, q_len).expand(batch, heads, q_len).contiguous()
        fill = DROPKEY_FILL

        def score_mod(score, b, h, q_idx, kv_idx):
            kept = keep_bhk[b, h, kv_idx] | norow[b, h, q_idx]
            return torch.where(kept, score, score - fill)

    run = _flex(query.is_cuda if compile is None else compile)
    return run(query, key, value, score_mod=score_mod, block_mask=structure["block"], scale=scaling)
