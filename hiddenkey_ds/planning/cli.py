"""`hiddenkey-ds plan RECIPE.yaml [key=value ...]`: the recipe's per-GPU memory, and the cheapest change that makes
it fit when it does not. Exit status: 0 fits, 1 does not fit, 2 bad input."""
from __future__ import annotations

import argparse
import json
import sys

from hiddenkey_ds.planning.config import config_from_recipe
from hiddenkey_ds.planning.estimate import estimate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hiddenkey-ds plan",
        description="Estimate per-GPU memory of a recipe (with key=value overrides) and suggest the cheapest "
        "change that makes it fit.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_length)")
    p.add_argument("--supervised-tokens", type=int,
                   help="supervised tokens per sequence (default: 8 for classification, all for sft)")
    p.add_argument("--config", help="a model config.json to use instead of model.name's shape")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            print(f"hiddenkey-ds plan: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from hiddenkey_ds.config import RecipeError, load_recipe
    from hiddenkey_ds.config.deepspeed import resolve_ds_config

    world = args.nodes * args.gpus_per_node
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=world, check_output_dir=False)
        steps = recipe.train.max_steps or 1000  # only the LR schedule depends on it
        ds = resolve_ds_config(recipe, world, total_steps=steps)
        shape = None
        if args.config:
            from hiddenkey_ds.models.shapes import shape_from_config

            with open(args.config) as f:
                shape = shape_from_config(json.load(f), args.config)
        cfg = config_from_recipe(recipe, ds, args.nodes, args.gpus_per_node, args.gpu_mem, shape=shape,
                                 seq_len=args.seq_len, supervised_tokens=args.supervised_tokens)
    except (RecipeError, ValueError, OSError) as err:
        print(f"hiddenkey-ds plan: {err}", file=sys.stderr)
        return 2
    plan = estimate(cfg)
    print(f"plan for {args.recipe}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(plan.format())
    return 0 if plan.fits else 1
