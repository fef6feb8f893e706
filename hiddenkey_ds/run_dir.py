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
```

A foundation module: it imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

import os
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


def write_atomic(path: Path, text: str) -> None:
    """Write a run-directory file whole: a reader (a resume, an evaluation, a report) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_run_dir(path: str | Path) -> bool:
    """A directory training wrote (it holds the resolved recipe), finished or not."""
    return (Path(path) / CONFIG).is_file()


def is_finished(path: str | Path) -> bool:
    return (Path(path) / FINISHED_MARKER).is_file()
