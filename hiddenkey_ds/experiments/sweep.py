"""`hiddenkey-ds sweep SWEEP.yaml`: a grid of methods x seeds x tasks, run one after another, then the report.

A sweep file (see recipes/sweeps/ and docs/reports.md):

    name: paper-rte
    out_dir: runs/sweeps/paper-rte       # runs land in OUT/runs/TASK-METHOD-seedS, the report in OUT/report
    recipe: recipes/smollm2-rte-lora.yaml
    ranks: 2                             # > 1: the `deepspeed` launcher with that many ranks; 1: plain python
    methods:                             # name -> key=value overrides on the recipe, or a mapping:
      lora: [dropout.preset=none]
      hiddenkey:                         #   recipe: (its own recipe), overrides:, grid: (named axes)
        overrides: [dropout.preset=hiddenkey]
        grid:                            # expands into hiddenkey-k0.05-a1, hiddenkey-k0.05-a2, ...
          k: {key: dropout.key.rate, values: [0.05, 0.1]}
          a: {key: dropout.alpha, values: [1, 2]}
    seeds: [0, 1, 2]
    tasks:                               # name -> overrides that select the data
      rte: [data.task=rte, data.path=../shared/data/glue/RTE]
    overrides: [train.max_steps=200]     # applied to every run (before the task's and the method's)
    eval: {base: true, limit: null, batch_size: 16, tasks: null, adapter: null}
    baseline: lora                       # what the report compares with (default: the method named lora)
    primary: best                        # which score leads the report: best (validation checkpoint) or final

Every run gets `run.label=METHOD`, so reports group runs by the sweep's method name. The file is validated with
pydantic before anything runs, and so is the recipe of every (task, method) pair: every problem is listed at once.

Re-running the same file is safe: finished runs (summary.json) are skipped, an interrupted run is resumed from
its newest complete checkpoint (run.resume=true), and evaluations whose results JSON exists are not redone,
unless it is stale: it records another adapter (sha256) than the finished run's, e.g. an `eval --adapter best`
made while the run was still training.
`--only task=rte,method=lora` runs a subset. For a sweep with grid methods, `--select` (also done after every
full pass) picks per task and grid the setting with the best mean over seeds of the best validation accuracy.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hiddenkey_ds.distributed import free_port, single_process_env
from hiddenkey_ds.evaluation import command
from hiddenkey_ds.run_dir import BASE_RESULTS, EVAL, is_finished, is_run_dir, results_name

if TYPE_CHECKING:
    from hiddenkey_ds.config import Recipe

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # method / task names become directory names
ADAPTER = Literal["final", "best", "both"]


class SweepError(RuntimeError):
    """A problem with the sweep's input (file, recipes, --only): exit status 2, nothing run or written."""


class RunFailed(SweepError):
    """A training or evaluation subprocess failed: exit status 1."""


# -- the sweep file, validated ------------------------------------------------------------------------------

def _check_override(value: str) -> str:
    from hiddenkey_ds.config.keys import check_key

    key, sep, _ = value.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{value!r} is not KEY=VALUE (hint: e.g. train.lr=3e-4 or dropout.preset=hiddenkey)")
    problem = check_key(key.strip().split("."))
    if problem:
        raise ValueError(f"{value!r}: {problem}")
    return value


def _check_key(value: str) -> str:
    from hiddenkey_ds.config.keys import check_key

    problem = check_key(value.split("."))
    if problem:
        raise ValueError(problem)
    return value


def _check_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"name {value!r}: use letters, digits and . _ + - (it names run directories), "
                         "starting with a letter or digit")
    return value


Override = Annotated[str, AfterValidator(_check_override)]
RecipeKey = Annotated[str, AfterValidator(_check_key)]
Name = Annotated[str, AfterValidator(_check_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridAxis(_Strict):
    key: RecipeKey = Field(description="recipe key the axis sets, e.g. dropout.key.rate")
    values: list[Any] = Field(min_length=1, description="values tried, in order")


class MethodSpec(_Strict):
    recipe: str | None = Field(None, description="this method's recipe (default: the sweep's `recipe`)")
    overrides: list[Override] = Field(default_factory=list)
    grid: dict[Name, GridAxis] = Field(
        default_factory=dict, description="axis short name -> {key, values}; the method expands into one method "
        "per combination, named METHOD-<axis><value>-...")


class EvalSpec(_Strict):
    base: bool = Field(True, description="also evaluate the base model without adapter, once per task")
    limit: int | float | None = Field(None, gt=0, description="lm-eval examples per task (a fraction if < 1)")
    batch_size: int | None = Field(None, gt=0, description="lm-eval batch size (default: the run's eval.batch_size)")
    tasks: list[str] | None = Field(None, description="lm-eval tasks (default: each run's training task)")
    adapter: ADAPTER | None = Field(None, description="final, best or both (default: both when the run kept one)")


def _as_method(value: Any) -> Any:
    return {"overrides": value} if value is None or isinstance(value, list) else value


class SweepFile(_Strict):
    name: str | None = None
    out_dir: str
    recipe: str | None = None
    ranks: int = Field(1, ge=1)
    methods: dict[Name, MethodSpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    tasks: dict[Name, list[Override]] = Field(min_length=1)
    overrides: list[Override] = Field(default_factory=list)
    eval: EvalSpec = EvalSpec()
    report: bool = True
    baseline: str | None = None
    primary: Literal["best", "final"] = "best"

    @field_validator("methods", mode="before")
    @classmethod
    def _method_lists(cls, value: Any) -> Any:
        # `lora: [a=b]` is shorthand for `lora: {overrides: [a=b]}`
        return {k: _as_method(v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_lists(cls, value: Any) -> Any:
        return {k: ([] if v is None else v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        dupes = sorted({s for s in value if value.count(s) > 1})
        if dupes:
            raise ValueError(f"seeds must be distinct integers; {dupes} repeat")
        return value

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("a sweep file is a mapping (name, out_dir, recipe, methods, seeds, tasks, ...)")
        return value


_MODELS_AT = {"": SweepFile, "eval": EvalSpec, "methods.*": MethodSpec, "methods.*.grid.*": GridAxis}
_TYPE_HINTS = {"list_type": "a list such as [a=1, b=2]", "dict_type": "a mapping", "int_type": "a whole number",
               "int_parsing": "a whole number", "bool_type": "true or false", "bool_parsing": "true or false",
               "string_type": "a string", "model_type": "a mapping", "float_type": "a number"}


def _format_errors(err: ValidationError) -> list[str]:
    """One line per problem, each with a hint, in the dotted key of the sweep file."""
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = ".".join("*" if (i % 2 and loc[0] == "methods") else p for i, p in enumerate(loc[:-1]))
            model = _MODELS_AT.get(parent)
            known = list(model.model_fields) if model else []
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
            lines.append(f"{path}: unknown key (hint: {hint})")
        elif kind == "missing":
            lines.append(f"{path}: required (hint: add `{loc[-1]}:` to the sweep file)")
        elif kind in _TYPE_HINTS:
            lines.append(f"{path}: expected {_TYPE_HINTS[kind]}, got {e.get('input')!r}")
        elif kind == "too_short":
            lines.append(f"{path}: must not be empty (hint: give at least one entry)")
        else:
            lines.append(f"{path}: {msg}" + ("" if "hint" in msg else f", got {e.get('input')!r}"))
    return lines


# -- the plan -----------------------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    recipe: Path
    overrides: list[str]
    family: str | None = None                          # the grid method it was expanded from
    grid: dict[str, Any] = field(default_factory=dict)  # axis short name -> value of this setting


@dataclass
class Sweep:
    name: str
    out_dir: Path
    ranks: int
    methods: list[Method]
    seeds: list[int]
    tasks: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: bool = True
    baseline: str | None = None
    primary: str = "best"

    def runs(self) -> list["PlannedRun"]:
        return [PlannedRun(self, task, method, seed)
                for task in self.tasks for method in self.methods for seed in self.seeds]

    @property
    def log_dir(self) -> Path:
        """Each child's output, one file per training and evaluation (the run directories hold what they wrote)."""
        return self.out_dir / "logs"

    @property
    def grid_families(self) -> dict[str, list[Method]]:
        out: dict[str, list[Method]] = {}
        for m in self.methods:
            if m.family is not None:
                out.setdefault(m.family, []).append(m)
        return out


def _label_override(name: str) -> str:
    # `run.label=1` or `=true` would be read as a number / bool: quote what YAML would not read as a string
    return f"run.label={name}" if isinstance(yaml.safe_load(name), str) else f"run.label='{name}'"


@dataclass
class PlannedRun:
    sweep: Sweep
    task: str
    method: Method
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method.name}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.sweep.out_dir / "runs" / self.name

    @property
    def state(self) -> str:
        if is_finished(self.run_dir):
            return "finished"
        return "interrupted" if self.run_dir.is_dir() and any(self.run_dir.iterdir()) else "new"

    def recipe_overrides(self) -> list[str]:
        """Overrides in order of precedence (later wins): sweep, task, method, then the run's identity."""
        return [*self.sweep.overrides, *self.sweep.tasks[self.task], *self.method.overrides,
                _label_override(self.method.name), f"run.seed={self.seed}", f"run.output_dir={self.run_dir}",
                "eval.at_end=false"]

    def train_args(self) -> list[str]:
        """Recipe + overrides; the run's seed, directory and the sweep's evaluation policy come last."""
        args = [str(self.method.recipe), *self.recipe_overrides()]
        if self.state == "interrupted":
            args.append("run.resume=true")
        return args


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _expand(name: str, spec: MethodSpec, recipe: Path) -> list[Method]:
    if not spec.grid:
        return [Method(name, recipe, list(spec.overrides))]
    axes = list(spec.grid.items())
    out = []
    for combo in itertools.product(*(axis.values for _, axis in axes)):
        grid = {short: value for (short, _), value in zip(axes, combo)}
        suffix = "-".join(f"{short}{_fmt(value)}" for short, value in grid.items())
        overrides = [*spec.overrides, *(f"{axis.key}={json.dumps(value)}" for (_, axis), value in zip(axes, combo))]
        out.append(Method(f"{name}-{suffix}", recipe, overrides, family=name, grid=grid))
    return out


def _load_recipes(sweep: Sweep) -> tuple[dict[tuple[str, str], Recipe], list[str]]:
    """The recipe of every (task, method) pair, loaded as its runs will load it (through the schema and the start-up
    checks), and the problems found; a problem shared by many pairs is listed once, with how many it affects."""
    from hiddenkey_ds.config import RecipeError, load_recipe

    recipes: dict[tuple[str, str], Recipe] = {}
    seen: dict[str, list[str]] = {}
    for task in sweep.tasks:
        for method in sweep.methods:
            run = PlannedRun(sweep, task, method, sweep.seeds[0])
            try:
                recipes[(task, method.name)] = load_recipe(method.recipe, run.recipe_overrides(),
                                                           world_size=sweep.ranks, check_output_dir=False)
            except RecipeError as err:
                for problem in err.problems:
                    seen.setdefault(problem, []).append(f"{task}/{method.name}")
    out = []
    for problem, where in seen.items():
        at = where[0] if len(where) == 1 else f"{where[0]} and {len(where) - 1} other task/method pair(s)"
        out.append(f"the recipe of {at}: {problem}")
    return recipes, out


def load_recipes(sweep: Sweep) -> dict[tuple[str, str], Recipe]:
    """(task, method name) -> its validated Recipe; one SweepError lists every problem (for a sweep built in code,
    such as the demo's; load_sweep runs the same check on a sweep file)."""
    recipes, problems = _load_recipes(sweep)
    if problems:
        raise _problems(sweep.name, problems)
    return recipes


def load_sweep(path: str | Path, check_recipes: bool = True) -> Sweep:
    """Read and validate a sweep file; one SweepError lists every problem (nothing is run or written)."""

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise SweepError(f"cannot read sweep file {p}: {err.strerror} (hint: sweep files live in "
                         "recipes/sweeps/)") from None
    except UnicodeDecodeError as err:
        raise SweepError(f"sweep file {p} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}) (hint: a sweep file is YAML text, see recipes/sweeps/; re-encode it as "
                         "UTF-8)") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{p} is not valid YAML: {err} (hint: fix it at the line and column named; a file cut off "
                         "ends inside an open bracket or quote)") from None
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise _problems(p, _format_errors(err)) from None
    problems: list[str] = []
    methods: list[Method] = []
    for name, m in spec.methods.items():
        recipe = m.recipe or spec.recipe
        if not recipe:
            problems.append(f"methods.{name}: no recipe (hint: set `recipe:` at the top or in the method)")
            continue
        if not Path(recipe).is_file():
            problems.append(f"methods.{name}: recipe {recipe} does not exist (hint: paths are relative to the "
                            f"working directory, {Path.cwd()})")
            continue
        methods.extend(_expand(name, m, Path(recipe)))
    names = [m.name for m in methods]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"methods: two methods are named {dup!r} (a grid setting's name collides with another "
                        "method) (hint: rename one)")
    for m in methods:
        if not NAME_PATTERN.match(m.name):
            problems.append(f"methods.{m.family}: grid setting name {m.name!r} is not a valid directory name "
                            "(hint: grid values should be numbers or short words)")
    if spec.baseline is not None and spec.baseline not in names and not problems:
        problems.append(f"baseline: {spec.baseline!r} is not a method of this sweep (hint: one of {', '.join(names)})")
    sweep = Sweep(spec.name or p.stem, Path(spec.out_dir), spec.ranks, methods, list(spec.seeds),
                  {t: list(o) for t, o in spec.tasks.items()}, list(spec.overrides), spec.eval,
                  spec.report, spec.baseline, spec.primary)
    if check_recipes and not problems:
        problems += _load_recipes(sweep)[1]
    if problems:
        raise _problems(p, problems)
    return sweep


def _problems(source: Path | str, problems: list[str]) -> SweepError:
    n = len(problems)
    return SweepError(f"{source}: {n} problem{'s' if n != 1 else ''}:\n" + "\n".join(f"  - {x}" for x in problems))


# -- subsets: --only ----------------------------------------------------------------------------------------

ONLY_KEYS = ("task", "method", "seed")


def parse_only(text: str | None, sweep: Sweep) -> dict[str, list[str]]:
    """`task=rte,method=lora,method=hiddenkey-*,seed=0`: the same key ORs, different keys AND. A method matches by
    name, by its grid's name (all its settings) or by a shell pattern."""
    if not text:
        return {}
    wanted: dict[str, list[str]] = {}
    problems = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = part.partition("=")
        if not sep or key not in ONLY_KEYS or not value:
            problems.append(f"--only {part!r}: expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)} "
                            "(hint: --only task=rte,method=lora)")
            continue
        wanted.setdefault(key, []).append(value)
    choices = {"task": list(sweep.tasks), "seed": [str(s) for s in sweep.seeds],
               "method": [m.name for m in sweep.methods] + list(sweep.grid_families)}
    for key, values in wanted.items():
        for value in values:
            if not fnmatch.filter(choices[key], value):
                problems.append(f"--only {key}={value}: matches no {key} of this sweep (hint: one of "
                                f"{', '.join(choices[key])})")
    if problems:
        raise SweepError("\n".join(problems))
    return wanted


def selected(run: PlannedRun, only: dict[str, list[str]]) -> bool:
    facts = {"task": [run.task], "seed": [str(run.seed)], "method": [run.method.name, run.method.family or ""]}
    return all(any(fnmatch.fnmatchcase(f, pattern) for f in facts[key] for pattern in patterns)
               for key, patterns in only.items())


# -- running ------------------------------------------------------------------------------------------------

def train_command(run: PlannedRun) -> list[str]:
    if run.sweep.ranks == 1:
        return [sys.executable, "-m", "hiddenkey_ds.train", *run.train_args()]
    # --no_local_rank: ranks read LOCAL_RANK from the environment the launcher sets
    return ["deepspeed", "--num_gpus", str(run.sweep.ranks), "--master_port", str(free_port()), "--no_local_rank",
            "--module", "hiddenkey_ds.train", *run.train_args()]


def eval_command(run_dir: Path, sweep: Sweep, base_only: bool = False, adapter: str | None = None) -> list[str]:
    ev = sweep.eval
    return command.eval_command(run_dir, tasks=ev.tasks or (), limit=ev.limit, batch_size=ev.batch_size,
                                adapter=adapter, base_only=base_only)


def missing_evaluations(run_dir: Path, adapter: str | None, log=None) -> str | None:
    """The --adapter value that evaluates what a finished run still lacks or holds stale (None: nothing to do).

    Stale: a results file that scored another adapter than the run's (an `eval --adapter best` while the run was
    still training, see harness.stale_reason); `log` (when given) gets why it is evaluated again."""
    from hiddenkey_ds.evaluation.harness import EvalError, chosen_kinds

    try:
        kinds = chosen_kinds(run_dir, adapter)
    except EvalError as err:
        raise RunFailed(str(err)) from None
    todo = [k for k in kinds if not (run_dir / EVAL / results_name(k)).is_file() or _stale(run_dir, k, log)]
    if not todo:
        return None
    return todo[0] if len(todo) == 1 else "both"


def _stale(run_dir: Path, kind: str, log=None) -> bool:
    from hiddenkey_ds.evaluation.harness import stale_reason

    current: dict[str, dict[str, Any]] = {}
    for name in (results_name(kind), results_name(kind, quantized=True)):
        path = run_dir / EVAL / name
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # the report names an unreadable file; evaluating again is not the fix for a hand edit
        reason = stale_reason(run_dir, results, str(path), current)
        if reason:
            if log is not None:
                log(f"[sweep] {reason}; evaluating it again")
            return True
    return False


def _child_env(ranks: int) -> dict[str, str]:
    # every child starts its own world (deepspeed) or none: it must not join one the sweep itself may run in
    env = single_process_env(dict(os.environ))
    # CPU ranks share the cores: without a cap every rank starts one thread per core and they thrash
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str], what: str, log=print) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[sweep] {what}: {shlex.join(cmd)}")
    log(f"[sweep]   log: {log_path}")
    started = time.time()
    with open(log_path, "a") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RunFailed(
            f"{what} failed (exit {rc}) after {time.time() - started:.0f} s; last lines of {log_path}:\n{tail}"
            "(hint: fix the cause and re-run the same command: finished work is kept, this run resumes)")
    log(f"[sweep]   done in {time.time() - started:.0f} s")


def run_sweep(sweep: Sweep, dry_run: bool = False, log=print, only: dict[str, list[str]] | None = None,
              evaluate: bool = True) -> Path | None:
    """Train, evaluate and report every run of the grid (or the `only` subset); returns the report path (None
    without a report). `evaluate=False` trains only: a grid stage that is chosen on validation needs no lm-eval,
    and a later run of the same sweep evaluates what is then selected."""
    every = sweep.runs()
    runs = [r for r in every if selected(r, only or {})]
    subset = f", {len(runs)} selected by --only" if only else ""
    log(f"[sweep] {sweep.name}: {len(every)} runs ({len(sweep.tasks)} tasks x {len(sweep.methods)} methods x "
        f"{len(sweep.seeds)} seeds){subset} in {sweep.out_dir}")
    if dry_run:
        _log_plan(sweep, runs, log)
        return None
    env, eval_env = _child_env(sweep.ranks), _child_env(1)  # lm-eval is one process: it gets every core
    for i, run in enumerate(runs, 1):
        head = f"run {i}/{len(runs)} {run.name}"
        _train(run, head, env, log)
        if evaluate:
            _evaluate_run(run, head, eval_env, log)
    if sweep.eval.base and evaluate:
        _evaluate_base_models(sweep, runs, eval_env, log)
    extra = [_select_grid_settings(sweep, log)] if sweep.grid_families else []
    return _write_sweep_report(sweep, extra, log) if sweep.report else None


def _log_plan(sweep: Sweep, runs: list[PlannedRun], log) -> None:
    """--dry-run: what each run would do, nothing started."""
    for i, run in enumerate(runs, 1):
        head = f"run {i}/{len(runs)} {run.name}"
        state = run.state
        if state != "finished":
            log(f"[sweep] {head} ({state}): {shlex.join(train_command(run))}")
            continue
        log(f"[sweep] {head}: finished already, skipped")
        todo = missing_evaluations(run.run_dir, sweep.eval.adapter, log)
        if todo:
            log(f"[sweep] {head}: would evaluate: {shlex.join(eval_command(run.run_dir, sweep, adapter=todo))}")


def _train(run: PlannedRun, head: str, env: dict[str, str], log) -> None:
    """Train a new run, resume an interrupted one, leave a finished one alone."""
    state = run.state
    if state == "finished":
        log(f"[sweep] {head}: finished already, skipped")
        return
    _run_logged(train_command(run), run.sweep.log_dir / f"{run.name}.log", env,
                f"{head}: {'resuming' if state == 'interrupted' else 'training'}", log)


def _evaluate_run(run: PlannedRun, head: str, env: dict[str, str], log) -> None:
    """lm-eval the adapters of a finished run that have no results file yet."""
    todo = missing_evaluations(run.run_dir, run.sweep.eval.adapter, log)
    if todo:
        _run_logged(eval_command(run.run_dir, run.sweep, adapter=todo), run.sweep.log_dir / f"{run.name}.eval.log",
                    env, f"{head}: lm-eval ({todo} adapter{'s' if todo == 'both' else ''})", log)


def _evaluate_base_models(sweep: Sweep, runs: list[PlannedRun], env: dict[str, str], log) -> None:
    every = sweep.runs()
    for task in dict.fromkeys(r.task for r in runs):
        # one "before" row per task, kept in a run directory of the task where the report finds it
        of_task = [r for r in every if r.task == task]
        if any((r.run_dir / EVAL / BASE_RESULTS).is_file() for r in of_task):
            continue
        home = next(r for r in of_task if is_run_dir(r.run_dir))
        _run_logged(eval_command(home.run_dir, sweep, base_only=True), sweep.log_dir / f"{task}-base.eval.log",
                    env, f"{task}: lm-eval of the base model", log)


def _select_grid_settings(sweep: Sweep, log) -> str:
    """Choose each grid's setting on validation, write selection.{json,md}; returns the report's section."""
    selection = select(sweep)
    path = write_selection(sweep, selection)
    log(f"[sweep] validation selection: {path}")
    return render_selection(selection)


def _write_sweep_report(sweep: Sweep, extra: list[str], log) -> Path:
    """The report of every run trained so far, grouped by the sweep's method and task names."""
    from hiddenkey_ds.experiments.report import ReportError, write_report

    started = [r for r in sweep.runs() if is_run_dir(r.run_dir)]
    try:
        report = write_report([r.run_dir for r in started], sweep.out_dir / "report",
                              labels={str(r.run_dir): r.method.name for r in started},
                              tasks={str(r.run_dir): r.task for r in started}, primary=sweep.primary,
                              baseline=sweep.baseline, extra_sections=extra)
    except ReportError as err:
        raise SweepError(f"the runs are done but the report failed: {err}") from None
    log(f"[sweep] report: {report.resolve()}")
    return report


# -- choosing a grid setting on the validation split ---------------------------------------------------------

CRITERION = ("mean over seeds of each run's best validation accuracy (summary.json `best`, else metrics.jsonl), "
             "ties: lower mean validation loss at those steps; lm-eval scores are never used")


def select(sweep: Sweep, only: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Per task and grid method: every setting's best validation accuracy per seed, and the setting chosen.

    Settings are compared on one set of seeds: those of `only` (seed=...), else every seed that any setting of the
    grid has finished on that task (so a grid stage run with --only seed=0,seed=1 is judged on seeds 0 and 1). A
    setting missing one of them is listed, not chosen."""
    if not sweep.grid_families:
        raise SweepError("this sweep has no grid methods: --select picks among a grid's settings (hint: give a "
                         "method a `grid:` of axes)")
    only = only or {}
    if "method" in only:
        raise SweepError("--select compares every setting of each grid: --only takes task= and seed= here, "
                         "not method=")
    seeds = [s for s in sweep.seeds if not only.get("seed") or any(fnmatch.fnmatchcase(str(s), p)
                                                                     for p in only["seed"])]
    tasks = [t for t in sweep.tasks if not only.get("task") or any(fnmatch.fnmatchcase(t, p) for p in only["task"])]
    out: dict[str, Any] = {"sweep": sweep.name, "criterion": CRITERION, "tasks": {}}
    for task in tasks:
        for family, settings in sweep.grid_families.items():
            out["tasks"].setdefault(task, {})[family] = _select_setting(sweep, task, settings, seeds,
                                                                        seeds_given=bool(only.get("seed")))
    return out


def _select_setting(sweep: Sweep, task: str, settings: list[Method], seeds: list[int],
                    seeds_given: bool) -> dict[str, Any]:
    """One grid on one task: every setting judged on the same seeds, the best complete one chosen."""
    run_dirs = {(m.name, seed): PlannedRun(sweep, task, m, seed).run_dir for m in settings for seed in seeds}
    finished = {key: run_dir for key, run_dir in run_dirs.items() if is_finished(run_dir)}
    judged = seeds if seeds_given else [s for s in seeds if any(k[1] == s for k in finished)]
    warnings: set[str] = set()
    candidates = [_candidate(m, {s: finished[(m.name, s)] for s in judged if (m.name, s) in finished}, judged,
                             warnings) for m in settings]
    complete = [c for c in candidates if c["complete"]]
    chosen = min(complete, key=lambda c: (-c["mean_accuracy"], c["mean_loss"] if c["mean_loss"] is not None
                                          else float("inf"), c["method"])) if complete else None
    incomplete = [c["method"] for c in candidates if not c["complete"]]
    if incomplete and judged:
        warnings.add(f"{len(incomplete)} setting(s) lack one of seeds {judged} and were not considered: "
                     f"{', '.join(incomplete[:4])}{' ...' if len(incomplete) > 4 else ''}")
    return {"chosen": chosen["method"] if chosen else None,
            "grid": chosen["grid"] if chosen else None,
            "overrides": chosen["overrides"] if chosen else None,
            "mean_best_val_accuracy": chosen["mean_accuracy"] if chosen else None,
            "seeds": judged, "candidates": candidates, "warnings": sorted(warnings)}


def _candidate(setting: Method, run_dirs: dict[int, Path], judged: list[int], warnings: set[str]) -> dict[str, Any]:
    """A setting's best validation accuracy and loss per finished seed (`run_dirs`), their means, and whether it
    has every judged seed; what makes the comparison doubtful goes into `warnings`."""
    from hiddenkey_ds.experiments.report import ReportError, load_run

    accs, losses, done = {}, {}, []
    for seed, run_dir in run_dirs.items():
        try:
            run = load_run(run_dir, setting.name)
        except ReportError as err:
            raise SweepError(str(err)) from None
        best = run.best_validation()
        if best is None:
            warnings.add(f"{run_dir} has no validation accuracy (hint: train with a validation split: "
                         "data.validation_from_train)")
            continue
        if not run.recipe.data.validation_from_train:
            warnings.add("the validation split is not carved from the training data: choosing on it "
                         "is choosing on evaluation data (hint: data.validation_from_train)")
        accs[seed], losses[seed] = best["accuracy"], best["loss"]
        done.append(seed)
    known_losses = [v for v in losses.values() if v is not None]
    return {"method": setting.name, "grid": setting.grid, "overrides": setting.overrides, "seeds": done,
            "best_val_accuracy": [accs[s] for s in done], "best_val_loss": [losses[s] for s in done],
            "mean_accuracy": statistics.fmean(accs.values()) if accs else None,
            "mean_loss": statistics.fmean(known_losses) if known_losses else None,
            "complete": bool(judged) and len(done) == len(judged)}


def render_selection(selection: dict[str, Any]) -> str:
    lines = ["## Validation selection of grid settings", "", f"Criterion: {selection['criterion']}.", ""]
    for task, families in selection["tasks"].items():
        for family, s in families.items():
            lines += [f"### {task} / {family}: " + (f"**{s['chosen']}**" if s["chosen"] else "no complete setting yet")
                      + f" (seeds {', '.join(map(str, s['seeds'])) or 'none finished'})", ""]
            if s["chosen"]:
                lines += [f"Overrides: `{' '.join(s['overrides'])}`; its runs alone: "
                          f"`--only task={task},method={s['chosen']}`", ""]
            axes = list(s["candidates"][0]["grid"]) if s["candidates"] else []
            lines += ["| setting | " + " | ".join(axes) + " | seeds | best val acc per seed (%) | mean (%) "
                      "| mean val loss |", "|---|" + "---|" * len(axes) + "---|---|---|---|"]
            for c in sorted(s["candidates"], key=lambda c: -(c["mean_accuracy"] if c["mean_accuracy"] is not None
                                                             else -1)):
                star = " ★" if c["method"] == s["chosen"] else ""
                per_seed = ", ".join(f"{100 * a:.1f}" for a in c["best_val_accuracy"]) or "—"
                mean = "—" if c["mean_accuracy"] is None else f"{100 * c['mean_accuracy']:.2f}"
                loss = "—" if c["mean_loss"] is None else f"{c['mean_loss']:.4f}"
                lines.append(f"| {c['method']}{star} | " + " | ".join(_fmt(c["grid"][a]) for a in axes)
                             + f" | {len(c['seeds'])}/{len(s['seeds'])} | {per_seed} | {mean} | {loss} |")
            lines += [""] + [f"Note: {w}" for w in s["warnings"]] + ([""] if s["warnings"] else [])
    return "\n".join(lines) + "\n"


def write_selection(sweep: Sweep, selection: dict[str, Any]) -> Path:
    from hiddenkey_ds.experiments.report import strict_json

    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.out_dir / "selection.json"
    path.write_text(json.dumps(strict_json(selection), indent=2, allow_nan=False) + "\n")
    (sweep.out_dir / "selection.md").write_text(render_selection(selection))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenkey-ds sweep",
                                     description="Run a methods x seeds x tasks grid, then report.")
    parser.add_argument("sweep", help="sweep YAML (see recipes/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run states, run nothing")
    parser.add_argument("--only", metavar="KEY=VALUE,...",
                        help="run a subset: task=, method= (a name, a grid's name, or a pattern such as "
                             "hiddenkey-k0.1-*), seed=; the same key twice = either, e.g. method=lora,method=dropkey")
    parser.add_argument("--select", action="store_true",
                        help="run nothing: pick each grid's setting per task by mean best validation accuracy over "
                             "seeds (those of --only seed=..., else every seed the grid has finished); print it and "
                             "write OUT/selection.json")
    parser.add_argument("--no-eval", action="store_true",
                        help="train (and select, report) only: no lm-eval, e.g. for a grid stage chosen on validation")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        only = parse_only(args.only, sweep)
        if args.select:
            selection = select(sweep, only)
            text = render_selection(selection)
            path = write_selection(sweep, selection)
            print(text)
            print(f"selection: {path.resolve()}")
            return 0
        report = run_sweep(sweep, dry_run=args.dry_run, only=only, evaluate=not args.no_eval)
    except RunFailed as err:
        print(f"hiddenkey-ds sweep: error: {err}", file=sys.stderr)
        return 1
    except SweepError as err:
        print(f"hiddenkey-ds sweep: error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
