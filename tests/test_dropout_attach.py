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


# -- the objective's hooks act only inside its own forward (and the backward of its loss) -------------------------

def _objective_step(model, cfg, ids, mask):
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    objective = HiddenKeyObjective(model, cfg).train()
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(3)
    out = objective(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return objective, out


@pytest.mark.parametrize("grad", ["one_branch", "both"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plain_call_after_objective_is_the_stock_model(grad, checkpointing):
    """After the objective's forward and backward, a plain train-mode call of the model is the stock model: the
    batch it returns has its own rows (not [x; x]), nothing is dropped, and the attention implementation is the
    model's own. (Before: `both` returned a doubled batch and every call dropped.)"""
    ids, mask = padded_batch("left")
    model, fresh = tiny_model(num_hidden_layers=4), tiny_model(num_hidden_layers=4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    _objective_step(model, DropoutConfig(preset="hiddenkey", key={"rate": 0.5}, consistency_grad=grad), ids, mask)
    model.train()
    fresh.train()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        stock = fresh(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == stock.shape == (3, 12, 97)
    assert (ours - stock).abs().max().item() <= 1e-6


def test_second_objective_replaces_the_first():
    """A second objective on the same model takes the first one's place (no stacked hooks, its loss is that of an
    objective on a model that never had another); the first one refuses to run."""
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    cfg = DropoutConfig(preset="hiddenkey", consistency_grad="both")
    ids, mask = padded_batch("left")
    model = tiny_model(num_hidden_layers=4)
    first = HiddenKeyObjective(model, cfg)
    second, out = _objective_step(model, cfg, ids, mask)
    _, alone = _objective_step(tiny_model(num_hidden_layers=4), cfg, ids, mask)
    layers = model.model.layers
    assert [len(layer._forward_pre_hooks) for layer in layers] == [0, 0, 1, 1]
    assert [len(layer.mlp._forward_hooks) for layer in layers] == [0, 0, 1, 1]
    assert torch.equal(out.loss.detach(), alone.loss.detach()) and out.consistency > 0
    with pytest.raises(RuntimeError, match="replaced by a newer HiddenKeyObjective"):
        first(input_ids=ids, attention_mask=mask, labels=ids)


def test_objective_remove_and_context_manager_take_everything_off():
    from hiddenkey_ds.method import dropout_handle
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    model = tiny_model(num_hidden_layers=4)
    ids, mask = padded_batch("right")
    with HiddenKeyObjective(model, DropoutConfig(preset="hiddenkey", keep_first_tokens=1)).train() as objective:
        objective(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        assert dropout_handle(model) is not None
    assert dropout_handle(model) is None and model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="removed"):
        objective(input_ids=ids, attention_mask=mask, labels=ids)
    objective.remove()  # idempotent


def test_model_already_on_the_hiddenkey_function_drops_nothing_outside_the_objective():
    """A model loaded with attn_implementation="hiddenkey" keeps it (there is nothing to switch), so the
    attention function itself asks the objective's scope whether to drop."""
    from hiddenkey_ds.method import attention

    attention.register()
    ids, mask = padded_batch("left")
    model, fresh = tiny_model(num_hidden_layers=4, attn_implementation="hiddenkey"), tiny_model(num_hidden_layers=4)
    _objective_step(model, DropoutConfig(preset="dropkey", key={"rate": 0.5}), ids, mask)
    assert model.config._attn_implementation == "hiddenkey"
    model.train()
    fresh.train()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        stock = fresh(input_ids=ids, attention_mask=mask).logits
    assert (ours - stock).abs().max().item() <= 1e-5
