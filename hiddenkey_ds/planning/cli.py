"""`hiddenkey-ds plan RECIPE.yaml [key=value ...]`: the recipe's per-GPU memory, and the cheapest change that makes
it fit when it does not. Exit status: 0 fits, 1 does not fit, 2 bad input."""
from __future__ import annotations

import argparse
import json
import sys

from hiddenkey_ds.config import RecipeError, load_recipe
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


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """Every option checked before the recipe is read: a plan against an impossible machine is no plan."""
    import math

    problems = []
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} must be >= 1, got {getattr(args, name)} (hint: {flag} 1 or more)")
    if not (math.isfinite(args.gpu_mem) and args.gpu_mem > 0):
        problems.append(f"--gpu-mem {args.gpu_mem:g}: GiB of memory per GPU must be a positive number (hint: e.g. "
                        "--gpu-mem 80 for an A100/H100 80GB, 141 for an H200)")
    if args.seq_len is not None and args.seq_len < 2:
        problems.append(f"--seq-len {args.seq_len}: a sequence needs at least 2 tokens (a prompt token and an answer "
                        "token) (hint: leave it out to use data.max_length)")
    if args.supervised_tokens is not None and args.supervised_tokens < 1:
        problems.append(f"--supervised-tokens {args.supervised_tokens}: at least 1 token per sequence is supervised "
                        "(hint: leave it out for the format's default)")
    elif args.supervised_tokens is not None and args.seq_len is not None and args.supervised_tokens >= args.seq_len:
        problems.append(f"--supervised-tokens {args.supervised_tokens}: at most --seq-len - 1 = {args.seq_len - 1} "
                        "positions of a sequence are predicted (hint: lower it or leave it out)")
    return problems


def _read_config(path: str) -> dict:
    """--config FILE: a model's config.json, read as the error messages need it named."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise RecipeError(f"--config {path}: no such file (hint: give a model's config.json)") from None
    except IsADirectoryError:
        raise RecipeError(f"--config {path}: is a directory (hint: give the config.json inside it)") from None
    except OSError as err:
        raise RecipeError(f"--config {path}: cannot be read ({err.strerror}) (hint: check its permissions)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"--config {path}: is not a JSON file ({type(err).__name__}: {err}) (hint: give a "
                          "model's config.json, as transformers writes it)") from None
    if not isinstance(config, dict):
        raise RecipeError(f"--config {path}: holds a JSON {type(config).__name__}, not a model config mapping "
                          "(hint: give a model's config.json)")
    return config


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from hiddenkey_ds.config.deepspeed import resolve_ds_config

    world = args.nodes * args.gpus_per_node
    try:
        problems = _argument_problems(args)
        if problems:
            raise RecipeError(problems)
        recipe = load_recipe(args.recipe, args.overrides, world_size=world, check_output_dir=False)
        steps = recipe.train.max_steps or 1000  # only the LR schedule depends on it
        ds = resolve_ds_config(recipe, world, total_steps=steps)
        shape = None
        if args.config:
            from hiddenkey_ds.models.shapes import shape_from_config

            shape = shape_from_config(_read_config(args.config), args.config)
        cfg = config_from_recipe(recipe, ds, args.nodes, args.gpus_per_node, args.gpu_mem, shape=shape,
                                 seq_len=args.seq_len, supervised_tokens=args.supervised_tokens)
        plan = estimate(cfg)  # dropout.layers is checked against the model's layer count here
    except (RecipeError, ValueError, OSError) as err:
        print(f"hiddenkey-ds plan: {err}", file=sys.stderr)
        return 2
    print(f"plan for {args.recipe}" + (f" {' '.join(args.overrides)}" if args.overrides else ""))
    print(plan.format())
    return 0 if plan.fits else 1
