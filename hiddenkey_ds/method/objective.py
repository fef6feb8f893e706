"""The training objective: cross-entropy on supervised tokens plus the consistency loss between two
stochastic passes.

    consistency_grad="one_branch" (the paper): pass 2 runs without grad
        loss = CE_1 + alpha * C(p_1, sg(p_2))
    consistency_grad="both" (R-Drop style): gradients through both passes
        loss = 1/2 (CE_1 + CE_2) + alpha * C(p_1, p_2)

    C = 1/2 (KL(p_1 || p_2) + KL(p_2 || p_1))                    consistency="kl"  (HiddenKey)
    C = 1/2 (KL(p_1 || m) + KL(p_2 || m)), m = (p_1 + p_2) / 2   consistency="js"  (HiddenCut)

Every term is a mean over supervised tokens (labels != -100, after the causal shift), computed in fp32. With
consistency="none" it is plain CE of one pass.

Design points that matter for speed and for DeepSpeed:
- Both passes share the layers before the first one with dropout. No mask is drawn there and the weights and
  input are the same, so the two passes are identical up to that layer: it runs once. From that layer on,
  `both` duplicates the rows ([h; h], one batch: a second forward of the same LoRA weights before one backward
  would make ZeRO-1/2 reduce a partition twice) and `one_branch` replays the remaining layers without grad.
  Both are exact: tested against running the two passes in full.
- One backward per micro-batch, whatever the mode.
- The LM head runs only on supervised positions, in chunks of `chunk_tokens`, each chunk under activation
  checkpointing: the loss never holds a (batch x sequence x vocabulary) tensor. Under ZeRO-3 every rank makes
  the same number of head calls (the head's weight is gathered collectively), whatever its own token count.
  What the model's own forward does to the head's output (Gemma-2's soft-capping, ...) is applied to each chunk
  (method/heads.py).
- The dropout hooks, the attention-implementation switch and this module's layer hooks act only inside this
  module's forward and the backward of the loss it returned (where gradient checkpointing recomputes layers):
  a plain call of the model in between is the stock model. One objective per model: a new one removes the
  previous one's hooks (using the old one then raises); `remove()` (or `with HiddenKeyObjective(...) as o:`)
  takes everything off. With every dropout off nothing is attached at all, so plain LoRA trains any layout.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hiddenkey_ds.method.apply import apply_dropout, dropout_handle, unwrap_model
from hiddenkey_ds.method.config import DropoutConfig
from hiddenkey_ds.method.heads import logit_transform

_OBJECTIVE_ATTR = "_hiddenkey_objective"


class LossOutput(NamedTuple):
    """A NamedTuple so that ZeRO-3's module hooks see the tensors in it (it walks tuples, not dataclasses)."""

    loss: torch.Tensor            # scalar with grad
    ce: torch.Tensor              # detached, same normalisation as loss
    consistency: torch.Tensor     # detached (0 for a single pass)
    n_tokens: torch.Tensor        # supervised tokens of one pass
    token_correct: torch.Tensor   # argmax == label at supervised positions (pass 1)
    seq_correct: torch.Tensor     # sequences with every supervised token right (pass 1)
    n_seqs: torch.Tensor          # sequences with at least one supervised token
    # with `choice_ids`: sequences whose first supervised token is the argmax among the choices' first tokens
    choice_correct: torch.Tensor | None = None


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
                kind: str, one_branch: bool, post=None, choice_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_sum, consistency_sum, correct per token, choice-restricted correct per token) for one chunk of
    supervised positions (the last is `correct` when no `choice_ids` are given); `post` is what the model's
    forward applies after the head (heads.logit_transform; None: nothing)."""
    post = post or (lambda logits: logits)
    logp1 = F.log_softmax(post(lm_head(h1).float()), dim=-1)
    correct = logp1.detach().argmax(-1) == y
    choice_ok = correct
    if choice_ids is not None:
        choice_ok = choice_ids[logp1.detach()[:, choice_ids].argmax(-1)] == y
    ce = F.nll_loss(logp1, y, reduction="sum")
    if h2 is None:
        return ce, ce.new_zeros(()), correct, choice_ok
    if one_branch:
        with torch.no_grad():
            logp2 = F.log_softmax(post(lm_head(h2).float()), dim=-1)
    else:
        logp2 = F.log_softmax(post(lm_head(h2).float()), dim=-1)
        ce = 0.5 * (ce + F.nll_loss(logp2, y, reduction="sum"))
    return ce, consistency_terms(logp1, logp2, kind).sum(), correct, choice_ok


def _batch_rows(value: Any, rows: int, done: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """`value` with every batch-major tensor (>= 2 dims, leading dim `rows`) duplicated as [v; v]. `done` maps
    tensors already duplicated in this forward to their copy: every layer gets the same mask, so one copy
    serves them all (and is all that checkpointed layers keep)."""
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != rows:
            return value
        if id(value) not in done:
            done[id(value)] = (value, torch.cat([value, value]))  # the original is kept so its id stays unique
        return done[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_rows(v, rows, done) for v in value)
    return value


class HiddenKeyObjective(torch.nn.Module):
    """Wraps a (PEFT) causal LM: forward(input_ids, attention_mask, labels) -> LossOutput.

    Give this module, not the bare model, to `deepspeed.initialize`, so that the whole loss (both passes
    and the head) runs inside the engine's forward. `share_prefix=False` runs the two passes in full from the
    first layer (the reference the shared version is tested against).
    """

    def __init__(self, model: torch.nn.Module, config: DropoutConfig, chunk_tokens: int = 1024,
                 apply: bool = True, share_prefix: bool = True):
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        base = unwrap_model(model)
        self.model = model
        self.config = config
        self.chunk_tokens = chunk_tokens
        self._post_head = logit_transform(base)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._removed = False
        self._depth = 0   # > 0 inside forward, and inside the backward of its loss
        previous = getattr(base, _OBJECTIVE_ATTR, None)
        if previous is not None:
            previous.remove()  # one objective per model: its hooks would stack on ours
        # `apply=False` borrows what apply_dropout already attached (always on, the caller's to remove); with every
        # dropout off nothing is attached and no layout is required
        if apply and config.active:
            self._handle = apply_dropout(model, config, scoped=True)
        else:
            self._handle = None if apply else dropout_handle(model)
        self._owns_handle = apply and self._handle is not None
        self._layers = self._handle.layers if self._handle is not None else []
        selected = self._handle.selected if self._handle is not None and config.active else []
        self.prefix = self._shared_prefix(selected) if share_prefix and config.dual_pass else 0
        # per-forward state of the layer hooks below
        self._dup_rows: int | None = None                     # both: duplicate batches of this many rows
        self._dup_done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._capture: dict[int, tuple[tuple, dict]] | None = None   # one_branch: inputs of the replayed layers
        if self.prefix:
            hook = self._duplicate if config.consistency_grad == "both" else self._record
            for i in range(self.prefix, len(self._layers)):
                self._hooks.append(self._layers[i].register_forward_pre_hook(
                    lambda module, args, kwargs, i=i: hook(i, module, args, kwargs) if self._depth else None,
                    with_kwargs=True))
        # a plain attribute would make the model a submodule of itself through this module (a cycle for
        # named_modules and for DeepSpeed): keep the back-reference out of nn.Module's registry
        object.__setattr__(base, _OBJECTIVE_ATTR, self)

    # -- hook lifetime ----------------------------------------------------------------------------------------
    def _enter(self) -> None:
        self._depth += 1
        if self._owns_handle:
            self._handle.enter()

    def _exit(self) -> None:
        if self._depth:
            self._depth -= 1
            if self._owns_handle:
                self._handle.exit()

    def _check_usable(self) -> None:
        if self._removed:
            raise RuntimeError("this HiddenKeyObjective was removed, or replaced by a newer HiddenKeyObjective on the "
                               "same model; build a new one to train through it")
        if self._owns_handle and dropout_handle(self.model) is not self._handle:
            raise RuntimeError("the dropout this HiddenKeyObjective attached was removed or replaced (apply_dropout / "
                               "remove_dropout on its model); build a new objective")

    def remove(self) -> None:
        """Take this objective's hooks and dropout off the model (idempotent)."""
        if self._removed:
            return
        self._removed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._depth = 0
        if self._owns_handle:
            self._handle.remove()
        base = unwrap_model(self.model)
        if getattr(base, _OBJECTIVE_ATTR, None) is self:
            object.__delattr__(base, _OBJECTIVE_ATTR)

    @contextlib.contextmanager
    def activated(self):
        """The objective's dropout (and hooks) on for calls outside its forward: references that run the model
        itself, measurements of `_passes`."""
        self._check_usable()
        self._enter()
        try:
            yield self
        finally:
            self._exit()

    def __enter__(self) -> "HiddenKeyObjective":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the shared prefix ----------------------------------------------------------------------------------
    def _shared_prefix(self, selected: list[int]) -> int:
        """Index of the first layer where the two passes can differ; 0 when nothing can be shared."""
        if not selected:
            return 0
        k = min(selected)
        decoder = unwrap_model(self.model).get_decoder()
        if not isinstance(getattr(decoder, "norm", None), torch.nn.Module):
            return 0  # the replay needs the final norm by name
        tail = {id(m) for layer in self._layers[k:] for m in layer.modules()}
        for m in decoder.modules():
            if id(m) in tail:
                continue
            # anything else random before layer k (PEFT's lora_dropout, a model's own attention dropout) makes
            # the passes differ there
            if isinstance(m, torch.nn.Dropout) and m.p > 0:
                return 0
            if float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
                return 0
        return k

    def _duplicate(self, i: int, module, args, kwargs):
        """both: from the first dropout layer on, the batch becomes [h; h] and so does every batch-major input."""
        rows = self._dup_rows
        if rows is None or not module.training:
            return None
        if i == self.prefix:  # the hidden states arrive with `rows` rows; B == 1 needs it said explicitly
            if args:
                args = (torch.cat([args[0], args[0]]), *args[1:])
            else:
                kwargs["hidden_states"] = torch.cat([kwargs["hidden_states"]] * 2)
        if rows > 1:
            kwargs = {k: _batch_rows(v, rows, self._dup_done) for k, v in kwargs.items()}
        return args, kwargs

    def _record(self, i: int, module, args, kwargs) -> None:
        if self._capture is not None:
            self._capture[i] = (args, kwargs)

    def _replay(self) -> torch.Tensor:
        """one_branch: layers prefix.. and the final norm again, without grad, on pass 1's input of layer `prefix`."""
        captured, self._capture = self._capture, None
        args, kwargs = captured[self.prefix]
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        layers = self._layers[self.prefix:]
        with torch.no_grad(), _checkpointing_off(layers):
            for i, layer in enumerate(layers, self.prefix):
                args, kwargs = captured[i]
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                out = layer(hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return unwrap_model(self.model).get_decoder().norm(hidden)

    # -- the loss -------------------------------------------------------------------------------------------
    def _passes(self, decoder, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of pass 1, of pass 2 or None), each (B, S, D)."""
        batch = input_ids.shape[0]
        dual = self.training and self.config.dual_pass
        run = lambda ids, mask: decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        self._capture = None
        if not dual:
            self._dup_rows, self._dup_done = None, {}
            return run(input_ids, attention_mask), None
        if self.config.consistency_grad == "both":
            if self.prefix:
                # kept with the loss: a layer recomputed in backward must be duplicated again (_ActiveInBackward)
                self._dup_rows, self._dup_done = batch, {}
                hidden = run(input_ids, attention_mask)
            else:
                cat = lambda t: None if t is None else torch.cat([t, t])
                hidden = run(cat(input_ids), cat(attention_mask))
            return hidden[:batch], hidden[batch:]
        if self.prefix:
            self._capture = {}
            try:
                hidden = run(input_ids, attention_mask)
            except BaseException:
                self._capture = None
                raise
            return hidden, self._replay()
        hidden = run(input_ids, attention_mask)
        with torch.no_grad(), _checkpointing_off(list(decoder.modules())):
            return hidden, run(input_ids, attention_mask)

    def _head_calls(self, n: int, lm_head: torch.nn.Module, device: torch.device) -> int:
        """Chunks of the head: the most any rank needs when ZeRO-3 partitions the head's weight (a rank making
        fewer calls would leave the others waiting in an all-gather)."""
        chunks = -(-n // self.chunk_tokens)
        if dist.is_initialized() and dist.get_world_size() > 1 and any(hasattr(p, "ds_id") for p in lm_head.parameters()):
            t = torch.tensor(chunks, dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            chunks = int(t.item())
        return chunks

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None, choice_ids: torch.Tensor | None = None) -> LossOutput:
        self._check_usable()
        while self._depth:  # a backward that failed half-way never left
            self._exit()
        self._enter()
        try:
            out = self._loss(input_ids, labels, attention_mask, normalizer, choice_ids)
        finally:
            self._exit()
        if out.loss.requires_grad and (self._hooks or self._owns_handle):
            out = out._replace(loss=_ActiveInBackward.apply(out.loss, self, (self._dup_rows, self._dup_done)))
        return out

    def _loss(self, input_ids, labels, attention_mask, normalizer, choice_ids) -> LossOutput:
        base = unwrap_model(self.model)
        decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
        batch = input_ids.shape[0]
        hidden1, hidden2 = self._passes(decoder, input_ids, attention_mask)

        targets = labels[:, 1:]
        supervised = targets != -100
        y = targets[supervised]
        h1 = hidden1[:, :-1][supervised]
        h2 = hidden2[:, :-1][supervised] if hidden2 is not None else None
        n = y.numel()
        one_branch = self.config.consistency_grad == "one_branch"

        ce_sum = cons_sum = hidden1.new_zeros((), dtype=torch.float32)
        correct, choice_ok = [], []
        calls = self._head_calls(n, lm_head, hidden1.device)
        for start in range(0, calls * self.chunk_tokens, self.chunk_tokens):
            part = slice(start, start + self.chunk_tokens)  # past n: an empty chunk, for ZeRO-3's call count
            args = (lm_head, h1[part], None if h2 is None else h2[part], y[part], self.config.consistency,
                    one_branch, self._post_head, choice_ids)
            if torch.is_grad_enabled() and h1.requires_grad:
                # reentrant: the recompute calls lm_head as a module again, so ZeRO-3 re-gathers its weight
                # (the non-reentrant variant rejects a parameter whose storage ZeRO-3 swapped meanwhile)
                ce, cons, ok, chose = checkpoint(_head_chunk, *args, use_reentrant=True)
            else:
                ce, cons, ok, chose = _head_chunk(*args)
            ce_sum, cons_sum = ce_sum + ce, cons_sum + cons
            correct.append(ok)
            choice_ok.append(chose)

        denom = normalizer if normalizer is not None else max(n, 1)
        loss = (ce_sum + self.config.alpha * cons_sum) / denom
        if calls == 0:
            # no rank has a supervised token: keep every trainable parameter in the graph (DeepSpeed expects a
            # gradient for each), with the same head call on every rank
            loss = loss + lm_head(hidden1[:, :1]).float().sum() * 0.0

        correct_t = torch.cat(correct) if correct else y.new_zeros(0, dtype=torch.bool)
        rows = supervised.nonzero()[:, 0]
        wrong_per_row = torch.zeros(batch, dtype=torch.long, device=y.device).index_add_(
            0, rows, (~correct_t).long())
        has_tokens = supervised.any(dim=1)
        choice_correct = None
        if choice_ids is not None:  # the verbalizer's choice is made at each sequence's first supervised token
            first = torch.ones_like(rows, dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            chose_t = torch.cat(choice_ok) if choice_ok else first
            choice_correct = (chose_t & first).sum()
        return LossOutput(
            loss=loss,
            ce=(ce_sum / denom).detach(),
            consistency=(cons_sum / denom).detach(),
            n_tokens=torch.tensor(n, device=y.device),
            token_correct=correct_t.sum(),
            seq_correct=(has_tokens & (wrong_per_row == 0)).sum(),
            n_seqs=has_tokens.sum(),
            choice_correct=choice_correct,
        )


class _ActiveInBackward(torch.autograd.Function):
    """Identity on the loss whose backward turns the objective's hooks back on (with the state of the forward that
    made this loss) until the end of that backward: gradient checkpointing recomputes layers there and must redraw
    the same masks on the same rows. Being the last op of the forward, its backward runs before any recompute."""

    @staticmethod
    def forward(ctx, loss, objective, state):
        ctx.objective, ctx.state = objective, state
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        objective = ctx.objective
        if not objective._removed:
            objective._dup_rows, objective._dup_done = ctx.state
            objective._enter()
            torch.autograd.Variable._execution_engine.queue_callback(objective._exit)
        return grad, None, None


@contextlib.contextmanager
def _checkpointing_off(layers):
    """A no-grad replay has nothing to recompute: run the layers' plain forward (and skip torch's
    'no input requires grad' warning)."""
    saved = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, saved):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = flag
