"""Evaluate a run (or any PEFT adapter, or a base model alone) with lm-evaluation-harness.

`hiddenkey-ds eval RUN_DIR` is the stock harness on the stock HF model with `peft=`, on the task YAMLs in
`eval/tasks/` (prompts from `hiddenkey_ds.data.templates`). Every evaluation prints, and stores in its results
JSON, the equivalent `lm_eval` command line; a test checks that both give identical numbers.

A run directory holds up to two adapters: `adapter/` (the final one) and `adapter_best/` (the step with the best
accuracy on the run's validation split; absent when the run had none). Results land in RUN_DIR/eval/ (or --out):
  results.json             the final adapter on the base model (full precision; the stock command's setting)
  results_best.json        the best-validation adapter, same setting
  results_4bit.json        a QLoRA run's final adapter on its 4-bit base as trained (when bitsandbytes runs here)
  results_best_4bit.json   the same for the best adapter
  base.json                the base model alone (--base-only): the "before" row of a report
Each file is the dict `lm_eval.simple_evaluate` returns (keys results, versions, n-shot, configs, config, ...,
without per-sample logs) plus a "hiddenkey_ds" block: base, adapter, adapter_kind (final|best), step, adapter_sha256
(the adapter scored: its step from the adapter's own hiddenkey_ds.json, the sha256 of its weights file), run_finished,
tasks, limit, batch_size, quantization, stock_command, provenance (package / library versions, git commit, device:
hiddenkey_ds.provenance) (the file names: hiddenkey_ds.run_dir).

A run still training moves adapter_best/ under an evaluation; a results file whose adapter_sha256 differs from the
finished run's adapter is stale (`stale_reason`): the sweep evaluates it again and a report refuses it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hiddenkey_ds.config.schema import EvalSection, Recipe
from hiddenkey_ds.resources import resource_dir
from hiddenkey_ds.provenance import collect as collect_provenance, sha256_file
from hiddenkey_ds.run_dir import (
    ADAPTER_CONFIG, ADAPTER_DIRS, ADAPTER_META, ADAPTER_WEIGHTS, BASE_RESULTS, CONFIG, EVAL, LOCK, SUMMARY,
    is_finished, is_run_dir, results_name, write_atomic,
)
from hiddenkey_ds.run_lock import RunDirLocked, RunLock

TASKS_DIR = resource_dir("eval_tasks")  # the checkout's eval/tasks/, or the copy a wheel ships
# builtin datasets of hiddenkey_ds.data with an lm-eval task of their own
BUILTIN_DATA_TASKS = {"builtin:toy-sst2": "hk_toy_sst2"}
ADAPTER_CHOICES = ("final", "best", "both")


class EvalError(RuntimeError):
    pass


@dataclass
class Target:
    """What to evaluate: a base model, optionally with adapters, described by a run's recipe if any."""

    base: str                      # as the user/recipe names it (builtin:..., a path or a hub id)
    adapters: dict[str | None, Path] = field(default_factory=dict)  # kind (final/best; None outside a run) -> dir
    run_dir: Path | None = None
    recipe: Recipe | None = None
    summary: dict[str, Any] | None = None

    @property
    def quantization(self) -> str:
        return self.recipe.model.quantization if self.recipe is not None else "none"

    @property
    def adapter(self) -> Path | None:
        """The first adapter evaluated (the final one when it is among them)."""
        return next(iter(self.adapters.values()), None)

    def step_of(self, kind: str | None) -> int | None:
        """The optimizer step the adapter of `kind` was saved at, from the run's summary."""
        summary = self.summary or {}
        if kind == "final":
            return summary.get("steps")
        if kind == "best":
            return (summary.get("best") or {}).get("step")
        return None


def adapter_record(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """{"kind", "step", "sha256"} of an adapter directory: kind and step from its own hiddenkey_ds.json (written
    with the weights; absent outside a run), sha256 of its weights file as it is now (None without one)."""
    adapter_dir = Path(adapter_dir)
    try:
        meta = json.loads((adapter_dir / ADAPTER_META).read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    weights = adapter_dir / ADAPTER_WEIGHTS
    return {"kind": meta.get("kind"), "step": meta.get("step"),
            "sha256": sha256_file(weights) if weights.is_file() else None}


def stale_reason(run_dir: str | os.PathLike, results: dict[str, Any], name: str = "the results file",
                 current: dict[str, dict[str, Any]] | None = None) -> str | None:
    """Why a run's results file no longer scores the run's adapter of its kind (None: it does, or it records no
    adapter hash, as files written before the hash was recorded). `current` caches adapter_record per kind."""
    ours = results.get("hiddenkey_ds") or {}
    kind, scored = ours.get("adapter_kind"), ours.get("adapter_sha256")
    if kind not in ADAPTER_DIRS or not scored:
        return None
    current = {} if current is None else current
    if kind not in current:
        current[kind] = adapter_record(Path(run_dir) / ADAPTER_DIRS[kind])
    now = current[kind]
    if now["sha256"] == scored:
        return None
    return (f"{name} scored the {kind} adapter of step {ours.get('step')} (sha256 {scored[:12]}), but the run's "
            f"{ADAPTER_DIRS[kind]}/ is now the one of step {now['step']} (sha256 {str(now['sha256'])[:12]}): it was "
            "evaluated while the run was still training")


def read_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """A run's config.yaml through the recipe schema: defaults come from the schema, so a run written before a
    field existed still loads. Raises EvalError naming every problem.

    Not load_recipe: its start-up checks (batch arithmetic, DeepSpeed JSON, data paths) judge a run about to
    start, and a finished run must stay readable after its data moved or a DeepSpeed config changed."""
    import yaml
    from pydantic import ValidationError

    from hiddenkey_ds.config.validate import format_validation_errors

    path = Path(run_dir) / CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise EvalError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}) "
                        f"(hint: {CONFIG} is written by the training loop; a damaged copy cannot be read)") from None
    except OSError as err:
        raise EvalError(f"{run_dir} is not a run directory: cannot read {path} ({err.strerror}) (hint: give the "
                        f"directory a training run wrote, the one holding {CONFIG} and {ADAPTER_DIRS['final']}/)"
                        ) from None
    except yaml.YAMLError as err:
        raise EvalError(f"{path} is not valid YAML: {err}") from None
    try:
        return Recipe.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError as err:
        problems = "\n".join(f"  - {p}" for p in format_validation_errors(err))
        raise EvalError(f"{path} is not a valid resolved recipe:\n{problems}\n(hint: {CONFIG} is written by "
                        "the training loop; a hand-edited or foreign file must follow the recipe schema)") from None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{path} is not JSON ({err}); the run wrote it atomically, so it was edited or damaged "
                        "since (hint: copy the run directory again)") from None


def available_adapters(run_dir: Path) -> list[str]:
    """Adapter kinds a run directory holds, final first."""
    return [k for k, d in ADAPTER_DIRS.items() if (run_dir / d / ADAPTER_CONFIG).is_file()]


def chosen_kinds(run_dir: Path, choice: str | None) -> list[str]:
    """The adapter kinds `--adapter choice` evaluates in a run directory (None: both when the best exists)."""
    have = available_adapters(run_dir)
    summary_hint = "" if is_finished(run_dir) else f" (the run has no {SUMMARY}: it has not finished; resume it first)"
    if choice is None:
        if "final" not in have:
            raise EvalError(f"{run_dir}: no final adapter at {run_dir / ADAPTER_DIRS['final']}{summary_hint}")
        return have
    wanted = ["final", "best"] if choice == "both" else [choice]
    for kind in wanted:
        if kind not in have:
            why = summary_hint or (
                " (the run had no validation split, so no best step was kept; hint: train with "
                "data.validation_from_train or an eval split, or evaluate --adapter final)" if kind == "best" else "")
            raise EvalError(f"{run_dir}: no {kind} adapter at {run_dir / ADAPTER_DIRS[kind]}{why}")
    return wanted


def resolve_target(path_or_name: str, base: str | None = None, base_only: bool = False,
                   adapter: str | None = None) -> Target:
    """A run dir (config.yaml + adapter/ [+ adapter_best/]), a PEFT adapter dir, or (base_only) a model name.

    `adapter` (final, best, both; None = both when the run kept a best adapter) picks a run's adapters."""
    if adapter is not None and adapter not in ADAPTER_CHOICES:
        raise EvalError(f"--adapter {adapter!r}: choose one of {', '.join(ADAPTER_CHOICES)}")
    if base_only and adapter is not None:
        raise EvalError("--base-only evaluates the model without any adapter: drop --adapter")
    p = Path(path_or_name).expanduser()
    if is_run_dir(p):
        recipe = read_run_recipe(p)
        kinds = [] if base_only else chosen_kinds(p, adapter)
        adapters = {k: (p / ADAPTER_DIRS[k]).resolve() for k in kinds}
        for directory in adapters.values():
            check_adapter(directory)
        return Target(base or recipe.model.name, adapters, p.resolve(), recipe, read_summary(p))
    if (p / ADAPTER_CONFIG).is_file():
        if adapter not in (None, "final"):
            raise EvalError(f"{p} is a single adapter, not a run directory: --adapter {adapter} needs a run's "
                            f"{ADAPTER_DIRS['best']}/ (hint: pass the run directory, or drop --adapter)")
        adapter_base = check_adapter(p).get("base_model_name_or_path")
        chosen = base or adapter_base
        if not chosen:
            raise EvalError(f"{p}/{ADAPTER_CONFIG} names no base model (hint: pass --base MODEL)")
        return Target(chosen, {} if base_only else {None: p.resolve()})
    if base_only:
        return Target(path_or_name)
    raise EvalError(
        f"{path_or_name!r} is neither a run directory ({CONFIG}) nor a PEFT adapter ({ADAPTER_CONFIG}) "
        "(hint: to evaluate a model without adapter use --base-only)"
    )


def check_adapter(directory: Path) -> dict[str, Any]:
    """The adapter's PEFT config (a JSON mapping) and weights (complete and readable), checked here, so that a
    truncated or corrupt adapter is one message before lm-eval starts rather than a loader traceback after the
    base model loaded. Returns the config."""
    config_path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{config_path} cannot be read as JSON ({type(err).__name__}: {err}) (hint: the adapter "
                        "is damaged; copy it again from where it was trained)") from None
    if not isinstance(config, dict):
        raise EvalError(f"{config_path} holds a {type(config).__name__}, not PEFT's mapping of settings (hint: the "
                        "adapter is damaged; copy it again)")
    weights = [directory / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (directory / n).is_file()]
    if not weights:
        raise EvalError(f"{directory}: no adapter weights (adapter_model.safetensors or adapter_model.bin) beside "
                        f"{ADAPTER_CONFIG} (hint: the adapter was not copied whole; copy the directory again)")
    try:
        if weights[0].suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights[0]), framework="pt") as f:  # checks the header covers the file exactly
                names = list(f.keys())
                for name in names:
                    f.get_tensor(name)
        else:
            import torch

            names = list(torch.load(weights[0], map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - each format reports damage with its own types; the file is the news
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EvalError(f"{weights[0]} is truncated or corrupt ({type(err).__name__}: {first}) (hint: copy the "
                        "adapter again from where it was trained)") from None
    if not names:
        raise EvalError(f"{weights[0]} holds no tensors (hint: the adapter is damaged; copy it again)")
    return config


def tasks_for_recipe(recipe: Recipe) -> tuple[list[str], dict[str, str]]:
    """(lm-eval task names, task metadata) for a run: its eval.tasks, else the task scoring its training data.

    The metadata points the local-file tasks at the run's data directory (e.g. {"rte_dir": ...}).
    """
    requested = list(recipe.eval.tasks)
    try:
        derived, metadata = _task_of_data(recipe.data)
    except EvalError:
        if not requested:
            raise
        return requested, {}  # the named tasks may not need the training data's location
    return (requested or derived), metadata


def _task_of_data(data: Any) -> tuple[list[str], dict[str, str]]:
    task, path = data.task, data.path
    if data.format != "classification" or not task:
        raise EvalError(
            "the run trained on free-form (sft) data: there is no multiple-choice task to score (hint: name the "
            "lm-eval tasks to run with --tasks, e.g. --tasks hk_rte, or eval.tasks in the recipe)"
        )
    from hiddenkey_ds.data.templates import get_template
    from hiddenkey_ds.evaluation import custom_task

    if custom_task.is_custom(data):  # generated into the run directory by run_eval (task_include_path)
        return [custom_task.task_name(data)], {}
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
            f"data.path={path!r} is a single file; the local tasks read a directory with train/dev files "
            f"(hint: put the dev split beside it as dev.jsonl and pass --tasks hk_{template.name}_local "
            f"--data-dir {template.name}=DIR)"
        )
    raise EvalError(
        f"data.path={path!r} is neither a local directory (relative paths resolve against {Path.cwd()}) nor the "
        f"task's hub dataset ({template.hub_path}) (hint: pass --tasks and --data-dir TASK=DIR)"
    )


def task_include_path(target: Target, tasks: list[str]) -> Path:
    """The --include_path for `tasks`: the shipped eval/tasks/, or, when a run with a task of its own
    (data.template) scores it, RUN_DIR/eval/tasks/ with that task's YAML generated from the run's recipe."""
    from hiddenkey_ds.evaluation import custom_task

    recipe = target.recipe
    if recipe is None or target.run_dir is None or not custom_task.is_custom(recipe.data) \
            or custom_task.task_name(recipe.data) not in tasks:
        return TASKS_DIR
    others = [t for t in tasks if t != custom_task.task_name(recipe.data)]
    if others:
        raise EvalError(f"tasks {others} with the run's own task {custom_task.task_name(recipe.data)}: the stock "
                        "lm_eval command takes one --include_path, and the run's task has its own "
                        f"({custom_task.tasks_dir(target.run_dir)}) (hint: evaluate them in two calls, "
                        "--tasks for each)")
    return custom_task.write_task(recipe.data, target.run_dir)


def model_args(target: Target, adapter: Path | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The HF model arguments, exactly as the stock command gets them (values are strings)."""
    from hiddenkey_ds.models.builtin import BuiltinModelError
    from hiddenkey_ds.models.loading import ModelLoadError, resolve_model_path

    try:
        args: dict[str, Any] = {"pretrained": resolve_model_path(target.base)}
    except (ModelLoadError, BuiltinModelError) as err:
        hint = "" if "hint:" in str(err) else " (hint: --base takes builtin:NAME, a local HF model directory or a hub id)"
        raise EvalError(f"base model: {err}{hint}") from None
    if adapter is not None:
        args["peft"] = str(adapter)
    if dtype:
        args["dtype"] = dtype
    return args


def stock_command(margs: dict[str, Any], tasks: list[str], metadata: dict[str, str], limit: float | None,
                  batch_size: int, device: str, include: Path = TASKS_DIR) -> str:
    parts = ["lm_eval", "--model", "hf", "--model_args", ",".join(f"{k}={v}" for k, v in margs.items()),
             "--include_path", str(include), "--tasks", ",".join(tasks)]
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
              batch_size: int, device: str, include: Path = TASKS_DIR) -> tuple[dict[str, Any], dict[str, Any]]:
    """(lm-eval results, facts about the model evaluated)."""
    # Mirrors what the stock CLI does with the same arguments: its TaskManager gets model_args | metadata as
    # task metadata, and its seeds are simple_evaluate's defaults.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    quant = margs.get("quantization_config")
    plain = {k: v for k, v in margs.items() if k != "quantization_config"}
    # Indexing lm-eval's thousands of stock task YAMLs takes 10-20 s per evaluation; our tasks need none of them,
    # so the full index is built only when a stock task is asked for (the task configs are the same either way).
    manager = TaskManager(include_path=str(include), include_defaults=False, metadata={**plain, **metadata})
    if not all(manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=str(include), metadata={**plain, **metadata})
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        ours = sorted(n for n in manager.all_tasks if n.startswith("hk_"))
        raise EvalError(f"unknown lm-eval task(s) {unknown} (hint: this package's tasks: {', '.join(ours)})")
    _check_tasks_load(tasks, manager)
    model: Any = "hf"
    facts: dict[str, Any] = {}
    if quant is not None:
        # HFLM takes no quantization config among its model_args (it reads one only from a pre-quantized
        # checkpoint's config), so the 4-bit model is built here and handed over as an instance.
        model = _quantized_lm(plain, quant, batch_size, device)
        import bitsandbytes as bnb

        facts["linear4bit_layers"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.model.modules())
    try:
        results = simple_evaluate(
            model=model, model_args=plain, tasks=tasks, limit=limit, batch_size=batch_size, device=device,
            task_manager=manager, log_samples=False, metadata=metadata,
        )
    except OSError as err:  # transformers' way of saying a model / adapter / tokenizer cannot be found or read
        raise EvalError(f"lm-eval could not load the model ({plain['pretrained']}, adapter {plain.get('peft', '-')}): "
                        f"{str(err).splitlines()[0]} (hint: a hub id needs network or the HF cache; pass --base with a "
                        "local model directory or builtin:NAME)") from None
    if results is None:  # non-zero ranks under torch.distributed
        raise EvalError("lm-eval returned no results (run evaluation in one process, not under a launcher)")
    results.pop("samples", None)
    return results, facts


def _check_tasks_load(tasks: list[str], manager: Any) -> None:
    """Build the tasks once before any model is loaded: a missing data directory, a file without the task's
    columns or a hub dataset out of reach is then one message, not a traceback from inside lm-eval."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict(tasks, manager)
    except Exception as err:  # noqa: BLE001 - whatever the dataset loader raises, the user gets it in one line
        what = f"{type(err).__name__}: {err}".splitlines()[0]
        local = [t for t in tasks if t.endswith("_local")]
        if str(manager.include_path) != str(TASKS_DIR):  # the task generated for a run's data.template
            hint = ("the run's own task reads the recipe's data.eval_path, else data.eval_split of data.path: "
                    "check that file is still there")
        elif local:
            names = ",".join(t.removeprefix("hk_").removesuffix("_local") for t in local)
            hint = (f"the _local tasks read DIR/{{train,dev}}.jsonl: pass --data-dir TASK=DIR for each of {names}, "
                    "e.g. --data-dir rte=../shared/data/glue/RTE")
        else:
            hint = ("hub tasks download their dataset: without network use the task's _local variant with "
                    "--data-dir, e.g. --tasks hk_rte_local --data-dir rte=../shared/data/glue/RTE")
        raise EvalError(f"lm-eval cannot load task(s) {', '.join(tasks)}: {what} (hint: {hint})") from None


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
    write_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


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


@dataclass
class Job:
    """One evaluation: a results file, the adapter kind it scores (None: the base model or a lone adapter) and the
    HF model arguments (with a quantization config for a 4-bit base, which the stock CLI cannot express)."""

    name: str
    kind: str | None
    margs: dict[str, Any]

    @property
    def quantized(self) -> bool:
        return "quantization_config" in self.margs


def run_eval(run_dir: str | os.PathLike, tasks: list[str] | None = None, limit: float | None = None,
             batch_size: int | None = None, *, base_only: bool = False, base: str | None = None,
             data_dirs: dict[str, str] | None = None, device: str | None = None,
             out_dir: str | os.PathLike | None = None, dtype: str | None = None, quantized: str = "auto",
             adapter: str | None = None, log=print, lock: RunLock | None = None) -> list[Path]:
    """Evaluate and write results JSON(s); returns their paths.

    `run_dir` is a run directory, an adapter directory or (base_only) a model name. `adapter` picks a run's
    adapters: final (results.json), best (results_best.json), both; None = both when the run kept adapter_best/.
    `batch_size` None: the run's eval.batch_size, else the schema's default. `data_dirs` maps metadata keys of the
    local tasks (e.g. {"rte_dir": ...}) to directories. `quantized`: "auto" also scores a QLoRA adapter on its
    4-bit base when bitsandbytes runs here, "never" skips that, "require" fails if it cannot. `lock` (from
    run_dir_lock) is taken once the checks have passed, before anything is written.
    """
    target = resolve_target(str(run_dir), base=base, base_only=base_only, adapter=adapter)
    tasks, metadata = _tasks_and_metadata(target, tasks, data_dirs)
    out = _results_dir(target, out_dir)
    if batch_size is None:
        batch_size = (target.recipe.eval if target.recipe is not None else EvalSection()).batch_size
    device = device or default_device()
    jobs = _plan_jobs(target, dtype, device, quantized, log)
    include = task_include_path(target, tasks)
    if lock is not None:
        _locked(lock.acquire, run_dir)

    from lm_eval.utils import make_table

    written = []
    environment = collect_provenance(world_size=1, device=device)
    for job in jobs:
        stock = None if job.quantized else stock_command(job.margs, tasks, metadata, limit, batch_size, device,
                                                         include)
        _announce(job, tasks, stock, log)
        started = time.time()
        # what is scored, read before lm-eval loads it: a run still training may replace adapter_best/ meanwhile
        scored = adapter_record(job.margs["peft"]) if "peft" in job.margs else None
        finished = target.run_dir is not None and is_finished(target.run_dir)
        outcome = _run_job(job, tasks, metadata, limit, batch_size, device, quantized, log, include)
        if outcome is None:
            continue
        results, facts = outcome
        results["hiddenkey_ds"] = {
            **_provenance(target, job, tasks, metadata, limit, batch_size, device, stock, scored),
            "run_finished": finished, "seconds": round(time.time() - started, 1), **facts,
            "provenance": environment,
        }
        if target.run_dir is not None and not finished and job.kind is not None:
            log(f"[eval] {target.run_dir} is still training: {job.name} scores its {job.kind} adapter of step "
                f"{results['hiddenkey_ds']['step']}, which may still change (a sweep re-evaluates it once finished)")
        path = out / job.name
        _write(results, path)
        log(make_table(results))
        log(f"[eval] wrote {path}")
        written.append(path)
    return written


def _tasks_and_metadata(target: Target, tasks: list[str] | None,
                        data_dirs: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """The lm-eval tasks (given, else the run's) and their metadata (the run's data directory, then --data-dir)."""
    metadata: dict[str, str] = {}
    if target.recipe is not None:
        try:
            derived, metadata = tasks_for_recipe(target.recipe)
        except EvalError:
            if not tasks:
                raise
        else:
            tasks = list(tasks or derived)  # named tasks still get the run's data directory
    if not tasks:
        raise EvalError("no run recipe to take the tasks from (hint: pass --tasks, e.g. --tasks hk_rte)")
    metadata.update({k: str(Path(v).expanduser().resolve()) for k, v in (data_dirs or {}).items()})
    return list(tasks), metadata


def _results_dir(target: Target, out_dir: str | os.PathLike | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if target.run_dir is None:
        raise EvalError("an adapter or model outside a run directory needs a place for its results "
                        "(hint: pass --out DIR)")
    return target.run_dir / EVAL


def _plan_jobs(target: Target, dtype: str | None, device: str, quantized: str, log) -> list[Job]:
    """Every adapter on the full-precision base (the base alone when there is none), then a QLoRA run's adapters on
    their 4-bit base as trained."""
    if not target.adapters:
        return [Job(BASE_RESULTS, None, model_args(target, None, dtype))]
    jobs = [Job(results_name(kind), kind, model_args(target, path, dtype)) for kind, path in target.adapters.items()]
    if target.quantization == "4bit" and quantized != "never":
        jobs += _quantized_jobs(target, dtype, device, quantized, log)
    return jobs


def _quantized_jobs(target: Target, dtype: str | None, device: str, quantized: str, log) -> list[Job]:
    ok, why = bnb_4bit_supported(device)
    if not ok:
        if quantized == "require":
            raise EvalError(f"4-bit evaluation requested but bitsandbytes cannot run 4-bit on {device}: {why} "
                            "(hint: --quantized auto skips it, or evaluate on a CUDA device)")
        log(f"[eval] skipping the 4-bit evaluation of this QLoRA adapter: bitsandbytes on {device}: {why}")
        return []
    from hiddenkey_ds.models.loading import quantization_config

    recipe = target.recipe
    if device == "cpu":  # bf16 matmuls are slow on most CPUs; the 4-bit weights are the point
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "fp32"})})
    quant = quantization_config(recipe)
    return [Job(results_name(kind, quantized=True), kind,
                {**model_args(target, path, dtype), "quantization_config": quant})
            for kind, path in target.adapters.items()]


def _announce(job: Job, tasks: list[str], stock: str | None, log) -> None:
    log(f"[eval] {job.name}: base={job.margs['pretrained']} adapter={job.margs.get('peft', '-')} "
        f"tasks={','.join(tasks)}")
    if stock:
        log(f"[eval] stock equivalent: {stock}")


def _run_job(job: Job, tasks: list[str], metadata: dict[str, str], limit: float | None, batch_size: int,
             device: str, quantized: str, log, include: Path = TASKS_DIR) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(results, facts), or None when `--quantized auto` lets a 4-bit evaluation that bitsandbytes refuses go."""
    if not (job.quantized and quantized == "auto"):
        return _evaluate(job.margs, tasks, metadata, limit, batch_size, device, include)
    try:
        return _evaluate(job.margs, tasks, metadata, limit, batch_size, device, include)
    except (AssertionError, RuntimeError, ValueError, NotImplementedError, ImportError) as err:
        # bitsandbytes' CPU and older-GPU kernels reject some shapes/dtypes only when they run
        log(f"[eval] skipping the 4-bit evaluation: bitsandbytes failed on {device}: "
            f"{type(err).__name__}: {err} (--quantized require makes this an error)")
        return None


def _provenance(target: Target, job: Job, tasks: list[str], metadata: dict[str, str], limit: float | None,
                batch_size: int, device: str, stock: str | None,
                scored: dict[str, Any] | None = None) -> dict[str, Any]:
    """What was scored and how: the "hiddenkey_ds" block of a results file (report and sweep read it). The step is
    the adapter's own (its hiddenkey_ds.json), else the run summary's."""
    step = (scored or {}).get("step")
    return {
        "base": target.base, "pretrained": job.margs["pretrained"],
        "adapter": job.margs.get("peft"), "adapter_kind": job.kind,
        "step": step if step is not None else target.step_of(job.kind),
        "adapter_sha256": (scored or {}).get("sha256"),
        "best_validation": (target.summary or {}).get("best") if job.kind == "best" else None,
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "tasks": tasks, "task_metadata": metadata, "limit": limit, "batch_size": batch_size, "device": device,
        "quantization": "4bit" if job.quantized else "none", "stock_command": stock,
    }


@contextmanager
def run_dir_lock(target: str, out_dir: str | None):
    """One writer per run directory. Refuses at once (without touching anything) a run a live process is writing;
    yields the lock an evaluation writing the run's eval/ takes once its checks have passed (run_eval(lock=...)),
    or None: results written elsewhere (--out), a model name, a lone adapter. Released on the way out."""
    path = Path(target).expanduser()
    if not (is_run_dir(path) or (path / LOCK).exists()):
        yield None
        return
    lock = RunLock(path, "hiddenkey-ds eval")
    _locked(lock.check, target)
    try:
        yield lock if out_dir is None else None
    finally:
        lock.release()


def _locked(step, target) -> None:
    try:
        step(key=f"eval {target}", hint="evaluate it once that process has finished")
    except RunDirLocked as err:
        raise EvalError(err.problems[0]) from None


def _parse_data_dirs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, path = value.partition("=")
        if sep:
            out[key if key.endswith("_dir") else f"{key}_dir"] = path
        else:
            out["data_dir"] = value  # one directory for every local task
    return out


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """The options, checked before any model or task loads (lm-eval would take a bad one hours later, or silently)."""
    import math

    problems = []
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        problems.append(f"--limit {args.limit:g}: give a number of examples (>= 1) or a fraction in (0, 1) (hint: "
                        "--limit 100, or leave it out to score every example)")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: must be >= 1 (hint: leave it out for the run's "
                        "eval.batch_size)")
    if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
        problems.append(f"--tasks {args.tasks!r} names no task (hint: e.g. --tasks hk_rte, or leave it out for the "
                        "run's tasks)")
    for value in args.data_dir:
        directory = value.partition("=")[2] if "=" in value else value
        if not Path(directory).expanduser().is_dir():
            problems.append(f"--data-dir {value}: {directory!r} is not a directory (hint: the directory holding the "
                            "task's train/dev files, e.g. rte=../shared/data/glue/RTE)")
    if args.out is not None:
        out = Path(args.out).expanduser()
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            problems.append(f"--out {args.out}: {'is' if existing == out else 'lies under'} the file {existing}, not "
                            "a directory (hint: choose another --out)")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            device = None
        if device is None:
            problems.append(f"--device {args.device!r} is not a device (hint: cpu, cuda or cuda:N)")
        elif device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {args.device}: this machine has no CUDA device (hint: --device cpu)")
    if args.dtype is not None and args.dtype != "auto":
        import torch

        if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
            problems.append(f"--dtype {args.dtype!r} is not a torch dtype (hint: bfloat16, float16, float32 or auto)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hiddenkey-ds eval", description="Evaluate a run directory, an adapter, or a base model with lm-eval."
    )
    parser.add_argument("target", help="run directory, PEFT adapter directory, or (with --base-only) a model name")
    parser.add_argument("--adapter", choices=ADAPTER_CHOICES,
                        help="a run's adapter(s): final (adapter/ -> eval/results.json), best (adapter_best/ -> "
                             "eval/results_best.json) or both; default: both when the run kept adapter_best/")
    parser.add_argument("--tasks",
                        help="comma-separated lm-eval tasks (default: the run's eval.tasks, else its training task)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1); for quick checks only")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"default: the run's eval.batch_size, else {EvalSection().batch_size}")
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
    try:
        problems = _argument_problems(args)
        if problems:
            raise EvalError(problems[0] if len(problems) == 1 else
                            f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        with run_dir_lock(args.target, args.out) as lock:
            run_eval(args.target, tasks, limit, args.batch_size, base_only=args.base_only, base=args.base,
                     data_dirs=_parse_data_dirs(args.data_dir), device=args.device, out_dir=args.out,
                     dtype=args.dtype, quantized=args.quantized, adapter=args.adapter, lock=lock)
    except EvalError as err:
        print(f"hiddenkey-ds eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
