"""HiddenCut's position: dropout on the MLP (FFN) output of the selected decoder layers, before the residual
add, applied by a forward hook so that no model class is edited."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hiddenkey_ds.method.config import HiddenDropout
from hiddenkey_ds.method.masks import SinkTokens, expected_keep, hidden_keep


def make_mlp_hook(spec: HiddenDropout, sink: SinkTokens | None = None, gate: Callable[[], bool] | None = None):
    """A forward hook for an MLP module: masks (and rescales) its output in training mode only, and only while
    `gate()` is true when a gate is given. Positions the `sink` protects pass through untouched (neither dropped nor
    rescaled)."""

    def hook(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or spec.rate == 0 or (gate is not None and not gate()):
            return None
        if spec.pattern == "element" and spec.rescale == "inverted":
            masked = F.dropout(output, spec.rate, training=True)  # the same thing, one fused kernel
        else:
            batch, seq, dim = output.shape
            keep = hidden_keep(spec.pattern, spec.rate, batch, seq, dim, output.device)
            masked = output * keep
            if spec.rescale == "inverted":
                masked = masked / expected_keep(spec.pattern, spec.rate, seq if spec.pattern == "span" else dim)
        if sink is not None:
            protected = sink.positions(output.shape[0], output.shape[1], output.device)
            masked = torch.where(protected[..., None], output, masked)
        return masked

    return hook
