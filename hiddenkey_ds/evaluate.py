"""Evaluate a run (or any PEFT adapter, or a base model alone) with lm-evaluation-harness.

`hiddenkey-ds eval RUN_DIR` is the stock harness on the stock HF model with `peft=`, on the task YAMLs in
`eval/tasks/` (prompts from `hiddenkey_ds.data.templates`). Every evaluation prints, and stores in its results
JSON, the equivalent `lm_eval` command line; a test checks that both give identical numbers.

Results land in RUN_DIR/eval/ (or --out):
  results.json        the adapter on the base model (full precision; the stock command's setting)
  results_4bit.json   a QLoRA run's adapter on its 4-bit base as trained, when bitsandbytes runs on the device
  base.json           the base model alone (--base-only): the "before" row of a report
Each file is the dict `lm_eval.simple_evaluate` returns (keys results, versions, n-shot, configs, config, ...,
without per-sample logs) plus a "hiddenkey_ds" block: base, adapter, tasks, limit, quantization, command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent.parent / "eval" / "tasks"
# builtin datasets of hiddenkey_ds.data with an lm-eval task of their own
BUILTIN_DATA_TASKS = {"builtin:toy-sst2": "hk_toy_sst2"}


class EvalError(RuntimeError):
    pass


@dataclass
class Target:
    """What to evaluate: a base model, optionally with an adapter, described by a run's recipe if any."""

    base: str                      # as the user/recipe names it (builtin:..., a path or a hub id)
    adapter: Path | None
    run_dir: Path | None
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization(self) -> str:
        return self.recipe.get("model", {}).get("quantization", "none")


def load_run_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    try:
        recipe = yaml.safe_load(path.read_text())
    except OSError as err:
        raise EvalError(f"{run_dir} is not a run directory: cannot read {path} ({err.strerror})") from None
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise EvalError(f"{path} is not a resolved recipe (no model section)")
    return recipe


def resolve_target(path_or_name: str, base: str | None = None, base_only: bool = False) -> Target:
    """A run dir (config.yaml + adapter/), a PEFT adapter dir, or (with base_only) a model name."""
    p = Path(path_or_name).expanduser()
    if (p / "config.yaml").is_file():
        recipe = load_run_recipe(p)
        adapter = p / "adapter"
        if not base_only and not (adapter / "adapter_config.json").is_file():
            done = (p / "summary.json").is_file()
            raise EvalError(
                f"{p}: no final adapter at {adapter}"
                + ("" if done else " (the run has no summary.json: it has not finished; resume it first)")
            )
        return Target(base or recipe["model"]["name"], None if base_only else adapter.resolve(), p.resolve(), recipe)
    if (p / "adapter_config.json").is_file():
        adapter_base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        chosen = base or adapter_base
        if not chosen:
            raise EvalError(f"{p}/adapter_config.json names no base model: pass --base MODEL")
        return Target(chosen, None if base_only else p.resolve(), None)
    if base_only:
        return Target(path_or_name, None, None)
    raise EvalError(
        f"{path_or_name!r} is neither a run directory (config.yaml) nor a PEFT adapter (adapter_config.json); "
        "to evaluate a model without adapter use --base-only"
    )


def tasks_for_recipe(recipe: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """(lm-eval task names, task metadata) for a run: its eval.tasks, else the task scoring its training data.

    The metadata points the local-file tasks at the run's data directory (e.g. {"rte_dir": ...}).
    """
    requested = list((recipe.get("eval") or {}).get("tasks") or [])
    try:
        derived, metadata = _task_of_data(recipe.get("data") or {})
    except EvalError:
        if not requested:
            raise
        return requested, {}  # the named tasks may not need the training data's location
    return (requested or derived), metadata


def _task_of_data(data: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    task, path = data.get("task"), data.get("path")
    if data.get("format", "classification") != "classification" or not task:
        raise EvalError(
            "the run trained on free-form (sft) data: there is no multiple-choice task to score; pass --tasks"
        )
    from hiddenkey_ds.data.templates import get_template

    template = get_template(task)
    if path is None or path == template.hub_path:
        return [f"hk_{template.name}"], {}
    if path in BUILTIN_DATA_TASKS:
        return [BUILTIN_DATA_TASKS[path]], {}
    local = Path(path).expanduser()
    if local.is_dir():
        return [f"hk_{template.name}_local"], {f"{template.name}_dir": str(local.resolve())}
    if local.exists():
        raise EvalError(
            f"data.path={path!r} is a single file; the local tasks read a directory with train/dev files: "
            f"pass --tasks hk_{template.name}_local --data-dir DIR"
        )
    raise EvalError(
        f"data.path={path!r} is neither a local directory (relative paths resolve against {Path.cwd()}) nor the "
        f"task's hub dataset ({template.hub_path}); pass --tasks and --data-dir"
    )


def model_args(target: Target, dtype: str | None = None) -> dict[str, Any]:
    """The HF model arguments, exactly as the stock command gets them (values are strings)."""
    from hiddenkey_ds.models import resolve_model_path

    args: dict[str, Any] = {"pretrained": resolve_model_path(target.base)}
    if target.adapter is not None:
        args["peft"] = str(target.adapter)
    if dtype:
        args["dtype"] = dtype
    return args


def stock_command(margs: dict[str, Any], tasks: list[str], metadata: dict[str, str], limit: float | None,
                  batch_size: int, device: str) -> str:
    parts = ["lm_eval", "--model", "hf", "--model_args", ",".join(f"{k}={v}" for k, v in margs.items()),
             "--include_path", str(TASKS_DIR), "--tasks", ",".join(tasks)]
    if metadata:
        parts += ["--metadata", json.dumps(metadata)]
    if limit is not None:
        parts += ["--limit", f"{limit:g}"]
    parts += ["--batch_size", str(batch_size), "--device", device]
    return " ".join(shlex.quote(p) for p in parts)


def bnb_4bit_supported(device: str) -> tuple[bool, str]:
    """Can bitsandbytes run a 4-bit layer on `device`? Tried on a tiny layer, not guessed from versions."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.ones(1, 64, device=device))
        return True, ""
    except Exception as err:  # noqa: BLE001 - any failure means "not on this device", reported as such
        return False, f"{type(err).__name__}: {err}".splitlines()[0]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _evaluate(margs: dict[str, Any], tasks: list[str], metadata: dict[str, str], limit: float | None,
              batch_size: int, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lm-eval results, facts about the model evaluated)."""
    # Mirrors what the stock CLI does with the same arguments: its TaskManager gets model_args | metadata as
    # task metadata, and its seeds are simple_evaluate's defaults.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    quant = margs.get("quantization_config")
    plain = {k: v for k, v in margs.items() if k != "quantization_config"}
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={**plain, **metadata})
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        ours = sorted(n for n in manager.all_tasks if n.startswith("hk_"))
        raise EvalError(f"unknown lm-eval task(s) {unknown}; this package's tasks: {', '.join(ours)}")
    model: Any = "hf"
    facts: dict[str, Any] = {}
    if quant is not None:
        # HFLM takes no quantization config among its model_args (it reads one only from a pre-quantized
        # checkpoint's config), so the 4-bit model is built here and handed over as an instance.
        model = _quantized_lm(plain, quant, batch_size, device)
        import bitsandbytes as bnb

        facts["linear4bit_layers"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.model.modules())
    results = simple_evaluate(
        model=model, model_args=plain, tasks=tasks, limit=limit, batch_size=batch_size, device=device,
        task_manager=manager, log_samples=False, metadata=metadata,
    )
    if results is None:  # non-zero ranks under torch.distributed
        raise EvalError("lm-eval returned no results (run evaluation in one process, not under a launcher)")
    results.pop("samples", None)
    return results, facts


def _quantized_lm(margs: dict[str, Any], quant: Any, batch_size: int, device: str):
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # bitsandbytes quantizes while placing the weights: load straight onto the evaluation device
    base = AutoModelForCausalLM.from_pretrained(margs["pretrained"], quantization_config=quant,
                                                device_map={"": device})
    model = PeftModel.from_pretrained(base, margs["peft"]) if "peft" in margs else base
    tokenizer = AutoTokenizer.from_pretrained(margs["pretrained"])
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def _write(results: dict[str, Any], path: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    os.replace(tmp, path)  # a reader never sees half a file


def primary_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} without stderr entries and filter suffixes (",none")."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        for key, value in row.items():
            name, _, _filter = key.partition(",")
            if key == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out.setdefault(task, {})[name] = float(value)
    return out


def run_eval(run_dir: str | os.PathLike, tasks: list[str] | None = None, limit: float | None = None,
             batch_size: int = 8, *, base_only: bool = False, base: str | None = None,
             data_dirs: dict[str, str] | None = None, device: str | None = None,
             out_dir: str | os.PathLike | None = None, dtype: str | None = None, quantized: str = "auto",
             log=print) -> list[Path]:
    """Evaluate and write results JSON(s); returns their paths.

    `run_dir` is a run directory, an adapter directory or (base_only) a model name. `data_dirs` maps metadata keys
    of the local tasks (e.g. {"rte_dir": ...}) to directories. `quantized`: "auto" also scores a QLoRA adapter on
    its 4-bit base when bitsandbytes runs here, "never" skips that, "require" fails if it cannot.
    """
    target = resolve_target(str(run_dir), base=base, base_only=base_only)
    metadata: dict[str, str] = {}
    if target.recipe:
        try:
            derived, metadata = tasks_for_recipe(target.recipe)
        except EvalError:
            if not tasks:
                raise
        else:
            tasks = list(tasks or derived)  # named tasks still get the run's data directory
    if not tasks:
        raise EvalError("no run recipe to take the tasks from: pass --tasks")
    tasks = list(tasks)
    metadata.update({k: str(Path(v).expanduser().resolve()) for k, v in (data_dirs or {}).items()})
    if out_dir is None:
        if target.run_dir is None:
            raise EvalError("an adapter or model outside a run directory needs --out DIR for its results")
        out_dir = target.run_dir / "eval"
    out_dir = Path(out_dir)
    device = device or default_device()

    jobs: list[tuple[str, dict[str, Any]]] = []
    margs = model_args(target, dtype)
    jobs.append(("base.json" if target.adapter is None else "results.json", margs))
    if target.adapter is not None and target.quantization == "4bit" and quantized != "never":
        ok, why = bnb_4bit_supported(device)
        if ok:
            from hiddenkey_ds.models import quantization_config

            model = {"dtype": "bf16", "quant_type": "nf4", "double_quant": True, **target.recipe["model"]}
            if device == "cpu":
                model["dtype"] = "fp32"  # bf16 matmuls are slow on most CPUs; the 4-bit weights are the point
            quant = quantization_config(SimpleNamespace(model=SimpleNamespace(**model)))
            jobs.append(("results_4bit.json", {**margs, "quantization_config": quant}))
        elif quantized == "require":
            raise EvalError(f"4-bit evaluation requested but bitsandbytes cannot run 4-bit on {device}: {why}")
        else:
            log(f"[eval] skipping the 4-bit evaluation of this QLoRA adapter: bitsandbytes on {device}: {why}")

    from lm_eval.utils import make_table

    written = []
    for name, args in jobs:
        quantized_job = "quantization_config" in args
        stock = None if quantized_job else stock_command(args, tasks, metadata, limit, batch_size, device)
        log(f"[eval] {name}: base={args['pretrained']} adapter={args.get('peft', '-')} tasks={','.join(tasks)}")
        if stock:
            log(f"[eval] stock equivalent: {stock}")
        started = time.time()
        if quantized_job and quantized == "auto":
            try:
                results, facts = _evaluate(args, tasks, metadata, limit, batch_size, device)
            except (AssertionError, RuntimeError, ValueError, NotImplementedError, ImportError) as err:
                # bitsandbytes' CPU and older-GPU kernels reject some shapes/dtypes only when they run
                log(f"[eval] skipping the 4-bit evaluation: bitsandbytes failed on {device}: "
                    f"{type(err).__name__}: {err} (--quantized require makes this an error)")
                continue
        else:
            results, facts = _evaluate(args, tasks, metadata, limit, batch_size, device)
        results["hiddenkey_ds"] = {
            "base": target.base, "pretrained": args["pretrained"],
            "adapter": str(target.adapter) if target.adapter else None,
            "run_dir": str(target.run_dir) if target.run_dir else None,
            "tasks": tasks, "task_metadata": metadata, "limit": limit, "batch_size": batch_size, "device": device,
            "quantization": "4bit" if quantized_job else "none",
            "stock_command": stock, "seconds": round(time.time() - started, 1), **facts,
        }
        path = out_dir / name
        _write(results, path)
        log(make_table(results))
        log(f"[eval] wrote {path}")
        written.append(path)
    return written


def _parse_data_dirs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, path = value.partition("=")
        if sep:
            out[key if key.endswith("_dir") else f"{key}_dir"] = path
        else:
            out["data_dir"] = value  # one directory for every local task
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hiddenkey-ds eval", description="Evaluate a run directory, an adapter, or a base model with lm-eval."
    )
    parser.add_argument("target", help="run directory, PEFT adapter directory, or (with --base-only) a model name")
    parser.add_argument("--tasks",
                        help="comma-separated lm-eval tasks (default: the run's eval.tasks, else its training task)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1); for quick checks only")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size, else 8")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model without the adapter")
    parser.add_argument("--base", help="base model for an adapter (default: the run's model.name / adapter_config)")
    parser.add_argument("--data-dir", action="append", default=[], metavar="[TASK=]DIR",
                        help="directory of a local task's files, e.g. rte=../shared/data/glue/RTE (repeatable)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="model dtype for lm-eval (default: the checkpoint's)")
    parser.add_argument("--out", help="results directory (default: RUN_DIR/eval)")
    parser.add_argument("--quantized", choices=["auto", "never", "require"], default="auto",
                        help="QLoRA runs: also evaluate on the 4-bit base (auto: when bitsandbytes runs here)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch_size = args.batch_size
    if batch_size is None:
        p = Path(args.target)
        recipe = load_run_recipe(p) if (p / "config.yaml").is_file() else {}
        batch_size = (recipe.get("eval") or {}).get("batch_size") or 8
    try:
        run_eval(args.target, tasks, limit, batch_size, base_only=args.base_only, base=args.base,
                 data_dirs=_parse_data_dirs(args.data_dir), device=args.device, out_dir=args.out,
                 dtype=args.dtype, quantized=args.quantized)
    except EvalError as err:
        print(f"hiddenkey-ds eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
