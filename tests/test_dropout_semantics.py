"""The framework's semantics: finite DropKey fill, causality, DropKey == normalized DropAttention,
independent masks, gradient-checkpoint replay, empirical rates."""
import math

import pytest
import torch

from hiddenkey_ds.method import DropoutConfig, apply_dropout
from hiddenkey_ds.method import attention as attn_mod
from hiddenkey_ds.method.attention import DROPKEY_FILL, _dropkey_mask, _rescale_weights
from hiddenkey_ds.method.masks import attention_keep, hidden_keep, span_length
from hiddenkey_ds.method.objective import HiddenKeyObjective
from tiny_models import padded_batch, tiny_model

HEAVY = {
    "key/element": {"key": {"rate": 0.9, "pattern": "element"}},
    "key/column": {"key": {"rate": 0.9, "pattern": "column"}},
    "key/span": {"key": {"rate": 0.5, "pattern": "span"}},
    "attention/element": {"attention": {"rate": 0.9, "pattern": "element"}},
    "attention/span/inverted": {"attention": {"rate": 0.5, "pattern": "span", "rescale": "inverted"}},
    "hidden/element": {"hidden": {"rate": 0.9, "pattern": "element"}},
    "hidden/span": {"hidden": {"rate": 0.5, "pattern": "span"}},
    "hidden/column": {"hidden": {"rate": 0.9, "pattern": "column"}},
}


def _train_logits(model, ids, mask=None, seed=0):
    torch.manual_seed(seed)
    return model(input_ids=ids, attention_mask=mask).logits


def test_dropkey_mask_is_finite_and_distinct_from_causal_fill():
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    keep = torch.tensor([False, True, False, True])[None, None, None, :]
    mask = _dropkey_mask(visible, keep, torch.float32)
    assert torch.isfinite(mask).all()
    causal_fill = torch.finfo(torch.float32).min
    assert (mask[~visible.expand_as(mask)] == causal_fill).all()
    # row 0 sees only key 0, which is dropped: the row keeps it instead of attending to the future
    assert mask[0, 0, 0, 0] == 0
    # row 2 sees keys 0..2 and keeps key 1: keys 0 and 2 get the DropKey fill, not the causal fill
    assert mask[0, 0, 2].tolist()[:3] == [-DROPKEY_FILL, 0.0, -DROPKEY_FILL]
    assert -DROPKEY_FILL > causal_fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropkey_mask_finite_in_low_precision(dtype):
    visible = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
    keep = torch.rand(1, 2, 1, 8) > 0.5
    assert torch.isfinite(_dropkey_mask(visible, keep, dtype)).all()


@pytest.mark.parametrize("name", list(HEAVY))
@pytest.mark.parametrize("side", ["left", "right"])
def test_no_nan_and_no_future_leak(name, side):
    """Perturbing token t+1 never changes outputs at (real) positions <= t, heavy dropout, same seed."""
    model = tiny_model()
    apply_dropout(model, DropoutConfig(preset="custom", **HEAVY[name]))
    model.train()
    ids, mask = padded_batch(side, seq=16)
    with torch.no_grad():
        base = _train_logits(model, ids, mask)
        assert not torch.isnan(base).any()
        for t in (0, 5, 11):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
            out = _train_logits(model, changed, mask)
            assert not torch.isnan(out).any()
            # padding queries attend to nothing real in stock attention either: compare real tokens
            real = mask[:, : t + 1].bool()
            assert torch.allclose(out[:, : t + 1][real], base[:, : t + 1][real], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the perturbation did reach later tokens


@pytest.mark.parametrize("pattern", ["element", "column", "span"])
def test_dropkey_equals_normalized_dropattention_forward_and_grad(pattern):
    ids, mask = padded_batch("left", seq=16)
    outs = {}
    for position in ("key", "attention"):
        model = tiny_model()
        model.train()
        block = {"rate": 0.4, "pattern": pattern}
        if position == "attention":
            block["rescale"] = "normalized"
        apply_dropout(model, DropoutConfig(preset="custom", **{position: block}))
        logits = _train_logits(model, ids, mask, seed=3)
        logits[mask.bool()].square().mean().backward()
        # padding queries see no key at all; their (unused) outputs are not part of the contract
        outs[position] = (logits.detach()[mask.bool()], {n: p.grad.clone() for n, p in model.named_parameters()})
    (lk, gk), (la, ga) = outs["key"], outs["attention"]
    assert (lk - la).abs().max().item() <= 1e-6
    # autograd goes through the normalizer, so gradients agree too
    for name in gk:
        assert torch.allclose(gk[name], ga[name], atol=1e-6, rtol=1e-4), name
    # and the drop did happen: a model without dropout gives other logits
    plain = tiny_model()
    plain.train()
    assert (plain(input_ids=ids, attention_mask=mask).logits[mask.bool()] - lk).abs().max().item() > 1e-3


def test_normalizer_constant_changes_the_gradient():
    """Normalized rescaling through autograd == DropKey; a detached (constant) scale is a different gradient."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 3, 5, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False])[None, None, None]
    w = torch.softmax(logits, -1)
    through = _rescale_weights(w, keep, "normalized", 0.6)
    detached = (w * keep) / (w * keep).sum(-1, keepdim=True).detach()
    upstream = torch.randn_like(through)
    g_through, = torch.autograd.grad((through * upstream).sum(), logits, retain_graph=True)
    g_detached, = torch.autograd.grad((detached * upstream).sum(), logits)
    g_dropkey, = torch.autograd.grad(
        (torch.softmax(logits.masked_fill(~keep, -DROPKEY_FILL), -1) * upstream).sum(), logits)
    assert torch.allclose(through, detached)
    assert torch.allclose(g_through, g_dropkey, atol=1e-6)
    assert (g_through - g_detached).abs().max() > 1e-3


def _record_masks(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        keep = attention_keep(*args, **kwargs)
        seen.append(keep)
        return keep

    monkeypatch.setattr(attn_mod, "attention_keep", recording)
    return seen


@pytest.mark.parametrize("pattern", ["element", "column", "span"])
def test_masks_independent_across_rows_heads_layers_and_passes(monkeypatch, pattern):
    seen = _record_masks(monkeypatch)
    model = tiny_model(num_hidden_layers=3)  # 4 query heads over 2 key/value heads (GQA)
    cfg = DropoutConfig(preset="custom", key={"rate": 0.5, "pattern": pattern}, consistency="kl", alpha=1.0,
                        layers="all", consistency_grad="both")
    objective = HiddenKeyObjective(model, cfg)
    objective.train()
    ids, _ = padded_batch("none", batch=2, seq=24)
    labels = ids.clone()
    objective(input_ids=ids, labels=labels)
    assert len(seen) == 3  # one draw per layer, both passes in the same draw
    for keep in seen:
        assert keep.shape[:2] == (4, 4)  # [x; x] rows x query heads, not kv heads
        flat = keep.flatten(2)
        assert not torch.equal(flat[0], flat[2]) and not torch.equal(flat[1], flat[3])  # pass 1 vs pass 2
        assert not torch.equal(flat[0], flat[1])  # batch rows
        assert not torch.equal(flat[0, 0], flat[0, 1])  # heads
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # layers


def test_one_branch_draws_new_masks_for_the_second_pass(monkeypatch):
    seen = _record_masks(monkeypatch)
    model = tiny_model(num_hidden_layers=4)
    objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey"))  # latter half: layers 2, 3
    objective.train()
    ids, _ = padded_batch("none", batch=2, seq=24)
    objective(input_ids=ids, labels=ids.clone())
    assert len(seen) == 4 and all(k.shape[0] == 2 for k in seen)  # pass 1: layers 2, 3; pass 2: layers 2, 3
    assert not torch.equal(seen[0], seen[2]) and not torch.equal(seen[1], seen[3])


@pytest.mark.parametrize("layers, expected", [("latter_half", [2, 3]), ("all", [0, 1, 2, 3]), ("1-2", [1, 2]),
                                              ([0, 3], [0, 3])])
def test_masks_only_in_selected_layers(layers, expected):
    """Attention masks are drawn and MLP outputs dropped in the selected layers only."""
    model = tiny_model(num_hidden_layers=4)
    handle = apply_dropout(model, DropoutConfig(preset="hiddenkey_nokl", key={"rate": 0.5},
                                                hidden={"rate": 0.5}, layers=layers))
    assert handle.selected == expected
    drew, zeroed = [], {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: drew.append(i))
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: zeroed.__setitem__(i, (o == 0).float().mean().item()))
    calls = []
    monkey = attn_mod.attention_keep
    try:
        attn_mod.attention_keep = lambda *a, **k: calls.append(1) or monkey(*a, **k)
        model.train()
        with torch.no_grad():
            model(input_ids=padded_batch("none", batch=4, seq=32)[0])
    finally:
        attn_mod.attention_keep = monkey
    assert len(calls) == len(expected)
    assert [i for i, frac in sorted(zeroed.items()) if frac > 0.3] == expected
    assert all(frac == 0 for i, frac in zeroed.items() if i not in expected)


def test_layer_selection_beyond_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        apply_dropout(tiny_model(), DropoutConfig(preset="hiddenkey", layers="1-5"))


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_keep_first_tokens_protects_the_sink(monkeypatch, side):
    """The first N real tokens of each row are never dropped: not as key columns (for any query or head), not
    in the MLP output; every other position still is."""
    n = 2
    model = tiny_model(num_hidden_layers=2)
    cfg = DropoutConfig(preset="custom", key={"rate": 0.9, "pattern": "column"},
                        hidden={"rate": 0.9, "pattern": "element"}, layers="all", keep_first_tokens=n)
    apply_dropout(model, cfg)
    ids, mask = padded_batch(side, batch=3, seq=16)
    first = mask.argmax(1)  # first real position of each row
    keeps, outs = [], []
    original = attn_mod.attention_keep
    monkeypatch.setattr(attn_mod, "_dropkey_mask",
                        lambda visible, keep, dtype, f=attn_mod._dropkey_mask: keeps.append(keep) or f(visible, keep, dtype))
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, a, o: outs.append(o))
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert original is attn_mod.attention_keep and len(keeps) == 2 and len(outs) == 2
    for keep, out in zip(keeps, outs):
        for row in range(3):
            sink = slice(int(first[row]), int(first[row]) + n)
            assert keep[row, :, 0, sink].all()                      # sink columns kept for every head
            assert (out[row, sink] != 0).all()                      # sink positions never zeroed
            rest = torch.ones(16, dtype=torch.bool)
            rest[sink] = False
            assert (~keep[row, :, 0, rest]).float().mean() > 0.6    # the others still dropped at ~0.9
            assert (out[row, rest] == 0).float().mean() > 0.6
    # the sink positions pass through unscaled: the same as the model without dropout there
    plain = tiny_model(num_hidden_layers=2)
    plain.model.layers[0].mlp.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask)
    row = 0
    sink = slice(int(first[row]), int(first[row]) + n)
    assert torch.allclose(outs[0][row, sink], outs[-1][row, sink], atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_replays_the_same_masks(reentrant):
    peft = pytest.importorskip("peft")
    ids, mask = padded_batch("left", seq=16)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(num_hidden_layers=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False))
        objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey"))
        objective.train()
        torch.manual_seed(7)
        objective(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


# Binomial tolerance: |observed - p| <= 5 standard deviations of the observed fraction.
@pytest.mark.parametrize("pattern", ["element", "column", "span"])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_empirical_attention_drop_rate(pattern, rate):
    torch.manual_seed(0)
    keep = attention_keep(pattern, rate, batch=64, heads=8, q_len=40, k_len=40, device=torch.device("cpu"))
    observed = 1 - keep.float().mean().item()
    if pattern == "span":
        assert observed == pytest.approx(span_length(rate, 40) / 40, abs=1e-6)
        assert abs(observed - rate) <= 0.5 / 40  # rounding to whole positions
        runs = (keep[..., 1:] != keep[..., :-1]).sum(-1)
        assert runs.max() <= 2  # one contiguous run
    else:
        n = keep.numel()
        assert abs(observed - rate) <= 5 * math.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("pattern", ["element", "column", "span"])
def test_empirical_hidden_drop_rate_and_shape(pattern):
    torch.manual_seed(0)
    keep = hidden_keep(pattern, 0.2, batch=64, seq=50, dim=128, device=torch.device("cpu"))
    expected_shape = {"element": (64, 50, 128), "column": (64, 1, 128), "span": (64, 50, 1)}[pattern]
    assert keep.shape == expected_shape
    observed = 1 - keep.float().mean().item()
    assert abs(observed - 0.2) <= 5 * math.sqrt(0.2 * 0.8 / keep.numel())


def test_model_level_hidden_rate_and_inverted_scale():
    """The MLP output is zeroed at the configured rate and survivors are scaled by 1/(1-p)."""
    model = tiny_model()
    apply_dropout(model, DropoutConfig(preset="custom", hidden={"rate": 0.25, "pattern": "element"}, layers="all"))
    model.train()
    mlp = model.model.layers[0].mlp
    captured = {}
    mlp.register_forward_hook(lambda m, a, o: captured.setdefault("masked", o))
    raw = {}
    handle = mlp.register_forward_hook(lambda m, a, o: raw.setdefault("raw", o.clone()), prepend=True)
    ids, _ = padded_batch("none", batch=8, seq=64)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    masked, before = captured["masked"], raw["raw"]
    dropped = masked == 0
    rate = dropped.float().mean().item()
    assert abs(rate - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / masked.numel())
    assert torch.allclose(masked[~dropped], before[~dropped] / 0.75, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_all_dropped_rows_found_by_count_match_direct_check(padded):
    from hiddenkey_ds.method.attention import _rows_without_kept_key

    torch.manual_seed(0)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    visible = causal[None, None].expand(3, 1, 9, 9).clone() if padded else causal[None, None]
    if padded:
        visible[1, :, :, :3] = False  # left padding of 3
    keep = torch.rand(3, 4, 1, 9) > 0.7
    direct = ~(visible & keep).any(-1)
    assert torch.equal(_rows_without_kept_key(visible, keep), direct)
    assert direct.any()  # the case is exercised
    mask = _dropkey_mask(visible, keep, torch.float32)
    assert (mask[direct] > torch.finfo(torch.float32).min / 2).sum() == (visible.expand(3, 4, 9, 9)[direct]).sum()
