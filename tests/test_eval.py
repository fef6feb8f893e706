"""The evaluation path: lm-eval task YAMLs, `hiddenkey-ds eval`, and its agreement with the stock `lm_eval` CLI."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hiddenkey_ds.evaluation import harness as evaluate
from hiddenkey_ds.data.templates import TEMPLATES, get_template
from hiddenkey_ds.data.toy import toy_sst2_rows

ROOT = Path(__file__).resolve().parent.parent
RTE = ROOT.parent / "shared" / "data" / "glue" / "RTE"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1"}


def _random_adapter(out: Path, seed: int, alpha: int) -> Path:
    """A real PEFT adapter on builtin:tiny-llama with non-zero LoRA weights (so it changes the scores)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hiddenkey_ds.models.loading import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return _random_adapter(tmp_path_factory.mktemp("adapter"), seed=0, alpha=8)


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    """A local SST-2-shaped directory (dev.jsonl, like ../shared's GLUE copies) for the *_local tasks."""
    d = tmp_path_factory.mktemp("sst2")
    rows = toy_sst2_rows("validation")[:40]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sst2_rows("train")[:16]))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_every_template_has_hub_and_local_tasks():
    tasks = ROOT / "eval" / "tasks"
    for name in TEMPLATES:
        hub = yaml.safe_load((tasks / f"hk_{name}.yaml").read_text())
        local = (tasks / f"hk_{name}_local.yaml").read_text()
        assert hub["task"] == f"hk_{name}" and hub["include"] == f"_{name}_template_yaml"
        assert f"utils.load_{name}_local" in local
        template = (tasks / f"_{name}_template_yaml").read_text()
        assert 'target_delimiter: ""' in template and "version: 1.0" in template


def test_prompts_are_the_training_templates_and_match_stock_lm_eval_strings():
    """lm-eval scores render_prompt(doc) + choice: the training text. The hub variants also score the very
    strings of lm-eval's stock tasks (their Jinja prompt + " " + answer)."""
    import importlib.util

    import lm_eval.tasks
    from lm_eval.utils import apply_template

    spec = importlib.util.spec_from_file_location("hk_task_utils", ROOT / "eval" / "tasks" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    stock_dir = Path(lm_eval.tasks.__file__).parent
    stock = {"rte": "glue/rte", "mrpc": "glue/mrpc", "sst2": "glue/sst2", "cola": "glue/cola", "qnli": "glue/qnli",
             "boolq": "super_glue/boolq"}
    doc = {"sentence1": "A cat sat.", "sentence2": "A cat", "sentence": "It was fine .", "question": "is it",
           "passage": "Some passage.", "label": 1}
    for name, template in TEMPLATES.items():
        text = getattr(task_utils, f"doc_to_text_{name}")(doc)
        choices = getattr(task_utils, f"doc_to_choice_{name}")(doc)
        target = getattr(task_utils, f"doc_to_target_{name}")(doc)
        assert text + choices[target] == template.render_prompt(doc) + template.render_answer(doc)
        cfg = yaml.safe_load((stock_dir / stock[name] / "default.yaml").read_text())
        stock_strings = [apply_template(cfg["doc_to_text"], doc) + " " + c for c in cfg["doc_to_choice"]]
        assert [text + c for c in choices] == stock_strings, name


def tiny_recipe(*overrides: str, out: str = "/nonexistent/run"):
    """The tiny recipe through the schema, as a run's config.yaml holds it."""
    from hiddenkey_ds.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny-lora.yaml", [f"run.output_dir={out}", *overrides],
                       check_output_dir=False)


def test_tasks_for_recipe(tmp_path):
    local = tmp_path / "RTE"
    local.mkdir()
    assert evaluate.tasks_for_recipe(tiny_recipe("data.task=rte", f"data.path={local}")) == (
        ["hk_rte_local"], {"rte_dir": str(local.resolve())})
    assert evaluate.tasks_for_recipe(tiny_recipe("data.task=rte", "data.path=null")) == (["hk_rte"], {})
    assert evaluate.tasks_for_recipe(tiny_recipe()) == (["hk_toy_sst2"], {})
    assert evaluate.tasks_for_recipe(tiny_recipe("eval.tasks=[hk_cola]", "data.task=rte", "data.path=null")) == (
        ["hk_cola"], {})
    # named tasks still get the run's local data directory
    recipe = tiny_recipe("eval.tasks=[hk_rte_local]", "data.task=rte", f"data.path={local}")
    assert evaluate.tasks_for_recipe(recipe) == (["hk_rte_local"], {"rte_dir": str(local.resolve())})
    with pytest.raises(evaluate.EvalError, match="sft.*hint: name the lm-eval tasks"):
        evaluate.tasks_for_recipe(tiny_recipe("data.format=sft", "data.task=null", f"data.path={local}"))
    with pytest.raises(evaluate.EvalError, match="neither a local directory"):
        evaluate.tasks_for_recipe(tiny_recipe("data.task=rte", f"data.path={tmp_path / 'missing'}"))


def test_old_run_config_without_newer_fields_loads_with_schema_defaults(tmp_path):
    """A config.yaml written before fields existed (here: no run.label, lora.bias, eval section) still loads."""
    full = yaml.safe_load(tiny_recipe(out=str(tmp_path)).to_yaml())
    del full["run"]["label"], full["lora"]["bias"], full["eval"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(full))
    recipe = evaluate.read_run_recipe(tmp_path)
    assert recipe.run.label is None and recipe.lora.bias == "none" and recipe.eval.batch_size == 8
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**full, "lora": {"rank": 8}}))
    with pytest.raises(evaluate.EvalError, match=r"lora.rank: unknown key \(hint: did you mean lora.r\?\)"):
        evaluate.read_run_recipe(tmp_path)


def test_local_task_without_directory_says_how_to_give_it():
    from lm_eval.tasks import TaskManager, get_task_dict

    with pytest.raises(ValueError, match="rte_dir"):
        get_task_dict(["hk_rte_local"], TaskManager(include_path=str(evaluate.TASKS_DIR), metadata={}))


@pytest.mark.slow  # ~20 s: runs the stock lm_eval CLI beside ours on the same adapter
def test_hiddenkey_eval_equals_stock_lm_eval_cli(adapter, sst2_dir, tmp_path):
    """`hiddenkey-ds eval` and the `lm_eval` command it prints give identical numbers and the expected layout."""
    out = tmp_path / "ours"
    rc = subprocess.run(
        [sys.executable, "-m", "hiddenkey_ds.cli", "eval", str(adapter), "--base", "builtin:tiny-llama",
         "--tasks", "hk_toy_sst2,hk_sst2_local", "--data-dir", f"sst2={sst2_dir}", "--limit", "24",
         "--batch-size", "4", "--out", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert rc.returncode == 0, rc.stderr[-3000:]
    assert "|hk_toy_sst2" in rc.stdout and "stock equivalent: lm_eval" in rc.stdout
    ours = json.loads((out / "results.json").read_text())

    # layout: lm-eval's own keys plus ours
    for key in ("results", "versions", "n-shot", "configs", "config", "hiddenkey_ds"):
        assert key in ours
    for task in ("hk_toy_sst2", "hk_sst2_local"):
        row = ours["results"][task]
        assert 0.0 <= row["acc,none"] <= 1.0 and row["acc_stderr,none"] > 0
        assert ours["versions"][task] == 1.0 and ours["n-shot"][task] == 0
        assert ours["configs"][task]["target_delimiter"] == ""
        assert ours["n-samples"][task]["effective"] == 24
    meta = ours["hiddenkey_ds"]
    assert meta["adapter"] == str(adapter.resolve()) and meta["limit"] == 24 and meta["quantization"] == "none"

    # the stock CLI, run exactly as printed (plus an output path)
    stock_out = tmp_path / "stock"
    cmd = shlex.split(meta["stock_command"]) + ["--output_path", str(stock_out)]
    assert cmd[:3] == ["lm_eval", "--model", "hf"]
    rc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    [stock_file] = stock_out.rglob("results_*.json")
    stock = json.loads(stock_file.read_text())
    assert stock["results"] == ours["results"]
    assert stock["n-samples"] == ours["n-samples"]


def test_base_only_writes_the_before_row(sst2_dir, tmp_path):
    [path] = evaluate.run_eval("builtin:tiny-llama", ["hk_sst2_local"], limit=8, batch_size=8, base_only=True,
                               data_dirs={"sst2_dir": str(sst2_dir)}, out_dir=tmp_path, log=lambda *_: None)
    assert path.name == "base.json"
    result = json.loads(path.read_text())
    assert result["hiddenkey_ds"]["adapter"] is None
    assert "peft" not in result["config"]["model_args"]
    assert evaluate.primary_metrics(result)["hk_sst2_local"]["acc"] == result["results"]["hk_sst2_local"]["acc,none"]


def fake_run(directory: Path, adapter: Path, *overrides: str, best: Path | None = None, steps: int = 6,
             best_step: int = 4) -> Path:
    """A run directory in the training loop's layout: config.yaml, adapter/, [adapter_best/], summary.json."""
    import shutil

    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(tiny_recipe(*overrides, out=str(directory)).to_yaml())
    shutil.copytree(adapter, directory / "adapter")
    summary = {"steps": steps, "wall_time_s": 1.0, "final_eval": None, "adapter": str(directory / "adapter"),
               "best": None}
    if best is not None:
        shutil.copytree(best, directory / "adapter_best")
        summary["best"] = {"step": best_step, "accuracy": 0.75, "loss": 0.5, "adapter": str(directory / "adapter_best")}
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory) -> Path:
    """A second adapter with other weights: the best checkpoint of fake runs, so its scores differ."""
    return _random_adapter(tmp_path_factory.mktemp("adapter_best"), seed=1, alpha=64)


def test_best_and_final_adapters_each_get_their_results_file(adapter, other_adapter, tmp_path):
    run_dir = fake_run(tmp_path / "run", adapter, best=other_adapter, steps=6, best_step=4)
    quiet = {"limit": 24, "batch_size": 8, "device": "cpu", "log": lambda *_: None}
    paths = evaluate.run_eval(run_dir, **quiet)  # default: both, since the run kept adapter_best/
    assert [p.name for p in paths] == ["results.json", "results_best.json"]
    final, best = (json.loads(p.read_text()) for p in paths)
    assert final["hiddenkey_ds"]["adapter_kind"] == "final" and final["hiddenkey_ds"]["step"] == 6
    assert final["hiddenkey_ds"]["adapter"] == str((run_dir / "adapter").resolve())
    assert best["hiddenkey_ds"]["adapter_kind"] == "best" and best["hiddenkey_ds"]["step"] == 4
    assert best["hiddenkey_ds"]["adapter"] == str((run_dir / "adapter_best").resolve())
    assert best["hiddenkey_ds"]["best_validation"]["accuracy"] == 0.75
    assert f"peft={(run_dir / 'adapter_best').resolve()}" in best["hiddenkey_ds"]["stock_command"]
    # different weights, different log-likelihoods: the best file really scored the best adapter
    assert final["results"]["hk_toy_sst2"] != best["results"]["hk_toy_sst2"]
    # each file names the weights it scored and the environment that scored them
    import hashlib
    from importlib import metadata

    for results, kind in ((final, "adapter"), (best, "adapter_best")):
        ours = results["hiddenkey_ds"]
        assert ours["adapter_sha256"] == hashlib.sha256((run_dir / kind / "adapter_model.safetensors").read_bytes()
                                                        ).hexdigest()
        assert ours["run_finished"] is True and ours["provenance"]["device"] == "cpu"
        assert ours["provenance"]["versions"]["lm_eval"] == metadata.version("lm_eval")
    assert evaluate.stale_reason(run_dir, best) is None
    # adapter_best/ replaced after the evaluation (a run that was still training): the file is stale now
    weights = "adapter_model.safetensors"
    shutil.copyfile(run_dir / "adapter" / weights, run_dir / "adapter_best" / weights)
    assert "evaluated while the run was still training" in evaluate.stale_reason(run_dir, best)
    from hiddenkey_ds.experiments.sweep import missing_evaluations

    assert missing_evaluations(run_dir, None) == "best"

    only = evaluate.run_eval(run_dir, adapter="final", out_dir=tmp_path / "final-only", **quiet)
    assert [p.name for p in only] == ["results.json"]
    assert json.loads(only[0].read_text())["results"] == final["results"]


def test_cli_errors_are_precise(adapter, tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2  # neither a run nor an adapter
    assert "neither a run directory" in capsys.readouterr().err
    run_dir = fake_run(tmp_path / "no-best", adapter)
    # --adapter best on a run that kept no best adapter: one line with a hint, nothing written
    assert evaluate.main([str(run_dir), "--adapter", "best"]) == 2
    err = capsys.readouterr().err
    assert "no best adapter" in err and "hint: train with data.validation_from_train" in err
    assert "Traceback" not in err and not (run_dir / "eval").exists()
    assert evaluate.chosen_kinds(run_dir, None) == ["final"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text(tiny_recipe(out=str(tmp_path / "half")).to_yaml())
    with pytest.raises(evaluate.EvalError, match="no final adapter.*not finished"):
        evaluate.resolve_target(str(tmp_path / "half"))
    assert evaluate.main([str(adapter), "--base", "builtin:nope", "--tasks", "hk_toy_sst2", "--out",
                          str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown builtin model 'builtin:nope'" in err and "hint:" in err and not (tmp_path / "out").exists()
    assert get_template("rte").choices == (" True", " False")


@pytest.mark.parametrize("case", ["sft", "single-file", "local-task-without-dir"])
def test_runs_eval_cannot_score_fail_cleanly(adapter, tmp_path, case):
    """`hiddenkey-ds eval` on a run trained on SFT data or on one data file: exit 2, one message with a hint, no
    traceback, nothing written."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b", "sentence": "fine .", "label": 1}) + "\n")
    overrides = {"sft": ["data.format=sft", "data.task=null", f"data.path={data}"],
                 "single-file": [f"data.path={data}"], "local-task-without-dir": [f"data.path={data}"]}[case]
    run_dir = fake_run(tmp_path / "run", adapter, *overrides)
    extra = ["--tasks", "hk_sst2_local"] if case == "local-task-without-dir" else []
    rc = subprocess.run([sys.executable, "-m", "hiddenkey_ds.cli", "eval", str(run_dir), "--limit", "4", *extra],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 2, rc.stderr[-2000:]
    errors = [line for line in rc.stderr.splitlines() if line.startswith("hiddenkey-ds eval: error:")]
    assert len(errors) == 1 and "hint:" in errors[0] and "Traceback" not in rc.stderr
    expected = {"sft": "free-form (sft) data", "single-file": "is a single file",
                "local-task-without-dir": "cannot load task(s) hk_sst2_local"}[case]
    assert expected in errors[0]
    assert not (run_dir / "eval").exists()


def test_training_tokens_are_the_tokens_lm_eval_scores():
    """data.encoding.split_ids (training) and lm-eval's HFLM._encode_pair split prompt/answer identically."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hiddenkey_ds.data.encoding import split_ids
    from hiddenkey_ds.models.loading import resolve_model_path

    path = resolve_model_path("builtin:tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(path), tokenizer=tokenizer, device="cpu")
    docs = toy_sst2_rows("validation")[:6] + [
        {"sentence1": "Paris is in France.", "sentence2": "Paris is French", "question": "Is it", "sentence": "Yes.",
         "passage": "A passage", "label": 0}]
    for name, template in TEMPLATES.items():
        for doc in docs:
            if not all(f in doc for f in template.fields):
                continue
            for choice in template.choices:
                prompt = template.render_prompt(doc)
                [(ctx, ans)] = split_ids(tokenizer, [prompt], [choice], add_special_tokens=True)
                assert lm._encode_pair(prompt, choice) == (ctx, ans), (name, prompt, choice)


@pytest.mark.slow
@pytest.mark.skipif(not (RTE / "dev.jsonl").is_file(),
                    reason=f"real GLUE RTE not present at {RTE} (../shared is not part of a clone)")
def test_real_rte_train_then_local_file_eval(tmp_path):
    """SmolLM2-135M-Instruct on real RTE for a handful of steps, then lm-eval on the local-file task."""
    run_dir = tmp_path / "rte-run"
    rc = subprocess.run(
        [sys.executable, "-m", "hiddenkey_ds.train", str(ROOT / "recipes" / "smollm2-rte-lora.yaml"),
         f"run.output_dir={run_dir}", f"data.path={RTE}", "train.max_steps=3", "train.micro_batch_size=4",
         "train.grad_accum=1", "train.global_batch_size=null", "train.log_every=1", "train.eval_every=null",
         "train.save_every=null", "data.max_train_examples=24", "data.max_eval_examples=8", "eval.at_end=false"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200,
    )
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-3000:]
    # the recipe keeps adapter_best/ too (issue 8); this test is about the local-file task: the final adapter
    [path] = evaluate.run_eval(run_dir, limit=16, batch_size=8, adapter="final", log=lambda *_: None)
    result = json.loads(path.read_text())
    assert result["hiddenkey_ds"]["tasks"] == ["hk_rte_local"]
    assert result["hiddenkey_ds"]["task_metadata"] == {"rte_dir": str(RTE.resolve())}
    assert result["n-samples"]["hk_rte_local"] == {"original": 277, "effective": 16}
    assert 0.0 <= result["results"]["hk_rte_local"]["acc,none"] <= 1.0


def test_eval_at_end_of_training(tmp_path):
    """eval.at_end=true: the loop itself writes RUN_DIR/eval/results.json for the run's task."""
    run_dir = tmp_path / "run"
    rc = subprocess.run(
        [sys.executable, "-m", "hiddenkey_ds.train", str(ROOT / "recipes" / "tiny-lora.yaml"),
         f"run.output_dir={run_dir}", "train.max_steps=2", "train.eval_every=null", "train.save_every=null",
         "data.max_train_examples=32", "data.max_eval_examples=8", "eval.at_end=true", "eval.limit=8"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-3000:]
    result = json.loads((run_dir / "eval" / "results.json").read_text())
    assert result["hiddenkey_ds"]["tasks"] == ["hk_toy_sst2"] and result["n-samples"]["hk_toy_sst2"]["effective"] == 8


def test_qlora_run_is_also_scored_on_its_4bit_base(tmp_path):
    """A 4-bit recipe: results.json (full-precision base, the stock command) plus results_4bit.json when
    bitsandbytes runs 4-bit here; the 4-bit file has no stock command (the CLI cannot pass a quantization config)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hiddenkey_ds.models.loading import resolve_model_path

    ok, why = evaluate.bnb_4bit_supported("cpu")
    if not ok:
        pytest.skip(f"bitsandbytes cannot run 4-bit on this CPU: {why}")
    # bitsandbytes' CPU kernels need every linear dimension divisible by their block: all multiples of 64 here
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run_dir = tmp_path / "qlora-run"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        run_dir / "adapter")
    recipe = tiny_recipe(f"model.name={tmp_path / 'base'}", "model.quantization=4bit", "model.quant_type=nf4",
                         "model.dtype=bf16", out=str(run_dir))
    (run_dir / "config.yaml").write_text(recipe.to_yaml())
    paths = evaluate.run_eval(run_dir, limit=4, batch_size=4, device="cpu", quantized="require", log=lambda *_: None)
    assert [p.name for p in paths] == ["results.json", "results_4bit.json"]
    full, quant = (json.loads(p.read_text()) for p in paths)
    assert full["hiddenkey_ds"]["quantization"] == "none" and full["hiddenkey_ds"]["stock_command"]
    assert quant["hiddenkey_ds"]["quantization"] == "4bit" and quant["hiddenkey_ds"]["stock_command"] is None
    assert quant["n-samples"] == full["n-samples"] and set(quant["results"]) == {"hk_toy_sst2"}
    assert quant["hiddenkey_ds"]["linear4bit_layers"] == 2 * 7  # every q/k/v/o/gate/up/down of both layers
