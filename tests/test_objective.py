"""The dual-pass objective against a naive full-logits reference, and its one-forward contract."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from hiddenkey_ds.method import DropoutConfig, dropout_handle
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
        loss.backward()
    else:
        # the objective's dropout acts only inside its forward: the reference turns it on around its own calls
        handle = dropout_handle(model)
        with handle.activated() if handle is not None else contextlib.nullcontext():
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


# -- what the model's forward does after its head ----------------------------------------------------------------

_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
_MOE = dict(num_local_experts=2, num_experts_per_tok=1)
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)
# family -> (config class, model class, settings that make its post-head transform far from the identity)
POST_HEAD = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=0.05)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=0.05)),
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(
        final_logit_softcapping=0.05, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8, laurel_rank=4,
        altup_num_inputs=2, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"], intermediate_size=[64, 64])),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(final_logit_softcapping=0.05)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(final_logit_softcapping=0.05)),
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(final_logit_softcapping=0.05)),
    "beam": ("BeamConfig", "BeamForCausalLM", dict(final_logit_softcapping=0.05)),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(
        logits_soft_cap=0.05, lru_width=32, block_types=["recurrent", "attention"], attention_window_size=16)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=4.0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=4.0)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(logit_scale=4.0)),
    "cohere_compass": ("CohereCompassTextConfig", "CohereCompassForCausalLM", dict(
        logit_scale=4.0, layer_types=["full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25)),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", dict(logits_scaling=0.25)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(logits_scaling=0.25, **_MOE)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(logits_scaling=0.25, **_MOE)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        logits_scaling=0.25, shared_intermediate_size=32, **_MOE)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        logits_scaling=0.25, shared_intermediate_size=32, layer_types=["mamba", "attention"], **_MOE, **_MAMBA)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=4.0)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(lm_head_multiplier=4.0, mamba_d_ssm=64, **_MAMBA)),
}


def _tiny_family(family, **overrides):
    import transformers

    config_name, model_name, extra = POST_HEAD[family]
    config = getattr(transformers, config_name)(**{**_TINY, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).float().eval()


def _ce_of_own_forward(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100), logits


@pytest.mark.parametrize("family", list(POST_HEAD))
def test_post_head_transform_matches_the_models_own_forward(family):
    """The chunked head applies what the model's forward applies after lm_head (soft-capping, logit_scale,
    logits_scaling, ...): the objective's CE equals cross-entropy on the model's own logits."""
    model = _tiny_family(family)
    ids, mask = padded_batch("left", batch=2, seq=10)
    labels = _labels(ids, mask)
    with torch.no_grad():
        reference, logits = _ce_of_own_forward(model, ids, mask, labels)
        raw = model.get_output_embeddings()(model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
        untransformed = F.cross_entropy(raw.float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        out = HiddenKeyObjective(model, DropoutConfig(preset="none"), chunk_tokens=5).eval()(
            input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(untransformed - reference) > 1e-3  # the transform matters here
    assert torch.allclose(out.ce, reference, atol=1e-5, rtol=1e-5), (out.ce, reference)
    sup = labels[:, 1:] != -100
    assert out.token_correct.item() == (logits[:, :-1].argmax(-1)[sup] == labels[:, 1:][sup]).sum().item()


def test_accuracy_uses_transformed_logits():
    """A negative logit_scale reverses the ranking: the argmax (accuracy) must come from the transformed logits."""
    model = _tiny_family("cohere", logit_scale=-4.0)
    ids, mask = padded_batch("none", batch=2, seq=10)
    labels = _labels(ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        pred = logits[:, :-1].argmax(-1)
        labels[:, 1:] = torch.where(labels[:, 1:] != -100, pred, labels[:, 1:])  # every supervised token right
        out = HiddenKeyObjective(model, DropoutConfig(preset="none")).eval()(
            input_ids=ids, attention_mask=mask, labels=labels)
    assert out.token_correct.item() == out.n_tokens.item() > 0
    assert out.seq_correct.item() == 2


def test_xlstm_transform_is_its_own_soft_cap():
    """xLSTM's forward does not run at tiny sizes on CPU in transformers 5.23 (its chunkwise kernel's state shapes
    do not match), so its transform is checked against the soft_cap function its forward calls."""
    import transformers
    from transformers.models.xlstm import modeling_xlstm

    from hiddenkey_ds.method.heads import logit_transform

    config = transformers.xLSTMConfig(embedding_dim=32, hidden_size=32, num_blocks=2, num_hidden_layers=2, num_heads=2,
                                      vocab_size=97, output_logit_soft_cap=0.5)
    with torch.device("meta"):
        model = transformers.xLSTMForCausalLM(config)
    x = torch.randn(4, 97) * 3
    assert torch.allclose(logit_transform(model)(x), modeling_xlstm.soft_cap(x, 0.5), atol=1e-6)
    assert not torch.allclose(x, modeling_xlstm.soft_cap(x, 0.5), atol=1e-2)


def test_plain_models_get_identity_and_unknown_heads_are_refused():
    """A plain head (LLaMA, GPT-2) is used as is; a forward that changes logits or hidden states around the head in
    a way hiddenkey-ds does not know (MiniCPM3 scales the hidden states before it) is refused, by name, also on a
    meta-device model (start-up checks)."""
    import transformers

    from hiddenkey_ds.method.heads import UnsupportedModelError, head_problem, logit_transform

    x = torch.randn(3, 97)
    assert head_problem(tiny_model()) is None and torch.equal(logit_transform(tiny_model())(x), x)
    with torch.device("meta"):
        minicpm = transformers.MiniCPM3ForCausalLM(transformers.MiniCPM3Config(
            vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8))
        gemma3 = _tiny_family("gemma3")
    problem = head_problem(minicpm)
    assert "MiniCPM3ForCausalLM" in problem and "logits_scaling" in problem
    with pytest.raises(UnsupportedModelError, match="MiniCPM3ForCausalLM"):
        logit_transform(minicpm)
    with pytest.raises(ValueError, match="MiniCPM3ForCausalLM"):
        HiddenKeyObjective(minicpm, DropoutConfig(preset="none"))
    assert head_problem(gemma3) is None  # a known transform is no problem


# -- plain LoRA on any layout -------------------------------------------------------------------------------------

def _other_layout(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                                          bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=97, max_position_embeddings=64,
                                            bos_token_id=1, eos_token_id=1)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
def test_plain_lora_trains_any_layout(kind):
    """Every dropout off: no hooks, no LLaMA layout needed. LoRA on GPT-2 / GPT-NeoX trains through the objective
    with the model's own loss, and its gradients are the model's own."""
    peft = pytest.importorskip("peft")
    target = ["c_attn"] if kind == "gpt2" else ["query_key_value"]
    model = peft.get_peft_model(_other_layout(kind), peft.LoraConfig(r=4, lora_dropout=0.0, target_modules=target,
                                                                     init_lora_weights=False))
    ids, mask = padded_batch("right", batch=2, seq=10)
    labels = _labels(ids, mask)
    objective = HiddenKeyObjective(model, DropoutConfig(preset="none"), chunk_tokens=4).train()
    out = objective(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference, _ = _ce_of_own_forward(model, ids, mask, labels)
    reference.backward()
    assert torch.allclose(out.loss, reference, atol=1e-5, rtol=1e-5), (out.loss, reference)
    assert ours and all(torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)
                        for (n, g), p in zip(ours.items(), (q for q in model.parameters() if q.requires_grad)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("preset", ["hiddenkey", "hiddencut"])
def test_dropout_on_an_unsupported_layout_names_what_is_missing(preset):
    from hiddenkey_ds.method.heads import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as err:
        HiddenKeyObjective(_other_layout("gpt2"), DropoutConfig(preset=preset))
    message = str(err.value)
    assert all(part in message for part in ("GPT2LMHeadModel", "GPT2Block", "`self_attn`", "attn", "preset none")), \
        message


@pytest.mark.parametrize("grad, reentrant", [("one_branch", True), ("both", True), ("both", False)])
def test_checkpointed_backward_redraws_the_forwards_masks(grad, reentrant):
    """The objective's dropout is on only inside its forward, yet gradient checkpointing recomputes the layers in
    backward: the backward turns it back on, with the forward's state, so the gradients equal those without
    checkpointing, even when a plain call of the model (another batch size, no dropout) runs in between."""
    cfg = DropoutConfig(preset="hiddenkey", key={"rate": 0.5}, hidden={"rate": 0.5}, consistency_grad=grad)
    ids, mask = padded_batch("left", seq=16)
    labels = _labels(ids, mask)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(num_hidden_layers=4)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        objective = HiddenKeyObjective(model, cfg).train()
        torch.manual_seed(11)
        out = objective(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.no_grad():
            model(input_ids=ids[:2], attention_mask=mask[:2])
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name
