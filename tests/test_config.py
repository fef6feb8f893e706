"""Recipe schema, overrides, start-up validation and DeepSpeed config resolution."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiddenkey_ds.config import RecipeError, load_recipe, reference_markdown
from hiddenkey_ds.config.reference import reference_rows
from hiddenkey_ds.config.deepspeed import resolve_ds_config
from hiddenkey_ds.training.schedules import lr_scheduler_factory

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-hiddenkey.yaml"


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal(tmp_path: Path, **sections) -> dict:
    base = {
        "run": {"output_dir": str(tmp_path / "out"), "deepspeed": "zero2"},
        "model": {"name": "builtin:tiny-llama", "dtype": "fp32"},
        "data": {"task": "sst2", "path": "builtin:toy-sst2"},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 10},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def _problems(path: Path, overrides=(), **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), **kwargs)
    return info.value.problems


# -- loading and overrides ---------------------------------------------------------------------------

def test_overrides_are_typed_yaml_values_and_keep_preset_settings():
    recipe = load_recipe(TINY, [
        "train.lr=3e-4", "lora.target_modules=[q_proj,k_proj,v_proj]", "dropout.key.rate=0.2",
        "train.max_steps=5", "data.max_eval_examples=null", "model.gradient_checkpointing=true",
    ], check_output_dir=False)
    assert recipe.train.lr == pytest.approx(3e-4) and isinstance(recipe.train.lr, float)
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    # a partial position block keeps the preset's other settings
    assert recipe.dropout.key.rate == 0.2 and recipe.dropout.key.pattern == "column"
    assert recipe.dropout.consistency == "kl" and recipe.dropout.alpha == 1.0
    assert recipe.train.max_steps == 5 and recipe.data.max_eval_examples is None
    assert recipe.model.gradient_checkpointing is True


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = _write(tmp_path, _minimal(tmp_path, train={"lr": "placeholder"}))
    path.write_text(path.read_text().replace("placeholder", "1e-4"))
    assert load_recipe(path).train.lr == pytest.approx(1e-4)


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(TINY, ["train.lr=7e-4", "dropout.hidden.rate=0.3"], check_output_dir=False)
    again = load_recipe(_write(tmp_path, yaml.safe_load(recipe.to_yaml())), check_output_dir=False)
    assert again == recipe


def test_unknown_override_key_gets_did_you_mean():
    problems = _problems(TINY, ["train.learning_rat=1", "lr=1", "model.nme=x", "train.max_steps.x=1", "trian.lr=1",
                                "dropout.key.rte=0.2"], check_output_dir=False)
    assert "override trian.lr: unknown key (hint: did you mean train.lr?)" in problems
    assert "override dropout.key.rte: unknown key (hint: did you mean dropout.key.rate?)" in problems
    assert "override train.learning_rat: unknown key (hint: did you mean train.lr?)" in problems
    assert "override lr: unknown key (hint: did you mean train.lr?)" in problems
    assert "override model.nme: unknown key (hint: did you mean model.name?)" in problems
    assert any(p.startswith("override train.max_steps.x: train.max_steps is a value") for p in problems)


def test_override_without_equals_sign():
    problems = _problems(TINY, ["train.lr"], check_output_dir=False)
    assert problems[0].startswith("override 'train.lr': expected KEY=VALUE")


def test_unknown_yaml_key_and_foreign_name_hints(tmp_path):
    data = _minimal(tmp_path, train={"learning_rate": 1e-4}, lora={"rnk": 4})
    problems = _problems(_write(tmp_path, data))
    assert "train.learning_rate: unknown key (hint: did you mean train.lr?)" in problems
    assert "lora.rnk: unknown key (hint: did you mean lora.r?)" in problems


# -- every bad-input case lists its own problem -----------------------------------------------------

def test_wrong_types_and_out_of_range_rates_are_all_listed(tmp_path):
    problems = _problems(TINY, [
        "train.max_steps=abc", "train.warmup=abc", "dropout.hidden.rate=1.0", "lora.dropout=-0.1",
        "model.dtype=fp16", "train.lr=0",
    ], check_output_dir=False)
    text = "\n".join(problems)
    assert "train.max_steps: expected a whole number, got 'abc'" in problems
    assert "train.warmup: expected a whole number or a number, got 'abc'" in problems
    assert "dropout.hidden.rate: Input should be less than 1, got 1.0 (hint: a rate is a drop probability in [0, 1)" in text
    assert "lora.dropout: Input should be greater than or equal to 0, got -0.1 (hint: a rate" in text
    assert "model.dtype: Input should be 'bf16' or 'fp32'" in text
    assert "train.lr: Input should be greater than 0, got 0" in text
    assert len(problems) == 6


def test_batch_arithmetic_single_source(tmp_path):
    path = _write(tmp_path, _minimal(tmp_path, train={"global_batch_size": 32}))
    recipe = load_recipe(path, world_size=4)
    assert recipe.train.global_batch(4) == 32 == recipe.train.micro_batch_size * recipe.train.grad_accum * 4
    problems = _problems(path, world_size=2)
    assert problems == [
        "train.global_batch_size: 32 != micro_batch_size 4 x grad_accum 2 x world size 2 = 16 (hint: set "
        "train.grad_accum=4 to keep the global batch; global batch = micro_batch_size x grad_accum x world size; "
        "unset train.global_batch_size to derive it)"
    ]
    # without a world size only divisibility can be checked
    assert load_recipe(path).train.global_batch_size == 32
    assert "no world size fits" in _problems(path, ["train.global_batch_size=30"])[0]


def test_zero3_refuses_8bit_and_device_map(tmp_path):
    path = _write(tmp_path, _minimal(tmp_path, run={"deepspeed": "zero3"},
                                     model={"quantization": "8bit", "device_map": "auto"}))
    problems = _problems(path)
    assert len(problems) == 2
    assert problems[0].startswith("model.quantization: 8bit with ZeRO-3 (zero3) is known to corrupt training")
    assert problems[1].startswith("model.device_map: 'auto' with ZeRO-3 (zero3)")
    # the same model settings are fine under ZeRO-2
    assert load_recipe(path, ["run.deepspeed=zero2"]).model.quantization == "8bit"


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"done": true}')
    path = _write(tmp_path, _minimal(tmp_path))
    problems = _problems(path)
    assert problems == [
        f"run.output_dir: {out} holds a finished run (summary.json); results are never overwritten "
        "(hint: choose another run.output_dir, or pass run.resume=true to reuse it)"
    ]
    assert load_recipe(path, ["run.resume=true"]).run.resume is True
    assert load_recipe(path, check_output_dir=False).run.output_dir == str(out)


def test_all_problems_reported_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    data = _minimal(tmp_path, run={"deepspeed": "zero3"}, model={"quantization": "8bit"},
                    train={"global_batch_size": 64, "max_stepz": 3}, dropout={"preset": "hiddenkey", "alpha": 0})
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, data), ["data.task=rtee"], world_size=2)
    problems = info.value.problems
    assert len(problems) == 6, problems
    for start in ("data.task: unknown task 'rtee'", "train.max_stepz: unknown key", "dropout: consistency='kl' with alpha=0",
                  "train.global_batch_size: 64 != ", "model.quantization: 8bit with ZeRO-3", "run.output_dir: "):
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert str(info.value).startswith(f"{tmp_path / 'r.yaml'}: 6 problems:\n  - ")


def test_length_must_be_max_steps_or_epochs(tmp_path):
    problems = _problems(_write(tmp_path, _minimal(tmp_path, train={"epochs": 2})))
    assert problems == ["train: set exactly one of train.max_steps and train.epochs (got max_steps=10, epochs=2.0)"]


def test_missing_sections_and_files(tmp_path):
    problems = _problems(_write(tmp_path, {"model": {"name": "x"}}))
    assert any(p.startswith("run: Field required") for p in problems)
    assert any(p.startswith("data: Field required") for p in problems)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    problems = _problems(_write(tmp_path, _minimal(tmp_path, run={"deepspeed": "zero9"})))
    assert problems[0].startswith("run.deepspeed: no DeepSpeed config 'zero9'")


def test_cli_exits_nonzero_and_leaves_outputs_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"accuracy": 0.7}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    path = _write(tmp_path, _minimal(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hiddenkey_ds.config", str(path), "train.lr=-1"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    assert "2 problems" in proc.stderr and "train.lr: Input should be greater than 0" in proc.stderr
    assert "holds a finished run" in proc.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


# -- DeepSpeed config resolution ---------------------------------------------------------------------

def _tiny(overrides=()):
    return load_recipe(TINY, list(overrides), check_output_dir=False)


def test_ds_config_filled_from_recipe_without_auto():
    recipe = _tiny(["train.micro_batch_size=4", "train.grad_accum=3", "train.max_grad_norm=0.5", "model.dtype=bf16",
                    "train.lr=3e-4", "train.warmup=0.1", "train.max_steps=50", "train.weight_decay=0.01"])
    ds = resolve_ds_config(recipe, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True}}
    assert "scheduler" not in ds  # the recipe's schedule is a LambdaLR handed to deepspeed.initialize
    assert ds["zero_optimization"]["stage"] == 2
    assert "auto" not in json.dumps(ds)


def _lrs(overrides, steps):
    import torch

    recipe = _tiny(overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.train.lr)
    sched = lr_scheduler_factory(recipe, recipe.train.max_steps)(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def test_lr_schedules_are_exact():
    assert _lrs(["train.max_steps=6", "train.warmup=2", "train.lr=0.01"], 6) == pytest.approx(
        [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025])
    # no warmup: full lr at the first step, then the decay (DeepSpeed's WarmupDecayLR stays flat here)
    assert _lrs(["train.max_steps=4", "train.warmup=0", "train.lr=0.01"], 4) == pytest.approx(
        [0.01, 0.0075, 0.005, 0.0025])
    assert _lrs(["train.max_steps=4", "train.warmup=0", "train.lr=0.01", "train.scheduler=cosine"], 3) == pytest.approx(
        [0.01, 0.01 * (0.5 + 0.5 * 0.7071067811865476), 0.005])
    assert _lrs(["train.max_steps=4", "train.warmup=0", "train.lr=0.01", "train.scheduler=constant"], 4) == [0.01] * 4


def test_ds_json_scheduler_block_is_refused(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["scheduler"] = {"type": "WarmupLR", "params": {}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(RecipeError, match="scheduler"):
        load_recipe(TINY, [f"run.deepspeed={path}"], check_output_dir=False)


def test_ds_epochs_recipe_needs_total_steps():
    recipe = _tiny(["train.max_steps=null", "train.epochs=2"])
    with pytest.raises(ValueError, match="pass total_steps"):
        resolve_ds_config(recipe, 1)
    total = recipe.train.total_steps(num_train_examples=100, world_size=2)
    assert total == (100 // 16) * 2
    assert resolve_ds_config(recipe, 2, total_steps=total)["train_batch_size"] == 16


def test_ds_json_conflicting_with_recipe_is_an_error(tmp_path):
    conflicting = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    conflicting["gradient_clipping"] = 0.3
    conflicting["train_micro_batch_size_per_gpu"] = 8  # equal to the recipe's: fine
    conflicting["optimizer"] = {"type": "Lion", "params": {"lr": "auto"}}
    conflicting["zero_optimization"]["mystery"] = "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(conflicting))
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [f"run.deepspeed={path}"], check_output_dir=False)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert f"run.deepspeed: {path} sets gradient_clipping=0.3 but the recipe gives 1.0" in problems[0]
    assert 'sets optimizer.type="Lion" but the recipe gives "AdamW"' in problems[1]
    assert "leaves zero_optimization.mystery=\"auto\"" in problems[2]


def test_every_key_is_documented_and_in_the_recipes_page():
    rows = reference_rows()
    undocumented = [key for key, _, _, meaning in rows if not meaning]
    assert undocumented == []
    page = (REPO / "docs" / "recipes.md").read_text()
    start = page.index("<!-- generated:recipe-key-reference -->") + len("<!-- generated:recipe-key-reference -->")
    end = page.index("<!-- /generated:recipe-key-reference -->")
    assert page[start:end].strip() == reference_markdown().strip(), (
        "docs/recipes.md key reference is stale: paste the output of `python -m hiddenkey_ds.config --reference` "
        "between its generated:recipe-key-reference markers"
    )


# -- combinations refused when the recipe loads ------------------------------------------------------------------

def _at_end(tmp_path, *overrides):
    return load_recipe(TINY, ["eval.at_end=true", *overrides], check_output_dir=False)


def test_eval_at_end_refuses_what_the_evaluation_cannot_run(tmp_path):
    """eval.at_end runs `hiddenkey-ds eval RUN_DIR` in one process: refused up front where it has no task to
    score or would load a base the recipe itself cannot hold on one device."""
    sft = ["data.format=sft", "data.task=null", f"data.path={tmp_path}"]
    assert "free-form (sft)" in _problems(TINY, ["eval.at_end=true", *sft], check_output_dir=False)[0]
    assert _at_end(tmp_path, *sft, "eval.tasks=[hk_rte]").eval.tasks == ["hk_rte"]  # named tasks: fine

    single = tmp_path / "train.jsonl"
    single.write_text('{"sentence": "good", "label": 1}\n')
    problems = _problems(TINY, ["eval.at_end=true", f"data.path={single}", "data.eval_split=null"],
                         check_output_dir=False)
    assert problems[0].startswith(f"eval.at_end: data.path='{single}' is a single file") and "hk_sst2_local" in problems[0]
    assert _at_end(tmp_path, f"data.path={single}", "data.eval_split=null", "eval.tasks=[hk_sst2]")
    assert _at_end(tmp_path, f"data.path={tmp_path}")  # a directory: the local task reads it
    assert "a hub dataset other than the task's" in _problems(
        TINY, ["eval.at_end=true", "data.path=someone/sst2-copy"], check_output_dir=False)[0]

    qlora_zero3 = ["model.quantization=4bit", "run.deepspeed=zero3"]
    assert "loads the base whole" in _problems(TINY, ["eval.at_end=true", *qlora_zero3], check_output_dir=False)[0]
    assert _at_end(tmp_path, "model.quantization=4bit", "run.deepspeed=zero2")  # the base is whole on a rank anyway
    assert load_recipe(TINY, ["eval.at_end=false", *qlora_zero3], check_output_dir=False)


def test_lora_on_the_lm_head_is_refused_where_the_chunked_head_uses_it_twice():
    head = "lora.target_modules=[q_proj,lm_head]"
    fits = ["train.micro_batch_size=8", "data.max_length=64", "train.loss_chunk_tokens=512"]  # one chunk
    dual = _problems(TINY, [head, *fits, "dropout.consistency_grad=both"], check_output_dir=False)
    assert len(dual) == 1 and "consistency_grad=both runs the head twice" in dual[0]
    assert "used more than once per forward" in dual[0] and "consistency_grad=one_branch" in dual[0]
    # one_branch (the default): the second pass's head runs without grad, so one chunk uses the weight once
    assert load_recipe(TINY, [head, *fits, "dropout.consistency_grad=one_branch"], check_output_dir=False)
    lora = REPO / "recipes" / "tiny-lora.yaml"  # one pass
    single = ["train.micro_batch_size=8", "data.max_length=64"]
    chunks = _problems(lora, [head, *single, "train.loss_chunk_tokens=256"], check_output_dir=False)
    assert len(chunks) == 1 and "the dual pass" not in chunks[0]
    assert "more than one chunk of train.loss_chunk_tokens=256" in chunks[0] and "raise train.loss_chunk_tokens" in chunks[0]
    # one pass and never more than one chunk: the head's weight is used once, which DeepSpeed handles
    assert load_recipe(lora, [head, *single, "train.loss_chunk_tokens=512"], check_output_dir=False)


def test_output_dir_must_be_a_directory_it_can_create(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, what in ((afile, "is a file"), (afile / "run", f"lies under the file {afile}")):
        problems = _problems(TINY, [f"run.output_dir={out}"], check_output_dir=False)
        assert problems == [f"run.output_dir: {out} {what}, not a directory (hint: choose another run.output_dir; "
                            "nothing was written)"]


def test_local_data_paths_are_checked_before_anything_loads(tmp_path):
    problems = _problems(TINY, [f"run.output_dir={tmp_path}/o", f"data.path={tmp_path}/missing",
                                f"data.eval_path={tmp_path}/dev.txt"])
    assert problems[0].startswith(f"data.path: '{tmp_path}/missing' does not exist")
    assert problems[1].startswith(f"data.eval_path: '{tmp_path}/dev.txt' is not a")
    # tools that only read the recipe (plan, launch.sh) may not see the run's data
    assert load_recipe(TINY, [f"data.path={tmp_path}/missing"], check_output_dir=False)


# -- what a resume may change -------------------------------------------------------------------------------------

def test_resume_changes_are_judged_generically():
    from hiddenkey_ds.training.checkpoint import recipe_changes

    old = load_recipe(TINY, check_output_dir=False).model_dump(mode="json")
    new = json.loads(json.dumps(old))
    new["run"].update(resume=True, output_dir="/elsewhere/same-run")  # not settings of the run
    new["train"].update(log_every=1, save_every=7, keep_checkpoints=5)
    new["eval"].update(at_end=True, tasks=["hk_sst2"], limit=10, batch_size=2, some_future_eval_key=1)
    new["run"]["label"] = "my name"  # a display field another section may add
    assert recipe_changes(old, new)[0] == []
    assert [k for k, _, _ in recipe_changes(old, new)[1]] == [
        "eval.at_end", "eval.batch_size", "eval.limit", "eval.some_future_eval_key", "eval.tasks", "run.label",
        "train.keep_checkpoints", "train.log_every", "train.save_every"]
    # anything else changes the result, including keys this module has never heard of
    new["dropout"]["layers"] = [0]
    new["dropout"]["some_future_knob"] = 0.5
    new["data"]["split_seed"] = old["data"]["split_seed"] + 3
    new["train"]["eval_every"] = 5  # which steps are validated (and which adapter is the best)
    new["train"]["lr"] = 1.0
    unsafe = recipe_changes(old, new)[0]
    assert [(k, a, b) for k, a, b in unsafe] == [
        ("data.split_seed", old["data"]["split_seed"], old["data"]["split_seed"] + 3), ("dropout.layers", old["dropout"]["layers"], [0]),
        ("dropout.some_future_knob", "<absent>", 0.5), ("train.eval_every", 15, 5), ("train.lr", 0.001, 1.0)]
