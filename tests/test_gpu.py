"""CUDA paths: the fused DropKey kernel against the sdpa reference (compiled, bf16, with gradients), a bf16
training step, and QLoRA's 4-bit bitsandbytes path on the device.

Marked `gpu`: deselected by the default run (`addopts = -m 'not slow and not gpu'`); `pytest -m gpu` runs them
on a machine with a CUDA device and skips them, saying why, on one without. The end-to-end timings and the
launcher runs are benchmarks/gpu_check.py's.
"""
import math

import pytest
import torch

from hiddenkey_ds.method import DropoutConfig, flex
from hiddenkey_ds.method import attention as attn_mod
from hiddenkey_ds.method.masks import attention_keep
from tiny_models import padded_batch, tiny_model, tiny_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False on this machine)"),
]

DEV = torch.device("cuda")
BF16_TOL = 2e-2   # relative to the largest magnitude: a few bf16 ulps (2^-8) of accumulated rounding


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def _visibility(kind: str, batch: int, seq: int) -> torch.Tensor | None:
    if kind == "causal":
        return None
    lens = torch.tensor([seq, seq // 2, 7][:batch], device=DEV)
    real = torch.arange(seq, device=DEV)[None, :] < lens[:, None]
    return (torch.tril(torch.ones(seq, seq, dtype=torch.bool, device=DEV))[None] & real[:, None, :])[:, None]


@pytest.mark.skipif(not flex.available(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("kind", ["causal", "right"])
@pytest.mark.parametrize("pattern,rate", [("column", 0.1), ("column", 0.9), ("span", 0.3)])
@pytest.mark.parametrize("seq", [256, 1000])   # 1000: not a multiple of FlexAttention's 128-token blocks
def test_fused_kernel_equals_sdpa_path_bf16_forward_and_backward(kind, pattern, rate, seq):
    torch.manual_seed(0)
    b, h, d = 3, 4, 64
    q, k, v = (torch.randn(b, h, seq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keep = attention_keep(pattern, rate, b, h, seq, seq, DEV)
    vis_arg = _visibility(kind, b, seq)
    visible = attn_mod._visible(vis_arg, seq, seq, DEV)
    grad = torch.randn(b, h, seq, d, device=DEV, dtype=torch.bfloat16)
    ref = attn_mod._dropkey_attention(q, k, v, visible, keep, 0.0, None)
    out = flex.dropkey_attention(q, k, v, vis_arg, keep, None)          # compiled: the fused kernel
    assert _rel(out, ref) <= BF16_TOL
    for a, c in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert torch.isfinite(a).all() and _rel(a, c) <= BF16_TOL


def _count_fused(monkeypatch) -> list[int]:
    calls = [0]
    original = flex.dropkey_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(flex, "dropkey_attention", counting)
    return calls


def _lora_model(dtype, checkpointing=False, layers=4):
    peft = pytest.importorskip("peft")
    model = tiny_model(num_hidden_layers=layers).to(DEV)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    return model.to(dtype)


@pytest.mark.skipif(not flex.available(), reason="FlexAttention needs torch >= 2.5")
@pytest.mark.parametrize("grad_mode", ["one_branch", "both"])
def test_bf16_hiddenkey_step_uses_fused_path_and_matches_sdpa(monkeypatch, grad_mode):
    """A bf16 HiddenKey training step on the device: `auto` takes the fused kernel, and its loss and LoRA
    gradients equal the sdpa path's (same seed, same masks) to bf16 tolerance; AdamW then moves the adapters."""
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    calls = _count_fused(monkeypatch)
    ids, mask = (t.to(DEV) for t in padded_batch("right", batch=3, seq=48))
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for kernel in ("sdpa", "auto"):
        model = _lora_model(torch.bfloat16)
        cfg = DropoutConfig(preset="hiddenkey", key_kernel=kernel, consistency_grad=grad_mode)
        objective = HiddenKeyObjective(model, cfg).train()
        torch.manual_seed(5)
        out = objective(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert math.isfinite(out.loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[kernel] = (out.loss.item(), grads)
        if kernel == "auto":
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
            opt.step()
            assert any((p.detach() != before[n]).any() for n, p in model.named_parameters() if p.requires_grad)
    assert calls[0] > 0, "the fused path was not taken on CUDA with key_kernel=auto"
    (loss_s, g_s), (loss_f, g_f) = results["sdpa"], results["auto"]
    assert abs(loss_f - loss_s) <= BF16_TOL * max(1.0, abs(loss_s))
    for name in g_s:
        assert _rel(g_f[name], g_s[name]) <= 5 * BF16_TOL, name  # gradients through 4 bf16 layers


@pytest.mark.skipif(not flex.available(), reason="FlexAttention needs torch >= 2.5")
def test_fused_path_gradient_checkpointing_replays_masks():
    """fp32 on the device: with reentrant gradient checkpointing the recomputed layers redraw the same
    keep-masks (device RNG restored by checkpointing) into the fused kernel, so gradients are unchanged."""
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    ids, mask = (t.to(DEV) for t in padded_batch("right", batch=3, seq=40))
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = _lora_model(torch.float32, checkpointing=checkpointing)
        objective = HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey", key={"rate": 0.5})).train()
        torch.manual_seed(9)
        objective(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_qlora_4bit_step_on_cuda(tmp_path, builtin_cache):
    """model.quantization=4bit on CUDA: bitsandbytes quantizes onto this rank's device (device_map), the base
    is Linear4bit, one HiddenKey step gives a finite loss and gradients on the adapters only."""
    bnb = pytest.importorskip("bitsandbytes")
    from hiddenkey_ds.models.loading import load_model
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    recipe = tiny_recipe("model.quantization=4bit", "model.dtype=bf16", "dropout.preset=hiddenkey",
                         f"run.output_dir={tmp_path / 'run'}")
    model, tokenizer = load_model(recipe)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.device.type == "cuda" for m in linear4)
    objective = HiddenKeyObjective(model, recipe.dropout).train()
    enc = tokenizer(["a short review: great", "another one, rather longer: bad"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(DEV), enc["attention_mask"].to(DEV)
    out = objective(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
