"""lm-eval hooks for the hiddenkey-ds tasks: prompts come from `hiddenkey_ds.data.templates`, never from YAML.

Every task YAML in this folder points here with `!function utils.NAME`. The text a model is scored on is
`render_prompt(doc)` followed by one of the template's `choices` (which carry their own leading space, hence
`target_delimiter: ""` in the YAMLs): exactly the string `hiddenkey_ds.data` trains on.

Local-file tasks (`hk_*_local`) read `{train,dev|validation}.{jsonl,json,csv,tsv,parquet}` from a directory
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

# The templates that get lm-eval tasks here: every task the recipes train on.
TASKS = ("rte", "mrpc", "sst2", "cola", "qnli", "boolq")


def _named(function, name: str):
    """lm-eval resolves `!function utils.NAME`; the bound function carries that name too."""
    function.__name__ = name
    return function


def find_split_files(data_dir: str | os.PathLike) -> dict[str, Path]:
    """{"train": path, "validation": path} in `data_dir`: the files training reads (hiddenkey_ds.data.loading)."""
    from hiddenkey_ds.data.loading import BUILDERS, split_files

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} does not exist (resolved to {root.resolve()})")
    try:
        found = {split: path for split, path in split_files(root).items() if split in ("train", "validation")}
    except ValueError as err:
        raise ValueError(f"{err}; keep one") from None
    if "validation" not in found:
        raise FileNotFoundError(
            f"{root}: no validation file (validation.*, dev.*, val.* or valid.* with a suffix in "
            f"{sorted(BUILDERS)}); found {sorted(p.name for p in root.iterdir())}"
        )
    return found


def load_local(task: str, data_dir: str | os.PathLike):
    """A `datasets.DatasetDict` with the task's local train (if any) and validation splits."""
    import datasets

    from hiddenkey_ds.data.loading import BUILDERS

    files = find_split_files(data_dir)
    out = {}
    for split, path in files.items():
        builder, kwargs = BUILDERS[path.suffix]
        out[split] = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    template = get_template(task)
    missing = [f for f in (*template.fields, template.label_field) if f not in out["validation"].column_names]
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


def load_toy_sst2(**metadata):
    """builtin:toy-sst2, generated in memory by hiddenkey_ds.data.toy (no files, no network)."""
    import datasets

    from hiddenkey_ds.data.toy import toy_sst2_rows

    return datasets.DatasetDict({s: datasets.Dataset.from_list(toy_sst2_rows(s)) for s in ("train", "validation")})


# The names the YAMLs reference (`!function utils.doc_to_text_rte`, ...), one set per task.
for _task in TASKS:
    _template = get_template(_task)
    for _name, _function in (("doc_to_text", lambda doc, t=_template: t.render_prompt(doc)),
                             ("doc_to_choice", lambda doc, t=_template: list(t.choices)),
                             ("doc_to_target", lambda doc, t=_template: t.label_id(doc))):
        globals()[f"{_name}_{_task}"] = _named(_function, f"{_name}_{_task}")
    globals()[f"load_{_task}_local"] = _local(_task)
del _task, _template, _name, _function
