"""DropKey and DropAttention as an attention function registered with transformers' AttentionInterface.

The function is registered under ATTN_NAME together with the matching mask function: without the latter,
transformers hands a custom attention function `attention_mask=None` and padded batches silently attend
to padding.

Which dropout a given attention module applies is read from the attribute CONFIG_ATTR that
`apply_dropout` sets on it; modules without it, modules in eval mode and configs with no attention-side
dropout all take transformers' own sdpa path unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hiddenkey_ds.method import flex
from hiddenkey_ds.method.config import REBUILD_MASK_BYTES, DropoutConfig
from hiddenkey_ds.method.masks import SinkTokens, attention_keep, expected_keep

ATTN_NAME = "hiddenkey"
CONFIG_ATTR = "_hiddenkey_dropout"
SINK_ATTR = "_hiddenkey_sink"   # a masks.SinkTokens when dropout.keep_first_tokens > 0
GATE_ATTR = "_hiddenkey_gate"   # scoped handles: a callable, the dropout acts only while it returns True

# What DropKey adds to a dropped logit. Large enough that exp() of it is exactly 0 next to any kept logit
# in fp32/bf16/fp16, finite (so no -inf arithmetic and no NaN rows) and far from the causal/padding fill
# (finfo.min), so a dropped visible key always ranks above a future or padding key.
DROPKEY_FILL = 1.0e4


def dropkey_mask_bytes(batch: int, heads: int, q_len: int, k_len: int, dtype: torch.dtype) -> int:
    return batch * heads * q_len * k_len * torch.finfo(dtype).bits // 8


def _visible(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool (B|1, 1, Q, K): True where stock attention may look. `None` from the mask interface means
    plain causal attention with no padding (its `is_causal` fast path)."""
    if attention_mask is None:
        offset = k_len - q_len  # queries are the last q_len positions (cached decoding)
        q = torch.arange(q_len, device=device)[:, None] + offset
        return (torch.arange(k_len, device=device)[None, :] <= q)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    # an additive float mask handed in by the caller: anything far below zero is masked
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _rows_without_kept_key(visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Bool (B, H, Q): rows whose visible keys are all dropped.

    For column/span masks (keep of shape (B, H, 1, K)) this is a count by matrix product, so no
    (B, H, Q, K) temporary is built beyond the mask itself."""
    if keep.shape[-2] != 1:
        return ~(visible & keep).any(dim=-1)
    batch, heads, _, k_len = keep.shape
    vis = visible[:, 0].to(torch.float32)                                    # (Bv, Q, K)
    kept = keep[:, :, 0, :].to(torch.float32)                                # (B, H, K)
    if vis.shape[0] == 1:
        counts = vis[0] @ kept.permute(2, 0, 1).reshape(k_len, batch * heads)   # (Q, B*H)
        counts = counts.reshape(-1, batch, heads).permute(1, 2, 0)
    else:
        counts = torch.bmm(vis, kept.transpose(1, 2)).transpose(1, 2)       # (B, H, Q)
    return counts == 0


def _dropkey_mask(visible: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask (B, H, Q, K) for sdpa: 0 kept, -DROPKEY_FILL dropped, finfo.min invisible.

    A query whose visible keys are all dropped keeps them. With a fill distinct from the causal one such a
    row already attends only to its visible keys, but as softmax(l - DROPKEY_FILL), i.e. the undropped row
    up to rounding; defining it as "not dropped" makes that exact and is the same rule DropAttention's
    normalized rescaling needs (it has no kept mass to divide by)."""
    neg_min = torch.finfo(dtype).min
    if keep is None:  # no DropKey: the causal/padding mask alone
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, neg_min)
    drop = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, -DROPKEY_FILL)
    mask = torch.where(visible, drop, neg_min)
    b, h, q = _rows_without_kept_key(visible, keep).nonzero(as_tuple=True)
    if b.numel():
        vis_rows = visible[b if visible.shape[0] > 1 else torch.zeros_like(b), 0, q]   # (n, K)
        mask[b, h, q] = torch.where(vis_rows, 0.0, neg_min).to(dtype)
    return mask


def _dropkey_attention(query, key, value, visible, keep, dropout: float, scaling: float | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=_dropkey_mask(visible, keep, query.dtype),
                                          dropout_p=dropout, scale=scaling)


def _rescale_weights(weights: torch.Tensor, keep: torch.Tensor, rescale: str, expected: float) -> torch.Tensor:
    kept = weights * keep
    if rescale == "inverted":
        return kept / expected
    if rescale == "normalized":
        mass = kept.sum(dim=-1, keepdim=True)
        has_mass = mass > 0
        # safe denominator: a where() over a division by zero still back-propagates NaN
        normalized = kept / torch.where(has_mass, mass, torch.ones_like(mass))
        return torch.where(has_mass, normalized, weights)
    return kept


def hiddenkey_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg: DropoutConfig | None = getattr(module, CONFIG_ATTR, None)
    gate = getattr(module, GATE_ATTR, None)
    if cfg is None or not module.training or not cfg.touches_attention or (gate is not None and not gate()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{type(module).__name__} uses logit soft-capping or attention sinks, which the hiddenkey attention "
            "function does not implement; use only `hidden` dropout with this model"
        )
    # masks live on query heads, so grouped keys/values are expanded to one per query head
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    visible = _visible(attention_mask, q_len, k_len, query.device)

    sink: SinkTokens | None = getattr(module, SINK_ATTR, None)
    # the protected key columns (B, 1, 1, K): never dropped, for any query or head
    protected = sink.positions(batch, k_len, query.device)[:, None, None, :] if sink is not None else None

    keep = (attention_keep(cfg.key.pattern, cfg.key.rate, batch, heads, q_len, k_len, query.device)
            if cfg.key.rate > 0 else None)
    if keep is not None and protected is not None:
        keep = keep | protected

    if cfg.attention.rate == 0:
        if flex.use_fused(cfg.key_kernel, keep, query, dropout):  # column/span on CUDA: one FlexAttention kernel
            out = flex.dropkey_attention(query, key, value, None if attention_mask is None else visible, keep, scaling)
            return out.transpose(1, 2).contiguous(), None
        # DropKey alone stays on the fused kernel: the drop is one more additive mask. A large (B, H, Q, K)
        # mask is built inside a checkpoint so that backward rebuilds it instead of every layer keeping its
        # own (2 GiB per layer for LLaMA-2-7B at 4 x 2048 tokens in the dual pass); a small one is kept, which
        # saves the rebuild (~6% of a step at 4 x 256 tokens).
        if torch.is_grad_enabled() and dropkey_mask_bytes(batch, heads, q_len, k_len, query.dtype) > REBUILD_MASK_BYTES:
            out = checkpoint(_dropkey_attention, query, key, value, visible, keep, dropout, scaling,
                             use_reentrant=False)
        else:
            out = _dropkey_attention(query, key, value, visible, keep, dropout, scaling)
        return out.transpose(1, 2).contiguous(), None

    # DropAttention acts on the softmax output, so the weights must be materialized
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scale + _dropkey_mask(visible, keep, query.dtype)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    att = cfg.attention
    keep = attention_keep(att.pattern, att.rate, batch, heads, q_len, k_len, query.device)
    if protected is not None:
        keep = keep | protected
    weights = _rescale_weights(weights, keep, att.rescale, expected_keep(att.pattern, att.rate, k_len))
    if dropout > 0:
        weights = F.dropout(weights, p=dropout, training=True)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Idempotent: make ATTN_NAME known to both of transformers' interfaces."""
    AttentionInterface.register(ATTN_NAME, hiddenkey_attention_forward)
    # The stock sdpa mask: a bool mask, or None for plain causal attention without padding.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
