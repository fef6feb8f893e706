"""The dual-pass objective against a naive full-logits reference, and its one-forward contract."""
import pytest
import torch
import torch.nn.functional as F

from hiddenkey_ds.method import DropoutConfig
from hiddenkey_ds.method.objective import HiddenKeyObjective
from tiny_models import padded_batch, tiny_model


def _consistency(lp1, lp2, kind):
    p1, p2 = lp1.exp(), lp2.exp()
    if kind == "kl":
        return 0.5 * ((p1 * (lp1 - lp2)).sum(-1) + (p2 * (lp2 - lp1)).sum(-1))
    m = 0.5 * (p1 + p2)
    return 0.5 * ((p1 * (lp1 - m.log())).sum(-1) + (p2 * (lp2 - m.log())).sum(-1))


def naive_loss(model, ids, mask, labels, cfg, training):
    """Full logits for every position, both passes run in full from the first layer, then the README's formulas,
    token-mean over supervised positions. `both`: one forward over [x; x]; `one_branch`: a grad pass, then a
    second pass without grad (the paper's NoGrad branch)."""
    dual = training and cfg.dual_pass
    batch = ids.shape[0]
    y = labels[:, 1:]
    sup = y != -100
    nll = lambda lp: -lp.gather(-1, y.clamp(min=0)[..., None])[..., 0][sup].mean()
    logp = lambda i, m: F.log_softmax(model(input_ids=i, attention_mask=m).logits.float()[:, :-1], -1)
    if not dual:
        return nll(logp(ids, mask)), torch.zeros(())
    if cfg.consistency_grad == "both":
        both = logp(torch.cat([ids, ids]), torch.cat([mask, mask]))
        lp1, lp2 = both[:batch], both[batch:]
        ce = 0.5 * (nll(lp1) + nll(lp2))
    else:
        lp1 = logp(ids, mask)
        with torch.no_grad():
            lp2 = logp(ids, mask)
        ce = nll(lp1)
    return ce, _consistency(lp1, lp2, cfg.consistency)[sup].mean()


def _labels(ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt: supervised only on the later tokens
    return labels


def _loss_and_grads(cfg, ids, mask, labels, chunk=1024, use_objective=True, share_prefix=True, layers=4,
                    checkpointing=False):
    model = tiny_model(num_hidden_layers=layers)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    objective = HiddenKeyObjective(model, cfg, chunk_tokens=chunk, share_prefix=share_prefix)
    objective.train()
    torch.manual_seed(11)  # the same masks in every computation
    if use_objective:
        out = objective(input_ids=ids, attention_mask=mask, labels=labels)
        loss, ce, cons = out.loss, out.ce, out.consistency
    else:
        ce, cons = naive_loss(model, ids, mask, labels, cfg, training=True)
        loss = ce + cfg.alpha * cons
    loss.backward()
    return loss.detach(), ce.detach(), cons.detach(), {n: p.grad for n, p in model.named_parameters()}, objective


def _assert_same(a, b, tol):
    (l1, ce1, c1, g1), (l2, ce2, c2, g2) = a[:4], b[:4]
    assert torch.allclose(l1, l2, atol=tol, rtol=tol), (l1, l2)
    assert torch.allclose(ce1, ce2, atol=tol, rtol=tol), (ce1, ce2)
    assert torch.allclose(c1, c2, atol=tol, rtol=tol), (c1, c2)
    assert g1.keys() == g2.keys()
    for name in g1:
        if g1[name] is None or g2[name] is None:
            assert g1[name] is None and g2[name] is None, name
        else:
            assert torch.allclose(g1[name], g2[name], atol=tol, rtol=max(tol, 1e-4)), name


@pytest.mark.parametrize("preset", ["none", "hiddenkey", "hiddenkey_nokl", "hiddencut", "dropkey"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("side", ["left", "right"])
def test_values_and_gradients_match_naive_reference(preset, chunk, side):
    """The presets as shipped (latter half, one-branch consistency with the shared first half) equal the naive
    computation."""
    cfg = DropoutConfig(preset=preset)
    ids, mask = padded_batch(side, seq=16)
    labels = _labels(ids, mask)
    ours = _loss_and_grads(cfg, ids, mask, labels, chunk)
    assert ours[4].prefix == (2 if cfg.dual_pass else 0)
    _assert_same(ours, _loss_and_grads(cfg, ids, mask, labels, chunk, use_objective=False), 1e-5)
    if cfg.dual_pass:
        assert ours[2] > 0


@pytest.mark.parametrize("grad", ["one_branch", "both"])
@pytest.mark.parametrize("layers", ["all", "latter_half", "1-2"])
@pytest.mark.parametrize("preset", ["hiddenkey", "hiddencut"])
def test_consistency_gradient_modes_match_naive_reference(grad, layers, preset):
    cfg = DropoutConfig(preset=preset, consistency_grad=grad, layers=layers)
    ids, mask = padded_batch("left", seq=16)
    labels = _labels(ids, mask)
    ours = _loss_and_grads(cfg, ids, mask, labels, chunk=7)
    _assert_same(ours, _loss_and_grads(cfg, ids, mask, labels, chunk=7, use_objective=False), 1e-5)


@pytest.mark.parametrize("grad", ["one_branch", "both"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("sink", [0, 2])
def test_shared_first_half_is_exact(grad, checkpointing, sink):
    """Computing the layers before the first dropout layer once equals running both passes in full."""
    cfg = DropoutConfig(preset="hiddenkey", consistency_grad=grad, keep_first_tokens=sink)
    ids, mask = padded_batch("left", seq=16)
    labels = _labels(ids, mask)
    shared = _loss_and_grads(cfg, ids, mask, labels, checkpointing=checkpointing)
    full = _loss_and_grads(cfg, ids, mask, labels, share_prefix=False, checkpointing=checkpointing)
    assert shared[4].prefix == 2 and full[4].prefix == 0
    _assert_same(shared, full, 1e-6)


def test_one_branch_gradient_is_the_grad_pass_only():
    """one_branch: p2 is a constant. Its gradient equals d/dtheta [CE(p1) + alpha C(p1, const p2)], which is not
    the gradient of the symmetric (both) objective on the same masks."""
    ids, mask = padded_batch("right", seq=16)
    labels = _labels(ids, mask)
    one = _loss_and_grads(DropoutConfig(preset="hiddenkey", layers="all"), ids, mask, labels)
    both = _loss_and_grads(DropoutConfig(preset="hiddenkey", layers="all", consistency_grad="both"), ids, mask,
                           labels)
    name = next(n for n, g in one[3].items() if g is not None and "q_proj" in n)
    assert (one[3][name] - both[3][name]).abs().max() > 1e-4


def test_lora_dropout_disables_sharing():
    """PEFT's lora_dropout makes the layers before the first dropout layer random: nothing is shared."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(num_hidden_layers=4),
                                peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey")).prefix == 0
    model = peft.get_peft_model(tiny_model(num_hidden_layers=4),
                                peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey")).prefix == 2


def _layer_calls(model):
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: calls.append((i, (a[0] if a else kw["hidden_states"]).shape[0],
                                                torch.is_grad_enabled())), with_kwargs=True)
    return calls


def test_passes_and_their_cost():
    """What runs: all-layer `both` is one forward over [x; x]; latter-half `both` runs the first half on x and
    the rest on [h; h]; `one_branch` replays only the latter half, without grad; evaluation is one pass."""
    ids, mask = padded_batch("left")
    labels = _labels(ids, mask)
    expect = {
        ("all", "both"): [(i, 6, True) for i in range(4)],
        ("latter_half", "both"): [(0, 3, True), (1, 3, True), (2, 6, True), (3, 6, True)],
        ("latter_half", "one_branch"): [(0, 3, True), (1, 3, True), (2, 3, True), (3, 3, True),
                                        (2, 3, False), (3, 3, False)],
        ("all", "one_branch"): [(i, 3, True) for i in range(4)] + [(i, 3, False) for i in range(4)],
    }
    for (layers, grad), calls_expected in expect.items():
        model = tiny_model(num_hidden_layers=4)
        objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey", layers=layers, consistency_grad=grad))
        calls = _layer_calls(model)
        objective.train()
        objective(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        # (the objective's hooks run first: layer 2 already receives the duplicated [h; h])
        assert calls == calls_expected, (layers, grad, calls)
        calls.clear()
        objective.eval()
        with torch.no_grad():
            objective(input_ids=ids, attention_mask=mask, labels=labels)
        assert calls == [(i, 3, False) for i in range(4)]


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
