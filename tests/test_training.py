"""Real training runs on CPU with gloo ranks: ZeRO equivalence (a ZeRO-3 that really partitions), QLoRA and bf16
through the engine, kill -9 and resume, the saved adapter reloaded in PEFT, evaluation after a multi-rank run."""
import json

import pytest
import torch

from train_runs import ZERO3_PARTITIONED, losses, metrics, train, tree

pytestmark = pytest.mark.distributed

SHORT = ("train.max_steps=4", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
         "eval.at_end=false", "data.max_train_examples=64", "data.max_eval_examples=16", "train.warmup=2")
ZERO3 = f"run.deepspeed={ZERO3_PARTITIONED}"
# 13 validation examples: 7 + 6 over two ranks, and neither a multiple of the micro-batch of 4
UNEVEN_EVAL = ("data.max_eval_examples=13", "train.eval_every=2")
TOL = 1e-5  # fp32; the same global batch split over ranks only reorders reductions


def _assert_same(a: dict, b: dict, tol=TOL):
    assert a.keys() == b.keys() and len(a) >= 2
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])


def _validation(out) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(out, "validation")}


def _all_partitioned(proc) -> None:
    """Every parameter tensor of the tiny model, LoRA included, was partitioned (none kept whole)."""
    assert "ZeRO-3: 29 of 29 parameter tensors partitioned over 2 ranks" in proc.stdout + proc.stderr


def test_two_ranks_zero2_and_zero3_equal_one_rank(tmp_path):
    one = tmp_path / "one"
    train("tiny-lora.yaml", one, *SHORT, *UNEVEN_EVAL, "train.micro_batch_size=8", "run.deepspeed=zero0")
    reference, reference_eval = losses(one), _validation(one)
    assert [r["examples"] for r in reference_eval.values()] == [13, 13]
    for stage, ds in (("zero2", "run.deepspeed=zero2"), ("zero3", ZERO3)):
        out = tmp_path / stage
        proc = train("tiny-lora.yaml", out, *SHORT, *UNEVEN_EVAL, "train.micro_batch_size=4", ds, nproc=2)
        if stage == "zero3":
            _all_partitioned(proc)
        _assert_same(reference, losses(out))
        # the uneven validation split: every example counted once, the same numbers as one rank
        evaluated = _validation(out)
        assert evaluated.keys() == reference_eval.keys()
        for step, row in evaluated.items():
            assert row["examples"] == 13 and row["accuracy"] == reference_eval[step]["accuracy"]
            assert row["loss"] == pytest.approx(reference_eval[step]["loss"], abs=TOL)


ZERO3_HIDDENKEY = (*SHORT, *UNEVEN_EVAL, "train.micro_batch_size=4", ZERO3, "model.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """tiny-hiddenkey on 2 ranks under the partitioning ZeRO-3, with gradient checkpointing (its recomputation
    re-gathers parameters and must replay the same masks), in fp32 and in bf16; the bf16 run is evaluated with
    lm-eval at the end (eval.at_end), which must run as a process of its own once both ranks have left."""
    root = tmp_path_factory.mktemp("zero3")
    runs = {}
    for dtype in ("fp32", "bf16"):
        extra = ("eval.at_end=true", "eval.limit=8") if dtype == "bf16" else ()
        proc = train("tiny-hiddenkey.yaml", root / dtype, *ZERO3_HIDDENKEY, f"model.dtype={dtype}", *extra, nproc=2,
                     timeout=900)
        _all_partitioned(proc)
        runs[dtype] = root / dtype
    return runs


def test_hiddenkey_under_zero3_equals_zero2(tmp_path, zero3_runs):
    """Same ranks, same seeds -> same masks: ZeRO-3 (partitioned, with gradient checkpointing) must not change the
    dual-pass computation."""
    out = tmp_path / "zero2"
    train("tiny-hiddenkey.yaml", out, *SHORT, *UNEVEN_EVAL, "train.micro_batch_size=4", "run.deepspeed=zero2", nproc=2)
    _assert_same(losses(out), losses(zero3_runs["fp32"]))
    assert all(r["consistency"] > 0 for r in metrics(zero3_runs["fp32"]))
    for step, row in _validation(out).items():
        assert row["loss"] == pytest.approx(_validation(zero3_runs["fp32"])[step]["loss"], abs=TOL)


def test_bf16_through_the_engine_and_evaluation_after_two_ranks(zero3_runs):
    fp32, bf16 = losses(zero3_runs["fp32"]), losses(zero3_runs["bf16"])
    ds = json.loads((zero3_runs["bf16"] / "ds_config.json").read_text())
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 3
    assert fp32.keys() == bf16.keys()
    assert all(abs(bf16[s] - fp32[s]) <= 1e-2 * fp32[s] for s in fp32)  # bf16 rounding, not another computation
    assert any(bf16[s] != fp32[s] for s in fp32)  # and really computed in bf16
    # eval.at_end after a 2-rank run: lm-eval ran in its own, single-process environment and wrote its results
    result = json.loads((zero3_runs["bf16"] / "eval" / "results.json").read_text())
    assert result["hiddenkey_ds"]["tasks"] == ["hk_toy_sst2"] and result["n-samples"]["hk_toy_sst2"]["effective"] == 8


def test_qlora_4bit_zero3_matches_zero2(tmp_path):
    """4-bit NF4 base on CPU, 2 ranks, the base partitioned by ZeRO-3. Evaluation in between (eval mode, no grad)
    is what used to corrupt ZeRO-3: see models._disable_cpu_weight_repacking."""
    runs = {}
    for stage, ds in (("zero2", "run.deepspeed=zero2"), ("zero3", ZERO3)):
        out = tmp_path / stage
        proc = train("tiny-lora.yaml", out, *SHORT, "model.quantization=4bit", "train.eval_every=1",
                     "train.micro_batch_size=4", ds, nproc=2)
        if stage == "zero3":
            _all_partitioned(proc)
        runs[stage] = out
    _assert_same(losses(runs["zero2"]), losses(runs["zero3"]), tol=1e-4)
    ev2 = [r["loss"] for r in metrics(runs["zero2"], "validation")]
    ev3 = [r["loss"] for r in metrics(runs["zero3"], "validation")]
    assert len(ev2) >= 4 and max(abs(a - b) for a, b in zip(ev2, ev3)) <= 1e-4


# -- kill -9 and resume ------------------------------------------------------------------------------------------

# grad_accum 3 over an epoch of 7 micro-batches per rank (56 examples / 2 ranks / 4): optimizer steps 3, 5, 8, ...
# take micro-batches from two epochs; an epochs recipe (6 epochs of 56 // 24 = 2 steps: 12 steps)
RESUME = ("train.micro_batch_size=4", "train.grad_accum=3", "train.max_steps=null", "train.epochs=6",
          "data.max_train_examples=56", "data.max_eval_examples=13", "train.save_every=3", "train.log_every=1",
          "train.eval_every=null", "eval.at_end=false", "train.warmup=2", ZERO3, "model.gradient_checkpointing=true")


def _complete(out) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*/COMPLETE"))


def test_kill_during_and_after_saves_then_resume_equals_uninterrupted(tmp_path):
    """Partitioned ZeRO-3, 2 ranks, grad_accum 3 with steps spanning epoch boundaries, an epochs recipe:
    rank 1 is SIGKILLed in the middle of the step-6 save, the resumed run is SIGKILLed (every rank) right after
    the step-9 save, the second resume finishes. Every step's loss equals the uninterrupted run's."""
    reference = losses(_run_full(tmp_path / "full"))
    assert sorted(reference) == list(range(1, 13))

    out = tmp_path / "killed"
    crash = {"CRASH_STEP": "6", "CRASH_POINT": "mid_save", "CRASH_RANK": "1"}
    died = train("tiny-hiddenkey.yaml", out, *RESUME, nproc=2, check=False, module="hkds_crash_train", env=crash)
    assert died.returncode != 0 and not (out / "summary.json").exists()
    assert _complete(out) == [3] and (out / "checkpoints" / "step_6").is_dir()  # a half-written step_6

    # (refusals of this directory without run.resume=true, or with a changed recipe: tests/test_bad_input.py)
    crash = {"CRASH_STEP": "9", "CRASH_POINT": "after_save"}
    resumed = train("tiny-hiddenkey.yaml", out, *RESUME, "run.resume=true", nproc=2, check=False,
                    module="hkds_crash_train", env=crash)
    assert f"resumed from {out / 'checkpoints' / 'step_3'} at step 3" in resumed.stdout + resumed.stderr
    assert resumed.returncode != 0 and _complete(out) == [6, 9]  # keep_checkpoints=2; the partial step_6 replaced

    # a setting that cannot change the result may differ, and config.yaml then records it
    final = train("tiny-hiddenkey.yaml", out, *RESUME, "run.resume=true", "train.keep_checkpoints=3", nproc=2)
    assert f"resumed from {out / 'checkpoints' / 'step_9'} at step 9" in final.stdout + final.stderr
    assert "train.keep_checkpoints 2 -> 3" in final.stdout + final.stderr
    assert "keep_checkpoints: 3" in (out / "config.yaml").read_text()
    after = losses(out)
    assert sorted(after) == sorted(reference)  # metrics.jsonl: no duplicated or missing steps
    for step in reference:
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step
    # the clock continues from the checkpoint: wall time counts every segment, not only the last one
    times = [r["time"] for r in sorted(metrics(out, "train"), key=lambda r: r["step"])]
    assert times == sorted(times), times
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_time_s"] >= times[-1] - 0.1


def _run_full(out):
    train("tiny-hiddenkey.yaml", out, *RESUME, nproc=2)
    return out


# -- the adapter -------------------------------------------------------------------------------------------------

def _validation_of(model, recipe, tokenizer, eval_ds):
    from hiddenkey_ds.data import make_collator
    from hiddenkey_ds.method import DropoutConfig
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    objective = HiddenKeyObjective(model, DropoutConfig(preset="none")).eval()
    collate = make_collator(tokenizer)
    ce, n, correct, seqs = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(eval_ds), 8):
            batch = collate([eval_ds[i] for i in range(start, min(start + 8, len(eval_ds)))])
            o = objective(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            ce += o.ce.item() * o.n_tokens.item()
            n += o.n_tokens.item()
            correct += o.seq_correct.item()
            seqs += o.n_seqs.item()
    return ce / n, correct / seqs


def _load(run, dtype, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.data import build_datasets
    from hiddenkey_ds.models.loading import load_tokenizer, resolve_model_path

    recipe = load_recipe(run / "config.yaml", check_output_dir=False)
    tokenizer = load_tokenizer(recipe)
    _, eval_ds, _ = build_datasets(recipe, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name), dtype=dtype)
    model = PeftModel.from_pretrained(base, str(run / "adapter"), is_trainable=trainable)
    return recipe, tokenizer, eval_ds, model


def test_adapter_saved_under_zero3_reloads_with_peft_and_reproduces_validation(zero3_runs):
    """The adapter a partitioned ZeRO-3 run saved, loaded the ecosystem's way: every tensor whole and equal to
    DeepSpeed's own consolidated weights, the trained model's validation loss and accuracy in eval mode, the
    recipe's dropout and gradients in train mode, and a different loss without the adapter."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = zero3_runs["fp32"]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_4",
                                                            exclude_frozen_parameters=True)
    trained = {k.removeprefix("model.").replace(".default.", "."): v for k, v in consolidated.items()}
    assert saved.keys() == trained.keys() and len(saved) == 8  # 2 layers x (q, v) x (A, B)
    final = metrics(run, "validation")[-1]
    recipe, tokenizer, eval_ds, model = _load(run, torch.float32)
    base = model.get_base_model()
    for key, value in saved.items():
        out_features, in_features = base.get_submodule(key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                                       ).base_layer.weight.shape
        assert value.shape == ((8, in_features) if "lora_A" in key else (out_features, 8)), (key, value.shape)
        assert torch.equal(value, trained[key].to(value.dtype)), key
        assert "lora_A" in key or value.abs().sum() > 0  # B trained away from its zero init

    loss, accuracy = _validation_of(model, recipe, tokenizer, eval_ds)
    assert loss == pytest.approx(final["loss"], abs=1e-5) and accuracy == final["accuracy"]
    with model.disable_adapter():
        base_loss, _ = _validation_of(model, recipe, tokenizer, eval_ds)
    assert abs(base_loss - loss) > 1e-4  # the adapter is what makes the number

    # train mode: reloaded as trainable, the recipe's dropout draws masks and every LoRA tensor gets a gradient
    from hiddenkey_ds.data import make_collator
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    recipe, tokenizer, eval_ds, model = _load(run, torch.float32, trainable=True)
    objective = HiddenKeyObjective(model, recipe.dropout).train()
    batch = make_collator(tokenizer)([eval_ds[i] for i in range(4)])
    torch.manual_seed(0)
    out = objective(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert out.consistency.item() > 0  # two passes with different masks: HiddenKey is on in train mode
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    if __import__("importlib").util.find_spec("tensorboard") is not None:  # DeepSpeed's monitor got the metrics
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))


def test_adapter_saved_in_bf16_under_zero3_is_whole(zero3_runs):
    from safetensors.torch import load_file

    saved = load_file(str(zero3_runs["bf16"] / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 8 and all(v.numel() in (8 * 64, 8 * 32) for v in saved.values())  # q: 64, v: 32 (GQA)
    final = metrics(zero3_runs["bf16"], "validation")[-1]
    recipe, tokenizer, eval_ds, model = _load(zero3_runs["bf16"], torch.bfloat16)
    loss, _ = _validation_of(model, recipe, tokenizer, eval_ds)
    assert loss == pytest.approx(final["loss"], abs=2e-3)


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    train("tiny-lora.yaml", out, *SHORT)
    before = tree(out)
    again = train("tiny-lora.yaml", out, *SHORT, check=False)
    assert again.returncode == 2 and "finished run" in again.stderr
    assert tree(out) == before
