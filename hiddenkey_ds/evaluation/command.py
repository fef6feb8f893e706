"""`hiddenkey-ds eval RUN_DIR ...` as a command line, and running it as its own single process.

Evaluation never runs inside a training process: the training entry point (eval.at_end) and sweeps start it as a
child once training has left its distributed world, so lm-eval gets the device memory and one clean process.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hiddenkey_ds.distributed import single_process_env


def eval_command(run_dir: str | Path, *, tasks: Sequence[str] = (), limit: float | None = None,
                 batch_size: int | None = None, adapter: str | None = None, base_only: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "hiddenkey_ds.cli", "eval", str(run_dir)]
    if base_only:
        cmd.append("--base-only")
    elif adapter:
        cmd += ["--adapter", adapter]
    if tasks:
        cmd += ["--tasks", ",".join(tasks)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


def run_eval_process(cmd: list[str], what: str) -> int:
    """Run `cmd` (from eval_command) in one process outside any distributed world; on failure say how to rerun it."""
    print(f"evaluating ({what}): {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, env=single_process_env(dict(os.environ))).returncode
    if rc != 0:
        print(f"hiddenkey-ds: the evaluation failed (exit {rc}) (hint: fix what it printed, then run it alone: "
              f"hiddenkey-ds {shlex.join(cmd[3:])})", file=sys.stderr)
    return rc
