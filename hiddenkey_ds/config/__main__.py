"""`python -m hiddenkey_ds.config RECIPE.yaml [key=value ...] [--world-size N]`: validate a recipe.

Prints the resolved recipe and DeepSpeed config, or every problem found (exit status 2). Nothing is written.
`--reference` prints the recipe key reference (Markdown) instead.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiddenkey_ds.config", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=3e-4")
    parser.add_argument("--world-size", type=int, default=None, help="ranks the run will use (checks batch arithmetic)")
    parser.add_argument("--reference", action="store_true", help="print the recipe key reference and exit")
    args = parser.parse_args(argv)
    from hiddenkey_ds.config import RecipeError, load_recipe, reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    if not args.recipe:
        parser.error("a recipe file is required")
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size {args.world_size}: a run has at least one rank (hint: --world-size 1 or more)")
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=args.world_size)
        from hiddenkey_ds.config.deepspeed import resolve_ds_config

        ds = resolve_ds_config(recipe, args.world_size or 1, total_steps=recipe.train.max_steps or 1)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(recipe.to_yaml())
    print("# DeepSpeed config" + (" (epochs recipe: total_num_steps shown as 1)" if recipe.train.max_steps is None else ""))
    print(json.dumps(ds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
