"""Attaching the framework to a model: equivalence with stock attention, padding, undo, architectures."""
import pytest
import torch

from hiddenkey_ds.method import DropoutConfig, apply_dropout, remove_dropout
from tiny_models import ARCHS, padded_batch, tiny_model

# A rate so small that nothing is dropped, yet the hiddenkey code path (not the sdpa fallback) runs.
NEVER = 1e-12
POSITION_CONFIGS = {
    "key/element": DropoutConfig(preset="custom", key={"rate": NEVER, "pattern": "element"}),
    "key/column": DropoutConfig(preset="custom", key={"rate": NEVER, "pattern": "column"}),
    "attention/element/normalized": DropoutConfig(preset="custom", attention={"rate": NEVER, "pattern": "element"}),
    "attention/column/inverted": DropoutConfig(
        preset="custom", attention={"rate": NEVER, "pattern": "column", "rescale": "inverted"}),
    "hidden/element": DropoutConfig(preset="custom", hidden={"rate": NEVER, "pattern": "element"}),
    "hidden/column": DropoutConfig(preset="custom", hidden={"rate": NEVER, "pattern": "column"}),
}


def _valid_logits(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[mask.bool()]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("preset", ["dropkey", "dropattention", "hiddencut", "hiddenkey", "hiddenkey_nokl"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_eval_mode_equals_stock_sdpa(arch, preset, side):
    model = tiny_model(arch)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        apply_dropout(model, DropoutConfig(preset=preset))
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert (ours - stock).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", list(POSITION_CONFIGS))
@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_training_path_respects_padding(arch, name, side):
    """The training path (own attention function, mask interface) on padded batches: logits at real
    tokens equal stock sdpa's. Without the registered mask function this is off by ~0.25 on left padding."""
    model = tiny_model(arch)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        stock = _valid_logits(model, ids, mask)
        apply_dropout(model, POSITION_CONFIGS[name])
        model.train()
        ours = _valid_logits(model, ids, mask)
    assert (ours - stock).abs().max().item() <= 1e-5


def test_rates_zero_in_training_equal_stock():
    model = tiny_model()
    ids, mask = padded_batch("left")
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        apply_dropout(model, DropoutConfig(preset="none"))
        model.train()
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert (ours - stock).abs().max().item() <= 1e-6


def test_training_mode_drops_and_remove_restores():
    model = tiny_model()
    ids, mask = padded_batch("none")
    model.train()
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        handle = apply_dropout(model, DropoutConfig(preset="hiddenkey"))
        assert model.config._attn_implementation == "hiddenkey"
        dropped = model(input_ids=ids, attention_mask=mask).logits
        assert (dropped - stock).abs().max().item() > 1e-3
        handle.remove()
        assert model.config._attn_implementation == "sdpa"
        restored = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(restored, stock)
    assert not any(m._forward_hooks for m in model.modules())


def test_reapply_replaces_and_remove_dropout_is_idempotent():
    model = tiny_model()
    apply_dropout(model, DropoutConfig(preset="hiddenkey"))
    apply_dropout(model, DropoutConfig(preset="hiddencut"))
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert len(hooked) == model.config.num_hidden_layers // 2  # one hook per latter-half MLP, not two
    assert model.config._attn_implementation == "sdpa"  # hiddencut needs no attention function
    remove_dropout(model)
    remove_dropout(model)
    assert not any(m._forward_hooks for m in model.modules())


def test_hidden_only_keeps_attention_implementation():
    model = tiny_model()
    apply_dropout(model, DropoutConfig(preset="custom", hidden={"rate": 0.1}))
    assert model.config._attn_implementation == "sdpa"


def test_peft_model_is_accepted():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = padded_batch("left")
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
        apply_dropout(model, DropoutConfig(preset="hiddenkey"))
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert (ours - stock).abs().max().item() <= 1e-6


def test_non_decoder_model_gets_clear_error():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="no decoder layers"):
        apply_dropout(bert, DropoutConfig(preset="hiddenkey"))
