"""The run directory: the one contract between training (which writes it), evaluation and experiments (which
read it and add eval/). Every name in it is spelled here and nowhere else in the package.

```
RUN_DIR/
  config.yaml          the resolved recipe (after overrides)
  ds_config.json       the resolved DeepSpeed config
  data_report.json     what the data pipeline kept, carved and flipped, and the data sources read
  provenance.json      what produced the run: package version, git commit + dirty flag, library versions,
                       python, device, world size, sha256 of every data file read (hub: id, revision,
                       fingerprint); one entry more per resume (hiddenkey_ds.provenance)
  metrics.jsonl        one JSON object per line: {"step", "split": "train"|"validation", "loss", "ce",
                       "consistency", "lr", "accuracy" (validation; a task of
                       the recipe's own: the verbalizer's choice, with "answer_accuracy"), "tokens_per_s",
                       "peak_mem_gib", "time"}
  checkpoints/step_N/  DeepSpeed checkpoint of the trainable state; complete only when it holds COMPLETE
  adapter/             final PEFT adapter (adapter_config.json + adapter_model.safetensors + hiddenkey_ds.json)
  adapter_best/        the adapter of the best validation step (only for runs with a validation split); its
                       hiddenkey_ds.json is the best-so-far record, written with the weights (a resume reads it)
  summary.json         written last: a run with it is finished and is never overwritten
  eval/                lm-eval results JSON (evaluation): results.json, results_best.json, their _4bit
                       variants (QLoRA runs on their 4-bit base), base.json (the base model alone);
                       eval/tasks/ the lm-eval task generated for a recipe's own task (data.template)
  logs/                per-node / per-rank logs (launch.sh)
  run.lock             while a training or an evaluation writes the directory (run_lock.py): filelock's marker
  run.lock.json        beside it: who holds it (host, pid, command, start time), for the refusal message
```

A foundation module: it imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
DATA_REPORT = "data_report.json"
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_COMPLETE = "COMPLETE"  # inside checkpoints/step_N/, written last by rank 0
SUMMARY = "summary.json"
FINISHED_MARKER = SUMMARY  # the loop writes it last: its presence means the run is finished
EVAL = "eval"
EVAL_TASKS = "tasks"  # inside eval/: the lm-eval task generated for a recipe-defined task (data.template)
LOGS = "logs"  # launch.sh writes it (per-node and per-rank logs)
LOCK = "run.lock"  # exists while one writer (a training, an evaluation) holds the directory: run_lock.py
LOCK_HOLDER = "run.lock.json"  # the holder's host, pid, command and start time, for the message a refusal prints

# adapter kind -> its directory; the final one always exists in a finished run, the best one only with validation
ADAPTER_DIRS = {"final": "adapter", "best": "adapter_best"}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's own file: a directory holding it is an adapter
ADAPTER_META = "hiddenkey_ds.json"      # beside the PEFT files: which step the adapter is from, the sha256 of its
                                        # weights file (PEFT ignores it); adapter_best/'s is the best-so-far record
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's weights file: the content an adapter's sha256 is of

# adapter kind -> the stem of its lm-eval results file in eval/; base.json is the base model without adapter
RESULT_STEMS = {"final": "results", "best": "results_best"}
BASE_RESULTS_STEM = "base"
BASE_RESULTS = f"{BASE_RESULTS_STEM}.json"
QUANTIZED_SUFFIX = "_4bit"  # a QLoRA adapter scored on its 4-bit base as trained


def results_name(kind: str | None, quantized: bool = False) -> str:
    """File name in eval/ of an adapter kind's results (kind None: an adapter outside a run, stored as
    results.json)."""
    return f"{RESULT_STEMS[kind or 'final']}{QUANTIZED_SUFFIX if quantized else ''}.json"


# read once at import (os.umask can only be read by setting it): the mode a plain open() would give a new file
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: Path, text: str) -> None:
    """Write a run-directory file whole: a reader (a resume, an evaluation, a report) never sees half of it, and
    after a crash or power loss the file holds either the old or the new text.

    The temporary file is unique (two writers never share one) and lives in the same directory (os.replace is
    atomic only within a file system); its data reaches the disk before the rename, and the directory entry after
    it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the file is shared like any other the run writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) refuse fsync on a directory; the data itself is synced
        pass
    finally:
        os.close(fd)


def is_run_dir(path: str | Path) -> bool:
    """A directory training wrote (it holds the resolved recipe), finished or not."""
    return (Path(path) / CONFIG).is_file()


def is_finished(path: str | Path) -> bool:
    return (Path(path) / FINISHED_MARKER).is_file()
