"""The demo: its generated dataset, and `hiddenkey-ds demo --quick` end to end (2 ranks, ZeRO-2, deepspeed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hiddenkey_ds.experiments.demo_data import make_rows, write_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_dataset_is_seeded_balanced_held_out_and_clean_as_documented():
    rows = make_rows(0)
    assert rows == make_rows(0)
    assert rows != make_rows(1)
    train, dev = rows["train"], rows["validation"]
    assert len(train) == 128 and len(dev) == 128
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev}
    assert sum(r["label"] for r in dev) == 64  # balanced: chance is 50%
    assert not any(r["noisy"] for r in train)  # the recipes flip labels after carving their validation split
    assert sum(r["noisy"] for r in make_rows(0, noise=0.25)["train"]) == 32
    assert all(set(r) == {"sentence", "label", "idx"} for r in dev)


def test_dataset_files_load_for_training_and_for_lm_eval(tmp_path):
    import importlib.util

    from hiddenkey_ds.config.schema import DataSection
    from hiddenkey_ds.data.loading import load_splits

    out = write_dataset(tmp_path / "data", seed=3, n_train=10, n_dev=6)
    info = yaml.safe_load((out / "dataset.yaml").read_text())
    assert info["seed"] == 3 and info["template"] == "sst2"
    splits = load_splits(DataSection(format="classification", task="sst2", path=str(out)))
    assert len(splits["train"]) == 10 and len(splits["eval"]) == 6
    spec = importlib.util.spec_from_file_location("hk_task_utils", ROOT / "eval" / "tasks" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    ds = task_utils.load_local("sst2", out)
    assert ds["validation"]["sentence"] == [r["sentence"] for r in make_rows(3, 10, 6)["validation"]]


def test_quick_demo_end_to_end(tmp_path):
    """The README's command in its reduced mode: real SmolLM2-135M, 2 ranks under ZeRO-2, lm-eval, report."""
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    rc = subprocess.run([sys.executable, "-m", "hiddenkey_ds.cli", "demo", "--quick", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    elapsed = time.time() - started
    assert rc.returncode == 0, rc.stdout[-3000:] + rc.stderr[-3000:]
    printed = re.search(r"\[demo\] report: (.+)", rc.stdout)
    assert printed and Path(printed.group(1)) == out.resolve() / "report" / "report.md"

    runs = {m: out / "runs" / f"reviews-{m}-seed0" for m in ("lora", "hiddenkey")}
    for method, run_dir in runs.items():
        assert (run_dir / "summary.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
        assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
        launch = (out / "logs" / f"reviews-{method}-seed0.log").read_text()
        assert "dist_world_size=2" in launch  # the deepspeed launcher started 2 ranks
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["name"] == "builtin:smollm2-135m-instruct"
        assert config["dropout"]["preset"] == ("none" if method == "lora" else "hiddenkey")
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        assert results["hiddenkey_ds"]["tasks"] == ["hk_sst2_local"]
    assert (runs["lora"] / "eval" / "base.json").is_file()
    report = (out / "report" / "report.md").read_text()
    assert "| hk_sst2_local (acc) |" in report and "LoRA" in report and "HiddenKey" in report
    for png in ("accuracy.png", "curves_hk_sst2_local.png"):
        assert (out / "report" / png).stat().st_size > 20_000
    print(f"quick demo: {elapsed:.0f} s")
