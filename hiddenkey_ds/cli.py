"""`hiddenkey-ds SUBCOMMAND ...`: one entry point, each subcommand lives in its own module."""
from __future__ import annotations

import importlib
import sys

# Subcommand -> module exposing `main(argv: list[str]) -> int`. Imported lazily so that `hiddenkey-ds plan`
# does not pay for importing DeepSpeed and lm-eval.
SUBCOMMANDS = {
    "train": ("hiddenkey_ds.train", "fine-tune with LoRA/QLoRA + a dropout method (recipe YAML + key=value overrides)"),
    "eval": ("hiddenkey_ds.evaluate", "evaluate a run directory or adapter with lm-evaluation-harness"),
    "report": ("hiddenkey_ds.report", "Markdown report + PNG figures comparing runs"),
    "sweep": ("hiddenkey_ds.sweep", "run a grid of methods x seeds x tasks, then report"),
    "demo": ("hiddenkey_ds.demo", "offline end-to-end demo: LoRA vs HiddenKey on SmolLM2-135M"),
    "plan": ("hiddenkey_ds.plan", "estimate per-GPU memory of a recipe before queueing it"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: hiddenkey-ds SUBCOMMAND [args...]\n\nsubcommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hiddenkey-ds: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
