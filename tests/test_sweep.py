"""`hiddenkey-ds sweep`: a real tiny grid (2 methods x 2 seeds) that trains, evaluates, skips, resumes, reports.

`tiny_sweep_dir` is shared with test_report.py: the sweep skips finished runs, so the second caller only
re-renders the report.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from hiddenkey_ds.experiments import sweep as sweep_mod

ROOT = Path(__file__).resolve().parent.parent
# short runs that still give a few curve points; the eval limit keeps lm-eval to seconds
COMMON = ["train.max_steps=4", "train.log_every=1", "train.eval_every=2", "train.save_every=2",
          "train.keep_checkpoints=2", "data.max_train_examples=64", "data.max_eval_examples=16"]


def fabricate_run(run_dir: Path, *overrides: str, recipe: str = "tiny-lora.yaml", task: str = "hk_toy_sst2",
                  final: float | None = None, best: float | None = None, limit: int | None = 16, batch_size: int = 16,
                  wall_time_s: float | None = 10.0, best_validation: tuple[int, float, float] | None = None,
                  validation: list[tuple[int, float, float]] = (), steps: int = 8) -> Path:
    """A finished run directory in the exact layout training + `hiddenkey-ds eval` leave (config.yaml through the
    schema, summary.json with `best`, metrics.jsonl, eval/results.json and results_best.json), with chosen numbers.

    `best_validation` = (step, accuracy, loss) of summary.json's best; `validation` = metrics.jsonl rows."""
    from hiddenkey_ds.config import load_recipe

    run_dir.mkdir(parents=True)
    cfg = load_recipe(ROOT / "recipes" / recipe, [f"run.output_dir={run_dir}", *overrides], check_output_dir=False)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    best_block = None
    if best_validation is not None:
        step, acc, loss = best_validation
        best_block = {"step": step, "accuracy": acc, "loss": loss, "adapter": str(run_dir / "adapter_best")}
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "wall_time_s": wall_time_s, "final_eval": None,
                                                      "adapter": str(run_dir / "adapter"), "best": best_block}))
    rows = [{"step": s, "split": "train", "loss": 1.0 / s, "ce": 1.0 / s} for s in range(1, steps + 1)]
    rows += [{"step": s, "split": "validation", "loss": loss, "accuracy": acc} for s, acc, loss in validation]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    for stem, value, step in (("results", final, steps), ("results_best", best, (best_validation or [None])[0])):
        if value is None:
            continue
        (run_dir / "eval").mkdir(exist_ok=True)
        (run_dir / "eval" / f"{stem}.json").write_text(json.dumps({
            "results": {task: {"alias": task, "acc,none": value, "acc_stderr,none": 0.01}},
            "config": {"batch_size": batch_size, "limit": limit},
            "hiddenkey_ds": {"limit": limit, "batch_size": batch_size, "step": step,
                             "adapter_kind": "final" if stem == "results" else "best"}}))
    return run_dir


def write_tiny_sweep(directory: Path) -> Path:
    spec = {
        "name": "tiny", "out_dir": str(directory / "out"), "recipe": str(ROOT / "recipes" / "tiny-lora.yaml"),
        "ranks": 1,
        "methods": {"lora": [], "hiddenkey": {"recipe": str(ROOT / "recipes" / "tiny-hiddenkey.yaml")}},
        "seeds": [0, 1], "tasks": {"toy": []}, "overrides": COMMON,
        "eval": {"base": True, "limit": 16, "batch_size": 16},
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_sweep_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(sweep file, report path) of the shared tiny sweep, run (or finished) under pytest's base temp dir."""
    directory = tmp_path_factory.getbasetemp() / "tiny_sweep"
    directory.mkdir(exist_ok=True)
    path = write_tiny_sweep(directory)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = sweep_mod.run_sweep(sweep_mod.load_sweep(path), log=lambda *_: None)
    return path, report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sweep_dir(tmp_path_factory)


def test_sweep_trains_evaluates_and_reports_every_run(tiny):
    path, report = tiny
    sweep = sweep_mod.load_sweep(path)
    runs = sweep.runs()
    assert [r.name for r in runs] == ["toy-lora-seed0", "toy-lora-seed1", "toy-hiddenkey-seed0", "toy-hiddenkey-seed1"]
    for run in runs:
        assert run.state == "finished"
        config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        assert config["run"]["seed"] == run.seed and config["train"]["max_steps"] == 4
        assert config["eval"]["at_end"] is False  # the sweep evaluates itself
        assert config["run"]["label"] == run.method.name  # reports group by the sweep's method name
        results = json.loads((run.run_dir / "eval" / "results.json").read_text())
        assert results["hiddenkey_ds"]["adapter"] == str((run.run_dir / "adapter").resolve())
        assert results["hiddenkey_ds"]["adapter_kind"] == "final"
        assert results["hiddenkey_ds"]["step"] == json.loads((run.run_dir / "summary.json").read_text())["steps"]
        assert results["n-samples"]["hk_toy_sst2"]["effective"] == 16
        # every adapter the run kept is evaluated: adapter_best/ too once the loop keeps one
        kept = [k for k, d in (("final", "adapter"), ("best", "adapter_best")) if (run.run_dir / d).is_dir()]
        assert sorted(f.name for f in (run.run_dir / "eval").glob("results*.json")) == sorted(
            {"final": "results.json", "best": "results_best.json"}[k] for k in kept)
    assert (runs[0].run_dir / "eval" / "base.json").is_file()
    assert not (runs[1].run_dir / "eval" / "base.json").exists()  # one base row per task
    assert report.is_file() and (report.parent / "accuracy.png").is_file()


def test_rerun_skips_finished_runs(tiny, capsys):
    path, _ = tiny
    sweep = sweep_mod.load_sweep(path)
    before = {r.name: (r.run_dir / "summary.json").stat().st_mtime_ns for r in sweep.runs()}
    lines: list[str] = []
    sweep_mod.run_sweep(sweep, log=lines.append)
    assert sum("finished already, skipped" in line for line in lines) == 4
    assert not any("training" in line or "lm-eval" in line for line in lines)
    assert before == {r.name: (r.run_dir / "summary.json").stat().st_mtime_ns for r in sweep.runs()}


def test_interrupted_run_is_resumed_from_its_checkpoint(tiny, tmp_path):
    """A run killed after its step-2 checkpoint: the sweep resumes it (run.resume=true) and finishes it."""
    path, _ = tiny
    sweep = sweep_mod.load_sweep(path)
    src = sweep.runs()[0].run_dir
    # a separate copy of one run, cut back to the state a kill after step 2 leaves behind
    spec = yaml.safe_load(path.read_text())
    spec["out_dir"] = str(tmp_path / "out")
    spec["methods"] = {"lora": []}
    spec["seeds"] = [0]
    spec["eval"] = {"base": False, "limit": 4, "batch_size": 4}
    spec["report"] = False
    copy = tmp_path / "sweep.yaml"
    copy.write_text(yaml.safe_dump(spec))
    resumed = sweep_mod.load_sweep(copy)
    [run] = resumed.runs()
    shutil.copytree(src, run.run_dir)
    for name in ("summary.json", "adapter", "eval"):
        shutil.rmtree(run.run_dir / name) if (run.run_dir / name).is_dir() else (run.run_dir / name).unlink()
    shutil.rmtree(run.run_dir / "checkpoints" / "step_4")
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics if m["step"] <= 2))
    # the copied config.yaml points at the original directory: a resumed run keeps its own
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    cfg["run"]["output_dir"] = str(run.run_dir)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run.state == "interrupted" and "run.resume=true" in run.train_args()

    lines: list[str] = []
    sweep_mod.run_sweep(resumed, log=lines.append)
    assert any("resuming" in line for line in lines)
    assert run.state == "finished"
    log = (resumed.out_dir / "logs" / f"{run.name}.log").read_text()
    assert "resumed from" in log and "step_2" in log
    steps = [json.loads(line)["step"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # no step trained twice, none skipped
    assert (run.run_dir / "eval" / "results.json").is_file()


def test_dry_run_prints_the_launcher_commands(tmp_path):
    spec = {"out_dir": str(tmp_path / "o"), "recipe": str(ROOT / "recipes" / "tiny-lora.yaml"), "ranks": 2,
            "methods": {"lora": [], "dropkey": ["dropout.preset=dropkey"]}, "seeds": [3], "tasks": {"toy": []}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    lines: list[str] = []
    assert sweep_mod.run_sweep(sweep_mod.load_sweep(path), dry_run=True, log=lines.append) is None
    commands = [line for line in lines if "deepspeed --num_gpus 2" in line]
    assert len(commands) == 2
    assert "--no_local_rank --module hiddenkey_ds.train" in commands[1]
    assert "dropout.preset=dropkey run.label=dropkey run.seed=3" in commands[1] and "eval.at_end=false" in commands[1]
    assert not (tmp_path / "o").exists()


def _write(tmp_path: Path, spec: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _base_spec(tmp_path: Path, **change) -> dict:
    return {"out_dir": str(tmp_path / "o"), "recipe": str(ROOT / "recipes" / "tiny-lora.yaml"),
            "methods": {"lora": []}, "seeds": [0], "tasks": {"toy": []}, **change}


@pytest.mark.parametrize("change, message", [
    ({"methods": {}}, "methods: must not be empty (hint"),
    ({"seeds": [1, 1]}, "seeds: seeds must be distinct integers; [1] repeat"),
    ({"colour": 1}, "colour: unknown key (hint: known keys"),
    ({"tasks": {"t": ["data.path"]}}, "tasks.t.0: 'data.path' is not KEY=VALUE (hint"),
    ({"methods": {"x": {"recipe": "nope.yaml"}}}, "methods.x: recipe nope.yaml does not exist (hint"),
    ({"methods": {"x": ["train.lr=-1"]}}, "the recipe of toy/x: train.lr: Input should be greater than 0"),
    ({"baseline": "lroa"}, "baseline: 'lroa' is not a method of this sweep (hint: one of lora)"),
])
def test_bad_sweep_files_are_rejected_precisely(tmp_path, change, message):
    with pytest.raises(sweep_mod.SweepError) as err:
        sweep_mod.load_sweep(_write(tmp_path, _base_spec(tmp_path, **change)))
    assert message in str(err.value)


def test_every_problem_of_a_sweep_file_is_listed_at_once_and_nothing_runs(tmp_path, capsys):
    spec = {"name": "bad", "out_dir": str(tmp_path / "out"), "recipe": str(ROOT / "recipes" / "tiny-lora.yaml"),
            "ranks": 0, "methds": {},
            "methods": {"lora": ["dropout.presett=none", "lr=3"], "bad name": [],
                        "hk": {"overrides": ["dropout.preset=hiddenkey"],
                               "grid": {"k": {"key": "dropout.key.rat", "values": [0.1]},
                                        "a": {"key": "dropout.alpha", "valus": [1]}}}},
            "seeds": [0, 0], "tasks": {"toy": ["data.path"]}, "eval": {"limt": 3}}
    path = _write(tmp_path, spec)
    assert sweep_mod.main([str(path)]) == 2
    err = capsys.readouterr().err
    expected = [
        "ranks: Input should be greater than or equal to 1",
        "methods.lora.overrides.0: 'dropout.presett=none': dropout.presett: unknown key (hint: did you mean "
        "dropout.preset?)",
        "methods.lora.overrides.1: 'lr=3': lr: unknown key (hint: did you mean train.lr?)",
        "name 'bad name': use letters, digits and . _ + -",
        "methods.hk.grid.k.key: dropout.key.rat: unknown key (hint: did you mean dropout.key.rate?)",
        "methods.hk.grid.a.values: required (hint: add `values:` to the sweep file)",
        "methods.hk.grid.a.valus: unknown key (hint: did you mean values?)",
        "seeds: seeds must be distinct integers; [0] repeat",
        "tasks.toy.0: 'data.path' is not KEY=VALUE",
        "eval.limt: unknown key (hint: did you mean limit?)",
        "methds: unknown key (hint: did you mean methods?)",
    ]
    assert f"{len(expected)} problems:" in err
    for line in expected:
        assert line in err, line
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_grid_methods_expand_into_named_settings_validated_as_recipes(tmp_path):
    spec = _base_spec(tmp_path, methods={
        "lora": [],
        "hiddenkey": {"overrides": ["dropout.preset=hiddenkey"],
                      "grid": {"k": {"key": "dropout.key.rate", "values": [0.05, 0.1]},
                               "h": {"key": "dropout.hidden.rate", "values": [0.02]},
                               "a": {"key": "dropout.alpha", "values": [1, 0.5]}}},
        "7": {"recipe": str(ROOT / "recipes" / "tiny-hiddenkey.yaml")}})
    sweep = sweep_mod.load_sweep(_write(tmp_path, spec))
    names = [m.name for m in sweep.methods]
    assert names == ["lora", "hiddenkey-k0.05-h0.02-a1", "hiddenkey-k0.05-h0.02-a0.5", "hiddenkey-k0.1-h0.02-a1",
                     "hiddenkey-k0.1-h0.02-a0.5", "7"]
    m = sweep.methods[3]
    assert m.family == "hiddenkey" and m.grid == {"k": 0.1, "h": 0.02, "a": 1}
    assert m.overrides == ["dropout.preset=hiddenkey", "dropout.key.rate=0.1", "dropout.hidden.rate=0.02",
                           "dropout.alpha=1"]
    assert list(sweep.grid_families) == ["hiddenkey"]
    [run] = [r for r in sweep.runs() if r.method.name == "7"]
    assert "run.label='7'" in run.train_args()  # quoted: YAML would read a bare 7 as a number

    from hiddenkey_ds.config import load_recipe
    [run] = [r for r in sweep.runs() if r.method is m]
    recipe = load_recipe(m.recipe, run.recipe_overrides(), check_output_dir=False)
    assert (recipe.dropout.key.rate, recipe.dropout.hidden.rate, recipe.dropout.alpha, recipe.run.label) == (
        0.1, 0.02, 1.0, "hiddenkey-k0.1-h0.02-a1")

    # a grid value the schema refuses is found before anything runs, named by its setting
    spec["methods"]["hiddenkey"]["grid"]["k"]["values"] = [0.1, 1.5]
    with pytest.raises(sweep_mod.SweepError, match=r"the recipe of toy/hiddenkey-k1.5-h0.02-a1 and 1 other .*"
                                                   r"dropout.key.rate: Input should be less than 1"):
        sweep_mod.load_sweep(_write(tmp_path, spec))


def test_only_runs_a_subset(tmp_path, capsys):
    spec = _base_spec(tmp_path, ranks=1, seeds=[0, 1], tasks={"a": [], "b": []}, methods={
        "lora": [], "dropkey": ["dropout.preset=dropkey"],
        "hk": {"overrides": ["dropout.preset=hiddenkey"], "grid": {"k": {"key": "dropout.key.rate",
                                                                         "values": [0.05, 0.1]}}}})
    sweep = sweep_mod.load_sweep(_write(tmp_path, spec))

    def names(only: str) -> list[str]:
        wanted = sweep_mod.parse_only(only, sweep)
        return [r.name for r in sweep.runs() if sweep_mod.selected(r, wanted)]

    assert names("task=a,method=lora") == ["a-lora-seed0", "a-lora-seed1"]
    assert names("method=lora,method=dropkey,seed=1,task=b") == ["b-lora-seed1", "b-dropkey-seed1"]
    assert names("method=hk,seed=0,task=a") == ["a-hk-k0.05-seed0", "a-hk-k0.1-seed0"]  # a grid by its name
    assert names("method=hk-k0.1,task=b,seed=1") == ["b-hk-k0.1-seed1"]
    assert names("method=*k0.05") == ["a-hk-k0.05-seed0", "a-hk-k0.05-seed1", "b-hk-k0.05-seed0", "b-hk-k0.05-seed1"]
    with pytest.raises(sweep_mod.SweepError, match=r"--only method=hidenkey: matches no method .*hint: one of lora, "
                                                   r"dropkey, hk-k0.05, hk-k0.1, hk"):
        sweep_mod.parse_only("method=hidenkey", sweep)
    with pytest.raises(sweep_mod.SweepError, match="KEY one of task, method, seed"):
        sweep_mod.parse_only("tsk=a", sweep)
    path = _write(tmp_path, spec)
    assert sweep_mod.main([str(path), "--dry-run", "--only", "task=b,method=dropkey,seed=0"]) == 0
    out = capsys.readouterr().out
    assert "1 selected by --only" in out and "run 1/1 b-dropkey-seed0 (new)" in out and "a-lora" not in out
    assert sweep_mod.main([str(path), "--only", "seed=9"]) == 2
    assert "--only seed=9: matches no seed" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_missing_evaluations_asks_only_for_what_a_run_lacks(tmp_path):
    run_dir = tmp_path / "run"
    for d in ("adapter", "adapter_best"):
        (run_dir / d).mkdir(parents=True)
        (run_dir / d / "adapter_config.json").write_text("{}")
    (run_dir / "summary.json").write_text("{}")
    assert sweep_mod.missing_evaluations(run_dir, None) == "both"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text("{}")
    assert sweep_mod.missing_evaluations(run_dir, None) == "best"
    assert sweep_mod.missing_evaluations(run_dir, "final") is None
    (run_dir / "eval" / "results_best.json").write_text("{}")
    assert sweep_mod.missing_evaluations(run_dir, None) is None


def test_select_picks_the_grid_setting_by_mean_best_validation_accuracy(tmp_path, capsys):
    """A 2 x 1 HiddenKey grid on two tasks, 2 seeds, runs fabricated in the sweep's layout. lm-eval scores point the
    other way: selection must never read them."""
    spec = _base_spec(tmp_path, seeds=[0, 1], tasks={"a": [], "b": []}, methods={
        "lora": [],
        "hk": {"overrides": ["dropout.preset=hiddenkey"],
               "grid": {"k": {"key": "dropout.key.rate", "values": [0.05, 0.1]},
                        "a": {"key": "dropout.alpha", "values": [1]}}}})
    path = _write(tmp_path, spec)
    sweep = sweep_mod.load_sweep(path)
    # (task, setting) -> per seed (best validation accuracy, its loss); lm-eval final score the opposite way
    best = {("a", "hk-k0.05-a1"): [(0.70, 0.50), (0.80, 0.40)],   # mean 0.75
            ("a", "hk-k0.1-a1"): [(0.74, 0.45), (0.74, 0.45)],    # mean 0.74
            ("b", "hk-k0.05-a1"): [(0.60, 0.30), (0.70, 0.50)],   # mean 0.65, mean loss 0.40
            ("b", "hk-k0.1-a1"): [(0.65, 0.20), (0.65, 0.30)]}    # mean 0.65, mean loss 0.25: wins the tie
    for run in sweep.runs():
        key = (run.task, run.method.name)
        acc, loss = best.get(key, [(0.5, 1.0)] * 2)[run.seed]
        fabricate_run(run.run_dir, *run.recipe_overrides()[:-2], final=1.0 - acc, best_validation=(3, acc, loss))
    selection = sweep_mod.select(sweep)
    a, b = selection["tasks"]["a"]["hk"], selection["tasks"]["b"]["hk"]
    assert a["chosen"] == "hk-k0.05-a1" and a["mean_best_val_accuracy"] == pytest.approx(0.75)
    assert a["grid"] == {"k": 0.05, "a": 1}
    assert a["overrides"] == ["dropout.preset=hiddenkey", "dropout.key.rate=0.05", "dropout.alpha=1"]
    assert b["chosen"] == "hk-k0.1-a1"  # equal accuracy, lower validation loss
    [cand] = [c for c in a["candidates"] if c["method"] == "hk-k0.1-a1"]
    assert cand["best_val_accuracy"] == [0.74, 0.74] and cand["seeds"] == [0, 1] and cand["complete"]
    assert any("not carved from the training data" in w for w in a["warnings"])

    # an unfinished seed takes a setting out of the choice, with a note
    import shutil
    shutil.rmtree(sweep_mod.PlannedRun(sweep, "a", sweep.methods[1], 1).run_dir)
    assert sweep_mod.main([str(path), "--select"]) == 0
    out = capsys.readouterr().out
    assert "### a / hk: **hk-k0.1-a1**" in out and "| hk-k0.05-a1 | 0.05 | 1 | 1/2 | 70.0 | 70.00 | 0.5000 |" in out
    assert "1 setting(s) lack one of seeds [0, 1] and were not considered: hk-k0.05-a1" in out
    written = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert written["tasks"]["a"]["hk"]["chosen"] == "hk-k0.1-a1" and written["criterion"].startswith("mean over seeds")

    # the seeds compared: those given (a grid stage run on seeds 0 and 1 is judged on them), else those finished
    stage = sweep_mod.select(sweep, {"seed": ["0"], "task": ["a"]})
    assert list(stage["tasks"]) == ["a"] and stage["tasks"]["a"]["hk"]["seeds"] == [0]
    assert stage["tasks"]["a"]["hk"]["chosen"] == "hk-k0.1-a1"
    assert {c["method"]: c["best_val_accuracy"] for c in stage["tasks"]["a"]["hk"]["candidates"]} == {
        "hk-k0.05-a1": [0.70], "hk-k0.1-a1": [0.74]}
    with pytest.raises(sweep_mod.SweepError, match="task= and seed= here, not method="):
        sweep_mod.select(sweep, {"method": ["hk"]})

    # the report of this sweep groups by its method names
    assert report_main(["--sweep", str(path), "--out", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["scores"]["final"]
    assert {r["method"] for r in rows} == {"lora", "hk-k0.05-a1", "hk-k0.1-a1"}
    # two sweep tasks train on one lm-eval task: each keeps its rows, named by the sweep's task
    assert {r["task"] for r in rows} == {"a/hk_toy_sst2", "b/hk_toy_sst2"}
    [row] = [r for r in rows if r["task"] == "b/hk_toy_sst2" and r["method"] == "hk-k0.1-a1"]
    assert row["values"] == pytest.approx([0.35, 0.35])


def report_main(argv: list[str]) -> int:
    from hiddenkey_ds.experiments.report import main

    return main(argv)
