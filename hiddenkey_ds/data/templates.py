"""Prompt templates and verbalizers: the one place that says how a task example becomes text.

Training (`hiddenkey_ds.data`) and evaluation (the lm-eval task YAMLs under `eval/tasks/`) both read these,
so a model is scored on exactly the prompt it was trained on.

Conventions
-----------
* ``prompt`` is a ``str.format`` template over the task's columns (field names as in the hub ``nyu-mll/glue``
  / ``super_glue`` datasets, so local copies such as ``../shared/data/glue/RTE/*.jsonl`` work unchanged).
* Every answer in ``choices`` starts with its separator (a space), and the training text is exactly
  ``render_prompt(ex) + render_answer(ex)``. In lm-eval that means ``target_delimiter: ""`` with
  ``doc_to_choice`` = ``choices``.
* Label ids index ``choices``: ``choices[example[label_field]]``. A label may also be given as its class name
  (``label_names``, for a recipe-defined task).

A recipe defines its own task with ``data.template`` / ``data.choices`` / ``data.label_field``
(``custom_template``); ``template_for(recipe.data)`` is the one way training, the start-up checks and the
evaluation get a recipe's template, built-in or not.

The wording follows lm-evaluation-harness' own GLUE / SuperGLUE tasks, the prompts the paper's line of
LLaMA work evaluates with.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskTemplate:
    name: str                     # "rte"
    fields: tuple[str, ...]       # required input columns
    prompt: str                   # str.format template
    choices: tuple[str, ...]      # verbalizer: label id -> answer text
    label_field: str = "label"
    hub_path: str | None = None   # where the task lives on the hub (for users with network)
    hub_name: str | None = None   # its configuration name
    eval_split: str = "validation"  # the labelled split evaluated on (GLUE test labels are hidden)
    label_names: tuple[str, ...] | None = None  # class names a label may be given as (index = label id)
    builtin: bool = True          # one of TEMPLATES (shipped lm-eval tasks), else defined by a recipe

    def render_prompt(self, example: dict) -> str:
        missing = [f for f in self.fields if f not in example]
        if missing:
            raise KeyError(
                f"task {self.name!r}: example lacks column(s) {missing}; the template needs {list(self.fields)} "
                f"(got {sorted(example)})"
            )
        return self.prompt.format(**{f: _clean(example[f]) for f in self.fields})

    def render_answer(self, example: dict) -> str:
        return self.choices[self.label_id(example)]

    def label_id(self, example: dict) -> int:
        if self.label_field not in example:
            raise KeyError(f"task {self.name!r}: example lacks the label column {self.label_field!r}")
        raw = example[self.label_field]
        if raw is None:  # a row without its label: JSON/CSV readers fill the column with None
            raise ValueError(f"task {self.name!r}: the example has no label (column {self.label_field!r} is empty)")
        label = self.resolve_label(raw)
        if label is None:
            # GLUE test splits carry label -1 (hidden labels): they cannot be trained or scored on
            raise ValueError(
                f"task {self.name!r}: label {raw!r} is not one of {self.label_spelling()} "
                f"(verbalizer {list(self.choices)}); unlabelled test splits cannot be used"
            )
        return label

    def resolve_label(self, raw: object) -> int | None:
        """The label id of a raw label value (an id, a whole-number float or string, or a class name), or None."""
        if isinstance(raw, str):
            text = raw.strip()
            if self.label_names is not None and text in self.label_names:
                return self.label_names.index(text)
            raw = text
        try:
            value = float(raw)  # CSV readers give "2" or 2.0 as readily as 2
        except (TypeError, ValueError):
            return None
        if not value.is_integer() or not 0 <= value < len(self.choices):
            return None
        return int(value)

    def label_spelling(self) -> str:
        ids = f"0..{len(self.choices) - 1}"
        return ids if self.label_names is None else f"{ids} or {list(self.label_names)}"


def _clean(value: object) -> str:
    # Stray whitespace at the edges would make the same example render differently across sources.
    return str(value).strip()


def _glue(name: str, fields: tuple[str, ...], prompt: str, choices: tuple[str, ...]) -> TaskTemplate:
    return TaskTemplate(name, fields, prompt, choices, hub_path="nyu-mll/glue", hub_name=name)


TEMPLATES: dict[str, TaskTemplate] = {
    t.name: t
    for t in (
        # 0 = entailment, 1 = not_entailment
        _glue("rte", ("sentence1", "sentence2"), "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
              (" True", " False")),
        # 0 = not_equivalent, 1 = equivalent
        _glue("mrpc", ("sentence1", "sentence2"),
              "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
              (" no", " yes")),
        # 0 = negative, 1 = positive
        _glue("sst2", ("sentence",), "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
              (" negative", " positive")),
        # 0 = unacceptable, 1 = acceptable
        _glue("cola", ("sentence",), "{sentence}\nQuestion: Does this sentence make sense?\nAnswer:", (" no", " yes")),
        # 0 = entailment (the sentence answers the question), 1 = not_entailment
        _glue("qnli", ("question", "sentence"),
              "{question}\n{sentence}\nQuestion: Does this response answer the question?\nAnswer:", (" yes", " no")),
        # super_glue/boolq: 0 = False, 1 = True
        TaskTemplate("boolq", ("passage", "question"), "{passage}\nQuestion: {question}?\nAnswer:", (" no", " yes"),
                     hub_path="aps/super_glue", hub_name="boolq"),
    )
}

# Tasks of the same benchmarks that are deliberately not offered, with the reason a user gets.
SKIPPED: dict[str, str] = {
    "stsb": (
        "STS-B is a regression task (similarity 0-5, scored by Pearson/Spearman correlation); a verbalizer of "
        "label ids cannot express it, and binning the score into words changes the metric the literature "
        "reports. The paper's LLaMA experiments use classification tasks; use rte, mrpc, sst2, cola, qnli or boolq"
    ),
    "mnli": "MNLI is not part of this package's task set (its 393k examples make paper-scale sweeps impractical)",
}

# Spellings users type for the same task.
_ALIASES = {"sst-2": "sst2", "sst_2": "sst2", "sts-b": "stsb", "sts_b": "stsb"}


def get_template(name: str) -> TaskTemplate:
    key = _ALIASES.get(name.lower(), name.lower())
    if key in TEMPLATES:
        return TEMPLATES[key]
    if key in SKIPPED:
        raise KeyError(f"task {name!r} is not supported: {SKIPPED[key]}")
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TEMPLATES))}")


# ------------------------------------------------------------------------------------ recipe-defined tasks
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*\Z")  # it names the lm-eval task (hk_NAME) and its files
DEFAULT_CUSTOM_NAME = "custom"


def template_fields(prompt: str) -> tuple[str, ...]:
    """The columns a ``str.format`` prompt reads, in order of first use. Raises ValueError for what the
    renderer cannot do: positional ``{}``, attribute/index access, conversions, nested fields, lone braces."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as err:
        raise ValueError(f"{err} (a literal brace is written {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise ValueError("a positional field {} cannot name a column: write the column's name, e.g. {text}")
        if not re.fullmatch(r"\w+", name) or conversion or spec:
            raise ValueError(f"field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: "
                             "only plain column names are allowed, e.g. {text}")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ValueError("the template names no column: write the data's fields in braces, e.g. {text}")
    return tuple(fields)


def choice_problems(choices: list[str] | dict[str, str]) -> str | None:
    """Why a verbalizer cannot be used, or None."""
    verbalizers = list(choices.values()) if isinstance(choices, dict) else list(choices)
    if len(verbalizers) < 2:
        return f"{len(verbalizers)} choice(s): a classification task needs at least two classes"
    if any(not isinstance(v, str) or not v.strip() for v in verbalizers):
        return f"every choice needs a non-blank answer text, got {verbalizers}"
    if isinstance(choices, dict) and any(not str(k).strip() for k in choices):
        return f"every class name needs text, got {list(choices)}"
    twice = sorted({v for v in verbalizers if verbalizers.count(v) > 1})
    if twice:
        return f"choice(s) {twice} appear twice: two classes with one answer cannot be told apart"
    stripped = [v.strip() for v in verbalizers]
    if len(set(stripped)) < len(stripped):
        return f"choices {verbalizers} differ only in whitespace: a class name would match two of them"
    return None


def custom_template(name: str, prompt: str, choices: list[str] | dict[str, str], label_field: str = "label",
                    eval_split: str = "validation") -> TaskTemplate:
    """A recipe-defined task. `choices` is the verbalizer (label id -> answer text, appended to the prompt as
    written: " World" after "Topic:"), or {class name: answer text}; labels are ids or class names (for a
    plain list, the answers without their surrounding whitespace)."""
    problem = choice_problems(choices)
    if problem:
        raise ValueError(problem)
    if isinstance(choices, dict):
        names, verbalizers = tuple(str(k).strip() for k in choices), tuple(choices.values())
    else:
        verbalizers = tuple(choices)
        names = tuple(v.strip() for v in verbalizers)
    return TaskTemplate(name, template_fields(prompt), prompt, verbalizers, label_field=label_field,
                        eval_split=eval_split, label_names=names, builtin=False)


def template_for(data) -> TaskTemplate:
    """The template of a recipe's `data` section: its own (data.template) or a built-in one (data.task)."""
    if getattr(data, "template", None):
        return custom_template(data.task or DEFAULT_CUSTOM_NAME, data.template, data.choices,
                               data.label_field or "label", data.eval_split or "validation")
    return get_template(data.task)
