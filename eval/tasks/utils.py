"""lm-eval hooks for the hiddenkey-ds tasks: prompts come from `hiddenkey_ds.data.templates`, never from YAML.

Every task YAML in this folder points here with `!function utils.NAME`. The text a model is scored on is
`render_prompt(doc)` followed by one of the template's `choices` (which carry their own leading space, hence
`target_delimiter: ""` in the YAMLs): exactly the string `hiddenkey_ds.data` trains on.

Local-file tasks (`hk_*_local`) read `{train,validation|dev}.{jsonl,json,csv,tsv,parquet}` from a directory
given at run time through lm-eval's task metadata, e.g. the stock CLI's
`--metadata '{"rte_dir": "../shared/data/glue/RTE"}'` (or `data_dir=...` for a single task).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    from hiddenkey_ds.data.templates import get_template
except ImportError:  # a checkout used without `pip install -e .`: the package sits two folders up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from hiddenkey_ds.data.templates import get_template

# Task family -> template name. One entry per task the recipes train on.
TASKS = ("rte", "mrpc", "sst2", "cola", "qnli", "boolq")
_EXTENSIONS = ("jsonl", "json", "csv", "tsv", "parquet")
# lm-eval split name -> file stems accepted for it (GLUE's local copies call the validation split "dev")
_SPLIT_FILES = {"train": ("train",), "validation": ("validation", "dev")}


def _text(task: str):
    template = get_template(task)

    def doc_to_text(doc: dict) -> str:
        return template.render_prompt(doc)

    doc_to_text.__name__ = f"doc_to_text_{task}"
    return doc_to_text


def _choices(task: str):
    template = get_template(task)

    def doc_to_choice(doc: dict) -> list[str]:
        return list(template.choices)

    doc_to_choice.__name__ = f"doc_to_choice_{task}"
    return doc_to_choice


def _target(task: str):
    template = get_template(task)

    def doc_to_target(doc: dict) -> int:
        return template.label_id(doc)

    doc_to_target.__name__ = f"doc_to_target_{task}"
    return doc_to_target


def find_split_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """{"train": path, "validation": path} for the files present in `data_dir` (validation is required)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} does not exist (resolved to {root.resolve()})")
    found: dict[str, Path] = {}
    for split, stems in _SPLIT_FILES.items():
        for stem in stems:
            hits = [root / f"{stem}.{ext}" for ext in _EXTENSIONS if (root / f"{stem}.{ext}").is_file()]
            if len(hits) > 1:
                raise ValueError(f"{root}: several files for split {split!r}: {[h.name for h in hits]}; keep one")
            if hits:
                found[split] = hits[0]
                break
    if "validation" not in found:
        names = sorted(p.name for p in root.iterdir())
        raise FileNotFoundError(
            f"{root}: no validation file (validation.* or dev.* with one of {list(_EXTENSIONS)}); found {names}"
        )
    return found


def load_local(task: str, data_dir: str | os.PathLike):
    """A `datasets.DatasetDict` with the task's local train (if any) and validation splits."""
    import datasets

    files = find_split_files(data_dir)
    builders = {"jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet"}
    out = {}
    for split, path in files.items():
        ext = path.suffix.lstrip(".")
        kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
        out[split] = datasets.load_dataset(builders[ext], data_files={split: str(path)}, split=split, **kwargs)
    missing = [f for f in get_template(task).fields + (get_template(task).label_field,)
               if f not in out["validation"].column_names]
    if missing:
        raise KeyError(
            f"{files['validation']}: task {task!r} needs column(s) {missing}; it has {out['validation'].column_names}"
        )
    return datasets.DatasetDict(out)


def _local(task: str):
    def custom_dataset(**metadata):
        # lm-eval passes the task metadata (YAML `metadata:` + model_args + --metadata) as keyword arguments.
        data_dir = metadata.get(f"{task}_dir") or metadata.get("data_dir")
        if not data_dir:
            raise ValueError(
                f"hk_{task}_local reads local files: give their directory with lm-eval's task metadata, e.g. "
                f"--metadata '{{\"{task}_dir\": \"path/to/{task.upper()}\"}}' (or data_dir=...); "
                "`hiddenkey-ds eval --data-dir` sets it for you"
            )
        return load_local(task, data_dir)

    custom_dataset.__name__ = f"load_{task}_local"
    return custom_dataset


# The names the YAMLs reference (`!function utils.doc_to_text_rte`, ...), one set per task.
for _task in TASKS:
    globals()[f"doc_to_text_{_task}"] = _text(_task)
    globals()[f"doc_to_choice_{_task}"] = _choices(_task)
    globals()[f"doc_to_target_{_task}"] = _target(_task)
    globals()[f"load_{_task}_local"] = _local(_task)
del _task
