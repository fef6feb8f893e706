"""The training objective: cross-entropy on supervised tokens plus the consistency loss between two
stochastic passes.

    loss = 1/2 (CE_1 + CE_2) + alpha * C(p_1, p_2)
    C = 1/2 (KL(p_1 || p_2) + KL(p_2 || p_1))          consistency="kl"  (HiddenKey)
    C = 1/2 (KL(p_1 || m) + KL(p_2 || m)), m = (p_1 + p_2) / 2   consistency="js"  (HiddenCut)

Every term is a mean over supervised tokens (labels != -100, after the causal shift), computed in fp32,
with gradients through both passes (no stop-gradient). With consistency="none" it is plain CE of one pass.

Two design points matter for speed and for DeepSpeed:
- Both passes run as ONE forward over the concatenated batch [x; x] and one backward: two forwards before
  one backward make ZeRO-1/2 reduce a partition twice and double ZeRO-3's all-gathers. The dropout masks
  are drawn per batch row, so the two halves get independent masks.
- The LM head runs only on supervised positions, in chunks of `chunk_tokens`, each chunk under activation
  checkpointing: the loss never holds a (batch x sequence x vocabulary) tensor, and its peak memory is
  bounded by one chunk's logits whatever the number of supervised tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hiddenkey_ds.dropout import DropoutConfig, apply_dropout, unwrap_model


class LossOutput(NamedTuple):
    """A NamedTuple so that ZeRO-3's module hooks see the tensors in it (it walks tuples, not dataclasses)."""

    loss: torch.Tensor            # scalar with grad
    ce: torch.Tensor              # detached, same normalisation as loss
    consistency: torch.Tensor     # detached (0 for a single pass)
    n_tokens: torch.Tensor        # supervised tokens of one pass
    token_correct: torch.Tensor   # argmax == label at supervised positions (pass 1)
    seq_correct: torch.Tensor     # sequences with every supervised token right (pass 1)
    n_seqs: torch.Tensor          # sequences with at least one supervised token


def consistency_terms(logp1: torch.Tensor, logp2: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token consistency C(p1, p2) from log-probabilities (N, V) -> (N,)."""
    p1, p2 = logp1.exp(), logp2.exp()
    if kind == "kl":
        # KL(p1||p2) + KL(p2||p1) = sum (p1 - p2)(log p1 - log p2)
        return 0.5 * ((p1 - p2) * (logp1 - logp2)).sum(-1)
    if kind == "js":
        logm = torch.logaddexp(logp1, logp2) - torch.log(torch.tensor(2.0, device=logp1.device))
        return 0.5 * ((p1 * (logp1 - logm)).sum(-1) + (p2 * (logp2 - logm)).sum(-1))
    raise ValueError(f"unknown consistency {kind!r}")


def _head_chunk(lm_head: torch.nn.Module, h1: torch.Tensor, h2: torch.Tensor | None, y: torch.Tensor,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_sum, consistency_sum, correct per token) for one chunk of supervised positions."""
    logp1 = F.log_softmax(lm_head(h1).float(), dim=-1)
    correct = logp1.detach().argmax(-1) == y
    ce = F.nll_loss(logp1, y, reduction="sum")
    if h2 is None:
        return ce, ce.new_zeros(()), correct
    logp2 = F.log_softmax(lm_head(h2).float(), dim=-1)
    ce = 0.5 * (ce + F.nll_loss(logp2, y, reduction="sum"))
    cons = consistency_terms(logp1, logp2, kind).sum() if kind != "none" else ce.new_zeros(())
    return ce, cons, correct


class HiddenKeyObjective(torch.nn.Module):
    """Wraps a (PEFT) causal LM: forward(input_ids, attention_mask, labels) -> LossOutput.

    Give this module, not the bare model, to `deepspeed.initialize`, so that the whole loss (both passes
    and the head) runs inside the engine's forward.
    """

    def __init__(self, model: torch.nn.Module, config: DropoutConfig, chunk_tokens: int = 1024,
                 apply: bool = True):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model = model
        self.config = config
        self.chunk_tokens = chunk_tokens
        if apply:
            apply_dropout(model, config)

    def _decoder_and_head(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        base = unwrap_model(self.model)
        return base.get_decoder(), base.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None) -> LossOutput:
        decoder, lm_head = self._decoder_and_head()
        batch = input_ids.shape[0]
        dual = self.training and self.config.dual_pass
        if dual:
            input_ids = torch.cat([input_ids, input_ids])
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask])
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

        targets = labels[:, 1:]
        supervised = targets != -100
        y = targets[supervised]
        h1 = hidden[:batch, :-1][supervised]
        h2 = hidden[batch:, :-1][supervised] if dual else None
        n = y.numel()

        ce_sum = cons_sum = hidden.new_zeros((), dtype=torch.float32)
        correct = []
        for start in range(0, n, self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)
            args = (lm_head, h1[part], None if h2 is None else h2[part], y[part], self.config.consistency)
            if torch.is_grad_enabled() and h1.requires_grad:
                # reentrant: the recompute calls lm_head as a module again, so ZeRO-3 re-gathers its weight
                # (the non-reentrant variant rejects a parameter whose storage ZeRO-3 swapped meanwhile)
                ce, cons, ok = checkpoint(_head_chunk, *args, use_reentrant=True)
            else:
                ce, cons, ok = _head_chunk(*args)
            ce_sum, cons_sum = ce_sum + ce, cons_sum + cons
            correct.append(ok)

        denom = normalizer if normalizer is not None else max(n, 1)
        loss = (ce_sum + self.config.alpha * cons_sum) / denom
        if n == 0:
            # keep every trainable parameter in the graph: DeepSpeed expects a gradient for each
            loss = loss + lm_head(hidden[:, :1]).float().sum() * 0.0

        correct_t = torch.cat(correct) if correct else y.new_zeros(0, dtype=torch.bool)
        rows = supervised.nonzero()[:, 0]
        wrong_per_row = torch.zeros(batch, dtype=torch.long, device=y.device).index_add_(
            0, rows, (~correct_t).long())
        has_tokens = supervised.any(dim=1)
        return LossOutput(
            loss=loss,
            ce=(ce_sum / denom).detach(),
            consistency=(cons_sum / denom).detach(),
            n_tokens=torch.tensor(n, device=y.device),
            token_correct=correct_t.sum(),
            seq_correct=(has_tokens & (wrong_per_row == 0)).sum(),
            n_seqs=has_tokens.sum(),
        )
