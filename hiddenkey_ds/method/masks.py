"""Keep-masks for the three dropout patterns.

Every mask is drawn with the torch RNG of the tensor's device (no private generator): activation
checkpointing saves and restores exactly that RNG state, so a recomputed layer redraws the same masks
and gradients are identical with and without gradient checkpointing.

A keep-mask is a bool tensor, True = kept. Shapes broadcast against what they mask:

    attention logits / weights (B, H, Q, K):  element -> (B, H, Q, K)   column, span -> (B, H, 1, K)
    hidden representations   (B, S, D):       element -> (B, S, D)      column -> (B, 1, D)   span -> (B, S, 1)
"""
from __future__ import annotations

import torch


def _bernoulli_keep(shape: tuple[int, ...], rate: float, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, device=device) >= rate


def span_length(rate: float, length: int) -> int:
    """Length of the dropped run: round(rate * length), so the expected drop rate is `rate` (HiddenCut's
    convention, where the span ratio is the drop rate). Sequences too short for one position drop none."""
    return min(length, int(round(rate * length)))


def _span_keep(lead: tuple[int, ...], length: int, rate: float, device: torch.device) -> torch.Tensor:
    """One contiguous dropped run of `span_length` positions per leading index, uniform start."""
    n = span_length(rate, length)
    if n == 0:
        return torch.ones(*lead, length, dtype=torch.bool, device=device)
    start = torch.randint(0, length - n + 1, (*lead, 1), device=device)
    pos = torch.arange(length, device=device)
    return (pos < start) | (pos >= start + n)


def attention_keep(pattern: str, rate: float, batch: int, heads: int, q_len: int, k_len: int,
                   device: torch.device) -> torch.Tensor:
    """Keep-mask over attention logits/weights of shape (B, H, Q, K); one bit per (row, query head, key)
    for `column`, shared by every query, i.e. the key is dropped for that head."""
    if pattern == "element":
        return _bernoulli_keep((batch, heads, q_len, k_len), rate, device)
    if pattern == "column":
        return _bernoulli_keep((batch, heads, 1, k_len), rate, device)
    if pattern == "span":
        return _span_keep((batch, heads), k_len, rate, device).unsqueeze(2)
    raise ValueError(f"unknown dropout pattern {pattern!r}; expected element, column or span")


def hidden_keep(pattern: str, rate: float, batch: int, seq: int, dim: int, device: torch.device) -> torch.Tensor:
    """Keep-mask over hidden representations (B, S, D): `column` drops a channel for every token of a row,
    `span` drops whole token rows."""
    if pattern == "element":
        return _bernoulli_keep((batch, seq, dim), rate, device)
    if pattern == "column":
        return _bernoulli_keep((batch, 1, dim), rate, device)
    if pattern == "span":
        return _span_keep((batch,), seq, rate, device).unsqueeze(-1)
    raise ValueError(f"unknown dropout pattern {pattern!r}; expected element, column or span")


def expected_keep(pattern: str, rate: float, length: int) -> float:
    """The fraction a keep-mask keeps on average: what inverted rescaling divides by."""
    if pattern == "span":
        return 1.0 - span_length(rate, length) / length if length else 1.0
    return 1.0 - rate


class SinkTokens:
    """Where each row's first `n` real tokens are, for the forward pass under way (attention-sink protection).

    A forward pre-hook on the decoder records the first real position of every row from its 2-D padding mask
    (left padding moves it); the attention function and the hidden-dropout hooks then keep those positions.
    A batch that reaches a layer duplicated ([x; x], the dual pass) maps row r to row r mod the recorded batch.
    """

    def __init__(self, n: int):
        self.n = n
        self.first: torch.Tensor | None = None

    def record(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.first = mask.to(torch.int64).argmax(dim=1)   # index of the first 1: right padding gives 0
        elif ids is not None:
            self.first = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
        else:
            self.first = None

    def positions(self, rows: int, length: int, device: torch.device) -> torch.Tensor:
        """Bool (rows, length): True at the protected positions."""
        first = self.first if self.first is not None else torch.zeros(1, dtype=torch.int64, device=device)
        if rows != first.shape[0]:
            if rows % first.shape[0]:
                raise RuntimeError(f"a batch of {rows} rows reached a dropout layer after a forward of "
                                   f"{first.shape[0]} rows; keep_first_tokens cannot place the sink")
            first = first.repeat(rows // first.shape[0])
        pos = torch.arange(length, device=device)
        first = first.to(device)[:, None]
        return (pos >= first) & (pos < first + self.n)
