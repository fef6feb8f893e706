"""The fused DropKey path (dropout/flex.py) against the sdpa path, on CPU.

torch 2.13 runs FlexAttention on CPU forward only (no backward), so these compare forward outputs, with
FlexAttention's eager implementation (the same score_mod / block mask the compiled kernel runs; compiling on
CPU costs ~40 s per shape). Gradients, the compiled kernel and bf16 on the device are in tests/test_gpu.py.
"""
import gc
import warnings
from types import SimpleNamespace

import pytest
import torch

from hiddenkey_ds.method import DropoutConfig, apply_dropout, flex
from hiddenkey_ds.method import attention as attn_mod
from hiddenkey_ds.method.masks import attention_keep
from tiny_models import padded_batch, tiny_model

pytestmark = [
    pytest.mark.skipif(not flex.available(), reason="FlexAttention needs torch >= 2.5"),
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*"),
]

B, H, S, D = 3, 2, 40, 16


def _visibility(kind: str) -> torch.Tensor | None:
    """None (plain causal, what transformers hands over without padding) or a bool (B, 1, S, S) mask."""
    if kind == "causal":
        return None
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    lens = torch.tensor([S, 25, 7])
    if kind == "left":
        real = torch.arange(S)[None, :] >= (S - lens)[:, None]
    else:
        real = torch.arange(S)[None, :] < lens[:, None]
    if kind == "window":  # a sliding window (Mistral): not causal & padding, so the general row count
        causal = causal & ~torch.tril(torch.ones(S, S, dtype=torch.bool), -8)
    return (causal[None] & real[:, None, :])[:, None]


def _compare(visible_arg, keep, q_len=S, dtype=torch.float32, tol=1e-5):
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))
    q = q[:, :, S - q_len:]
    visible = attn_mod._visible(visible_arg, q_len, S, q.device)
    with torch.no_grad():
        ref = attn_mod._dropkey_attention(q, k, v, visible, keep, 0.0, None)
        out = flex.dropkey_attention(q, k, v, visible_arg, keep, None, compile=False)
    # rows with no visible key at all (left-padding queries) are not defined alike; nothing reads them
    rows = visible[:, 0].any(-1)[:, None, :, None].expand_as(ref)
    err = (out.float() - ref.float())[rows].abs().max().item()
    assert err <= tol, err
    return out


@pytest.mark.parametrize("kind", ["causal", "right", "left", "window"])
@pytest.mark.parametrize("pattern,rate", [("column", 0.1), ("column", 0.9), ("span", 0.5)])
def test_fused_forward_equals_sdpa_path(kind, pattern, rate):
    """Same keep-mask -> same output: dropped visible keys, causal/padding exclusion, and (at rate 0.9) rows
    whose visible keys are all dropped keeping them."""
    torch.manual_seed(0)
    keep = attention_keep(pattern, rate, B, H, S, S, torch.device("cpu"))
    if rate == 0.9:
        assert attn_mod._rows_without_kept_key(attn_mod._visible(_visibility(kind), S, S, "cpu"), keep).any()
    _compare(_visibility(kind), keep)


def test_fused_forward_with_protected_columns_and_cached_decoding_offset():
    torch.manual_seed(0)
    keep = attention_keep("column", 0.9, B, H, S, S, torch.device("cpu"))
    keep[..., :2] = True  # keep_first_tokens: the sink columns are forced True before the kernel is chosen
    _compare(None, keep)
    _compare(None, keep, q_len=10)  # queries are the last 10 positions


def test_fused_forward_bf16_and_no_dropkey():
    torch.manual_seed(0)
    keep = attention_keep("column", 0.3, B, H, S, S, torch.device("cpu"))
    _compare(_visibility("right"), keep, dtype=torch.bfloat16, tol=2e-2)
    _compare(None, None)  # plain causal attention through the same block mask


def test_block_mask_is_built_once_per_mask_and_shared_by_layers():
    flex.clear_cache()
    visible = _visibility("right")
    first = flex.block_structure(visible, S, S, torch.device("cpu"))
    assert flex.block_structure(visible, S, S, torch.device("cpu")) is first          # the next layer
    assert flex.block_structure(visible.clone(), S, S, torch.device("cpu")) is not first  # the next forward
    causal = flex.block_structure(None, S, S, torch.device("cpu"))
    assert flex.block_structure(None, S, S, torch.device("cpu")) is causal
    assert first["real"] is not None  # causal & padding: the prefix count of all-dropped rows
    # a mask that died leaves a dead weak reference, which must not pass for plain causal (None)
    flex.clear_cache()
    dead = flex.block_structure(_visibility("right"), S, S, torch.device("cpu"))
    gc.collect()
    assert flex.block_structure(None, S, S, torch.device("cpu")) is not dead
    assert flex.block_structure(_visibility("window"), S, S, torch.device("cpu"))["real"] is None


def test_dispatch_rule():
    column = torch.ones(1, 2, 1, 8, dtype=torch.bool)
    element = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    cuda_query = SimpleNamespace(device=torch.device("cuda"), requires_grad=True)
    cpu_query = torch.zeros(1, 2, 8, 4, requires_grad=True)
    assert flex.use_fused("auto", column, cuda_query, 0.0)
    assert not flex.use_fused("auto", element, cuda_query, 0.0)       # element DropKey: explicit path
    assert not flex.use_fused("auto", column, cuda_query, 0.1)        # attention-probability dropout
    assert not flex.use_fused("auto", column, cpu_query, 0.0)         # CPU: the sdpa path
    assert not flex.use_fused("sdpa", column, cuda_query, 0.0)
    assert flex.use_fused("flex", column, cuda_query, 0.0)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex.use_fused("flex", column, cpu_query, 0.0)
    with torch.no_grad():
        assert flex.use_fused("flex", column, cpu_query, 0.0)         # forward only: fine on CPU
    with pytest.raises(ValueError, match="column/span"):
        flex.use_fused("flex", element, cuda_query, 0.0)


def test_key_kernel_setting():
    assert DropoutConfig(preset="hiddenkey").key_kernel == "auto"
    assert DropoutConfig(preset="hiddenkey", key_kernel="flex").key_kernel == "flex"
    for bad in ({"preset": "dropkey"}, {"preset": "hiddencut"}, {"preset": "dropattention"},
                {"preset": "hiddenkey", "attention": {"rate": 0.1}}):
        with pytest.raises(ValueError, match="key_kernel=flex"):
            DropoutConfig(**bad, key_kernel="flex")


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_model_with_forced_fused_path_equals_sdpa_path(side):
    """A whole model in training mode (masks drawn), forward without grad: the attention function dispatches
    to FlexAttention and the logits equal those of the sdpa path with the same masks (same seed), for the
    dropout layers it selects, with padding through transformers' mask interface."""
    ids, mask = padded_batch(side, batch=3, seq=12)
    logits = {}
    for kernel in ("sdpa", "flex"):
        model = tiny_model("llama").train()
        apply_dropout(model, DropoutConfig(preset="hiddenkey_nokl", hidden={"rate": 0.0}, key={"rate": 0.5},
                                           layers="all", key_kernel=kernel))
        torch.manual_seed(3)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits[kernel] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (logits["flex"] - logits["sdpa"])[real].abs().max() <= 1e-5
    # the masks did drop something: eval mode gives other logits
    model.eval()
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - logits["flex"])[real].abs().max() > 1e-3


# -- gradients, through FlexAttention's eager reference ----------------------------------------------------------
@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch refuses FlexAttention backward on CPU up front (`_validate_device`); its eager implementation
    (dense math over the same score_mod and block mask) differentiates fine. Lifting that check lets the CPU
    suite compare gradients; the compiled kernel's gradients are compared on a GPU (tests/test_gpu.py)."""
    import torch.nn.attention.flex_attention as fa

    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch has no FlexAttention device check to lift")
    monkeypatch.setattr(fa, "_validate_device", lambda *args, **kwargs: None)
    # the dispatch refuses flex + grad on CPU for users; here the eager reference runs it
    monkeypatch.setattr(flex, "use_fused", lambda kernel, keep, query, dropout: kernel == "flex")


@pytest.mark.parametrize("kind", ["causal", "right", "window"])
@pytest.mark.parametrize("rate", [0.1, 0.9])
def test_fused_gradients_equal_sdpa_path(cpu_flex_backward, kind, rate):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, S, D)
    keep = attention_keep("column", rate, B, H, S, S, torch.device("cpu"))
    visible = attn_mod._visible(_visibility(kind), S, S, q.device)
    # rows that see no key at all are not defined alike (see test above); in a model they get no gradient
    grad = grad * visible[:, 0].any(-1)[:, None, :, None]
    ref = torch.autograd.grad(attn_mod._dropkey_attention(q, k, v, visible, keep, 0.0, None), (q, k, v), grad)
    ours = torch.autograd.grad(flex.dropkey_attention(q, k, v, _visibility(kind), keep, None, compile=False),
                               (q, k, v), grad)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 1e-5


def test_model_gradients_through_fused_path_equal_sdpa_path_with_checkpoint_replay(cpu_flex_backward):
    """LoRA gradients of the HiddenKey objective (dual pass) through the fused path equal the sdpa path's, and
    with gradient checkpointing the recomputed layers replay the same keep-masks into the fused kernel."""
    peft = pytest.importorskip("peft")
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    ids, mask = padded_batch("right", seq=16)
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for kernel, checkpointing in (("sdpa", False), ("flex", False), ("flex", True)):
        model = tiny_model(num_hidden_layers=3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
        cfg = DropoutConfig(preset="hiddenkey", key={"rate": 0.5}, layers="all", consistency_grad="both",
                            key_kernel=kernel)
        objective = HiddenKeyObjective(model, cfg).train()
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objective(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[kernel, checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = grads["sdpa", False]
    assert ref and all(g.abs().sum() > 0 for g in ref.values())
    for key in (("flex", False), ("flex", True)):
        for name, g in ref.items():
            assert torch.allclose(grads[key][name], g, atol=1e-6, rtol=1e-4), (key, name)
