"""The recipe schema: every key a recipe may set, its type, default and meaning.

Each section is a pydantic model with ``extra="forbid"`` so that a misspelt key is an error, never a silently
ignored setting. Field descriptions are the user documentation: the key reference in docs/recipes.md is
generated from them (``hiddenkey_ds.config.reference_markdown``).

Checks that need only one field live here (types, ranges, allowed values); checks across sections or against
the outside world (world size, the DeepSpeed JSON, the output directory) live in ``validate.py``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hiddenkey_ds.method.config import DropoutConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(_Section):
    output_dir: str = Field(
        description="run directory (config.yaml, metrics.jsonl, checkpoints/, adapter/, summary.json); a directory "
        "holding a finished run (summary.json) is never overwritten"
    )
    seed: int = Field(0, description="seeds model init of new weights (LoRA), dropout masks and data shuffling")
    resume: bool = Field(
        False, description="continue from the newest complete checkpoint in output_dir (required to reuse a run dir)"
    )
    accept_data_change: bool = Field(
        False,
        description="on resume, continue although a data file's content (sha256 in the run's provenance.json) or a "
        "hub dataset's fingerprint changed since the run started; without it such a resume is refused",
    )
    deepspeed: str = Field(
        "zero2",
        description="DeepSpeed config: a name in ds_configs/ (zero0, zero1, zero2, zero3, zero3_offload) or a path to "
        "a JSON file; ZeRO-2 suits LoRA (ZeRO-3 re-gathers the frozen base every step)",
    )
    label: str | None = Field(
        None,
        description="method name reports group and show this run under (hiddenkey-ds sweep sets the sweep's method "
        "name); null = a name derived from the dropout setting",
    )


class ModelSection(_Section):
    name: str = Field(
        description="builtin:tiny-llama, builtin:smollm2-135m-instruct, a local HF model directory or a hub id"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for a hub id")
    dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="compute/storage dtype of the base model and DeepSpeed precision (bf16 needs Ampere+ GPUs)"
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="bitsandbytes quantization of the frozen base: 4bit = QLoRA (quant storage = dtype so ZeRO-3 can "
        "partition it); 8bit is not allowed with ZeRO-3",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (NF4 is QLoRA's)")
    double_quant: bool = Field(True, description="4-bit: also quantize the quantization constants (~0.4 bit/param)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (reentrant + input grads: works with PEFT and ZeRO-3)"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel when no attention dropout is active (dropout installs its own)"
    )
    device_map: str | dict[str, Any] | None = Field(
        None, description="transformers device_map; leave unset under DeepSpeed (not allowed with ZeRO-3)"
    )
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the hub (off: LLaMA needs none)")


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="PEFT's lora_dropout on the LoRA input (the framework's 'DropoutLoRA' baseline)"
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="module names that get adapters (the paper: q_proj, v_proj), or all-linear"
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases are trained (LLaMA has none)")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is empty: name at least one module, e.g. [q_proj, v_proj]")
        return v


class DataSection(_Section):
    format: Literal["classification", "sft"] = Field(
        "classification",
        description="classification = prompt template + verbalizer, loss on the answer; sft = prompt/response or "
        "chat messages, loss on the response",
    )
    template: str | None = Field(
        None,
        description="your own classification task: the prompt, a str.format template over the data's columns "
        "(e.g. \"{text}\\nTopic:\"); with data.choices (and data.label_field) it replaces a built-in task, and "
        "data.task names it (default custom; lm-eval task hk_NAME, generated into RUN_DIR/eval/tasks)",
    )
    choices: list[str] | dict[str, str] | None = Field(
        None,
        description="with data.template: the verbalizer, one answer text per class in label-id order, appended to the "
        "prompt as written (e.g. [\" World\", \" Sports\"]), or {class name: answer text}; labels in the data are ids "
        "or class names (for a list: the answers without surrounding spaces)",
    )
    label_field: str | None = Field(None, description="with data.template: the column holding the label (null = label)")
    task: str | None = Field(
        None, description="template name for classification (rte, mrpc, sst2, cola, qnli, boolq; see "
        "data/templates.py), or the name of the recipe's own task (data.template)"
    )
    path: str | None = Field(
        None,
        description="local directory ({train,dev,validation,test}.{jsonl,json,csv,tsv,parquet}) or file, "
        "builtin:toy-sst2, or a hub dataset id; unset = the task's hub dataset. Relative paths are relative to the "
        "working directory",
    )
    name: str | None = Field(None, description="hub dataset configuration (default: the task's, e.g. rte for nyu-mll/glue)")
    revision: str | None = Field(None, description="hub dataset revision")
    eval_path: str | None = Field(None, description="a separate local file for the evaluation split")
    train_split: str = Field("train", description="split trained on")
    eval_split: str | None = Field(
        "validation", description="split evaluated on (a local 'dev' file counts as validation); null = no evaluation"
    )
    prompt_field: str = Field("prompt", description="sft: column holding the prompt")
    response_field: str = Field("response", description="sft: column holding the response")
    messages_field: str | None = Field(
        None, description="sft: column holding chat messages [{role, content}]; the last assistant turn is the response"
    )
    chat_template: bool = Field(
        True, description="sft: render prompt/response with the tokenizer's chat template (else prompt + response + eos)"
    )
    max_length: int = Field(512, gt=0, description="tokens per example, prompt + answer")
    truncation: Literal["left", "drop"] = Field(
        "left", description="an over-long example: cut the prompt from the left (keeping BOS) or drop it; the answer is never cut"
    )
    max_train_examples: int | None = Field(None, gt=0, description="use a seeded random subset of the training split")
    max_eval_examples: int | None = Field(None, gt=0, description="use the first N evaluation examples")
    validation_from_train: int | float | None = Field(
        None, gt=0,
        description="carve the loop's validation split from the training data: N examples, or a fraction if < 1 "
        "(seeded by split_seed, the same for every run.seed); it replaces eval_split in the loop and picks "
        "adapter_best, so the split a table is scored on (lm-eval, eval_split) never picks a checkpoint",
    )
    split_seed: int = Field(0, description="seeds validation_from_train and label_noise (not the run's seed)")
    label_noise: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="classification: flip this fraction of the training labels to another class (seeded by "
        "split_seed and run.seed; the carved validation keeps its labels): makes memorization visible",
    )
    shuffle: bool = Field(True, description="reshuffle training data every epoch (seeded by run.seed and the epoch)")

    @field_validator("template", mode="before")
    @classmethod
    def _template_quoted(cls, v: Any) -> Any:
        if isinstance(v, (dict, set)):  # YAML reads an unquoted {text} as a mapping
            raise ValueError("expected a string, got a YAML mapping: an unquoted {column} is read as one (hint: quote "
                             "the template, e.g. template: \"Text: {text}\\nTopic:\" in the recipe, or "
                             "data.template='Text: {text} Topic:' as an override)")
        return v

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str | None) -> str | None:
        if v is not None:
            from hiddenkey_ds.data.templates import template_fields

            try:
                template_fields(v)
            except ValueError as err:
                raise ValueError(f"{err} (hint: the prompt is a str.format template over the data's columns, "
                                 "e.g. \"{text}\\nTopic:\")") from None
        return v

    @field_validator("choices")
    @classmethod
    def _usable_choices(cls, v: list[str] | dict[str, str] | None) -> list[str] | dict[str, str] | None:
        if v is not None:
            from hiddenkey_ds.data.templates import choice_problems

            problem = choice_problems(v)
            if problem:
                raise ValueError(f"{problem} (hint: one distinct answer text per class, e.g. "
                                 "[\" World\", \" Sports\"], or {class name: answer text})")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None, info: ValidationInfo) -> str | None:
        from hiddenkey_ds.data.templates import DEFAULT_CUSTOM_NAME, TASK_NAME, get_template

        if info.data.get("template") is not None:  # the recipe's own task: data.task only names it
            v = DEFAULT_CUSTOM_NAME if v is None else v
            try:
                get_template(v)
            except KeyError:
                if not TASK_NAME.match(v):
                    raise ValueError(f"task name {v!r} for data.template: it names the lm-eval task and its files "
                                     "(hint: letters, digits and _, e.g. data.task=my_topics)") from None
                return v
            raise ValueError(f"task {v!r} is a built-in task, but data.template defines a task of its own (hint: "
                             "give it another name, e.g. data.task=my_topics, or drop data.template)")
        if v is None:
            return v
        try:
            return get_template(v).name
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None

    @field_validator("validation_from_train")
    @classmethod
    def _carve_size(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and v >= 1:
            if v.is_integer():
                return int(v)
            raise ValueError(f"validation_from_train={v}: a fraction must be < 1 (e.g. 0.1) and a count whole")
        return v

    @model_validator(mode="after")
    def _format_needs(self) -> "DataSection":
        if self.label_noise and self.format != "classification":
            raise ValueError("label_noise flips class labels: it needs format=classification")
        custom = self.template is not None
        if custom and self.format != "classification":
            raise ValueError("data.template defines a classification task, but data.format=sft (hint: set "
                             "data.format=classification, or drop data.template for prompt/response data)")
        if custom and self.choices is None:
            raise ValueError("data.template without data.choices: the task has no verbalizer (hint: one answer "
                             "text per class, e.g. data.choices='[\" World\", \" Sports\", \" Business\"]')")
        if not custom and (self.choices is not None or self.label_field is not None):
            raise ValueError("data.choices / data.label_field define a task of your own, but data.template is not "
                             "set (hint: set data.template, the prompt over your columns; built-in tasks bring "
                             "their own verbalizer and label column)")
        if custom and self.path is None:
            raise ValueError("data.template: a task of your own has no hub dataset to default to (hint: set "
                             "data.path to its local directory or file, or a hub dataset id)")
        if self.format == "classification" and self.task is None:
            raise ValueError("format=classification needs a task template: set data.task (e.g. rte)")
        if self.path is None and self.task is None:
            raise ValueError("no data source: set data.path (local file/dir or hub id) or data.task")
        return self


class TrainSection(_Section):
    micro_batch_size: int = Field(8, gt=0, description="examples per rank per forward (HiddenKey forwards 2x this)")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    global_batch_size: int | None = Field(
        None, gt=0, description="optional check: must equal micro_batch_size x grad_accum x world size"
    )
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="after warmup: linear decay to 0, cosine decay, or constant"
    )
    warmup: int | float = Field(
        0.06, ge=0, description="warmup length: a fraction of the total steps if < 1 (e.g. 0.06), else a step count"
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to train (set this or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (set this or max_steps)")
    max_grad_norm: float | None = Field(1.0, ge=0, description="gradient clipping norm; null or 0 = no clipping")
    torch_adam: bool | None = Field(
        None, description="use torch.optim.AdamW instead of DeepSpeed's fused/CPU Adam; null = only without a GPU"
    )
    loss_chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the supervised LM head (memory cap)")
    log_every: int = Field(10, gt=0, description="optimizer steps between train metric lines")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between evaluations; null = at the end only")
    save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints; null = at the end only")
    keep_best: bool = Field(
        True, description="also keep the adapter of the best validation step (accuracy, then loss) in "
        "output_dir/adapter_best (the paper's best-epoch protocol); needs a validation split")
    keep_checkpoints: int = Field(2, gt=0, description="newest complete checkpoints kept in output_dir/checkpoints")

    @field_validator("warmup")
    @classmethod
    def _warmup_kind(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            if v.is_integer():
                return int(v)  # 10.0 from YAML means 10 steps
            raise ValueError(f"warmup={v}: a fraction must be < 1 (e.g. 0.06) and a step count a whole number")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas={list(v)}: each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _one_length(self) -> "TrainSection":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(
                "set exactly one of train.max_steps and train.epochs "
                f"(got max_steps={self.max_steps}, epochs={self.epochs})"
            )
        return self

    # -- the one source of the batch arithmetic ---------------------------------------------------
    def global_batch(self, world_size: int) -> int:
        """Examples per optimizer step across all ranks."""
        return self.micro_batch_size * self.grad_accum * world_size

    def total_steps(self, num_train_examples: int, world_size: int) -> int:
        """Optimizer steps of the run: max_steps, or epochs over the data (a partial last batch is dropped)."""
        if self.max_steps is not None:
            return self.max_steps
        steps_per_epoch = num_train_examples // self.global_batch(world_size)
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_train_examples} training examples make no full global batch of {self.global_batch(world_size)}"
            )
        return max(1, round(steps_per_epoch * self.epochs))

    def warmup_steps(self, total_steps: int) -> int:
        if isinstance(self.warmup, float):
            return int(self.warmup * total_steps)
        return self.warmup

    @property
    def clipping(self) -> float:
        return float(self.max_grad_norm or 0.0)


class EvalSection(_Section):
    at_end: bool = Field(True, description="when training ends, run `hiddenkey-ds eval RUN_DIR` as its own process "
                         "(lm-eval on the final adapter, and on adapter_best/ when kept)")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names; empty = the training task's")
    limit: int | float | None = Field(None, gt=0, description="lm-eval limit: examples per task, or a fraction if < 1")
    batch_size: int = Field(8, gt=0, description="lm-eval batch size")


class Recipe(_Section):
    """A complete, validated training recipe. Build it with ``load_recipe``, not directly."""

    run: RunSection
    model: ModelSection
    lora: LoraSection = LoraSection()
    dropout: DropoutConfig = DropoutConfig()
    data: DataSection
    train: TrainSection
    eval: EvalSection = EvalSection()

    def to_yaml(self) -> str:
        """The resolved recipe as YAML; loading it back gives the same recipe."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


SECTIONS: dict[str, type[BaseModel]] = {
    "run": RunSection,
    "model": ModelSection,
    "lora": LoraSection,
    "dropout": DropoutConfig,
    "data": DataSection,
    "train": TrainSection,
    "eval": EvalSection,
}
