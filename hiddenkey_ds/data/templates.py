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
* Label ids index ``choices``: ``choices[example[label_field]]``.

The wording follows lm-evaluation-harness' own GLUE / SuperGLUE tasks, the prompts the paper's line of
LLaMA work evaluates with.
"""
from __future__ import annotations

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
        label = int(raw) if isinstance(raw, bool) or float(raw).is_integer() else None
        if label is None or not 0 <= label < len(self.choices):
            # GLUE test splits carry label -1 (hidden labels): they cannot be trained or scored on
            raise ValueError(
                f"task {self.name!r}: label {raw!r} is not one of 0..{len(self.choices) - 1} "
                f"(verbalizer {list(self.choices)}); unlabelled test splits cannot be used"
            )
        return label


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
