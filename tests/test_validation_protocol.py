"""The paper's reporting protocol on our side: a validation split carved from the training data (never the split
a table is scored on), seeded label noise, and the adapter of the best validation step."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from hiddenkey_ds.data.pipeline import _carve_validation, _flip_labels
from hiddenkey_ds.data.templates import get_template
from hiddenkey_ds.data.toy import toy_sst2_rows
from tiny_models import tiny_recipe
from train_runs import metrics, train


def _toy(n=300):
    return datasets.Dataset.from_list(toy_sst2_rows("train")[:n])


def test_carved_validation_is_disjoint_seeded_and_independent_of_the_run_seed():
    ds = _toy()
    rest, val, digest = _carve_validation(ds, 50, seed=0)
    assert len(val) == 50 and len(rest) == 250
    v, r = list(val["idx"]), list(rest["idx"])
    assert not set(v) & set(r) and sorted(v + r) == list(range(300))
    again = _carve_validation(ds, 50, seed=0)
    assert list(again[1]["idx"]) == v and again[2] == digest          # same split_seed: same rows, same digest
    other = _carve_validation(ds, 50, seed=1)
    assert list(other[1]["idx"]) != v and other[2] != digest
    assert len(_carve_validation(ds, 0.1, seed=0)[1]) == 30               # a fraction
    from hiddenkey_ds.config import RecipeError
    with pytest.raises(RecipeError, match="validation_from_train"):
        _carve_validation(ds, 300, seed=0)


def test_label_noise_flips_exactly_the_fraction_seeded():
    ds = _toy(200)
    template = get_template("sst2")
    noisy, n = _flip_labels(ds, template, 0.2, (0, 0))
    labels, noisy_labels = list(ds["label"]), list(noisy["label"])
    assert n == 40 and sum(a != b for a, b in zip(labels, noisy_labels)) == 40
    assert list(noisy["sentence"]) == list(ds["sentence"])
    assert list(_flip_labels(ds, template, 0.2, (0, 0))[0]["label"]) == noisy_labels    # repeatable
    assert list(_flip_labels(ds, template, 0.2, (0, 1))[0]["label"]) != noisy_labels    # per run seed
    rte = datasets.Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": i % 2} for i in range(10)])
    flipped_rte, _ = _flip_labels(rte, get_template("rte"), 0.5, (3, 3))
    assert sum(a != b for a, b in zip(list(rte["label"]), list(flipped_rte["label"]))) == 5


def test_build_datasets_uses_the_carved_split_and_reports_it(builtin_cache):
    from hiddenkey_ds.data import build_datasets
    from hiddenkey_ds.models.loading import load_tokenizer

    recipe = tiny_recipe("data.validation_from_train=64", "data.label_noise=0.25", "data.max_train_examples=100",
                         "data.max_eval_examples=null")
    tok = load_tokenizer(recipe)
    train_ds, eval_ds, report = build_datasets(recipe, tok)
    assert len(eval_ds) == 64 and len(train_ds) == 100
    assert report.splits["eval"].carved_from == "train" and len(report.splits["eval"].carved_ids) == 40
    assert report.splits["train"].labels_flipped == 25 and report.splits["eval"].labels_flipped == 0
    # the run seed picks the training subset, never the validation rows
    _, eval_other, report_other = build_datasets(tiny_recipe(
        "data.validation_from_train=64", "data.max_train_examples=100", "data.max_eval_examples=null",
        "run.seed=5"), tok)
    assert report_other.splits["eval"].carved_ids == report.splits["eval"].carved_ids
    assert list(eval_other["input_ids"]) == list(eval_ds["input_ids"])


def test_label_noise_needs_classification():
    from hiddenkey_ds.config import RecipeError

    with pytest.raises(RecipeError, match="label_noise"):
        tiny_recipe("data.format=sft", "data.task=null", "data.label_noise=0.1")


def test_best_adapter_is_the_best_validation_step_and_reloads_to_it(tmp_path):
    """adapter_best holds the weights of the validation step with the highest accuracy (then lowest loss), and,
    loaded the PEFT way, reproduces that step's validation loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.data import build_datasets, make_collator
    from hiddenkey_ds.method import DropoutConfig
    from hiddenkey_ds.models.loading import load_tokenizer, resolve_model_path
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    out = tmp_path / "run"
    train("tiny-hiddenkey.yaml", out, "train.max_steps=12", "train.eval_every=2", "train.save_every=null",
          "train.log_every=4", "data.validation_from_train=48", "data.max_eval_examples=null",
          "data.max_train_examples=128", "data.label_noise=0.3", "eval.at_end=false")
    rows = metrics(out, "validation")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    best_row = max(rows, key=lambda r: (r["accuracy"], -r["loss"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["step"] == best_row["step"] and summary["best"]["loss"] == best_row["loss"]
    meta = json.loads((out / "adapter_best" / "hiddenkey_ds.json").read_text())
    assert meta["kind"] == "best" and meta["step"] == best_row["step"]
    final_meta = json.loads((out / "adapter" / "hiddenkey_ds.json").read_text())
    # the meta file also names the weights (sha256 of the weights file): what a results file records it scored
    import hashlib

    assert final_meta == {"kind": "final", "step": 12, "sha256": hashlib.sha256(
        (out / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()}

    recipe = load_recipe(out / "config.yaml", check_output_dir=False)
    tokenizer = load_tokenizer(recipe)
    _, eval_ds, _ = build_datasets(recipe, tokenizer)
    collate = make_collator(tokenizer)
    losses = {}
    for kind in ("adapter_best", "adapter"):
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name), dtype=torch.float32)
        objective = HiddenKeyObjective(PeftModel.from_pretrained(base, str(out / kind)),
                                       DropoutConfig(preset="none")).eval()
        ce = n = 0.0
        with torch.no_grad():
            for start in range(0, len(eval_ds), 8):
                batch = collate([eval_ds[i] for i in range(start, min(start + 8, len(eval_ds)))])
                o = objective(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])
                ce += o.ce.item() * o.n_tokens.item()
                n += o.n_tokens.item()
        losses[kind] = ce / n
    assert losses["adapter_best"] == pytest.approx(best_row["loss"], abs=1e-5)
    assert losses["adapter"] == pytest.approx(rows[-1]["loss"], abs=1e-5)
