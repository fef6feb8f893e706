"""`hiddenkey-ds report` on real tiny runs (the shared sweep of test_sweep.py): its numbers are the ones it read."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from hiddenkey_ds import report as report_mod
from test_sweep import tiny_sweep_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hiddenkey_ds.sweep import load_sweep

    path, report = tiny_sweep_dir(tmp_path_factory)
    return [r.run_dir for r in load_sweep(path).runs()], report


def _acc(run_dir: Path, name: str = "results") -> float:
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())["results"]["hk_toy_sst2"]["acc,none"]


def test_table_is_the_metrics_it_read(tiny):
    from scipy import stats

    run_dirs, report = tiny
    lora = {0: _acc(run_dirs[0]), 1: _acc(run_dirs[1])}
    hk = {0: _acc(run_dirs[2]), 1: _acc(run_dirs[3])}
    table = json.loads((report.parent / "report.json").read_text())
    rows = {(r["task"], r["method"]): r for r in table["rows"]}
    assert set(rows) == {("hk_toy_sst2", "LoRA"), ("hk_toy_sst2", "HiddenKey")}
    for method, values in (("LoRA", lora), ("HiddenKey", hk)):
        row = rows[("hk_toy_sst2", method)]
        assert row["seeds"] == [0, 1] and row["values"] == [values[0], values[1]]
        assert row["mean"] == pytest.approx(statistics.fmean(values.values()))
        assert row["std"] == pytest.approx(statistics.stdev(values.values()))
    hk_row = rows[("hk_toy_sst2", "HiddenKey")]
    assert hk_row["delta_vs_lora"] == pytest.approx(statistics.fmean(hk.values()) - statistics.fmean(lora.values()))
    sig = hk_row["significance"]
    diffs = [hk[s] - lora[s] for s in (0, 1)]
    if len(set(diffs)) > 1:
        assert sig["p"] == pytest.approx(stats.ttest_rel([hk[0], hk[1]], [lora[0], lora[1]]).pvalue)
    else:
        assert sig["p"] is None and "undefined" in sig["note"]
    assert table["base"]["hk_toy_sst2"]["value"] == _acc(run_dirs[0], "base")

    # the Markdown shows the same numbers
    md = report.read_text()
    lora_cell = f"{100 * statistics.fmean(lora.values()):.1f} ± {100 * statistics.stdev(lora.values()):.1f} (n=2)"
    assert lora_cell in md
    assert f"| hk_toy_sst2 (acc) | {100 * _acc(run_dirs[0], 'base'):.1f} |" in md
    assert f"{100 * hk_row['delta_vs_lora']:+.1f}" in md
    for run_dir in run_dirs:
        assert f"`{run_dir}`" in md


def test_curves_and_overfitting_come_from_metrics_jsonl(tiny):
    run_dirs, report = tiny
    table = json.loads((report.parent / "report.json").read_text())
    for row in table["runs"]:
        metrics = [json.loads(line) for line in (Path(row["path"]) / "metrics.jsonl").read_text().splitlines()]
        val = [(m["step"], m["loss"]) for m in metrics if m["split"] == "validation"]
        best = min(val, key=lambda x: x[1])
        o = row["overfitting"]
        assert (o["best_step"], o["best_val_loss"], o["final_val_loss"]) == (best[0], best[1], val[-1][1])
        assert o["final_train_ce"] == [m["ce"] for m in metrics if m["split"] == "train"][-1]


def test_figures_are_real_pngs(tiny):
    import matplotlib.image as mpimg

    _, report = tiny
    for name in ("accuracy.png", "curves_hk_toy_sst2.png"):
        image = mpimg.imread(report.parent / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image.std() > 0.01  # not blank
        assert f"]({name})" in report.read_text()


def test_cli_renders_into_out_dir(tiny, tmp_path, capsys):
    run_dirs, _ = tiny
    assert report_mod.main([str(d) for d in run_dirs[:2]] + ["--out", str(tmp_path)]) == 0
    assert "| hk_toy_sst2 (acc) |" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "accuracy.png").is_file()


def test_method_labels_follow_the_paper():
    assert report_mod.method_label({"dropout": {"preset": "none"}}) == "LoRA"
    assert report_mod.method_label({"dropout": {"preset": "hiddenkey"}}) == "HiddenKey"
    assert report_mod.method_label({"dropout": {"preset": "dropkey", "key": {"rate": 0.3}}}) == "DropKey (key ele 0.3)"
    hk = {"dropout": {"preset": "hiddenkey", "key": {"rate": 0.05}, "hidden": {"rate": 0.02}}}
    assert report_mod.method_label(hk) == "HiddenKey (key col 0.05, hidden ele 0.02, kl 1)"
    with_lora_dropout = {"dropout": {"preset": "none"}, "lora": {"dropout": 0.1}}
    assert report_mod.method_label(with_lora_dropout) == "LoRA + lora_dropout 0.1"


def test_single_seed_significance_says_why():
    out = report_mod.paired_test({0: 0.8}, {0: 0.7})
    assert out["p"] is None and "2 seeds" in out["note"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(report_mod.ReportError, match="not a run directory"):
        report_mod.load_run(tmp_path)
