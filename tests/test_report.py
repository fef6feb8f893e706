"""`hiddenkey-ds report`: its numbers are the ones it read, computed as documented.

Two kinds of input: the real tiny sweep of test_sweep.py (trained and evaluated for real), and run directories
fabricated in the exact layout (config.yaml through the schema, summary.json, metrics.jsonl, eval/*.json) with
chosen scores, so that medians, means, stds and p-values can be checked against hand-computed values.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from hiddenkey_ds.experiments import report as report_mod
from test_sweep import fabricate_run, tiny_sweep_dir


def strict_load(text: str):
    """json.loads that refuses NaN / Infinity, as any strict JSON parser does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# -- the real tiny sweep ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hiddenkey_ds.experiments.sweep import load_sweep

    path, report = tiny_sweep_dir(tmp_path_factory)
    return [r.run_dir for r in load_sweep(path).runs()], report


def _acc(run_dir: Path, name: str = "results") -> float:
    return json.loads((run_dir / "eval" / f"{name}.json").read_text())["results"]["hk_toy_sst2"]["acc,none"]


def test_table_is_the_metrics_it_read(tiny):
    from scipy import stats

    run_dirs, report = tiny
    lora = {0: _acc(run_dirs[0]), 1: _acc(run_dirs[1])}
    hk = {0: _acc(run_dirs[2]), 1: _acc(run_dirs[3])}
    table = strict_load((report.parent / "report.json").read_text())
    assert table["baseline"] == "lora" and table["requested_primary"] == "best"
    # runs that kept adapter_best/ lead with its scores; without one the final scores lead
    kept_best = any((d / "adapter_best").is_dir() for d in run_dirs)
    assert table["primary"] == ("best" if kept_best else "final")
    # grouped by the sweep's method names, not by labels recomputed from the dropout settings
    rows = {(r["task"], r["method"]): r for r in table["scores"]["final"]}
    assert set(rows) == {("hk_toy_sst2", "lora"), ("hk_toy_sst2", "hiddenkey")}
    for method, values in (("lora", lora), ("hiddenkey", hk)):
        row = rows[("hk_toy_sst2", method)]
        assert row["seeds"] == [0, 1] and row["values"] == [values[0], values[1]]
        assert row["median"] == pytest.approx(statistics.median(values.values()))
        assert row["mean"] == pytest.approx(statistics.fmean(values.values()))
        assert row["std"] == pytest.approx(statistics.stdev(values.values()))
    hk_row = rows[("hk_toy_sst2", "hiddenkey")]
    assert hk_row["delta_vs_baseline"]["mean"] == pytest.approx(statistics.fmean(hk.values()) - statistics.fmean(lora.values()))
    sig = hk_row["significance"]
    diffs = [hk[s] - lora[s] for s in (0, 1)]
    assert sig["n"] == 2
    if abs(diffs[0] - diffs[1]) > 1e-12:
        assert sig["p"] == pytest.approx(stats.ttest_rel([hk[0], hk[1]], [lora[0], lora[1]]).pvalue)
    else:
        assert sig["p"] is None and "no test" in sig["note"]
    assert table["base"]["hk_toy_sst2"]["value"] == _acc(run_dirs[0], "base")
    assert table["eval_settings"]["hk_toy_sst2"] == {"limit": 16, "batch_size": 16}
    for row in table["runs"]:
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert row["wall_time_s"] == summary["wall_time_s"]
    walls = {m["method"]: m["wall_time_s_mean"] for m in table["methods"]}
    assert walls["lora"] == pytest.approx(statistics.fmean(
        json.loads((d / "summary.json").read_text())["wall_time_s"] for d in run_dirs[:2]))

    # the Markdown shows the same numbers
    md = report.read_text()
    lora_cell = (f"{100 * statistics.median(lora.values()):.1f} · {100 * statistics.fmean(lora.values()):.1f} ± "
                 f"{100 * statistics.stdev(lora.values()):.1f} (n=2)")
    assert lora_cell in md
    assert f"| hk_toy_sst2 (acc) | {100 * _acc(run_dirs[0], 'base'):.1f} |" in md
    assert f"{100 * hk_row['delta_vs_baseline']['mean']:+.2f}" in md
    assert "| lora | LoRA |" in md and "| hiddenkey | HiddenKey |" in md  # method name beside its dropout setting
    for run_dir in run_dirs:
        assert f"`{run_dir}`" in md
    assert "Wang et al." not in md  # a tiny random model on toy data is not the paper's setting


def test_curves_and_overfitting_come_from_metrics_jsonl(tiny):
    run_dirs, report = tiny
    table = strict_load((report.parent / "report.json").read_text())
    for row in table["runs"]:
        metrics = [json.loads(line) for line in (Path(row["path"]) / "metrics.jsonl").read_text().splitlines()]
        val = [(m["step"], m["loss"]) for m in metrics if m["split"] == "validation"]
        best = min(val, key=lambda x: x[1])
        o = row["overfitting"]
        assert (o["best_step"], o["best_val_loss"], o["final_val_loss"]) == (best[0], best[1], val[-1][1])
        assert o["final_train_ce"] == [m["ce"] for m in metrics if m["split"] == "train"][-1]
        top = max((m for m in metrics if m["split"] == "validation"), key=lambda m: (m["accuracy"], -m["loss"], -m["step"]))
        assert row["best_validation"]["accuracy"] == top["accuracy"]


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


# -- fabricated runs: the statistics against hand-computed values ---------------------------------------------

LORA_FINAL, HK_FINAL = [0.70, 0.74, 0.66], [0.75, 0.78, 0.72]
LORA_BEST, HK_BEST = [0.72, 0.80, 0.70], [0.80, 0.81, 0.73]


@pytest.fixture
def study(tmp_path):
    """lora and hiddenkey, 3 seeds each, with final and best-checkpoint scores and wall times 10/20/30 s."""
    dirs = []
    for method, preset, finals, bests in (("lora", "none", LORA_FINAL, LORA_BEST),
                                          ("hiddenkey", "hiddenkey", HK_FINAL, HK_BEST)):
        for seed in range(3):
            dirs.append(fabricate_run(
                tmp_path / f"{method}-{seed}", f"dropout.preset={preset}", f"run.seed={seed}", f"run.label={method}",
                final=finals[seed], best=bests[seed], wall_time_s=10.0 * (seed + 1) * (2 if method == "hiddenkey" else 1),
                best_validation=(4, 0.6 + seed / 10, 0.5), validation=[(4, 0.6 + seed / 10, 0.5), (8, 0.55, 0.7)]))
    return dirs


def test_median_mean_std_delta_and_paired_t_test_are_the_hand_computed_values(study, tmp_path):
    report = report_mod.write_report(study, tmp_path / "out")
    table = strict_load((tmp_path / "out" / "report.json").read_text())
    final = {r["method"]: r for r in table["scores"]["final"]}
    best = {r["method"]: r for r in table["scores"]["best"]}
    # final: LoRA 70/74/66, HiddenKey 75/78/72
    assert (final["lora"]["median"], final["lora"]["mean"], final["lora"]["std"]) == pytest.approx((0.70, 0.70, 0.04))
    assert (final["hiddenkey"]["median"], final["hiddenkey"]["mean"], final["hiddenkey"]["std"]) == pytest.approx(
        (0.75, 0.75, 0.03))
    assert final["hiddenkey"]["delta_vs_baseline"] == pytest.approx({"median": 0.05, "mean": 0.05})
    # paired differences 5, 4, 6 points: mean 5, sd 1 -> t = 5 / (1 / sqrt 3) = 8.660; with 2 degrees of freedom
    # the two-sided p is 1 - t / sqrt(2 + t^2) = 1 - 8.660 / 8.775 = 0.01307
    sig = final["hiddenkey"]["significance"]
    assert sig["n"] == 3 and sig["t"] == pytest.approx(8.6603, abs=1e-3) and sig["p"] == pytest.approx(0.013072, abs=1e-5)
    # best: LoRA 72/80/70 (median 72, mean 74, std 5.29), HiddenKey 80/81/73 (median 80, mean 78)
    assert (best["lora"]["median"], best["lora"]["mean"], best["lora"]["std"]) == pytest.approx((0.72, 0.74, 0.052915),
                                                                                               abs=1e-6)
    assert best["hiddenkey"]["delta_vs_baseline"] == pytest.approx({"median": 0.08, "mean": 0.04})
    # differences 8, 1, 3: mean 4, sd 3.606 -> t = 1.9215, p = 1 - 1.9215 / sqrt(2 + 1.9215^2) = 0.19461
    assert best["hiddenkey"]["significance"]["p"] == pytest.approx(0.19461, abs=1e-4)
    assert best["hiddenkey"]["steps"] == [4, 4, 4] and final["hiddenkey"]["steps"] == [8, 8, 8]
    walls = {m["method"]: m for m in table["methods"]}
    assert walls["lora"]["wall_time_s_mean"] == pytest.approx(20.0) and walls["hiddenkey"]["wall_time_s_mean"] == 40.0
    assert [r["best_validation"]["accuracy"] for r in table["runs"][:3]] == pytest.approx([0.6, 0.7, 0.8])

    md = report.read_text()
    headline, also = md.index("## Headline: best-validation checkpoint"), md.index("## Also: final adapter")
    assert headline < also  # the paper's protocol leads by default
    assert "| hk_toy_sst2 (acc) | 72.0 · 74.0 ± 5.3 (n=3) | **80.0 · 78.0 ± 4.4 (n=3)** |" in md
    assert "| hk_toy_sst2 (acc) | 70.0 · 70.0 ± 4.0 (n=3) | **75.0 · 75.0 ± 3.0 (n=3)** |" in md
    assert "| hk_toy_sst2 | final | hiddenkey | 0, 1, 2 | 75.00 | 75.00 ± 3.00 | +5.00 | +5.00 | p = 0.0131 (t = 8.66, n = 3) |" in md
    assert "| lora | LoRA | 3 | 20 s | 60 s |" in md

    report_mod.write_report(study, tmp_path / "final", primary="final")
    md = (tmp_path / "final" / "report.md").read_text()
    assert md.index("## Headline: final adapter") < md.index("## Also: best-validation checkpoint")


def test_one_seed_says_no_test_and_a_missing_number_is_null_not_nan(tmp_path):
    runs = [fabricate_run(tmp_path / "lora", "run.label=lora", final=0.7, wall_time_s=None,
                          validation=[(2, 0.5, 0.4), (4, 0.6, float("nan"))]),
            fabricate_run(tmp_path / "hk", "run.label=hk", "dropout.preset=hiddenkey", final=0.8)]
    report = report_mod.write_report(runs, tmp_path / "out")
    text = (tmp_path / "out" / "report.json").read_text()
    assert "NaN" not in text
    table = strict_load(text)
    [hk] = [r for r in table["scores"]["final"] if r["method"] == "hk"]
    assert hk["std"] is None and hk["significance"]["p"] is None
    assert hk["significance"]["note"].startswith("n<2: no test")
    # a diverged run (NaN validation loss in metrics.jsonl): flagged, and null in the JSON
    assert table["runs"][0]["overfitting"]["final_val_loss"] is None and table["runs"][0]["overfitting"]["diverged"]
    assert report_mod.strict_json({"a": [float("nan"), float("inf"), 1.5]}) == {"a": [None, None, 1.5]}
    assert table["methods"][0]["wall_time_s_mean"] is None
    assert "n<2: no test (n=1 seed run with both)" in report.read_text()
    # no run kept a best adapter: the final scores lead, and the report says why
    assert table["primary"] == "final" and table["requested_primary"] == "best"
    md = report.read_text()
    assert md.index("## Headline: final adapter") < md.index("## Also: best-validation checkpoint")
    assert "no run has results_best.json, so the final adapter scores lead" in md
    assert "No run has results_best.json" in md


def test_methods_whose_dropout_labels_coincide_do_not_collide(tmp_path):
    """Two LoRA settings (r=4 and r=16) have the same dropout label; the sweep's method names keep them apart,
    and without names the report refuses to pool them instead of averaging two methods."""
    runs = []
    for name, r, scores in (("lora-r4", 4, [0.60, 0.62]), ("lora-r16", 16, [0.80, 0.84])):
        for seed in (0, 1):
            runs.append(fabricate_run(tmp_path / f"{name}-{seed}", f"lora.r={r}", f"run.seed={seed}",
                                      f"run.label={name}", final=scores[seed]))
    assert {report_mod.method_label(report_mod.load_run(d).recipe) for d in runs} == {"LoRA"}
    report_mod.write_report(runs, tmp_path / "out", baseline="lora-r4")
    rows = {r["method"]: r for r in strict_load((tmp_path / "out" / "report.json").read_text())["scores"]["final"]}
    assert rows["lora-r4"]["mean"] == pytest.approx(0.61) and rows["lora-r16"]["mean"] == pytest.approx(0.82)
    assert rows["lora-r16"]["delta_vs_baseline"]["mean"] == pytest.approx(0.21)

    # the same runs without names would both be "LoRA"
    unnamed = []
    for d in runs:
        text = (d / "config.yaml").read_text().replace(f"label: {d.name.rsplit('-', 1)[0]}", "label: null")
        target = tmp_path / "unnamed" / d.name
        target.mkdir(parents=True)
        (target / "config.yaml").write_text(text)
        (target / "eval").mkdir()
        (target / "eval" / "results.json").write_text((d / "eval" / "results.json").read_text())
        unnamed.append(target)
    with pytest.raises(report_mod.ReportError, match=r"'LoRA' on hk_toy_sst2: .* differ in lora.r \(4 vs 16\)"):
        report_mod.write_report(unnamed, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # a sweep's labels override the recipe's: the same directories group right when the sweep names them
    labels = {str(d): d.name.rsplit("-", 1)[0] for d in unnamed}
    report_mod.write_report(unnamed, tmp_path / "labelled", labels=labels)


def test_different_lm_eval_limits_or_batch_sizes_are_refused(tmp_path, capsys):
    a = fabricate_run(tmp_path / "a", "run.label=lora", final=0.7, limit=16, batch_size=16)
    b = fabricate_run(tmp_path / "b", "run.label=hk", "dropout.preset=hiddenkey", final=0.8, limit=None,
                      batch_size=16)
    c = fabricate_run(tmp_path / "c", "run.label=dk", "dropout.preset=dropkey", final=0.8, limit=16, batch_size=4)
    out = tmp_path / "out"
    assert report_mod.main([str(a), str(b), str(c), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiddenkey-ds report: error: lm-eval scores made with different limits or batch sizes")
    assert "hk_toy_sst2: limit=16 batch_size=16" in err and "limit=None batch_size=16" in err
    assert "limit=16 batch_size=4" in err
    assert str(a / "eval" / "results.json") in err and str(b / "eval" / "results.json") in err
    assert "hint:" in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_paper_numbers_only_beside_the_papers_setting(tmp_path):
    runs = []
    for method, preset, task in (("lora", "none", "rte"), ("hiddenkey", "hiddenkey", "rte"),
                                 ("lora", "none", "mrpc")):
        for seed in (0, 1):
            runs.append(fabricate_run(tmp_path / f"{task}-{method}-{seed}", f"data.task={task}", "data.path=null",
                                      f"dropout.preset={preset}", f"run.seed={seed}", f"run.label={method}",
                                      recipe="llama2-7b-lora.yaml", task=f"hk_{task}", final=0.85 + seed / 100,
                                      best=0.88 + seed / 100, best_validation=(10, 0.9, 0.3)))
    md = report_mod.write_report(runs, tmp_path / "out").read_text()
    section = md[md.index("## Beside the paper"):md.index("## Against the baseline")]
    assert "Wang et al. 2024" in section
    assert "| hk_rte | LoRA | 88.45 — paper (Wang et al. 2024, Table 5) | lora, best-validation checkpoint | 88.50 (n=2) |" \
        in section
    assert "| hk_rte | HiddenKey | 90.25 — paper (Wang et al. 2024, Table 5) | hiddenkey, final adapter | 85.50 (n=2) |" \
        in section
    assert "| hk_mrpc | LoRA | 88.73" in section and "| hk_mrpc | HiddenKey | 89.46" in section
    assert "| hk_mrpc | HiddenKey | 89.46 — paper (Wang et al. 2024, Table 5) | — | no matching method |" in section

    # another model on the same task: not the paper's setting, no paper numbers
    other = [fabricate_run(tmp_path / f"l3-{seed}", "data.task=rte", "data.path=null", f"run.seed={seed}",
                           "run.label=lora", recipe="llama3-8b-lora.yaml", task="hk_rte", final=0.8)
             for seed in (0, 1)]
    md = report_mod.write_report(other, tmp_path / "l3").read_text()
    assert "Wang et al." not in md and "88.45" not in md


def test_method_labels_follow_the_paper():
    assert report_mod.method_label({"dropout": {"preset": "none"}}) == "LoRA"
    assert report_mod.method_label({"dropout": {"preset": "hiddenkey"}}) == "HiddenKey"
    assert report_mod.method_label({"dropout": {"preset": "dropkey", "key": {"rate": 0.3}}}) == "DropKey (key ele 0.3)"
    hk = {"dropout": {"preset": "hiddenkey", "key": {"rate": 0.05}, "hidden": {"rate": 0.02}}}
    assert report_mod.method_label(hk) == "HiddenKey (key col 0.05, hidden ele 0.02, kl 1)"
    with_lora_dropout = {"dropout": {"preset": "none"}, "lora": {"dropout": 0.1}}
    assert report_mod.method_label(with_lora_dropout) == "LoRA + lora_dropout 0.1"


def test_not_a_run_directory(tmp_path, capsys):
    with pytest.raises(report_mod.ReportError, match="not a run directory"):
        report_mod.load_run(tmp_path)
    assert report_mod.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "hint:" in capsys.readouterr().err and not (tmp_path / "out").exists()
