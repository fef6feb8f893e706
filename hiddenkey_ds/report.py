"""`hiddenkey-ds report RUN_DIR...`: compare runs in a Markdown report with PNG figures.

Reads each run's config.yaml (method, seed), metrics.jsonl (curves) and eval/*.json (lm-eval results; base.json
gives the base model's "before" row) and writes into --out:
  report.md        task x method table (mean +- std over seeds, delta vs. LoRA, paired t-test across seeds),
                   a per-run table, overfitting diagnostics from the validation curves
  report.json      the same numbers, machine-readable
  accuracy.png     lm-eval accuracy per task and method: bars = mean, error bars = std over seeds, dots = seeds,
                   dashed line = base model
  curves_TASK.png  per method: training CE (dashed) and validation loss (solid), validation accuracy; a star marks
                   each method's lowest validation loss, so a curve rising after it shows overfitting
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BASELINE = "LoRA"
BASE_MODEL = "base model (no adapter)"
PRESET_LABELS = {"none": BASELINE, "dropkey": "DropKey", "dropattention": "DropAttention", "hiddencut": "HiddenCut",
                 "hiddenkey": "HiddenKey", "hiddenkey_nokl": "HiddenKey w/o KL", "custom": "custom dropout"}
METHOD_ORDER = ["LoRA", "DropKey", "DropAttention", "HiddenCut", "HiddenKey w/o KL", "HiddenKey"]
# a run's validation loss ending this much above its minimum is flagged as overfitting
OVERFIT_THRESHOLD = 0.10


class ReportError(RuntimeError):
    pass


@dataclass
class Run:
    path: Path
    recipe: dict[str, Any]
    method: str
    seed: int
    task: str                                        # what it trained on (its lm-eval task name when known)
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem -> lm-eval results JSON

    def curve(self, split: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.metrics if r.get("split") == split and isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]


def method_label(recipe: dict[str, Any]) -> str:
    """The paper's name for the run's dropout setting; settings off the preset are spelled out."""
    from hiddenkey_ds.dropout.config import DropoutConfig

    raw = recipe.get("dropout") or {}
    cfg = DropoutConfig(**raw)
    label = PRESET_LABELS.get(cfg.preset, cfg.preset)
    if cfg != DropoutConfig(preset=cfg.preset):
        # compact enough for a plot legend, yet distinct for every setting (position, pattern, rate, loss)
        parts = [f"{pos} {getattr(cfg, pos).pattern[:3]} {getattr(cfg, pos).rate:g}"
                 for pos in ("key", "attention", "hidden") if getattr(cfg, pos).rate]
        if cfg.dual_pass:
            parts.append(f"{cfg.consistency} {cfg.alpha:g}")
        label = f"{label} ({', '.join(parts) or 'no dropout'})"
    lora_dropout = (recipe.get("lora") or {}).get("dropout", 0.0) or 0.0
    if lora_dropout:
        label = f"{label} + lora_dropout {lora_dropout:g}"
    return label


def _task_of(recipe: dict[str, Any]) -> str:
    from hiddenkey_ds.evaluate import EvalError, tasks_for_recipe

    try:
        return tasks_for_recipe(recipe)[0][0]
    except (EvalError, KeyError):
        return str((recipe.get("data") or {}).get("task") or (recipe.get("data") or {}).get("path"))


def load_run(path: str | Path) -> Run:
    p = Path(path)
    try:
        recipe = yaml.safe_load((p / "config.yaml").read_text())
    except OSError:
        raise ReportError(f"{p} is not a run directory (no config.yaml)") from None
    metrics = []
    if (p / "metrics.jsonl").is_file():
        for n, line in enumerate((p / "metrics.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ReportError(f"{p}/metrics.jsonl line {n} is not JSON: {err}") from None
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else None
    evals = {f.stem: json.loads(f.read_text()) for f in sorted((p / "eval").glob("*.json"))}
    return Run(p, recipe, method_label(recipe), int(recipe.get("run", {}).get("seed", 0)), _task_of(recipe),
               metrics, summary, evals)


def _accuracy_metric(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    row = results.get("results", {}).get(task, {})
    for name in ("acc", "mcc", "f1", "exact_match"):
        if isinstance(row.get(f"{name},none"), (int, float)):
            return name, float(row[f"{name},none"])
    return None


def _method_key(method: str) -> tuple[int, str]:
    base = method.split(" [")[0].split(" + ")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def paired_test(method: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Paired t-test over the seeds both have (scores of the same seed are paired)."""
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    out: dict[str, Any] = {"test": "paired t-test across seeds", "n_pairs": len(seeds), "p": None}
    if len(seeds) < 2:
        out["note"] = f"needs >= 2 seeds run with both methods (has {len(seeds)})"
        return out
    if len(set(diffs)) == 1:
        out["note"] = "identical difference on every seed: the t statistic is undefined"
        return out
    from scipy import stats

    result = stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds])
    out.update(t=float(result.statistic), p=float(result.pvalue))
    return out


def build_table(runs: list[Run]) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written as report.json)."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    metric_of: dict[str, str] = {}
    base: dict[str, dict[str, Any]] = {}
    for run in runs:
        results = run.evals.get("results")
        if results:
            for task in results.get("results", {}):
                found = _accuracy_metric(results, task)
                if found is None:
                    continue
                metric_of[task] = found[0]
                seeds = scores.setdefault((task, run.method), {})
                if run.seed in seeds:
                    raise ReportError(
                        f"two runs of {run.method} on {task} with seed {run.seed} (one is {run.path}); "
                        "give each run once"
                    )
                seeds[run.seed] = found[1]
        for task in (run.evals.get("base") or {}).get("results", {}):
            found = _accuracy_metric(run.evals["base"], task)
            if found and task not in base:  # the same base model and task give the same number: keep one
                base[task] = {"metric": found[0], "value": found[1], "source": str(run.path / "eval" / "base.json")}
    rows = []
    for task in sorted({t for t, _ in scores}):
        baseline = scores.get((task, BASELINE))
        for method in sorted((m for t, m in scores if t == task), key=_method_key):
            values = scores[(task, method)]
            vals = [values[s] for s in sorted(values)]
            row = {"task": task, "method": method, "metric": metric_of[task], "seeds": sorted(values),
                   "values": vals, "mean": statistics.fmean(vals),
                   "std": statistics.stdev(vals) if len(vals) > 1 else None}
            if baseline is not None and method != BASELINE:
                row["delta_vs_lora"] = row["mean"] - statistics.fmean(baseline.values())
                row["significance"] = paired_test(values, baseline)
            rows.append(row)
    return {"rows": rows, "base": base, "runs": [_run_row(r) for r in runs]}


def overfitting(run: Run) -> dict[str, Any] | None:
    steps, losses = run.curve("validation", "loss")
    if len(losses) < 2:
        return None
    best = min(range(len(losses)), key=losses.__getitem__)
    rise = (losses[-1] - losses[best]) / losses[best] if losses[best] > 0 else 0.0
    _, train = run.curve("train", "ce")
    return {"best_step": steps[best], "best_val_loss": losses[best], "final_val_loss": losses[-1],
            "final_train_ce": train[-1] if train else None, "rise": rise, "overfit": rise > OVERFIT_THRESHOLD}


def _run_row(run: Run) -> dict[str, Any]:
    acc = {}
    for stem, results in run.evals.items():
        for task in results.get("results", {}):
            found = _accuracy_metric(results, task)
            if found:
                acc[f"{stem}:{task}"] = found[1]
    return {"path": str(run.path), "method": run.method, "seed": run.seed, "task": run.task,
            "finished": run.summary is not None, "steps": (run.summary or {}).get("steps"),
            "wall_time_s": (run.summary or {}).get("wall_time_s"), "lm_eval": acc, "overfitting": overfitting(run)}


# -- rendering ---------------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _mean_std(row: dict[str, Any]) -> str:
    if row["std"] is None:
        return f"{_pct(row['mean'])} (n=1)"
    return f"{_pct(row['mean'])} ± {_pct(row['std'])} (n={len(row['values'])})"


def _significance(row: dict[str, Any]) -> str:
    sig = row.get("significance")
    if sig is None:
        return "baseline" if row["method"] == BASELINE else "— (no LoRA runs)"
    if sig["p"] is None:
        return f"n/a: {sig['note']}"
    return f"p = {sig['p']:.3g} (t = {sig['t']:.2f}, {sig['n_pairs']} seeds)"


def render_markdown(table: dict[str, Any], figures: list[str]) -> str:
    rows, base = table["rows"], table["base"]
    lines = ["# hiddenkey-ds report", ""]
    if rows:
        tasks = sorted({r["task"] for r in rows})
        methods = sorted({r["method"] for r in rows}, key=_method_key)
        metric = {r["task"]: r["metric"] for r in rows}
        lines += ["## lm-eval accuracy: task x method", "",
                  "Mean ± sample std over seeds, in %; the base model row is the pretrained model without adapter.", ""]
        header = ["task (metric)"] + ([BASE_MODEL] if base else []) + methods
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for task in tasks:
            cells = [f"{task} ({metric[task]})"]
            if base:
                cells.append(_pct(base[task]["value"]) if task in base else "—")
            by_method = {r["method"]: r for r in rows if r["task"] == task}
            best = max(by_method.values(), key=lambda r: r["mean"])["method"]
            for m in methods:
                r = by_method.get(m)
                cell = "—" if r is None else _mean_std(r)
                cells.append(f"**{cell}**" if r is not None and m == best and len(by_method) > 1 else cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Bold: the best method of the row.", "",
                  "## Against the LoRA baseline", "",
                  "| task | method | seeds | mean ± std (%) | Δ vs LoRA (points) | significance |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            delta = r.get("delta_vs_lora")
            lines.append(
                f"| {r['task']} | {r['method']} | {', '.join(map(str, r['seeds']))} | {_mean_std(r)} | "
                f"{'—' if delta is None else f'{100 * delta:+.1f}'} | {_significance(r)} |"
            )
    else:
        lines += ["No run has lm-eval results (RUN_DIR/eval/results.json): run `hiddenkey-ds eval RUN_DIR` first.", ""]

    lines += ["", "## Runs", "",
              "Overfitting: validation loss at the end vs. its minimum (flagged when more than "
              f"{100 * OVERFIT_THRESHOLD:.0f}% above it).", "",
              "| run | method | seed | steps | wall time | final train CE | val loss: best (step) → final | overfit "
              "| lm-eval |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in table["runs"]:
        o = r["overfitting"]
        curve = "—" if o is None else f"{o['best_val_loss']:.3f} ({o['best_step']}) → {o['final_val_loss']:.3f}"
        flag = "—" if o is None else f"{'yes' if o['overfit'] else 'no'} (+{100 * o['rise']:.0f}%)"
        ce = "—" if o is None or o["final_train_ce"] is None else f"{o['final_train_ce']:.3f}"
        acc = ", ".join(f"{k.split(':', 1)[1]}{' (base)' if k.startswith('base:') else ''} {_pct(v)}"
                        for k, v in r["lm_eval"].items()) or "not evaluated"
        wall = "—" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f} s"
        steps = r["steps"] if r["finished"] else "unfinished"
        lines.append(f"| `{r['path']}` | {r['method']} | {r['seed']} | {steps} | {wall} | {ce} | {curve} | {flag} "
                     f"| {acc} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    fixed = {m: i for i, m in enumerate(METHOD_ORDER)}
    out, spare = {}, len(METHOD_ORDER)
    for m in methods:
        base = m.split(" [")[0].split(" + ")[0]
        if base in fixed and not any(v == palette(fixed[base]) for v in out.values()):
            out[m] = palette(fixed[base])
        else:
            out[m] = palette(spare % 10)
            spare += 1
    return out


def _mean_curve(runs: list[Run], split: str, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for s, v in zip(*run.curve(split, key)):
            per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    return (steps, [statistics.fmean(per_step[s]) for s in steps], [min(per_step[s]) for s in steps],
            [max(per_step[s]) for s in steps])


def plot_curves(runs: list[Run], task: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    methods = sorted(by_method, key=_method_key)
    colors = _colors(methods)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in methods:
        group, c = by_method[m], colors[m]
        n = len(group)
        steps, mean, lo, hi = _mean_curve(group, "train", "ce")
        if steps:
            ax_loss.plot(steps, mean, "--", color=c, alpha=0.7, lw=1.2)
            if n > 1:
                ax_loss.fill_between(steps, lo, hi, color=c, alpha=0.08)
        steps, mean, lo, hi = _mean_curve(group, "validation", "loss")
        if steps:
            best = min(range(len(mean)), key=mean.__getitem__)
            rise = (mean[-1] - mean[best]) / mean[best] if mean[best] > 0 else 0.0
            verdict = f"overfits: final val loss +{100 * rise:.0f}% over its min" if rise > OVERFIT_THRESHOLD \
                else f"final val loss +{100 * rise:.0f}% over its min"
            ax_loss.plot(steps, mean, "-o", color=c, lw=2, ms=3.5, label=f"{m} (n={n}): {verdict}")
            ax_loss.plot(steps[best], mean[best], "*", color=c, ms=16, mec="black", mew=0.8)
            if n > 1:
                ax_loss.fill_between(steps, lo, hi, color=c, alpha=0.15)
        steps, mean, lo, hi = _mean_curve(group, "validation", "accuracy")
        if steps:
            ax_acc.plot(steps, [100 * v for v in mean], "-o", color=c, lw=2, ms=3.5, label=f"{m} (n={n})")
            if n > 1:
                ax_acc.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=c, alpha=0.15)
    ax_loss.set(title=f"{task}: training CE (dashed) vs validation loss (solid)", xlabel="optimizer step",
                ylabel="loss (token mean over answers)")
    ax_loss.set_yscale("log")
    ax_loss.plot([], [], "*", color="grey", ms=12, mec="black", label="★ lowest validation loss")
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_acc.set(title=f"{task}: validation accuracy (training loop, answer argmax)", xlabel="optimizer step",
               ylabel="accuracy (%)")
    ax_acc.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(table: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows, base = table["rows"], table["base"]
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=_method_key)
    colors = _colors(methods)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8.5, 4.2 + 0.8 * len(tasks) * max(1, len(methods))), 4.8))
    for ti, task in enumerate(tasks):
        by_method = {r["method"]: r for r in rows if r["task"] == task}
        best = max(by_method.values(), key=lambda r: r["mean"])["method"]
        for mi, m in enumerate(methods):
            r = by_method.get(m)
            if r is None:
                continue
            x = ti + (mi - (len(methods) - 1) / 2) * width
            ax.bar(x, 100 * r["mean"], width * 0.9, color=colors[m], label=m if ti == 0 else None,
                   yerr=None if r["std"] is None else 100 * r["std"], capsize=4,
                   edgecolor="black", linewidth=1.8 if m == best and len(by_method) > 1 else 0.4)
            ax.scatter([x] * len(r["values"]), [100 * v for v in r["values"]], color="black", s=12, zorder=3)
            ax.annotate(f"{100 * r['mean']:.1f}" + (" ★" if m == best and len(by_method) > 1 else ""),
                        (x, 100 * (r["mean"] + (r["std"] or 0))), ha="center", va="bottom", fontsize=9,
                        xytext=(0, 3), textcoords="offset points")
        if task in base:
            ax.hlines(100 * base[task]["value"], ti - 0.45, ti + 0.45, colors="dimgray", linestyles="--", lw=1.5,
                      label=BASE_MODEL if ti == 0 else None)
    n_seeds = sorted({len(r["values"]) for r in rows})
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel=f"{rows[0]['metric']} (%)" if rows else "accuracy (%)",
           title=f"lm-eval accuracy: mean ± std over seeds (n = {', '.join(map(str, n_seeds))}); "
                 "dots = seeds, ★ = best")
    lows = [100 * min(r["values"]) for r in rows] + [100 * b["value"] for b in base.values()]
    ax.set_ylim(max(0.0, min(lows) - 10), 100 * min(1.0, max(r["mean"] + (r["std"] or 0) for r in rows) + 0.08))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: never on a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Render report.md, report.json and the PNGs into out_dir; returns report.md."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(runs)
    figures = []
    if table["rows"]:
        plot_accuracy(table, out / "accuracy.png")
        figures.append("accuracy.png")
    for task in sorted({r.task for r in runs}):
        group = [r for r in runs if r.task == task and r.metrics]
        if group:
            name = f"curves_{''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in task)}.png"
            plot_curves(group, task, out / name)
            figures.append(name)
    (out / "report.json").write_text(json.dumps(table, indent=2, default=_json_default) + "\n")
    report = out / "report.md"
    report.write_text(render_markdown(table, figures))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenkey-ds report", description="Markdown + PNG report comparing runs.")
    parser.add_argument("runs", nargs="+", help="run directories (each with config.yaml, metrics.jsonl, eval/)")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.runs, args.out)
    except ReportError as err:
        print(f"hiddenkey-ds report: error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
