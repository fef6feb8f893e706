"""What happened to the data: rows read, kept, truncated and dropped (with why), per split."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SplitReport:
    split: str
    rows: int = 0                 # rows in the source split (before max_*_examples)
    selected: int = 0             # rows after max_*_examples
    kept: int = 0                 # examples in the final dataset
    truncated: int = 0            # kept, with the prompt cut from the left to fit max_length
    dropped_too_long: int = 0     # the answer alone does not fit, or data.truncation=drop
    dropped_unlabelled: int = 0   # label outside the verbalizer (e.g. -1 in GLUE test splits)
    dropped_invalid: int = 0      # sft: empty response or no final assistant turn
    carved_from: str | None = None    # validation carved from this split (data.validation_from_train)
    carved_ids: str | None = None     # sha1 of the carved rows' positions in it: the same split across runs
    labels_flipped: int = 0       # training labels flipped by data.label_noise

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_unlabelled + self.dropped_invalid

    def line(self) -> str:
        parts = [f"{self.kept} kept of {self.selected}"]
        if self.selected != self.rows:
            parts[0] += f" selected from {self.rows}"
        if self.carved_from:
            parts.append(f"carved from {self.carved_from} (rows sha1 {self.carved_ids[:10]})")
        if self.labels_flipped:
            parts.append(f"{self.labels_flipped} labels flipped (data.label_noise)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated (prompt cut from the left)")
        for what, n in (("too long", self.dropped_too_long), ("unlabelled", self.dropped_unlabelled),
                        ("invalid", self.dropped_invalid)):
            if n:
                parts.append(f"{n} dropped: {what}")
        return f"{self.split}: " + ", ".join(parts)


@dataclass
class DataReport:
    source: str
    format: str
    task: str | None
    max_length: int
    splits: dict[str, SplitReport] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # what was read (hiddenkey_ds.data.loading.load_splits)
    # a task of the user's own: the first token of each answer, among which validation picks (training/loop.py)
    choice_first_tokens: list[int] | None = None

    def summary(self) -> str:
        head = f"data {self.source} ({self.format}{', ' + self.task if self.task else ''}, max_length {self.max_length})"
        return "\n".join([head, *("  " + s.line() for s in self.splits.values())])

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["choice_first_tokens"] is None:
            del out["choice_first_tokens"]
        for name, split in self.splits.items():
            out["splits"][name]["dropped"] = split.dropped
        return out
