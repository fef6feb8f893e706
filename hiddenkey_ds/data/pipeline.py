"""build_datasets: a recipe's data section + tokenizer -> tokenized train/eval datasets and a DataReport."""
from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.data.checks import missing_value_problems
from hiddenkey_ds.data.encoding import OK, TOO_LONG, TRUNCATED, encode_pair, split_ids
from hiddenkey_ds.data.loading import load_splits
from hiddenkey_ds.data.stats import DataReport, SplitReport
from hiddenkey_ds.data.templates import template_for

UNLABELLED, INVALID = "unlabelled", "invalid"
_MAP_BATCH = 1000


def _required_columns(data: Any) -> list[str]:
    if data.format == "classification":
        template = template_for(data)
        return [*template.fields, template.label_field]
    if data.messages_field:
        return [data.messages_field]
    return [data.prompt_field, data.response_field]


def _check_columns(data: Any, splits: dict[str, Any]) -> None:
    problems = []
    need = _required_columns(data)
    for role, ds in splits.items():
        if ds is None:
            continue
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            if data.format == "classification" and data.template:
                hint = (f"data.template {data.template!r} and data.label_field read columns {need}; rename them "
                        f"to the data's own columns ({ds.column_names})")
            elif data.format == "classification":
                hint = (f"data.task={data.task} reads columns {need} (field names of the hub nyu-mll/glue / "
                        "super_glue datasets); is data.task right for this data?")
            else:
                hint = "set data.prompt_field/data.response_field, or data.messages_field for chat data"
            problems.append(
                f"data.path: the {role} split lacks column(s) {missing}; it has {ds.column_names} (hint: {hint})"
            )
    problems += missing_value_problems(data, splits)
    if not problems and data.format == "classification":
        problems += _label_problems(template_for(data), splits)
    if problems:
        raise RecipeError(problems)


HIDDEN_LABEL = -1  # GLUE's test splits mark their withheld labels so: such rows are dropped and counted


def _label_problems(template: Any, splits: dict[str, Any]) -> list[str]:
    """One problem per split whose label column holds values that name no class (a 1-based id, a misspelt class
    name): training on them would crash deep in tokenizing or silently drop rows."""
    problems = []
    for role, ds in splits.items():
        if ds is None:
            continue
        bad: Counter = Counter()
        for value in ds[template.label_field]:
            if value is not None and value != HIDDEN_LABEL and template.resolve_label(value) is None:
                bad[value if isinstance(value, (int, float, str)) else repr(value)] += 1
        if bad:
            shown = ", ".join(repr(v) for v in list(bad)[:5]) + (", ..." if len(bad) > 5 else "")
            problems.append(
                f"data.path: {sum(bad.values())} row(s) of the {role} split have a label outside the choices in "
                f"column {template.label_field!r} ({shown}); task {template.name!r} takes labels "
                f"{template.label_spelling()} (hint: "
                + ("label ids count from 0, in the order of data.choices; class names are matched exactly"
                   if not template.builtin else f"{template.name} labels are 0/1 as in the hub dataset")
                + ")")
    return problems


def _choice_tokens(template: Any, tokenizer: Any, train: Any) -> tuple[list[str], list[int] | None]:
    """(problems, the first token of each answer after a real prompt). Two answers with the same ids (characters
    the tokenizer maps alike, say) are one class to the loss and to lm-eval. A task of the user's own also picks
    its validation answer among the answers' first tokens (the choice-restricted accuracy), so those must differ.
    Checked before the model loads."""
    if train is None or len(train) == 0:
        return [], None
    try:
        prompt = template.render_prompt(dict(train[0]))
    except KeyError:
        return [], None  # a missing column is reported by the column check
    pairs = split_ids(tokenizer, [prompt] * len(template.choices), list(template.choices), add_special_tokens=True)
    answers = [tuple(ids) for _, ids in pairs]
    for i, j in ((i, j) for i in range(len(answers)) for j in range(i)):
        c_i, c_j = template.choices[i], template.choices[j]
        if answers[i] == answers[j]:
            return [f"data.choices: {c_j!r} and {c_i!r} tokenize to the same ids {list(answers[i])} after the "
                    "prompt, so neither training nor lm-eval can tell those classes apart (hint: choose answers "
                    "this tokenizer writes differently, e.g. other words)"], None
        if not template.builtin and answers[i][:1] == answers[j][:1]:
            return [f"data.choices: {c_j!r} and {c_i!r} start with the same token {answers[i][0]} after the "
                    "prompt, and the validation accuracy picks the class among the answers' first tokens (hint: "
                    "answers whose first word differs, e.g. ' sports' / ' music', or put the distinguishing word "
                    "first)"], None
    return [], [ids[0] for ids in answers]


class _Renderer:
    """Example -> (prompt text, answer text, add_special_tokens), or a drop status."""

    def __init__(self, data: Any, tokenizer: Any):
        self.data = data
        self.tokenizer = tokenizer
        self.template = template_for(data) if data.format == "classification" else None
        self.use_chat = data.format == "sft" and (data.messages_field is not None or data.chat_template)
        if self.use_chat and not getattr(tokenizer, "chat_template", None):
            raise RecipeError(
                "data.chat_template: the tokenizer has no chat template (hint: data.chat_template=false renders "
                "prompt + response + eos; chat messages need a chat model's tokenizer)"
            )

    def __call__(self, example: dict) -> tuple[str, str, bool] | str:
        if self.template is not None:
            try:
                answer = self.template.render_answer(example)
            except ValueError:
                return UNLABELLED
            # BOS etc. come from the tokenizer's own special-token handling, as in lm-eval
            return self.template.render_prompt(example), answer, True
        if self.data.messages_field:
            messages = example[self.data.messages_field]
            if not messages or not isinstance(messages, list) or messages[-1].get("role") != "assistant":
                return INVALID
        else:
            prompt, response = example[self.data.prompt_field], example[self.data.response_field]
            if not response or not str(response).strip():
                return INVALID
            if not self.use_chat:
                return str(prompt), str(response) + (self.tokenizer.eos_token or ""), True
            messages = [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
        return (*self._chat_split(messages), False)  # the template writes its own BOS

    def _chat_split(self, messages: list[dict]) -> tuple[str, str]:
        tok = self.tokenizer
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise RecipeError(
                "data.chat_template: the tokenizer's chat template does not render the conversation as "
                "<prompt with generation prompt> + <response>, so the response cannot be isolated for the loss "
                "(hint: data.chat_template=false)"
            )
        return prompt, full[len(prompt):]


def _encode_batch(batch: dict[str, list], render: _Renderer, tokenizer: Any, data: Any) -> dict[str, list]:
    n = len(next(iter(batch.values())))
    rows = [render({k: v[i] for k, v in batch.items()}) for i in range(n)]
    out: dict[str, list] = {"input_ids": [None] * n, "labels": [None] * n, "status": [None] * n}
    for flag in (True, False):
        idx = [i for i, r in enumerate(rows) if not isinstance(r, str) and r[2] is flag]
        if not idx:
            continue
        pairs = split_ids(tokenizer, [rows[i][0] for i in idx], [rows[i][1] for i in idx], add_special_tokens=flag)
        for i, (prompt_ids, answer_ids) in zip(idx, pairs):
            if not answer_ids:
                out["status"][i] = INVALID
                continue
            ids, labels, status = encode_pair(prompt_ids, answer_ids, data.max_length, data.truncation,
                                              tokenizer.bos_token_id)
            out["input_ids"][i], out["labels"][i], out["status"][i] = ids or [], labels or [], status
    for i, r in enumerate(rows):
        if isinstance(r, str):
            out["input_ids"][i], out["labels"][i], out["status"][i] = [], [], r
    return out


def _tokenize_split(ds: Any, role: str, render: _Renderer, tokenizer: Any, data: Any, report: SplitReport):
    encoded = ds.map(
        _encode_batch, batched=True, batch_size=_MAP_BATCH, remove_columns=ds.column_names,
        fn_kwargs={"render": render, "tokenizer": tokenizer, "data": data},
        # in memory: every rank tokenizes the same small data; shared on-disk cache files would race
        keep_in_memory=True, load_from_cache_file=False, desc=f"tokenizing {role}",
        # a fixed fingerprint: hashing the tokenizer to make one is slow and warns; nothing is cached anyway
        new_fingerprint=f"hiddenkey-ds-{role}-{uuid.uuid4().hex}",
    )
    counts = Counter(encoded["status"])
    report.truncated = counts[TRUNCATED]
    report.dropped_too_long = counts[TOO_LONG]
    report.dropped_unlabelled = counts[UNLABELLED]
    report.dropped_invalid = counts[INVALID]
    kept_rows = [i for i, s in enumerate(encoded["status"]) if s in (OK, TRUNCATED)]
    kept = encoded.select(kept_rows, keep_in_memory=True)
    report.kept = len(kept)
    return kept.remove_columns("status")


def _empty_problem(role: str, report: SplitReport, data: Any) -> str:
    return (
        f"data: the {role} split is empty after filtering ({report.line()}) (hint: "
        + ("raise data.max_length or use data.truncation=left" if report.dropped_too_long else
           "check data.task and the label column" if report.dropped_unlabelled else
           "check the data source")
        + ")"
    )


def _carve_validation(train: Any, size: int | float, seed: int) -> tuple[Any, Any, str]:
    """(train without the carved rows, carved validation, sha1 of the carved row positions)."""
    import hashlib

    import numpy as np

    n = size if isinstance(size, int) else int(round(size * len(train)))
    if not 0 < n < len(train):
        raise RecipeError(f"data.validation_from_train={size}: {n} of {len(train)} training rows would leave no "
                          "training or no validation data (hint: a count below the training rows, or a fraction)")
    perm = np.random.default_rng(seed).permutation(len(train))
    val, rest = np.sort(perm[:n]), np.sort(perm[n:])
    digest = hashlib.sha1(val.astype(np.int64).tobytes()).hexdigest()
    return train.select(rest, keep_in_memory=True), train.select(val, keep_in_memory=True), digest


def _flip_labels(ds: Any, template: Any, fraction: float, seed: tuple[int, int]) -> tuple[Any, int]:
    """Exactly round(fraction x rows) labels moved to another class, chosen uniformly (seeded)."""
    import numpy as np

    rng = np.random.default_rng(list(seed))
    n = int(round(fraction * len(ds)))
    chosen = set(rng.choice(len(ds), size=n, replace=False).tolist())
    shifts = rng.integers(1, len(template.choices), size=len(ds))  # to another class, uniformly
    field, k = template.label_field, len(template.choices)

    def flip(example: dict, idx: int) -> dict:
        if idx in chosen:
            new = (template.label_id(example) + int(shifts[idx])) % k
            # written as the column spells labels: a column of class names stays one of strings
            example[field] = template.label_names[new] if isinstance(example[field], str) else new
        return example

    return ds.map(flip, with_indices=True, keep_in_memory=True, load_from_cache_file=False,
                  desc="flipping labels"), n


def build_datasets(recipe: Any, tokenizer: Any) -> tuple[Any, Any, DataReport]:
    """(train_ds, eval_ds or None, report). Datasets hold `input_ids` and `labels` (-100 off the answer).

    With data.validation_from_train the evaluation split is carved from the training split first (seeded by
    data.split_seed). The training subset (data.max_train_examples) is then a seeded random sample (run.seed);
    data.label_noise flips labels in it; evaluation takes the first N (max_eval_examples).
    Raises RecipeError for missing columns, missing splits and splits left empty by filtering.
    """
    data = recipe.data
    source = data.path or f"hub {template_for(data).hub_path}"
    report = DataReport(source=source, format=data.format, task=data.task, max_length=data.max_length)
    splits = load_splits(data, report.sources)
    _check_columns(data, splits)
    carved = None
    if data.validation_from_train:
        splits["train"], splits["eval"], carved = _carve_validation(splits["train"], data.validation_from_train,
                                                                   data.split_seed)
    render = _Renderer(data, tokenizer)
    if render.template is not None:
        choice_problems, first_tokens = _choice_tokens(render.template, tokenizer, splits["train"])
        if choice_problems:
            raise RecipeError(choice_problems)
        if not render.template.builtin:  # the built-in tasks keep their whole-answer accuracy (docs/recipes.md)
            report.choice_first_tokens = first_tokens
    out: dict[str, Any] = {"train": None, "eval": None}
    problems = []
    for role, ds in splits.items():
        if ds is None:
            continue
        split_report = report.splits[role] = SplitReport(split=role, rows=len(ds))
        limit = data.max_train_examples if role == "train" else data.max_eval_examples
        if limit is not None and limit < len(ds):
            ds = ds.shuffle(seed=recipe.run.seed).select(range(limit)) if role == "train" else ds.select(range(limit))
        split_report.selected = len(ds)
        if role == "eval" and carved is not None:
            split_report.carved_from, split_report.carved_ids = data.train_split, carved
        if role == "train" and data.label_noise:
            ds, split_report.labels_flipped = _flip_labels(ds, render.template, data.label_noise,
                                                           (data.split_seed, recipe.run.seed))
        out[role] = _tokenize_split(ds, role, render, tokenizer, data, split_report)
        if split_report.kept == 0:
            problems.append(_empty_problem(role, split_report, data))
    if problems:
        raise RecipeError(problems)
    return out["train"], out["eval"], report
