"""`hiddenkey-ds sweep SWEEP.yaml`: a grid of methods x seeds x tasks, run one after another, then the report.

A sweep file (see recipes/sweeps/):

    name: paper-rte
    out_dir: runs/sweeps/paper-rte       # runs land in OUT/runs/TASK-METHOD-seedS, the report in OUT/report
    recipe: recipes/smollm2-rte-lora.yaml
    ranks: 2                             # > 1: the `deepspeed` launcher with that many ranks; 1: plain python
    methods:                             # name -> key=value overrides on the recipe, or {recipe:, overrides:}
      lora: []
      hiddenkey: [dropout.preset=hiddenkey]
    seeds: [0, 1, 2]
    tasks:                               # name -> overrides that select the data
      rte: [data.task=rte, data.path=../shared/data/glue/RTE]
    overrides: [train.max_steps=200]     # applied to every run (before run.seed / run.output_dir)
    eval: {base: true, limit: null, batch_size: 16, tasks: null}   # tasks null: each run's training task

Re-running the same file is safe: finished runs (summary.json) are skipped, an interrupted run is resumed from
its newest complete checkpoint (run.resume=true), and evaluations whose results JSON exists are not redone.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"name", "out_dir", "recipe", "ranks", "methods", "seeds", "tasks", "overrides", "eval", "report"}
EVAL_KEYS = {"base", "limit", "batch_size", "tasks"}


class SweepError(RuntimeError):
    pass


@dataclass
class Method:
    name: str
    recipe: Path
    overrides: list[str]


@dataclass
class Sweep:
    name: str
    out_dir: Path
    ranks: int
    methods: list[Method]
    seeds: list[int]
    tasks: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    report: bool = True

    def runs(self) -> list["PlannedRun"]:
        return [PlannedRun(self, task, method, seed)
                for task in self.tasks for method in self.methods for seed in self.seeds]


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
        if (self.run_dir / "summary.json").is_file():
            return "finished"
        return "interrupted" if self.run_dir.is_dir() and any(self.run_dir.iterdir()) else "new"

    def train_args(self) -> list[str]:
        """Recipe + overrides; the run's seed, directory and the sweep's evaluation policy come last."""
        args = [str(self.method.recipe), *self.sweep.overrides, *self.sweep.tasks[self.task], *self.method.overrides,
                f"run.seed={self.seed}", f"run.output_dir={self.run_dir}", "eval.at_end=false"]
        if self.state == "interrupted":
            args.append("run.resume=true")
        return args


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{where}: expected a list of key=value strings, got {value!r}")
    return list(value)


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep file {p}: {err.strerror}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: a sweep file is a mapping (name, out_dir, recipe, methods, seeds, tasks, ...)")
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise SweepError(f"{p}: unknown key(s) {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("out_dir", "methods", "seeds", "tasks"):
        if not raw.get(key):
            raise SweepError(f"{p}: `{key}` is required and must not be empty")
    default_recipe = raw.get("recipe")
    methods = []
    for name, spec in raw["methods"].items():
        recipe = default_recipe
        if isinstance(spec, dict):
            extra = set(spec) - {"recipe", "overrides"}
            if extra:
                raise SweepError(f"{p}: methods.{name}: unknown key(s) {sorted(extra)} (recipe, overrides)")
            recipe, spec = spec.get("recipe", default_recipe), spec.get("overrides")
        if not recipe:
            raise SweepError(f"{p}: methods.{name} has no recipe: set `recipe:` at the top or in the method")
        if not Path(recipe).is_file():
            raise SweepError(
                f"{p}: methods.{name}: recipe {recipe} does not exist (paths are relative to {Path.cwd()})")
        methods.append(Method(str(name), Path(recipe), _overrides(spec, f"{p}: methods.{name}")))
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"{p}: seeds must be a list of distinct integers, got {seeds!r}")
    tasks = {str(t): _overrides(o, f"{p}: tasks.{t}") for t, o in raw["tasks"].items()}
    ev = raw.get("eval") or {}
    if set(ev) - EVAL_KEYS:
        raise SweepError(f"{p}: eval: unknown key(s) {sorted(set(ev) - EVAL_KEYS)}; known: {sorted(EVAL_KEYS)}")
    ranks = int(raw.get("ranks", 1))
    if ranks < 1:
        raise SweepError(f"{p}: ranks must be >= 1, got {ranks}")
    return Sweep(str(raw.get("name") or p.stem), Path(raw["out_dir"]), ranks, methods, seeds, tasks,
                 _overrides(raw.get("overrides"), f"{p}: overrides"), ev, bool(raw.get("report", True)))


def _free_port() -> int:
    # the launcher's default 29500 collides with any other job on the machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(run: PlannedRun) -> list[str]:
    if run.sweep.ranks == 1:
        return [sys.executable, "-m", "hiddenkey_ds.train", *run.train_args()]
    # --no_local_rank: ranks read LOCAL_RANK from the environment the launcher sets
    return ["deepspeed", "--num_gpus", str(run.sweep.ranks), "--master_port", str(_free_port()), "--no_local_rank",
            "--module", "hiddenkey_ds.train", *run.train_args()]


def eval_command(run_dir: Path, sweep: Sweep, base_only: bool = False) -> list[str]:
    ev = sweep.eval
    cmd = [sys.executable, "-m", "hiddenkey_ds.cli", "eval", str(run_dir)]
    if base_only:
        cmd.append("--base-only")
    if ev.get("tasks"):
        cmd += ["--tasks", ",".join(ev["tasks"])]
    if ev.get("limit") is not None:
        cmd += ["--limit", str(ev["limit"])]
    if ev.get("batch_size"):
        cmd += ["--batch-size", str(ev["batch_size"])]
    return cmd


def _child_env(ranks: int) -> dict[str, str]:
    env = dict(os.environ)
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
        raise SweepError(
            f"{what} failed (exit {rc}) after {time.time() - started:.0f} s; last lines of {log_path}:\n{tail}")
    log(f"[sweep]   done in {time.time() - started:.0f} s")


def run_sweep(sweep: Sweep, dry_run: bool = False, log=print) -> Path | None:
    """Train, evaluate and report every run of the grid; returns the report path (None without report)."""
    runs = sweep.runs()
    logs = sweep.out_dir / "logs"
    log(f"[sweep] {sweep.name}: {len(runs)} runs ({len(sweep.tasks)} tasks x {len(sweep.methods)} methods x "
        f"{len(sweep.seeds)} seeds) in {sweep.out_dir}")
    env, eval_env = _child_env(sweep.ranks), _child_env(1)  # lm-eval is one process: it gets every core
    for i, run in enumerate(runs, 1):
        state = run.state
        head = f"run {i}/{len(runs)} {run.name}"
        if state == "finished":
            log(f"[sweep] {head}: finished already, skipped")
        elif dry_run:
            log(f"[sweep] {head} ({state}): {shlex.join(train_command(run))}")
        else:
            _run_logged(train_command(run), logs / f"{run.name}.log", env,
                        f"{head}: {'resuming' if state == 'interrupted' else 'training'}", log)
        if dry_run:
            continue
        if not (run.run_dir / "eval" / "results.json").is_file():
            _run_logged(eval_command(run.run_dir, sweep), logs / f"{run.name}.eval.log", eval_env, f"{head}: lm-eval",
                        log)
    if sweep.eval.get("base", True) and not dry_run:
        for task in sweep.tasks:
            # one "before" row per task, kept in the task's first run directory where the report finds it
            first = next(r for r in runs if r.task == task)
            if not (first.run_dir / "eval" / "base.json").is_file():
                _run_logged(eval_command(first.run_dir, sweep, base_only=True), logs / f"{task}-base.eval.log",
                            eval_env, f"{task}: lm-eval of the base model", log)
    if dry_run or not sweep.report:
        return None
    from hiddenkey_ds.report import write_report

    report = write_report([r.run_dir for r in runs], sweep.out_dir / "report")
    log(f"[sweep] report: {report.resolve()}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiddenkey-ds sweep",
                                     description="Run a methods x seeds x tasks grid, then report.")
    parser.add_argument("sweep", help="sweep YAML (see recipes/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run states, run nothing")
    args = parser.parse_args(argv)
    try:
        report = run_sweep(load_sweep(args.sweep), dry_run=args.dry_run)
    except SweepError as err:
        print(f"hiddenkey-ds sweep: error: {err}", file=sys.stderr)
        return 1
    if report is not None:
        print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
