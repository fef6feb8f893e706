"""E2E NLG (restaurant meaning representation -> text): the prompt, the readers, training pairs, the dev split.

One record per meaning representation (MR) with all of its human references, whichever source it came from:

* the grouped JSONL of ../shared/data/e2e (`{"mr", "refs", "idx"}`, one line per MR);
* the official release's CSVs (`trainset.csv`, `devset.csv`, `testset_w_refs.csv`; header `mr,ref`, one row per
  reference): grouped by MR in order of first appearance, as e2e-metrics' `read_and_group_tsv` groups them;
* the hub copies, one row per reference: `tuetschek/e2e_nlg` (formerly `e2e_nlg`; fields `meaning_representation`,
  `human_reference`; splits train/validation/test = the official three files) and `GEM/e2e_nlg` (the *cleaned*
  E2E of Dušek et al. 2019, other MRs and references; fields `meaning_representation`, `target`, and `references`
  holding every reference in validation/test).

Training uses `pairs(records)`: one example per (MR, reference), as the paper and LoRA's original E2E setup do;
`carve_validation` splits records by MR so that no MR's references straddle training and validation.
Only `datasets` objects are touched lazily (the hub path), so the readers need nothing beyond the stdlib.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hiddenkey_ds.errors import RecipeError

__all__ = ["E2ERecord", "e2e_prompt", "read_jsonl", "read_csv", "from_hub", "load_dir", "pairs",
           "carve_validation", "OFFICIAL_FILES", "HUB_FIELDS"]


@dataclass(frozen=True)
class E2ERecord:
    mr: str
    refs: tuple[str, ...]
    idx: int


def e2e_prompt(mr: str) -> str:
    """The one prompt training and evaluation both use.

    The MR stays verbatim (`name[Alimentum], area[city centre]`: the model must copy values such as "£20-25"
    exactly) after a plain-language cue, so a base model without finetuning already continues with a sentence; the
    prompt ends in "Description:" and the target starts with a space (like the classification templates' answers)
    and holds no newline, so generation stops at the first newline, the end of the description.
    """
    return f"Table: {mr.strip()}\nDescription:"


def _target(ref: str) -> str:
    return " " + " ".join(ref.split())


# The official release's files by split (trainset.csv is the 42k-pair training set).
OFFICIAL_FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
# hub dataset -> (MR field, per-row reference field, optional all-references field)
HUB_FIELDS = {"tuetschek/e2e_nlg": ("meaning_representation", "human_reference", None),
              "e2e_nlg": ("meaning_representation", "human_reference", None),
              "GEM/e2e_nlg": ("meaning_representation", "target", "references")}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RecipeError(f"data.path: {path} does not exist (hint: the E2E directory holds dev/test .jsonl or the "
                          f"official {', '.join(OFFICIAL_FILES.values())})")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: the official CSVs may start with a BOM
    except UnicodeDecodeError as err:
        raise RecipeError(f"data.path: {path} is not UTF-8 ({err.reason} at byte {err.start}) (hint: re-encode it, "
                          "e.g. iconv -f latin1 -t utf-8)") from None
    if not text.strip():
        raise RecipeError(f"data.path: {path} is empty (hint: check the download)")
    return text


def _group(rows: Iterable[tuple[str, str]], where: str) -> list[E2ERecord]:
    grouped: dict[str, list[str]] = {}
    for mr, ref in rows:
        grouped.setdefault(mr.strip(), []).append(ref.strip())
    records = [E2ERecord(mr, tuple(r for r in refs if r), i) for i, (mr, refs) in enumerate(grouped.items())]
    bad = [r.mr for r in records if not r.mr or not r.refs]
    if bad:
        raise RecipeError(f"data.path: {where}: {len(bad)} MR(s) without a reference or empty, e.g. {bad[0]!r} "
                          "(hint: every MR needs at least one non-empty reference)")
    return records


def read_jsonl(path: str | Path) -> list[E2ERecord]:
    """The grouped JSONL: one `{"mr": str, "refs": [str, ...], "idx": int}` per line (idx defaults to the line)."""
    path = Path(path)
    records = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecipeError(f"data.path: {path}:{line_no}: not JSON ({err.msg}) (hint: one object per line)") from None
        missing = [k for k in ("mr", "refs") if k not in row]
        if missing:
            raise RecipeError(f"data.path: {path}:{line_no}: missing field(s) {missing} (has {sorted(row)}) "
                              '(hint: E2E JSONL lines are {"mr": ..., "refs": [...], "idx": ...})')
        refs = [row["refs"]] if isinstance(row["refs"], str) else row["refs"]
        records.append(E2ERecord(row["mr"].strip(), tuple(r.strip() for r in refs if r.strip()),
                                 int(row.get("idx", len(records)))))
    bad = [r.mr for r in records if not r.mr or not r.refs]
    if bad:
        raise RecipeError(f"data.path: {path}: {len(bad)} record(s) with an empty MR or no reference, e.g. "
                          f"{bad[0]!r} (hint: every MR needs at least one non-empty reference)")
    return records


def read_csv(path: str | Path) -> list[E2ERecord]:
    """An official CSV (`mr,ref`, one row per reference; trainset.csv, devset.csv, testset_w_refs.csv)."""
    path = Path(path)
    reader = csv.DictReader(_read_text(path).splitlines())
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    missing = [c for c in ("mr", "ref") if c not in columns]
    if missing:
        raise RecipeError(f"data.path: {path}: missing column(s) {missing} (has {reader.fieldnames}) (hint: the "
                          "official E2E CSVs have the header `mr,ref`; testset.csv has no references, use "
                          "testset_w_refs.csv)")
    return _group(((row[columns["mr"]] or "", row[columns["ref"]] or "") for row in reader), str(path))


def from_hub(dataset: Any, dataset_id: str = "tuetschek/e2e_nlg") -> list[E2ERecord]:
    """Group a hub split (a `datasets.Dataset`, one row per reference) by MR; fields per HUB_FIELDS[dataset_id]."""
    if dataset_id not in HUB_FIELDS:
        raise RecipeError(f"data.path: unknown E2E hub dataset {dataset_id!r} (hint: one of {sorted(HUB_FIELDS)})")
    mr_field, ref_field, all_field = HUB_FIELDS[dataset_id]
    names = set(dataset.column_names)
    need = [mr_field] + ([] if all_field in names else [ref_field])
    missing = [c for c in need if c not in names]
    if missing:
        raise RecipeError(f"data.path: hub dataset {dataset_id}: missing column(s) {missing} (has "
                          f"{sorted(names)}) (hint: check the dataset id; fields are listed in HUB_FIELDS)")

    def rows():
        for row in dataset:
            refs = row.get(all_field) if all_field else None
            if refs:  # GEM's validation/test rows carry every reference of their MR (target repeats one)
                yield from ((row[mr_field], r) for r in refs)
            else:
                yield row[mr_field], row[ref_field]

    records = _group(rows(), dataset_id)
    # GEM repeats the MR's full reference list on each of its rows: keep each reference once, in order
    return [E2ERecord(r.mr, tuple(dict.fromkeys(r.refs)), r.idx) for r in records] if all_field else records


def load_dir(directory: str | Path) -> dict[str, list[E2ERecord]]:
    """{"train"?, "validation"?, "test"?: records} from a directory of grouped JSONL (train/dev|validation/test
    .jsonl) or official CSVs; JSONL wins where both exist for a split."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise RecipeError(f"data.path: E2E directory {str(root)!r} does not exist (hint: e.g. ../shared/data/e2e)")
    candidates = {"train": ["train.jsonl", OFFICIAL_FILES["train"]],
                  "validation": ["dev.jsonl", "validation.jsonl", OFFICIAL_FILES["validation"]],
                  "test": ["test.jsonl", OFFICIAL_FILES["test"]]}
    out = {}
    for split, names in candidates.items():
        for name in names:
            if (root / name).is_file():
                out[split] = (read_jsonl if name.endswith(".jsonl") else read_csv)(root / name)
                break
    if not out:
        raise RecipeError(f"data.path: {root} holds no E2E file (found {sorted(p.name for p in root.iterdir())}) "
                          "(hint: dev.jsonl/test.jsonl or the official trainset.csv, devset.csv, testset_w_refs.csv)")
    return out


def pairs(records: Iterable[E2ERecord]) -> list[dict[str, str]]:
    """One SFT example per (MR, reference): {"prompt", "response"} (the sft format's default fields)."""
    return [{"prompt": e2e_prompt(r.mr), "response": _target(ref)} for r in records for ref in r.refs]


def carve_validation(records: list[E2ERecord], fraction: float, seed: int = 0
                     ) -> tuple[list[E2ERecord], list[E2ERecord]]:
    """(train, validation) by MR: a seeded shuffle of the MRs, round(fraction * n) of them (at least 1) validate.

    Splitting references instead would put one MR's other references in training: validation would then measure
    recall of seen MRs, not generalization to unseen ones.
    """
    if not 0.0 < fraction < 1.0:
        raise RecipeError(f"validation fraction: {fraction} is not in (0, 1) (hint: e.g. 0.1)")
    if len(records) < 2:
        raise RecipeError(f"data.path: {len(records)} MR(s) cannot be split into training and validation "
                          "(hint: use a larger file)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(fraction * len(records))), len(records) - 1)
    held = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val
