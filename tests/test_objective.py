"""The dual-pass objective against a naive full-logits reference, and its one-forward contract."""
import pytest
import torch
import torch.nn.functional as F

from hiddenkey_ds.dropout import DropoutConfig
from hiddenkey_ds.objective import HiddenKeyObjective
from tiny_models import padded_batch, tiny_model


def naive_loss(model, ids, mask, labels, cfg, training):
    """Full logits for every position, then the README's formulas, token-mean over supervised positions."""
    dual = training and cfg.dual_pass
    batch = ids.shape[0]
    if dual:
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
    logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]
    y = labels[:, 1:]
    sup = y != -100
    logp = F.log_softmax(logits, -1)
    ce1 = -logp[:batch].gather(-1, y.clamp(min=0)[..., None])[..., 0][sup].mean()
    if not dual:
        return ce1, torch.zeros(())
    ce2 = -logp[batch:].gather(-1, y.clamp(min=0)[..., None])[..., 0][sup].mean()
    p1, p2 = logp[:batch].exp(), logp[batch:].exp()
    lp1, lp2 = logp[:batch], logp[batch:]
    if cfg.consistency == "kl":
        kl12 = (p1 * (lp1 - lp2)).sum(-1)
        kl21 = (p2 * (lp2 - lp1)).sum(-1)
        cons = (0.5 * (kl12 + kl21))[sup].mean()
    else:
        m = 0.5 * (p1 + p2)
        cons = (0.5 * ((p1 * (lp1 - m.log())).sum(-1) + (p2 * (lp2 - m.log())).sum(-1)))[sup].mean()
    return 0.5 * (ce1 + ce2), cons


def _labels(ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt: supervised only on the later tokens
    return labels


@pytest.mark.parametrize("preset", ["none", "hiddenkey", "hiddenkey_nokl", "hiddencut", "dropkey"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("side", ["left", "right"])
def test_values_and_gradients_match_naive_reference(preset, chunk, side):
    cfg = DropoutConfig(preset=preset)
    ids, mask = padded_batch(side, seq=16)
    labels = _labels(ids, mask)
    results = []
    for use_objective in (True, False):
        model = tiny_model()
        objective = HiddenKeyObjective(model, cfg, chunk_tokens=chunk)
        objective.train()
        torch.manual_seed(11)  # the same masks in both computations
        if use_objective:
            out = objective(input_ids=ids, attention_mask=mask, labels=labels)
            loss, ce, cons = out.loss, out.ce, out.consistency
        else:
            ce, cons = naive_loss(model, ids, mask, labels, cfg, training=True)
            loss = ce + cfg.alpha * cons
        loss.backward()
        results.append((loss.detach(), ce.detach(), cons.detach(),
                        {n: p.grad for n, p in model.named_parameters()}))
    (l1, ce1, c1, g1), (l2, ce2, c2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ce1, ce2, atol=1e-5, rtol=1e-5)
    assert torch.allclose(c1, c2, atol=1e-5, rtol=1e-5)
    if cfg.dual_pass:
        assert c1 > 0
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name


def test_both_passes_run_as_one_forward():
    model = tiny_model()
    calls = []
    model.model.register_forward_hook(lambda m, a, kw, o: calls.append(kw["input_ids"].shape), with_kwargs=True)
    objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey"))
    ids, mask = padded_batch("left")
    objective.train()
    objective(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
    assert calls == [torch.Size([6, 12])]  # [x; x] in one call
    calls.clear()
    objective.eval()
    with torch.no_grad():
        objective(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask))
    assert calls == [torch.Size([3, 12])]  # evaluation: one deterministic pass


def test_normalizer_gives_sum_over_normalizer():
    model = tiny_model()
    objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey"))
    ids, mask = padded_batch("right")
    labels = _labels(ids, mask)
    objective.train()
    torch.manual_seed(0)
    mean = objective(input_ids=ids, attention_mask=mask, labels=labels)
    torch.manual_seed(0)
    scaled = objective(input_ids=ids, attention_mask=mask, labels=labels, normalizer=100.0)
    assert torch.allclose(scaled.loss * 100.0, mean.loss * mean.n_tokens, rtol=1e-6)


def test_no_supervised_tokens_gives_zero_loss_with_graph():
    model = tiny_model()
    objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey"))
    ids, mask = padded_batch("none")
    objective.train()
    out = objective(input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens.item() == 0
    assert all(p.grad is not None for p in model.parameters())


def test_accuracy_counts_match_argmax():
    model = tiny_model()
    objective = HiddenKeyObjective(model, DropoutConfig(preset="none")).eval()
    ids, mask = padded_batch("left")
    labels = _labels(ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        pred = logits[:, :-1].argmax(-1)
        y = labels[:, 1:]
        # make row 0 entirely right so seq_correct is not trivially zero
        labels[0, 1:] = torch.where(y[0] != -100, pred[0], y[0])
        y = labels[:, 1:]
        sup = y != -100
        out = objective(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.token_correct.item() == (pred[sup] == y[sup]).sum().item()
    per_row = [(pred[r][sup[r]] == y[r][sup[r]]).all().item() for r in range(ids.shape[0])]
    assert out.seq_correct.item() == sum(per_row) >= 1
    assert out.n_seqs.item() == 3
