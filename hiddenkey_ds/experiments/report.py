"""`hiddenkey-ds report RUN_DIR...`: compare runs in a Markdown report with PNG figures.

Reads each run's config.yaml (through the recipe schema: method name, seed, task), summary.json (wall time, the
best validation step), metrics.jsonl (curves) and eval/*.json (lm-eval results of the final adapter, results.json,
and of the best-validation adapter, results_best.json; base.json gives the base model's "before" row) and writes
into --out:
  report.md        per task x method, for both the best-checkpoint and the final-adapter scores: median and
                   mean +- std over seeds, delta vs. the LoRA baseline with a paired t-test across seeds; the
                   paper's published numbers where the setting is the paper's; wall time; a per-run table with
                   the overfitting diagnostics of the validation curves
  report.json      the same numbers, machine-readable (strict JSON: a missing number is null)
  accuracy.png     lm-eval accuracy per task and method, one panel per score (best / final): bars = mean, error
                   bars = std over seeds, dots = seeds, black tick = median, dashed line = base model
  curves_TASK.png  per method: training CE (dashed) and validation loss (solid), validation accuracy; a star marks
                   each method's lowest validation loss, so a curve rising after it shows overfitting

Runs are grouped by their method name: `run.label` (a sweep sets it to the sweep file's method name), else a
name derived from the dropout setting. Runs of one group must share their recipe up to seeds and bookkeeping,
and every lm-eval score of a task must come from the same limit and batch size; the report refuses otherwise.
It also refuses a stale score: a results file of a finished run that scored another adapter than the run's
(harness.stale_reason), and notes scores made while a run was still training.

A "Provenance" section lists, per run, the versions it was trained with (provenance.json: package version, git
commit, torch / transformers / peft / deepspeed / bitsandbytes, python, device, world size; lm_eval from its
results files) and warns where the compared runs differ.
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

from hiddenkey_ds.config.keys import flatten
from hiddenkey_ds.config.schema import Recipe
from hiddenkey_ds.run_dir import (
    BASE_RESULTS, BASE_RESULTS_STEM, CONFIG, EVAL, METRICS, PROVENANCE, QUANTIZED_SUFFIX, RESULT_STEMS, SUMMARY,
    is_finished, is_run_dir,
)

BASELINE = "LoRA"
BASE_MODEL = "base model (no adapter)"
PRESET_LABELS = {"none": BASELINE, "dropkey": "DropKey", "dropattention": "DropAttention", "hiddencut": "HiddenCut",
                 "hiddenkey": "HiddenKey", "hiddenkey_nokl": "HiddenKey w/o KL", "custom": "custom dropout"}
PRESET_ORDER = ["none", "dropkey", "dropattention", "hiddencut", "hiddenkey_nokl", "hiddenkey", "custom"]
# a run's validation loss ending this much above its minimum is flagged as overfitting
OVERFIT_THRESHOLD = 0.10
# score kinds: which adapter an lm-eval score is of (its results file: hiddenkey_ds.run_dir.RESULT_STEMS)
KINDS = ("best", "final")
KIND_TITLES = {"final": "final adapter", "best": "best-validation checkpoint"}
# the eval/ files whose lm-eval settings must agree: the base model's and both adapter kinds'
_SCORED_STEMS = (BASE_RESULTS_STEM, *RESULT_STEMS.values())
# recipe keys that may differ between the seeds of one method: seeds, places and bookkeeping, not the method
SEED_KEYS = {"run", "eval", "train.log_every", "train.save_every", "train.keep_checkpoints", "data.split_seed"}

# The paper's published numbers, shown beside ours only where our setting is the paper's (model and task).
# Wang, Chen, Jiang, Xue, Kong, Wu, "LoRA Meets Dropout under a Unified Framework", Findings of ACL 2024
# (arXiv:2403.00812). Accuracy in %; NLU numbers are the median of 5 runs.
PAPER_CITATION = ("Wang et al. 2024, \"LoRA Meets Dropout under a Unified Framework\", Findings of ACL 2024, "
                  "arXiv:2403.00812")
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "source": "paper (Wang et al. 2024, Table 5)", "model": "LLaMA2-7B + LoRA", "statistic": "median of 5 runs",
        "tasks": {"rte": {"LoRA": 88.45, "HiddenKey": 90.25}, "mrpc": {"LoRA": 88.73, "HiddenKey": 89.46}},
    },
    # RoBERTa-large is an encoder this package does not train; kept so the citation table is complete
    "roberta-large": {
        "source": "paper (Wang et al. 2024, Table 1)", "model": "RoBERTa-large + LoRA", "statistic": "median of 5 runs",
        "tasks": {
            "rte": {"LoRA": 84.48, "DropKey": 87.36, "DropAttention": 85.56, "HiddenCut": 87.00,
                    "HiddenKey w/o KL": 87.70, "HiddenKey": 88.10},
            "mrpc": {"LoRA": 89.95, "DropKey": 90.93, "DropAttention": 90.20, "HiddenCut": 90.69,
                     "HiddenKey w/o KL": 90.90, "HiddenKey": 91.20},
            "sst2": {"LoRA": 95.99, "DropKey": 96.22, "DropAttention": 95.76, "HiddenCut": 96.10,
                     "HiddenKey w/o KL": 96.22, "HiddenKey": 96.44},
        },
    },
}


class ReportError(RuntimeError):
    pass


@dataclass
class Run:
    path: Path
    recipe: Recipe
    method: str                                      # the group it is reported in
    seed: int
    task: str                                        # what it trained on (its lm-eval task name when known)
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # file stem -> lm-eval results JSON
    variant: str | None = None                       # the sweep's task name (several can train on one lm-eval task)
    prefixed: bool = False                           # show the variant: other runs reach the same task differently
    provenance: dict[str, Any] | None = None         # provenance.json (None: trained before it was recorded)

    def key(self, task: str | None = None) -> str:
        """The row a score of lm-eval task `task` (default: the run's own) lands in."""
        task = task or self.task
        return f"{self.variant}/{task}" if self.prefixed and self.variant else task

    def curve(self, split: str, key: str) -> tuple[list[int], list[float]]:
        # NaN stays in (a diverged run must show as one); only non-numbers are skipped
        rows = [r for r in self.metrics if r.get("split") == split and isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool)]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    @property
    def wall_time_s(self) -> float | None:
        value = (self.summary or {}).get("wall_time_s")
        return float(value) if _number(value) else None

    def best_validation(self) -> dict[str, Any] | None:
        """The best validation step: summary.json's `best`, else the highest accuracy in metrics.jsonl (ties:
        the lower loss, then the earlier step), the rule the training loop keeps adapter_best/ by."""
        best = (self.summary or {}).get("best")
        if isinstance(best, dict) and _number(best.get("accuracy")):
            return {"step": best.get("step"), "accuracy": float(best["accuracy"]),
                    "loss": float(best["loss"]) if _number(best.get("loss")) else None, "source": SUMMARY}
        rows = [r for r in self.metrics if r.get("split") == "validation" and _number(r.get("accuracy"))]
        if not rows:
            return None
        top = min(rows, key=lambda r: (-r["accuracy"], r["loss"] if _number(r.get("loss")) else math.inf, r["step"]))
        return {"step": top["step"], "accuracy": float(top["accuracy"]),
                "loss": float(top["loss"]) if _number(top.get("loss")) else None, "source": METRICS}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def method_label(recipe: Recipe | dict[str, Any]) -> str:
    """The paper's name for the run's dropout setting; settings off the preset are spelled out.

    `recipe` is a Recipe or a mapping of its `dropout` and `lora` sections (validated by the schema, which fills
    in what is left out). Describes a run; reports group by the sweep's method name (run.label) and use this only
    for runs without one.
    """
    from hiddenkey_ds.config.schema import LoraSection
    from hiddenkey_ds.method.config import DropoutConfig

    if isinstance(recipe, dict):
        cfg = DropoutConfig.model_validate(recipe.get("dropout") or {})
        lora_dropout = LoraSection.model_validate(recipe.get("lora") or {}).dropout
    else:
        cfg, lora_dropout = recipe.dropout, recipe.lora.dropout
    label = PRESET_LABELS.get(cfg.preset, cfg.preset)
    if cfg != DropoutConfig(preset=cfg.preset):
        # compact enough for a plot legend, yet distinct for every setting (position, pattern, rate, loss)
        parts = [f"{pos} {getattr(cfg, pos).pattern[:3]} {getattr(cfg, pos).rate:g}"
                 for pos in ("key", "attention", "hidden") if getattr(cfg, pos).rate]
        if cfg.dual_pass:
            parts.append(f"{cfg.consistency} {cfg.alpha:g}")
        label = f"{label} ({', '.join(parts) or 'no dropout'})"
    if lora_dropout:
        label = f"{label} + lora_dropout {lora_dropout:g}"
    return label


def _task_of(recipe: Recipe) -> str:
    from hiddenkey_ds.evaluation.harness import EvalError, tasks_for_recipe

    try:
        return tasks_for_recipe(recipe)[0][0]
    except (EvalError, KeyError):
        return str(recipe.data.task or recipe.data.path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ReportError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}), so "
                          "not a results file (hint: delete it and re-create it: re-run `hiddenkey-ds eval` for an "
                          "eval file)") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not JSON ({err}) (hint: delete it and re-create it: re-run `hiddenkey-ds eval` "
                          "for an eval file)") from None


def load_run(path: str | Path, label: str | None = None, variant: str | None = None) -> Run:
    """One run directory; `label` (a sweep's method name) overrides the recipe's run.label; `variant` is the
    sweep's task name."""
    from hiddenkey_ds.evaluation.harness import EvalError, read_run_recipe

    p = Path(path)
    if not is_run_dir(p):
        raise ReportError(f"{p} is not a run directory (no {CONFIG}) (hint: pass the directories training wrote, "
                          "e.g. OUT/runs/* of a sweep)")
    try:
        recipe = read_run_recipe(p)
    except EvalError as err:
        raise ReportError(str(err)) from None
    summary = _read_json(p / SUMMARY) if is_finished(p) else None
    evals = {f.stem: _read_json(f) for f in sorted((p / EVAL).glob("*.json"))}
    method = label or recipe.run.label or method_label(recipe)
    provenance = _read_json(p / PROVENANCE) if (p / PROVENANCE).is_file() else None
    return Run(p, recipe, method, recipe.run.seed, _task_of(recipe), _read_metrics(p), summary, evals, variant,
               provenance=provenance)


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    metrics = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ReportError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}) "
                          "(hint: the loop writes it as JSON lines; a damaged copy cannot be read: copy the run "
                          "directory again)") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ReportError(f"{path} line {n} is not JSON: {err} (hint: the loop writes whole lines; a "
                                  "truncated last line means the run died mid-write: resume it)") from None
    return metrics


def mark_variants(runs: list[Run]) -> None:
    """Sweep tasks that train on the same lm-eval task (say clean and noisy RTE) get rows of their own, named
    VARIANT/TASK; a task reached one way keeps its plain name."""
    variants: dict[str, set[str | None]] = {}
    for run in runs:
        variants.setdefault(run.task, set()).add(run.variant)
    for run in runs:
        run.prefixed = len(variants[run.task]) > 1


def _accuracy_metric(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    row = results.get("results", {}).get(task, {})
    for name in ("acc", "mcc", "f1", "exact_match"):
        if _number(row.get(f"{name},none")):
            return name, float(row[f"{name},none"])
    return None


def eval_settings(results: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval settings that change a score: limit and batch size (ours, else lm-eval's own config)."""
    ours, theirs = results.get("hiddenkey_ds") or {}, results.get("config") or {}
    return {"limit": ours.get("limit", theirs.get("limit")), "batch_size": ours.get("batch_size", theirs.get("batch_size"))}


# -- checks before anything is compared -------------------------------------------------------------------

def _method_settings(recipe: Recipe) -> dict[str, Any]:
    flat = flatten(recipe.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in SEED_KEYS)}


def check_groups(runs: list[Run]) -> None:
    """Runs reported as one method on one task must be one method: only seeds and bookkeeping may differ."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.key(), run.method), []).append(run)
    problems = []
    for (task, method), group in groups.items():
        ref = _method_settings(group[0].recipe)
        for other in group[1:]:
            mine = _method_settings(other.recipe)
            diff = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
            if diff:
                shown = ", ".join(f"{k} ({ref.get(k)!r} vs {mine.get(k)!r})" for k in diff[:4])
                problems.append(f"{method!r} on {task}: {group[0].path} and {other.path} differ in {shown}"
                                + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
                break
        seeds = [r.seed for r in group]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            paths = ", ".join(str(r.path) for r in group if r.seed in dupes)
            problems.append(f"{method!r} on {task}: seed(s) {dupes} given more than once ({paths})")
    if problems:
        raise ReportError("runs grouped as one method are not one method:\n" + "\n".join(f"  - {p}" for p in problems)
                          + "\n(hint: give each setting its own name with run.label=NAME, as `hiddenkey-ds sweep` "
                          "does, or pass each run directory once)")


def check_eval_settings(runs: list[Run]) -> None:
    """Scores of one task are comparable only when lm-eval ran them with the same limit and batch size."""
    seen: dict[str, dict[tuple[Any, Any], list[str]]] = {}
    for run in runs:
        for stem in _SCORED_STEMS:
            results = run.evals.get(stem)
            if not results:
                continue
            s = eval_settings(results)
            for task in results.get("results", {}):
                seen.setdefault(run.key(task), {}).setdefault((s["limit"], s["batch_size"]), []).append(
                    str(run.path / EVAL / f"{stem}.json"))
    problems = []
    for task, by_setting in sorted(seen.items()):
        if len(by_setting) > 1:
            parts = [f"limit={limit} batch_size={bs}: {files[0]}" + (f" and {len(files) - 1} more" if len(files) > 1 else "")
                     for (limit, bs), files in by_setting.items()]
            problems.append(f"{task}: " + "; ".join(parts))
    if problems:
        raise ReportError("lm-eval scores made with different limits or batch sizes are not comparable:\n"
                          + "\n".join(f"  - {p}" for p in problems)
                          + "\n(hint: delete the odd files and re-run `hiddenkey-ds eval RUN_DIR --limit L "
                          "--batch-size B` with one setting for all, or report the groups separately)")


def check_stale_scores(runs: list[Run]) -> list[str]:
    """Refuses a finished run's results file that scored another adapter than the run's own; returns a warning
    per unfinished run with adapter scores (its adapters may still change)."""
    from hiddenkey_ds.evaluation.harness import stale_reason

    problems, warnings = [], []
    for run in runs:
        scored = {stem: r for stem, r in run.evals.items() if (r.get("hiddenkey_ds") or {}).get("adapter_kind")}
        if not scored:
            continue
        if run.summary is None:
            warnings.append(f"{run.path} has not finished: its scores ({', '.join(sorted(scored))}) are of adapters "
                            "that may still change")
            continue
        current: dict[str, dict[str, Any]] = {}
        for stem, results in sorted(scored.items()):
            reason = stale_reason(run.path, results, str(run.path / EVAL / f"{stem}.json"), current)
            if reason:
                kind = results["hiddenkey_ds"]["adapter_kind"]
                problems.append(f"{reason} (hint: hiddenkey-ds eval {run.path} --adapter {kind}, or re-run the "
                                "sweep, which evaluates it again)")
    if problems:
        raise ReportError("stale lm-eval scores:\n" + "\n".join(f"  - {p}" for p in problems))
    return warnings


# provenance keys shown per run and compared across runs: (column title, getter)
_PROVENANCE_COLUMNS = {
    "hiddenkey_ds": lambda p: p.get("package_version"),
    "git commit": lambda p: None if not p.get("git_commit") else
    p["git_commit"][:10] + ("+dirty" if p.get("git_dirty") else ""),
    **{lib: (lambda p, lib=lib: (p.get("versions") or {}).get(lib))
       for lib in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "python")},
    "device": lambda p: p.get("device"),
    "world size": lambda p: p.get("world_size"),
}


def _lm_eval_versions(run: Run) -> str | None:
    found = sorted({str(v) for r in run.evals.values()
                    if (v := (((r.get("hiddenkey_ds") or {}).get("provenance") or {}).get("versions") or {})
                        .get("lm_eval"))})
    return ", ".join(found) or None


def provenance_table(runs: list[Run]) -> dict[str, Any]:
    """Per run: the versions it was trained (and scored) with; `warnings`: every column in which runs differ."""
    rows = []
    for run in runs:
        values = {title: get(run.provenance) for title, get in _PROVENANCE_COLUMNS.items()} \
            if run.provenance is not None else {title: None for title in _PROVENANCE_COLUMNS}
        values["lm_eval"] = _lm_eval_versions(run)
        resumed = len((run.provenance or {}).get("resumes") or [])
        changed = any(r.get("code_changes") for r in (run.provenance or {}).get("resumes") or [])
        rows.append({"path": str(run.path), "method": run.method, "seed": run.seed,
                     "recorded": run.provenance is not None, "resumes": resumed, "code_changed_on_resume": changed,
                     **values})
    warnings = []
    for title in [*_PROVENANCE_COLUMNS, "lm_eval"]:
        seen: dict[Any, list[str]] = {}
        for row in rows:
            if row[title] is not None:
                seen.setdefault(row[title], []).append(row["path"])
        if len(seen) > 1:
            parts = [f"{value} ({len(paths)} run{'s' if len(paths) != 1 else ''}, e.g. {paths[0]})"
                     for value, paths in seen.items()]
            warnings.append(f"the runs differ in {title}: " + "; ".join(parts))
    missing = [r["path"] for r in rows if not r["recorded"]]
    if missing:
        warnings.append(f"{len(missing)} run(s) record no {PROVENANCE} (trained before it was written), e.g. "
                        f"{missing[0]}: their versions are unknown")
    for row in rows:
        if row["code_changed_on_resume"]:
            warnings.append(f"{row['path']} was resumed with other code or libraries than it started with "
                            f"(its {PROVENANCE} `resumes`)")
    return {"runs": rows, "warnings": warnings}


# -- the numbers ------------------------------------------------------------------------------------------

def _preset(recipe: Recipe) -> str:
    return recipe.dropout.preset


def _no_dropout(recipe: Recipe) -> bool:
    return not recipe.dropout.active and not recipe.dropout.dual_pass and not recipe.lora.dropout


def pick_baseline(runs: list[Run], explicit: str | None = None) -> str | None:
    """The method the others are compared with: --baseline, else one named lora (any case), else the only
    method trained without any dropout."""
    methods = list(dict.fromkeys(r.method for r in runs))
    if explicit is not None:
        if explicit not in methods:
            raise ReportError(f"--baseline {explicit!r} is not among the methods {methods} (hint: name one of them)")
        return explicit
    named = [m for m in methods if m.lower() == "lora"]
    if len(named) == 1:
        return named[0]
    plain = [m for m in methods if all(_no_dropout(r.recipe) for r in runs if r.method == m)]
    return plain[0] if len(plain) == 1 else None


def _method_key(baseline: str | None, runs: list[Run]):
    preset = {}
    for run in runs:
        preset.setdefault(run.method, _preset(run.recipe))

    def key(method: str) -> tuple[int, int, str]:
        p = preset.get(method, "custom")
        return (0 if method == baseline else 1, PRESET_ORDER.index(p) if p in PRESET_ORDER else len(PRESET_ORDER),
                method)
    return key


def describe(values: dict[int, float]) -> dict[str, Any]:
    """Median, mean and sample std over seeds (std None for one seed)."""
    seeds = sorted(values)
    vals = [values[s] for s in seeds]
    return {"seeds": seeds, "values": vals, "n": len(vals), "median": statistics.median(vals),
            "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}


def paired_test(method: dict[int, float], baseline: dict[int, float]) -> dict[str, Any]:
    """Paired t-test over the seeds both have (scores of the same seed are paired)."""
    seeds = sorted(set(method) & set(baseline))
    diffs = [method[s] - baseline[s] for s in seeds]
    out: dict[str, Any] = {"test": "paired t-test across seeds", "n": len(seeds), "seeds": seeds, "t": None,
                           "p": None, "note": None}
    if len(seeds) < 2:
        out["note"] = f"n<2: no test (n={len(seeds)} seed{'s' if len(seeds) != 1 else ''} run with both)"
        return out
    if max(diffs) - min(diffs) < 1e-12:
        out["note"] = "the same difference on every seed: no test (the t statistic is undefined)"
        return out
    from scipy import stats

    result = stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds])
    out.update(t=float(result.statistic), p=float(result.pvalue))
    return out


def _paper_setting(runs: list[Run]) -> dict[str, Any] | None:
    """The paper's table for these runs when their model is the paper's (LLaMA-2-7B, base not chat)."""
    names = {r.recipe.model.name.rstrip("/").split("/")[-1].lower() for r in runs}
    if len(names) == 1:
        name = names.pop().replace("_", "-")
        if name.removesuffix("-hf") in ("llama-2-7b", "llama2-7b"):
            return PAPER_RESULTS["llama-2-7b"]
    return None


def _paper_method(method: str, recipe: Recipe, baseline: str | None) -> str | None:
    """The paper's row a method of ours stands beside: the baseline, else its dropout preset's name."""
    if method == baseline:
        return BASELINE
    return PRESET_LABELS.get(_preset(recipe)) if _preset(recipe) != "none" else None


@dataclass
class _Scores:
    """The lm-eval scores of every run, by score kind: (task row, method) -> seed -> value, and what goes with them."""

    values: dict[str, dict[tuple[str, str], dict[int, float]]]
    steps: dict[str, dict[tuple[str, str], dict[int, Any]]]  # the optimizer step each score's adapter is from
    metric_of: dict[str, str]                                  # task row -> the metric scored
    runs_of_task: dict[str, list[Run]]                         # task row -> the runs with a score in it


def build_table(runs: list[Run], primary: str = "best", baseline: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written as report.json)."""
    if primary not in KINDS:
        raise ReportError(f"--primary {primary!r}: choose best or final")
    check_groups(runs)
    check_eval_settings(runs)
    unfinished_scores = check_stale_scores(runs)
    base_name = pick_baseline(runs, baseline)
    order = _method_key(base_name, runs)
    scores = _collect_scores(runs)
    tables = {kind: _score_rows(scores, kind, base_name, order) for kind in KINDS}
    methods = sorted({r.method for r in runs}, key=order)
    paper = _paper_rows(scores, methods, base_name)
    return {"primary": _leading_kind(tables, primary), "requested_primary": primary, "baseline": base_name,
            "scores": tables, "base": _base_rows(runs), "methods": [_method_row(m, runs) for m in methods],
            "paper": paper, "paper_citation": PAPER_CITATION if paper else None,
            "eval_settings": _eval_settings_by_task(runs), "runs": [_run_row(r) for r in runs],
            "provenance": provenance_table(runs), "warnings": unfinished_scores}


def _other_kind(kind: str) -> str:
    return next(k for k in KINDS if k != kind)


def _leading_kind(tables: dict[str, list[dict[str, Any]]], requested: str) -> str:
    other = _other_kind(requested)
    # e.g. runs trained without a validation split keep no best adapter: lead with what exists, and say so
    return other if not tables[requested] and tables[other] else requested


def _collect_scores(runs: list[Run]) -> _Scores:
    scores = _Scores({k: {} for k in KINDS}, {k: {} for k in KINDS}, {}, {})
    for run in runs:
        for kind in KINDS:
            results = run.evals.get(RESULT_STEMS[kind])
            if not results:
                continue
            for lm_task in results.get("results", {}):
                found = _accuracy_metric(results, lm_task)
                if found is None:
                    continue
                task = run.key(lm_task)
                scores.metric_of[task] = found[0]
                scores.values[kind].setdefault((task, run.method), {})[run.seed] = found[1]
                scores.steps[kind].setdefault((task, run.method), {})[run.seed] = \
                    (results.get("hiddenkey_ds") or {}).get("step")
                if run not in scores.runs_of_task.setdefault(task, []):
                    scores.runs_of_task[task].append(run)
    return scores


def _base_rows(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """task row -> the base model's score (the "before" row), from the first run that has one."""
    base: dict[str, dict[str, Any]] = {}
    for run in runs:
        results = run.evals.get(BASE_RESULTS_STEM) or {}
        for lm_task in results.get("results", {}):
            found = _accuracy_metric(results, lm_task)
            task = run.key(lm_task)
            if found and task not in base:  # the same base model and task give the same number: keep one
                base[task] = {"metric": found[0], "value": found[1],
                              "source": str(run.path / EVAL / BASE_RESULTS)}
    return base


def _score_rows(scores: _Scores, kind: str, base_name: str | None, order) -> list[dict[str, Any]]:
    """One row per task and method: the statistics over seeds, and the comparison with the baseline's seeds."""
    by_key = scores.values[kind]
    rows = []
    for task in sorted({t for t, _ in by_key}):
        ref = by_key.get((task, base_name)) if base_name else None
        ref_stats = describe(ref) if ref else None
        for method in sorted((m for t, m in by_key if t == task), key=order):
            values = by_key[(task, method)]
            row = {"task": task, "method": method, "kind": kind, "metric": scores.metric_of[task], **describe(values),
                   "steps": [scores.steps[kind][(task, method)][s] for s in sorted(values)]}
            if ref_stats is not None and method != base_name:
                row["delta_vs_baseline"] = {"median": row["median"] - ref_stats["median"],
                                            "mean": row["mean"] - ref_stats["mean"]}
                row["significance"] = paired_test(values, ref)
            rows.append(row)
    return rows


def _method_row(method: str, runs: list[Run]) -> dict[str, Any]:
    group = [r for r in runs if r.method == method]
    walls = [r.wall_time_s for r in group if r.wall_time_s is not None]
    return {"method": method, "dropout": method_label(group[0].recipe), "runs": len(group),
            "wall_time_s_mean": statistics.fmean(walls) if walls else None,
            "wall_time_s_total": sum(walls) if walls else None, "timed_runs": len(walls)}


def _published(task_runs: list[Run]) -> tuple[dict[str, Any], dict[str, float]] | None:
    """(the paper's setting, its numbers for this task) when these runs are in the paper's setting."""
    setting = _paper_setting(task_runs)
    data_tasks = {r.recipe.data.task for r in task_runs}
    if setting is None or len(data_tasks) != 1 or data_tasks <= {None}:
        return None
    published = setting["tasks"].get(next(iter(data_tasks)))
    return (setting, published) if published else None


def _paper_rows(scores: _Scores, methods: list[str], base_name: str | None) -> list[dict[str, Any]]:
    paper = []
    for task, task_runs in sorted(scores.runs_of_task.items()):
        found = _published(task_runs)
        if found is None:
            continue
        setting, published = found
        for paper_method, value in published.items():
            paper.append({"task": task, "paper_method": paper_method, "paper": value / 100,
                          "source": setting["source"], "model": setting["model"], "statistic": setting["statistic"],
                          "ours": _ours_beside(scores, task, task_runs, methods, paper_method, base_name)})
    return paper


def _ours_beside(scores: _Scores, task: str, task_runs: list[Run], methods: list[str], paper_method: str,
                 base_name: str | None) -> list[dict[str, Any]]:
    """Our medians (every score kind) of the methods that stand beside the paper's `paper_method`."""
    ours = []
    for m in methods:
        group = [r for r in task_runs if r.method == m]
        if not group or _paper_method(m, group[0].recipe, base_name) != paper_method:
            continue
        for kind in KINDS:
            values = scores.values[kind].get((task, m))
            if values:
                d = describe(values)
                ours.append({"method": m, "kind": kind, "median": d["median"], "n": d["n"]})
    return ours


def _eval_settings_by_task(runs: list[Run]) -> dict[str, dict[str, Any]]:
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        for stem in _SCORED_STEMS:
            for task in (run.evals.get(stem) or {}).get("results", {}):
                settings.setdefault(run.key(task), eval_settings(run.evals[stem]))
    return settings


def overfitting(run: Run) -> dict[str, Any] | None:
    steps, losses = run.curve("validation", "loss")
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if len(losses) < 2 or not finite:
        return None
    best = min(finite, key=losses.__getitem__)
    _, train = run.curve("train", "ce")
    out = {"best_step": steps[best], "best_val_loss": losses[best], "final_val_loss": losses[-1],
           "final_train_ce": train[-1] if train else None, "diverged": not math.isfinite(losses[-1])}
    if out["diverged"]:  # a NaN / inf final loss: no rise to compute, and certainly no healthy end
        return {**out, "rise": None, "overfit": True}
    rise = (losses[-1] - losses[best]) / losses[best] if losses[best] > 0 else 0.0
    return {**out, "rise": rise, "overfit": rise > OVERFIT_THRESHOLD}


def _run_row(run: Run) -> dict[str, Any]:
    acc = {}
    for stem, results in run.evals.items():
        for task in results.get("results", {}):
            found = _accuracy_metric(results, task)
            if found:
                acc[f"{stem}:{task}"] = found[1]
    return {"path": str(run.path), "method": run.method, "dropout": method_label(run.recipe), "seed": run.seed,
            "task": run.key(), "finished": run.summary is not None, "steps": (run.summary or {}).get("steps"),
            "wall_time_s": run.wall_time_s, "best_validation": run.best_validation(),
            "validation_source": _validation_source(run.recipe), "selected_on_eval_data": _selected_on_eval_data(run.recipe),
            "lm_eval": acc, "overfitting": overfitting(run)}


def _selected_on_eval_data(recipe: Recipe) -> bool:
    """Whether the loop's validation split is the split lm-eval scores (the hk_* tasks score validation/dev)."""
    return not recipe.data.validation_from_train and recipe.data.eval_split == "validation" \
        and recipe.data.eval_path is None


def _validation_source(recipe: Recipe) -> str:
    carved = recipe.data.validation_from_train
    if carved:
        return f"carved from the training data ({carved:g})"
    if recipe.data.eval_split is None:
        return "none"
    return f"the {recipe.data.eval_split!r} split"


# -- rendering ---------------------------------------------------------------------------------------------

# eval/ file stem -> how the per-run table names its score
_STEM_NAMES = {BASE_RESULTS_STEM: "base model", **{RESULT_STEMS[k]: k for k in KINDS},
               **{RESULT_STEMS[k] + QUANTIZED_SUFFIX: f"{k} 4-bit" for k in KINDS}}


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _cell(row: dict[str, Any]) -> str:
    """median · mean ± std (n): the paper reports the median (NLU), the mean shows the spread."""
    spread = f"{_pct(row['mean'])} ± {_pct(row['std'])}" if row["std"] is not None else _pct(row["mean"])
    return f"{_pct(row['median'])} · {spread} (n={row['n']})"


def _significance(row: dict[str, Any], baseline: str | None) -> str:
    sig = row.get("significance")
    if sig is None:
        return "baseline" if row["method"] == baseline else "— (no baseline runs)"
    if sig["p"] is None:
        return sig["note"]
    return f"p = {sig['p']:.3g} (t = {sig['t']:.2f}, n = {sig['n']})"


def _score_table(table: dict[str, Any], kind: str, methods: list[str]) -> list[str]:
    rows, base = table["scores"][kind], table["base"]
    if not rows:
        return [f"No run has {RESULT_STEMS[kind]}.json: "
                + ("no run kept a best-validation adapter (adapter_best/: runs with a validation split)."
                   if kind == "best" else "run `hiddenkey-ds eval RUN_DIR` first."), ""]
    tasks = sorted({r["task"] for r in rows})
    metric = {r["task"]: r["metric"] for r in rows}
    shown = [m for m in methods if any(r["method"] == m for r in rows)]
    header = ["task (metric)"] + ([BASE_MODEL] if base else []) + shown
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        cells = [f"{task} ({metric[task]})"]
        if base:
            cells.append(_pct(base[task]["value"]) if task in base else "—")
        by_method = {r["method"]: r for r in rows if r["task"] == task}
        best = max(by_method.values(), key=lambda r: r["median"])["method"]
        for m in shown:
            r = by_method.get(m)
            cell = "—" if r is None else _cell(r)
            cells.append(f"**{cell}**" if r is not None and m == best and len(by_method) > 1 else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(table: dict[str, Any], figures: list[str], extra: list[str] = ()) -> str:
    lines = ["# hiddenkey-ds report", "", _intro(table), ""]
    for i, kind in enumerate((table["primary"], _other_kind(table["primary"]))):
        lines += _score_section(table, kind, headline=i == 0)
    if table["paper"]:
        lines += _paper_section(table)
    lines += _baseline_section(table)
    lines += ["", *_methods_section(table)]
    lines += ["", *_runs_section(table)]
    lines += ["", *_provenance_section(table)]
    for section in extra:
        lines += ["", section.rstrip()]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _intro(table: dict[str, Any]) -> str:
    settings = "; ".join(f"{t}: limit {s['limit'] if s['limit'] is not None else 'none (full split)'}, "
                         f"batch size {s['batch_size']}" for t, s in sorted(table["eval_settings"].items()))
    return ("lm-eval accuracy in %. Each cell: **median** · mean ± sample std over seeds (n seeds); bold = the row's "
            "best median. Best-validation checkpoint = the run's adapter_best/, the step with the highest accuracy "
            f"on its validation split (ties: lower validation loss). Baseline: {table['baseline'] or 'none found'}. "
            + (f"lm-eval settings: {settings}." if settings else ""))


def _score_section(table: dict[str, Any], kind: str, headline: bool) -> list[str]:
    """One score kind's table: the headline (with why it leads when it was not the one asked for), or the other."""
    lines = [f"## {'Headline' if headline else 'Also'}: {KIND_TITLES[kind]} ({RESULT_STEMS[kind]}.json)", ""]
    requested = table["requested_primary"]
    if headline and kind != requested:
        lines += [f"The {KIND_TITLES[requested]} scores were asked to lead, but no run has "
                  f"{RESULT_STEMS[requested]}.json, so the {KIND_TITLES[kind]} scores lead.", ""]
    lines += _score_table(table, kind, [m["method"] for m in table["methods"]])
    if kind == "best" and table["scores"]["best"]:
        lines += _leak_caution(table["runs"])
    return lines


def _leak_caution(runs: list[dict[str, Any]]) -> list[str]:
    leaky = [r for r in runs if r["selected_on_eval_data"] and RESULT_STEMS["best"] in
             {k.split(":", 1)[0] for k in r["lm_eval"]}]
    if not leaky:
        return []
    return [f"Caution: {len(leaky)} run(s) chose their best checkpoint on their `validation` split, which "
            "is the split lm-eval scores, so these best-checkpoint scores are optimistic (hint: carve the "
            "validation split from the training data, data.validation_from_train).", ""]


def _paper_section(table: dict[str, Any]) -> list[str]:
    lines = ["## Beside the paper", "",
             f"Only where the setting is the paper's (model and task). Source: {table['paper_citation']}; the "
             "paper reports the median of 5 runs and does not state whether from the best or the final epoch.", "",
             "| task | method (paper) | published | ours: method, score | ours: median (n) |",
             "|---|---|---|---|---|"]
    for p in table["paper"]:
        for o in p["ours"] or [None]:
            mine = "—" if o is None else f"{o['method']}, {KIND_TITLES[o['kind']]}"
            value = "no matching method" if o is None else f"{_pct(o['median'], 2)} (n={o['n']})"
            lines.append(f"| {p['task']} | {p['paper_method']} | {100 * p['paper']:.2f} — {p['source']} | {mine} "
                         f"| {value} |")
    return lines + [""]


def _baseline_section(table: dict[str, Any]) -> list[str]:
    baseline = table["baseline"]
    lines = ["## Against the baseline", ""]
    if baseline is None:
        lines += ["No baseline: no method is named `lora` and not exactly one trains without dropout "
                  "(`--baseline METHOD` names one).", ""]
    lines += ["| task | score | method | seeds | median | mean ± std | Δ median | Δ mean | paired t-test across seeds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind in (table["primary"], _other_kind(table["primary"])):
        lines += [_baseline_line(r, kind, baseline) for r in table["scores"][kind]]
    return lines + ["", "Δ in points against the baseline's median / mean; the t-test pairs runs of the same seed."]


def _baseline_line(r: dict[str, Any], kind: str, baseline: str | None) -> str:
    d = r.get("delta_vs_baseline")
    dm = "—" if d is None else f"{100 * d['median']:+.2f}"
    da = "—" if d is None else f"{100 * d['mean']:+.2f}"
    spread = f"{_pct(r['mean'], 2)} ± {_pct(r['std'], 2)}" if r["std"] is not None else _pct(r["mean"], 2)
    return (f"| {r['task']} | {kind} | {r['method']} | {', '.join(map(str, r['seeds']))} | "
            f"{_pct(r['median'], 2)} | {spread} | {dm} | {da} | {_significance(r, baseline)} |")


def _methods_section(table: dict[str, Any]) -> list[str]:
    lines = ["## Methods and wall time", "",
             "| method | dropout setting | runs | mean wall time per run | total |", "|---|---|---|---|---|"]
    for m in table["methods"]:
        mean = "—" if m["wall_time_s_mean"] is None else f"{m['wall_time_s_mean']:.0f} s"
        total = "—" if m["wall_time_s_total"] is None else f"{m['wall_time_s_total']:.0f} s"
        lines.append(f"| {m['method']} | {m['dropout']} | {m['runs']} | {mean} | {total} |")
    return lines


def _runs_section(table: dict[str, Any]) -> list[str]:
    return ["## Runs", "",
            "Best validation: the step with the highest validation accuracy (the adapter_best/ step). Overfitting: "
            "validation loss at the end vs. its minimum (flagged when more than "
            f"{100 * OVERFIT_THRESHOLD:.0f}% above it).", "",
            "| run | method | seed | steps | wall time | validation split | best validation: acc (step) | final train CE "
            "| val loss: best (step) → final | overfit | lm-eval |",
            "|---|---|---|---|---|---|---|---|---|---|---|"] + [_run_line(r) for r in table["runs"]]


def _provenance_section(table: dict[str, Any]) -> list[str]:
    prov = table["provenance"]
    columns = [*_PROVENANCE_COLUMNS, "lm_eval"]
    lines = ["## Provenance", "", "What each run was trained with (its provenance.json) and lm-eval's version in its "
             "results files; — = not recorded.", "",
             "| run | " + " | ".join(columns) + " | resumes |", "|---|" + "---|" * (len(columns) + 1)]
    for r in prov["runs"]:
        cells = ["—" if r[c] is None else str(r[c]) for c in columns]
        lines.append(f"| `{r['path']}` | " + " | ".join(cells) + f" | {r['resumes']} |")
    notes = [*prov["warnings"], *table.get("warnings", [])]
    return lines + ([""] + [f"Warning: {w}" for w in notes] if notes else [])


def _run_line(r: dict[str, Any]) -> str:
    o, b = r["overfitting"], r["best_validation"]
    curve = "—" if o is None else f"{o['best_val_loss']:.3f} ({o['best_step']}) → {o['final_val_loss']:.3f}"
    flag = "—" if o is None else "yes (diverged: final val loss not finite)" if o["diverged"] else \
        f"{'yes' if o['overfit'] else 'no'} (+{100 * o['rise']:.0f}%)"
    ce = "—" if o is None or o["final_train_ce"] is None else f"{o['final_train_ce']:.3f}"
    best = "—" if b is None else f"{_pct(b['accuracy'])} ({b['step']})"
    wall = "—" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f} s"
    steps = r["steps"] if r["finished"] else "unfinished"
    return (f"| `{r['path']}` | {r['method']} | {r['seed']} | {steps} | {wall} | {r['validation_source']} | "
            f"{best} | {ce} | {curve} | {flag} | {_lm_eval_cell(r['lm_eval'])} |")


def _lm_eval_cell(scores: dict[str, float]) -> str:
    """`stem:task` -> score, as "task kind score, ..." (kind: final, best, base model, ... from the file stem)."""
    cells = []
    for key, value in scores.items():
        stem, task = key.split(":", 1)
        cells.append(f"{task} {_STEM_NAMES.get(stem, stem)} {_pct(value)}")
    return ", ".join(cells) or "not evaluated"


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {m: palette(i % 10) for i, m in enumerate(methods)}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_curve(runs: list[Run], split: str, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for s, v in zip(*run.curve(split, key)):
            per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    return (steps, [statistics.fmean(per_step[s]) for s in steps], [min(per_step[s]) for s in steps],
            [max(per_step[s]) for s in steps])


def plot_curves(runs: list[Run], task: str, path: Path, methods: list[str]) -> None:
    import matplotlib.pyplot as plt

    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    colors = _colors(methods)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m in [m for m in methods if m in by_method]:
        _plot_train_ce(ax_loss, by_method[m], colors[m])
        _plot_validation_loss(ax_loss, by_method[m], m, colors[m])
        _plot_validation_accuracy(ax_acc, by_method[m], m, colors[m])
    _dress_curve_axes(ax_loss, ax_acc, task)
    _save(fig, path)


def _plot_train_ce(ax, group: list[Run], color: Any) -> None:
    """Dashed: the mean training CE over seeds, with the seeds' range when there are several."""
    steps, mean, lo, hi = _mean_curve(group, "train", "ce")
    if steps:
        ax.plot(steps, mean, "--", color=color, alpha=0.7, lw=1.2)
        if len(group) > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.08)


def _plot_validation_loss(ax, group: list[Run], method: str, color: Any) -> None:
    """Solid: the mean validation loss, a star at its minimum, and the overfitting verdict in the legend."""
    steps, mean, lo, hi = _mean_curve(group, "validation", "loss")
    if not steps or not any(math.isfinite(v) for v in mean):
        return
    n = len(group)
    best = min((i for i, v in enumerate(mean) if math.isfinite(v)), key=mean.__getitem__)
    rise = (mean[-1] - mean[best]) / mean[best] if mean[best] > 0 else 0.0
    verdict = f"overfits: final val loss +{100 * rise:.0f}% over its min" if rise > OVERFIT_THRESHOLD \
        else f"final val loss +{100 * rise:.0f}% over its min"
    ax.plot(steps, mean, "-o", color=color, lw=2, ms=3.5, label=f"{method} (n={n}): {verdict}")
    ax.plot(steps[best], mean[best], "*", color=color, ms=16, mec="black", mew=0.8)
    if n > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15)


def _plot_validation_accuracy(ax, group: list[Run], method: str, color: Any) -> None:
    steps, mean, lo, hi = _mean_curve(group, "validation", "accuracy")
    if not steps:
        return
    n = len(group)
    ax.plot(steps, [100 * v for v in mean], "-o", color=color, lw=2, ms=3.5, label=f"{method} (n={n})")
    if n > 1:
        ax.fill_between(steps, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.15)


def _dress_curve_axes(ax_loss, ax_acc, task: str) -> None:
    ax_loss.set(title=f"{task}: training CE (dashed) vs validation loss (solid)", xlabel="optimizer step",
                ylabel="loss (token mean over answers)")
    ax_loss.set_yscale("log")
    ax_loss.plot([], [], "*", color="grey", ms=12, mec="black", label="★ lowest validation loss")
    ax_loss.legend(fontsize=8, loc="upper right")
    ax_acc.set(title=f"{task}: validation accuracy (training loop, answer argmax)", xlabel="optimizer step",
               ylabel="accuracy (%)")
    if ax_acc.get_legend_handles_labels()[0]:  # runs without validation accuracy draw nothing here
        ax_acc.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)


def plot_accuracy(table: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    kinds = [k for k in (table["primary"], _other_kind(table["primary"])) if table["scores"][k]]
    base = table["base"]
    methods = [m["method"] for m in table["methods"]]
    colors = _colors(methods)
    all_rows = [r for k in kinds for r in table["scores"][k]]
    tasks = sorted({r["task"] for r in all_rows})
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, len(kinds), figsize=(len(kinds) * max(6.5, 3.2 + 0.8 * len(tasks) * len(methods)), 4.8),
                             squeeze=False)
    ylim = _accuracy_ylim(all_rows, base)
    for ax, kind in zip(axes[0], kinds):
        rows = table["scores"][kind]
        for ti, task in enumerate(tasks):
            _draw_task_bars(ax, [r for r in rows if r["task"] == task], ti, methods, colors, width)
            if task in base:
                ax.hlines(100 * base[task]["value"], ti - 0.45, ti + 0.45, colors="dimgray", linestyles="--", lw=1.5,
                          label=BASE_MODEL if ti == 0 else None)
        _dress_accuracy_axis(ax, kind, rows, tasks, ylim)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # never on a bar
    _save(fig, path)


def _accuracy_ylim(rows: list[dict[str, Any]], base: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """Room below the lowest seed or base score, and above the highest error bar or seed for the labels."""
    lows = [100 * min(r["values"]) for r in rows] + [100 * b["value"] for b in base.values()]
    top = 100 * min(1.0, max(max(r["mean"] + (r["std"] or 0), *r["values"]) for r in rows) + 0.08)
    return max(0.0, min(lows) - 10), top


def _draw_task_bars(ax, task_rows: list[dict[str, Any]], ti: int, methods: list[str], colors: dict[str, Any],
                    width: float) -> None:
    """One task's group of bars (mean, std error bar, seeds as dots, median tick); the best median is starred."""
    by_method = {r["method"]: r for r in task_rows}
    best = max(by_method.values(), key=lambda r: r["median"])["method"] if by_method else None
    for mi, m in enumerate(methods):
        r = by_method.get(m)
        if r is None:
            continue
        starred = m == best and len(by_method) > 1
        x = ti + (mi - (len(methods) - 1) / 2) * width
        ax.bar(x, 100 * r["mean"], width * 0.9, color=colors[m], label=m if ti == 0 else None,
               yerr=None if r["std"] is None else 100 * r["std"], capsize=4,
               edgecolor="black", linewidth=1.8 if starred else 0.4)
        ax.scatter([x] * len(r["values"]), [100 * v for v in r["values"]], color="black", s=12, zorder=3)
        ax.hlines(100 * r["median"], x - width * 0.4, x + width * 0.4, colors="black", lw=2.2, zorder=4)
        ax.annotate(f"{100 * r['median']:.1f}" + (" ★" if starred else ""),
                    (x, 100 * max(r["mean"] + (r["std"] or 0), max(r["values"]))), ha="center",
                    va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")


def _dress_accuracy_axis(ax, kind: str, rows: list[dict[str, Any]], tasks: list[str],
                         ylim: tuple[float, float]) -> None:
    n_seeds = sorted({r["n"] for r in rows})
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel=f"{rows[0]['metric']} (%)", ylim=ylim,
           title=f"{KIND_TITLES[kind]}: mean ± std, tick = median (n = {', '.join(map(str, n_seeds))})")
    ax.grid(axis="y", alpha=0.3)


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: report.json must be JSON (no NaN / Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *, labels: dict[str, str] | None = None,
                 tasks: dict[str, str] | None = None, primary: str = "best", baseline: str | None = None,
                 extra_sections: list[str] = ()) -> Path:
    """Render report.md, report.json and the PNGs into out_dir; returns report.md.

    `labels` maps a run directory (as given) to its method name, overriding run.label (a sweep passes its own
    names, so runs trained before run.label existed group right too); `tasks` maps it to the sweep's task name.
    Nothing is written unless every check passes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    if not run_dirs:
        raise ReportError("no run directories given (hint: hiddenkey-ds report OUT/runs/* --out report/)")
    labels = {str(Path(k)): v for k, v in (labels or {}).items()}
    tasks = {str(Path(k)): v for k, v in (tasks or {}).items()}
    runs = [load_run(p, labels.get(str(Path(p))), tasks.get(str(Path(p)))) for p in run_dirs]
    mark_variants(runs)
    table = build_table(runs, primary=primary, baseline=baseline)
    text = json.dumps(strict_json(table), indent=2, allow_nan=False) + "\n"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if any(table["scores"][k] for k in KINDS):
        plot_accuracy(table, out / "accuracy.png")
        figures.append("accuracy.png")
    methods = [m["method"] for m in table["methods"]]
    for task in sorted({r.key() for r in runs}):
        group = [r for r in runs if r.key() == task and r.metrics]
        if group:
            name = f"curves_{''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in task)}.png"
            plot_curves(group, task, out / name, methods)
            figures.append(name)
    (out / "report.json").write_text(text)
    report = out / "report.md"
    report.write_text(render_markdown(table, figures, list(extra_sections)))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenkey-ds report", description="Markdown + PNG report comparing runs.")
    parser.add_argument("runs", nargs="*", help="run directories (each with config.yaml, metrics.jsonl, eval/)")
    parser.add_argument("--sweep", help="a sweep file: report its runs (those trained so far) under its method names")
    parser.add_argument("--out", default=None, help="output directory (default: ./report, or OUT/report of --sweep)")
    parser.add_argument("--primary", choices=KINDS, default=None,
                        help="which lm-eval score leads the report: best (the best-validation checkpoint, the "
                             "paper's protocol; default, or the sweep's `primary`) or final (the final adapter); "
                             "both are always shown")
    parser.add_argument("--baseline", help="method the others are compared with (default: the one named lora, else "
                                           "the only one without dropout)")
    args = parser.parse_args(argv)
    try:
        labels: dict[str, str] = {}
        variants: dict[str, str] = {}
        run_dirs: list[str | Path] = list(args.runs)
        out = args.out or "report"
        if args.sweep:
            from hiddenkey_ds.experiments.sweep import SweepError, load_sweep

            try:
                sweep = load_sweep(args.sweep)
            except SweepError as err:
                raise ReportError(str(err)) from None
            started = [r for r in sweep.runs() if is_run_dir(r.run_dir)]
            labels = {str(r.run_dir): r.method.name for r in started}
            variants = {str(r.run_dir): r.task for r in started}
            run_dirs += [r.run_dir for r in started]
            out = args.out or str(sweep.out_dir / "report")
            args.baseline = args.baseline or sweep.baseline
            args.primary = args.primary or sweep.primary
        if not run_dirs:
            raise ReportError("no run directories (hint: hiddenkey-ds report RUN_DIR... or --sweep SWEEP.yaml)")
        target = Path(out).expanduser()
        blocker = next((p for p in (target, *target.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ReportError(f"--out {out}: {'is' if blocker == target else 'lies under'} the file {blocker}, not a "
                              "directory (hint: choose another --out; nothing was written)")
        report = write_report(run_dirs, out, labels=labels, tasks=variants, primary=args.primary or "best",
                              baseline=args.baseline)
    except ReportError as err:
        print(f"hiddenkey-ds report: error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
