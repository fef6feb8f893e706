"""`hiddenkey-ds SUBCOMMAND ...`: one entry point, each subcommand lives in its own module.

Bad input of any subcommand (a recipe, model, data file, run directory, sweep file, ...) ends in one message
with a hint and exit status 2, printed once (by rank 0 under a launcher), never in a traceback: the modules
report it with their own exception types, which this entry point turns into that message when a module lets one
escape.
"""
from __future__ import annotations

import importlib
import sys

from hiddenkey_ds.distributed import is_rank_zero

# Subcommand -> module exposing `main(argv: list[str]) -> int`. Imported lazily so that `hiddenkey-ds plan`
# does not pay for importing DeepSpeed and lm-eval.
SUBCOMMANDS = {
    "train": ("hiddenkey_ds.train", "fine-tune with LoRA/QLoRA + a dropout method (recipe YAML + key=value overrides)"),
    "eval": ("hiddenkey_ds.evaluation.harness", "evaluate a run directory or adapter with lm-evaluation-harness"),
    "report": ("hiddenkey_ds.experiments.report", "Markdown report + PNG figures comparing runs"),
    "sweep": ("hiddenkey_ds.experiments.sweep", "run a grid of methods x seeds x tasks, then report"),
    "demo": ("hiddenkey_ds.experiments.demo", "offline end-to-end demo: LoRA vs HiddenKey on SmolLM2-135M"),
    "plan": ("hiddenkey_ds.planning.cli", "estimate per-GPU memory of a recipe before queueing it"),
}

# The package's bad-input exceptions, by module: each is caught only if its module was imported (a subcommand
# that never imported it cannot raise it).
USER_ERRORS = {
    "hiddenkey_ds.errors": "RecipeError",
    "hiddenkey_ds.models.loading": "ModelLoadError",
    "hiddenkey_ds.models.builtin": "BuiltinModelError",
    "hiddenkey_ds.evaluation.harness": "EvalError",
    "hiddenkey_ds.experiments.report": "ReportError",
    "hiddenkey_ds.experiments.sweep": "SweepError",
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: hiddenkey-ds SUBCOMMAND [args...]\n\nsubcommands:\n{rows}\n"


def user_error_types() -> tuple[type[BaseException], ...]:
    found = []
    for module, name in USER_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"hiddenkey-ds: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except Exception as err:  # noqa: BLE001 - only the package's bad-input types are handled, the rest re-raised
        if not isinstance(err, user_error_types()):
            raise
        if is_rank_zero():
            print(f"hiddenkey-ds {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
