"""Launching real training runs from tests: one process, or N gloo ranks through torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hiddenkey_ds.distributed import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
FAKES = REPO / "tests" / "fakes"
# ZeRO-3 that partitions every tensor of the tiny model (ds_configs/zero3.json keeps tensors below 100,000
# elements whole, i.e. all of them), re-gathers at every use and reduces in small buckets
ZERO3_PARTITIONED = REPO / "tests" / "ds_configs" / "zero3_partitioned.json"


def train_command(recipe: str, out_dir: Path, *overrides: str, nproc: int = 1, module: str = "hiddenkey_ds.train",
                  env: dict | None = None) -> tuple[list[str], dict]:
    """(command, environment) of `module` (hiddenkey_ds.train, or one of tests/fakes) on `recipe` with `nproc`
    torchrun ranks; nproc=0: the bare module, for a caller that sets the rank's environment itself."""
    args = [str(RECIPES / recipe), f"run.output_dir={out_dir}", *overrides]
    if nproc <= 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if module != "hiddenkey_ds.train":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKES), env.get("PYTHONPATH", "")]))
    return cmd, env


def train(recipe: str, out_dir: Path, *overrides: str, nproc: int = 1, check: bool = True,
          timeout: float = 600, module: str = "hiddenkey_ds.train", env: dict | None = None) -> subprocess.CompletedProcess:
    """`module` (hiddenkey_ds.train, or tests/fakes' hkds_crash_train) on `recipe` with `nproc` torchrun ranks."""
    cmd, env = train_command(recipe, out_dir, *overrides, nproc=nproc, module=module, env=env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir)}


def tree(directory: Path) -> list[tuple[str, int, int]]:
    """Every path under `directory` with its size and mtime: equal before and after means nothing was touched."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).rglob("*"))
