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
from collections.abc import Iterable
from pathlib import Path

from hiddenkey_ds.config import Recipe, RecipeError, load_recipe
from hiddenkey_ds.experiments.sweep import EvalSpec, Method, Sweep, SweepError, load_recipes, run_sweep
from hiddenkey_ds.resources import resource_dir

RECIPES = resource_dir("recipes")
DEMO_TASK = "reviews"
# --quick: the same path with fewer steps and a shorter lm-eval, to prove it end to end in CI
QUICK = ["train.max_steps=6", "train.eval_every=3", "train.log_every=1", "train.save_every=3",
         "data.max_eval_examples=16"]
QUICK_EVAL_LIMIT = 24


def build_sweep(out: Path, lora_recipe: Path, hiddenkey_recipe: Path, ranks: int, seeds: list[int],
                overrides: list[str], data_overrides: list[str], limit: int | None, task: str) -> Sweep:
    return Sweep(
        name="demo", out_dir=out, ranks=ranks,
        methods=[Method("lora", lora_recipe, []), Method("hiddenkey", hiddenkey_recipe, [])],
        seeds=seeds, tasks={task: data_overrides}, overrides=overrides, eval=EvalSpec(base=True, limit=limit),
    )


class DemoError(ValueError):
    """A problem with the demo's arguments or recipes: exit status 2, nothing written."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.time()
    out = Path(args.out).resolve()
    own_recipes = {args.lora_recipe.resolve(), args.hiddenkey_recipe.resolve()} == {
        (RECIPES / "demo-lora.yaml").resolve(), (RECIPES / "demo-hiddenkey.yaml").resolve()}
    try:
        sweep = _demo_sweep(args, out, own_recipes)
        recipes = load_recipes(sweep)  # every problem of both recipes now, before data, models or training
    except (DemoError, RecipeError, SweepError) as err:
        print(f"hiddenkey-ds demo: error: {err}", file=sys.stderr)
        return 2
    if not args.dry_run:
        if own_recipes:
            from hiddenkey_ds.experiments.demo_data import write_dataset

            write_dataset(out / "data")  # deterministic: rewriting it on a re-run changes nothing
            print(f"[demo] data: {out / 'data'} (generated, seed 0)")
        _prebuild_models(recipes.values())
    try:
        report = run_sweep(sweep, dry_run=args.dry_run)
    except SweepError as err:
        print(f"hiddenkey-ds demo: error: {err}", file=sys.stderr)
        return 1
    if report is not None:  # None: --dry-run
        _print_outcome(report, started)
    return 0


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _demo_sweep(args: argparse.Namespace, out: Path, own_recipes: bool) -> Sweep:
    """The demo as a sweep: one task (the generated reviews, or the user's recipes' task), two methods."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise DemoError(f"--seeds takes integers like 0,1,2, got {args.seeds!r} (hint: --seeds 0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"--seeds {args.seeds!r}: give one or more distinct integers (hint: --seeds 0,1,2)")
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DemoError(f"--out {args.out}: {'is' if blocker == out else 'lies under'} the file {blocker}, not a "
                        "directory (hint: choose another --out; nothing was written)")
    if args.ranks < 1:
        raise DemoError(f"--ranks {args.ranks}: each run needs at least one rank (hint: --ranks 1 runs plain python, "
                        "--ranks 2 two CPU/GPU ranks under deepspeed)")
    if args.limit is not None and args.limit < 1:
        raise DemoError(f"--limit {args.limit}: give a number of examples per task (hint: --limit 100, or leave it "
                        "out to score every example)")
    overrides = (QUICK if args.quick else []) + args.overrides
    limit = QUICK_EVAL_LIMIT if args.quick and args.limit is None else args.limit
    data_overrides = [f"data.path={out / 'data'}"] if own_recipes else []
    task = DEMO_TASK if own_recipes else _recipe_task(args.lora_recipe, overrides)
    return build_sweep(out, args.lora_recipe, args.hiddenkey_recipe, args.ranks, seeds, overrides, data_overrides,
                       limit, task)


def _print_outcome(report: Path, started: float) -> None:
    print(report.read_text().split("\n## Runs")[0])  # the tables; the full report is in the file
    print(f"[demo] finished in {time.time() - started:.0f} s")
    print(f"[demo] report: {report.resolve()}")
    print(f"[demo] figures: {', '.join(str(p) for p in sorted(report.parent.glob('*.png')))}")


def _recipe_task(recipe: Path, overrides: list[str]) -> str:
    """The sweep task's name (it names the run directories) for a recipe of the user's: its data.task."""
    return load_recipe(recipe, overrides, check_output_dir=False).data.task or "data"


def _prebuild_models(recipes: Iterable[Recipe]) -> None:
    """Build builtin:* models here, once, before any launcher: ranks then only read the finished cache."""
    from hiddenkey_ds.models.loading import resolve_model_path

    for name in sorted({r.model.name for r in recipes}):
        if name.startswith("builtin:"):
            print(f"[demo] model {name}: {resolve_model_path(name)}")


if __name__ == "__main__":
    sys.exit(main())
