"""Row-level checks of the raw data against the template, before anything is tokenized.

A JSON/CSV row that lacks a field the template reads comes out of `datasets` as None in that column. Rendered,
it would become the text "None" (a prompt field) or a crash deep in tokenizing (the label); so every such row
is reported here, with where it is and how many there are, as bad input.
"""
from __future__ import annotations

from typing import Any

_SHOW = 5  # row numbers quoted per problem


def _text_fields(data: Any) -> list[str]:
    if data.format == "classification":
        from hiddenkey_ds.data.templates import template_for

        template = template_for(data)
        return [*template.fields, template.label_field]
    if data.messages_field:
        return []  # a missing conversation is an invalid example, counted and dropped by the pipeline
    return [data.prompt_field]  # an empty response is an invalid example too; a missing prompt is not


def missing_value_problems(data: Any, splits: dict[str, Any]) -> list[str]:
    """One problem per (split, column) with rows whose value is missing (None)."""
    problems = []
    for role, ds in splits.items():
        if ds is None:
            continue
        for column in _text_fields(data):
            if column not in ds.column_names:
                continue  # a missing column is reported by the column check
            rows = _missing_rows(ds, column)
            if rows:
                shown = ", ".join(str(i + 1) for i in rows[:_SHOW]) + (", ..." if len(rows) > _SHOW else "")
                problems.append(
                    f"data.path: {len(rows)} row(s) of the {role} split have no value in column {column!r} "
                    f"(row {shown}, counting from 1) (hint: fill in or remove those rows"
                    + ("; unlabelled rows cannot be trained or scored on" if data.format == "classification"
                       and column == _label(data) else "") + ")")
    return problems


def _missing_rows(ds: Any, column: str, batch: int = 4096) -> list[int]:
    """Row indices whose `column` is None, read a batch at a time (a big SFT column is never whole in memory)."""
    rows: list[int] = []
    for start, part in zip(range(0, len(ds), batch), ds.select_columns([column]).iter(batch_size=batch)):
        rows += [start + i for i, value in enumerate(part[column]) if value is None]
    return rows


def _label(data: Any) -> str:
    from hiddenkey_ds.data.templates import template_for

    return template_for(data).label_field
