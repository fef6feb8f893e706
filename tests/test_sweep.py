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

from hiddenkey_ds import sweep as sweep_mod

ROOT = Path(__file__).resolve().parent.parent
# short runs that still give a few curve points; the eval limit keeps lm-eval to seconds
COMMON = ["train.max_steps=4", "train.log_every=1", "train.eval_every=2", "train.save_every=2",
          "train.keep_checkpoints=2", "data.max_train_examples=64", "data.max_eval_examples=16"]


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
        results = json.loads((run.run_dir / "eval" / "results.json").read_text())
        assert results["hiddenkey_ds"]["adapter"] == str((run.run_dir / "adapter").resolve())
        assert results["n-samples"]["hk_toy_sst2"]["effective"] == 16
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
    assert "dropout.preset=dropkey run.seed=3" in commands[1] and "eval.at_end=false" in commands[1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    ({"methods": {}}, "`methods` is required"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"colour": 1}, "unknown key"),
    ({"tasks": {"t": ["data.path"]}}, "key=value"),
    ({"methods": {"x": {"recipe": "nope.yaml"}}}, "does not exist"),
])
def test_bad_sweep_files_are_rejected_precisely(tmp_path, change, message):
    spec = {"out_dir": "o", "recipe": str(ROOT / "recipes" / "tiny-lora.yaml"), "methods": {"lora": []},
            "seeds": [0], "tasks": {"toy": []}, **change}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(sweep_mod.SweepError, match=message):
        sweep_mod.load_sweep(path)
