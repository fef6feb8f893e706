"""`hiddenkey-ds demo`: plain LoRA vs. HiddenKey on SmolLM2-135M-Instruct, offline, on CPU, in minutes.

1. generates the demo task (hiddenkey_ds.experiments.demo_data: seeded restaurant reviews, a small training split with
   flipped labels so that overfitting can show) into OUT/data;
2. trains recipes/demo-lora.yaml and recipes/demo-hiddenkey.yaml, each with 2 ranks under ZeRO-2 through the
   `deepspeed` launcher;
3. evaluates both adapters and the base model with lm-eval (task hk_sst2_local on OUT/data);
4. writes the report (Markdown + PNGs) to OUT/report and prints its path.

It is a sweep (hiddenkey_ds.experiments.sweep) with one task and one seed: re-running it skips what is finished and resumes
what was interrupted. `--lora-recipe/--hiddenkey-recipe` swap in bigger recipes (GPU users; their own data).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hiddenkey_ds.resources import resource_dir
from hiddenkey_ds.experiments.sweep import Method, Sweep, SweepError, run_sweep

RECIPES = resource_dir("recipes")
DEMO_TASK = "reviews"
# --quick: the same path with fewer steps and a shorter lm-eval, to prove it end to end in CI
QUICK = ["train.max_steps=6", "train.eval_every=3", "train.log_every=1", "train.save_every=3",
         "data.max_eval_examples=16"]
QUICK_EVAL_LIMIT = 24


def build_sweep(out: Path, lora_recipe: Path, hiddenkey_recipe: Path, ranks: int, seeds: list[int],
                quick: bool, extra: list[str], data_overrides: list[str], limit: int | None, task: str) -> Sweep:
    overrides = (QUICK if quick else []) + extra
    return Sweep(
        name="demo", out_dir=out, ranks=ranks,
        methods=[Method("lora", lora_recipe, []), Method("hiddenkey", hiddenkey_recipe, [])],
        seeds=seeds, tasks={task: data_overrides}, overrides=overrides,
        eval={"base": True, "limit": QUICK_EVAL_LIMIT if quick and limit is None else limit},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenkey-ds demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="demo folder (data, runs, report); default runs/demo")
    parser.add_argument("--quick", action="store_true", help="6 steps and a 24-example lm-eval: proves the path (CI)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks per run (deepspeed --num_gpus); default 2")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds, e.g. 0,1,2 (the report's t-test needs >= 2)")
    parser.add_argument("--lora-recipe", type=Path, default=RECIPES / "demo-lora.yaml")
    parser.add_argument("--hiddenkey-recipe", type=Path, default=RECIPES / "demo-hiddenkey.yaml")
    parser.add_argument("--limit", type=int, help="lm-eval examples per task (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both runs, e.g. --set train.max_steps=200 (repeatable)")
    args = parser.parse_args(argv)
    started = time.time()
    out = Path(args.out).resolve()
    own_recipes = {args.lora_recipe.resolve(), args.hiddenkey_recipe.resolve()} == {
        (RECIPES / "demo-lora.yaml").resolve(), (RECIPES / "demo-hiddenkey.yaml").resolve()}
    data_overrides: list[str] = []
    task = DEMO_TASK if own_recipes else _recipe_task(args.lora_recipe)
    if own_recipes:
        from hiddenkey_ds.experiments.demo_data import write_dataset

        if not args.dry_run:
            write_dataset(out / "data")  # deterministic: rewriting it on a re-run changes nothing
            print(f"[demo] data: {out / 'data'} (generated, seed 0)")
        data_overrides = [f"data.path={out / 'data'}"]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"hiddenkey-ds demo: error: --seeds takes integers like 0,1,2, got {args.seeds!r}", file=sys.stderr)
        return 2
    if not args.dry_run:
        _prebuild_models([args.lora_recipe, args.hiddenkey_recipe])
    sweep = build_sweep(out, args.lora_recipe, args.hiddenkey_recipe, args.ranks, seeds, args.quick,
                        args.overrides, data_overrides, args.limit, task)
    try:
        report = run_sweep(sweep, dry_run=args.dry_run)
    except SweepError as err:
        print(f"hiddenkey-ds demo: error: {err}", file=sys.stderr)
        return 1
    if report is None:  # --dry-run
        return 0
    text = report.read_text()
    print(text.split("\n## Runs")[0])  # the tables; the full report is in the file
    print(f"[demo] finished in {time.time() - started:.0f} s")
    print(f"[demo] report: {report.resolve()}")
    print(f"[demo] figures: {', '.join(str(p) for p in sorted(report.parent.glob('*.png')))}")
    return 0


def _recipe_task(recipe: Path) -> str:
    import yaml

    data = yaml.safe_load(recipe.read_text()).get("data") or {}
    return str(data.get("task") or "data")


def _prebuild_models(recipes: list[Path]) -> None:
    """Build builtin:* models here, once, before any launcher: ranks then only read the finished cache."""
    import yaml

    from hiddenkey_ds.models.loading import resolve_model_path

    for name in sorted({(yaml.safe_load(r.read_text()).get("model") or {}).get("name", "") for r in recipes}):
        if name.startswith("builtin:"):
            print(f"[demo] model {name}: {resolve_model_path(name)}")


if __name__ == "__main__":
    sys.exit(main())
