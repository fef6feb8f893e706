"""load_recipe: YAML + overrides -> a validated Recipe, or one RecipeError listing every problem."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.config.keys import dotted_location, suggest
from hiddenkey_ds.config.overrides import apply_overrides
from hiddenkey_ds.config.schema import SECTIONS, Recipe
from hiddenkey_ds.run_dir import FINISHED_MARKER

_RATE_HINT = "a rate is a drop probability in [0, 1); 0 switches that dropout off"
_TYPE_NAMES = {
    "int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list such as [a, b]", "dict_type": "a mapping",
    "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys", "tuple_type": "a list such as [0.9, 0.999]",
}


def _format_error(err: dict[str, Any]) -> str:
    path = dotted_location(err["loc"])
    kind, msg = err["type"], err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    hint = ""
    if kind == "extra_forbidden":
        return f"{path}: unknown key (hint: {suggest(path.split('.'))})"
    if kind == "missing":
        hint = f"add `{path.rsplit('.', 1)[-1]}:` to the recipe's {path.rsplit('.', 1)[0] or 'top level'} section or pass {path}=VALUE"
    elif kind in _TYPE_NAMES:
        msg = f"expected {_TYPE_NAMES[kind]}, got {err.get('input')!r}"
    elif kind in {"less_than", "greater_than_equal", "greater_than", "less_than_equal"}:
        msg = f"{msg}, got {err.get('input')!r}"
        if path.endswith(".rate") or path == "lora.dropout":
            hint = _RATE_HINT
    return f"{path}: {msg}" + (f" (hint: {hint})" if hint else "")


def format_validation_errors(error: ValidationError) -> list[str]:
    """One line per problem; a union's per-branch failures become one line naming every accepted type."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for err in error.errors():
        by_path.setdefault(dotted_location(err["loc"]), []).append(err)
    lines = []
    for path, errs in by_path.items():
        kinds = [_TYPE_NAMES[e["type"]] for e in errs if e["type"] in _TYPE_NAMES]
        if len(errs) > 1 and len(kinds) == len(errs):
            lines.append(f"{path}: expected {' or '.join(dict.fromkeys(kinds))}, got {errs[0].get('input')!r}")
        else:
            lines.append(_format_error(errs[0]))
    return lines


def _read_yaml(path: str | Path) -> dict[str, Any]:
    from hiddenkey_ds.resources import shipped_recipe

    path = shipped_recipe(path) or Path(path)  # `recipes/x.yaml` outside a checkout: the installed copy
    if path.is_dir():
        raise RecipeError(f"recipe file {str(path)!r} is a directory (hint: give a recipe YAML file, e.g. "
                          "recipes/tiny-lora.yaml)")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (hint: recipes live in recipes/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read ({err.strerror}) (hint: check its "
                          "permissions)") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                          f"offset {err.start}) (hint: a recipe is a YAML text file; re-encode it as UTF-8, or check "
                          "that the path names the recipe and not another file)") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err} (hint: fix it at the line and column named; a file cut "
                          "off ends inside an open bracket or quote)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of sections (run, model, ...), not a {type(raw).__name__}")
    return raw


def _valid_sections(raw: dict[str, Any]) -> dict[str, BaseModel | None]:
    """Each section validated on its own, so cross-section checks run even when another section is broken."""
    out: dict[str, BaseModel | None] = {}
    for name, model in SECTIONS.items():
        out[name] = _lenient(model, raw.get(name, {}))
    return out


def _lenient(model: type[BaseModel], value: Any) -> BaseModel | None:
    """``value`` validated, with its broken keys dropped (defaults instead); None if that still fails.

    The broken keys are already reported; dropping them lets the cross-section checks see the rest.
    """
    data = dict(value) if isinstance(value, dict) else {}
    for _ in range(3):
        try:
            return model.model_validate(data)
        except ValidationError as err:
            broken = {e["loc"][0] for e in err.errors() if e["loc"] and e["loc"][0] in data}
            if not broken:
                return None
            for key in broken:
                del data[key]
    return None


def _batch_problems(train: Any, world_size: int | None) -> list[str]:
    if train is None or train.global_batch_size is None:
        return []
    per_rank = train.micro_batch_size * train.grad_accum
    if world_size is None:
        if train.global_batch_size % per_rank:
            return [
                f"train.global_batch_size: {train.global_batch_size} is not a multiple of micro_batch_size "
                f"{train.micro_batch_size} x grad_accum {train.grad_accum} = {per_rank}, so no world size fits "
                "(hint: global batch = micro_batch_size x grad_accum x world size)"
            ]
        return []
    actual = train.global_batch(world_size)
    if actual == train.global_batch_size:
        return []
    hint = "global batch = micro_batch_size x grad_accum x world size; unset train.global_batch_size to derive it"
    denom = train.micro_batch_size * world_size
    if train.global_batch_size % denom == 0:
        hint = f"set train.grad_accum={train.global_batch_size // denom} to keep the global batch; " + hint
    return [
        f"train.global_batch_size: {train.global_batch_size} != micro_batch_size {train.micro_batch_size} x "
        f"grad_accum {train.grad_accum} x world size {world_size} = {actual} (hint: {hint})"
    ]


def _zero3_problems(run: Any, model: Any) -> list[str]:
    if run is None or model is None:
        return []
    from hiddenkey_ds.config.deepspeed import load_ds_json, zero_stage

    try:
        stage = zero_stage(load_ds_json(run.deepspeed))
    except RecipeError as err:
        return err.problems
    if stage != 3:
        return []
    problems = []
    if model.quantization == "8bit":
        problems.append(
            f"model.quantization: 8bit with ZeRO-3 ({run.deepspeed}) is known to corrupt training (the loss is "
            "an order of magnitude off while ZeRO-1/2 are correct: bitsandbytes issue #1451) (hint: use "
            "model.quantization=4bit, whose storage dtype ZeRO-3 can partition, or run.deepspeed=zero2)"
        )
    if model.device_map is not None:
        problems.append(
            f"model.device_map: {model.device_map!r} with ZeRO-3 ({run.deepspeed}): ZeRO-3 places and partitions "
            "the weights itself, a device_map fights it (hint: remove model.device_map, or use run.deepspeed=zero2)"
        )
    return problems


def _output_dir_problems(run: Any, check_finished: bool) -> list[str]:
    """A file where the run directory should be is always wrong; writability and a finished run only matter to
    the run itself (``check_finished``), not to tools that merely read the recipe (plan, launch.sh)."""
    if run is None:
        return []
    out = Path(run.output_dir).expanduser()
    # the nearest existing ancestor decides whether the directory can be created at all
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == out else f"lies under the file {existing}"
        return [f"run.output_dir: {run.output_dir} {what}, not a directory (hint: choose another run.output_dir; "
                "nothing was written)"]
    if check_finished and existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"run.output_dir: {existing} is not writable, so {run.output_dir} cannot be created or written "
                "(hint: choose a run.output_dir you can write)"]
    marker = out / FINISHED_MARKER
    if check_finished and marker.exists() and not run.resume:
        return [
            f"run.output_dir: {run.output_dir} holds a finished run ({FINISHED_MARKER}); results are never "
            "overwritten (hint: choose another run.output_dir, or pass run.resume=true to reuse it)"
        ]
    return []


def _data_path_problems(data: Any) -> list[str]:
    """Local data paths that do not exist, before anything loads (hiddenkey_ds.data.loading reads them later)."""
    if data is None:
        return []
    from hiddenkey_ds.data.loading import BUILDERS, looks_local

    problems = []
    if data.path is not None and not data.path.startswith("builtin:") and looks_local(data.path) \
            and not Path(data.path).expanduser().exists():
        problems.append(
            f"data.path: {data.path!r} does not exist (relative paths are relative to the working directory "
            f"{Path.cwd()}) (hint: check the path; GLUE copies look like ../shared/data/glue/RTE)")
    if data.eval_path is not None:
        eval_file = Path(data.eval_path).expanduser()
        if not eval_file.is_file() or eval_file.suffix not in BUILDERS:
            problems.append(f"data.eval_path: {data.eval_path!r} is not a {'/'.join(BUILDERS)} file "
                            "(hint: give an existing file of one of these formats)")
    return problems


def _lm_head_problems(lora: Any, dropout: Any, train: Any, data: Any) -> list[str]:
    """LoRA on the LM head, where the chunked loss head (hiddenkey_ds.method.objective) applies it with gradient more than
    once per forward: twice per chunk in a dual pass that back-propagates through both (consistency_grad=both;
    one_branch runs the second pass's head without grad), once per chunk when a micro-batch can hold more
    supervised tokens than one chunk (ZeRO-3 then also pads every rank to the same number of chunks). Each use adds
    a gradient in its own (reentrant, checkpointed) backward, which DeepSpeed's ZeRO gradient hooks reduce per use
    (ZeRO-1/2: "gradient computed twice for this partition")."""
    if lora is None or not isinstance(lora.target_modules, list) or "lm_head" not in lora.target_modules:
        return []
    reasons = []
    both = dropout is not None and dropout.dual_pass and getattr(dropout, "consistency_grad", "both") == "both"
    if both:
        reasons.append("the dual pass with consistency_grad=both runs the head twice per chunk with gradients")
    if train is not None and data is not None and train.micro_batch_size * data.max_length > train.loss_chunk_tokens:
        reasons.append(f"a micro-batch of {train.micro_batch_size} x {data.max_length} tokens can need more than one "
                       f"chunk of train.loss_chunk_tokens={train.loss_chunk_tokens}")
    if not reasons:
        return []
    return [f"lora.target_modules: LoRA on lm_head is used more than once per forward by the chunked loss head "
            f"({'; '.join(reasons)}), which DeepSpeed's gradient reduction does not support (hint: remove lm_head "
            "from lora.target_modules" + (", or use dropout.consistency_grad=one_branch" if both else "")
            + ("" if len(reasons) == 1 and both else
               ", or raise train.loss_chunk_tokens to micro_batch_size x data.max_length") + ")"]


def _eval_at_end_problems(run: Any, model: Any, data: Any, ev: Any) -> list[str]:
    """eval.at_end runs `hiddenkey-ds eval RUN_DIR` (hiddenkey_ds.evaluation.harness) after training, in one process on
    one device: refuse what it cannot do, before hours of training."""
    if ev is None or not ev.at_end:
        return []
    problems = []
    if data is not None and not ev.tasks:
        derived = _eval_task_problem(data)
        if derived:
            problems.append(derived)
    if run is not None and model is not None and model.quantization == "4bit":  # 8bit + ZeRO-3: refused anyway
        from hiddenkey_ds.config.deepspeed import load_ds_json, zero_stage

        try:
            stage = zero_stage(load_ds_json(run.deepspeed))
        except RecipeError:
            stage = None  # reported by _zero3_problems
        if stage == 3:
            problems.append(
                f"eval.at_end: this {model.quantization} recipe partitions its quantized base over the ranks with "
                f"ZeRO-3 ({run.deepspeed}), but the evaluation after training loads the base whole, in one process "
                "on one device, and in full precision first (results.json, the stock lm-eval setting: about 4x the "
                "4-bit size) (hint: set eval.at_end=false and evaluate afterwards with `hiddenkey-ds eval RUN_DIR` "
                "on a device that holds the full-precision base)"
            )
    return problems


def _eval_task_problem(data: Any) -> str | None:
    """Why no lm-eval task can be derived from the training data (evaluate.tasks_for_recipe's rule), or None."""
    if data.format != "classification" or not data.task:
        return ("eval.at_end: the run trains on free-form (sft) data, which has no multiple-choice task to score "
                "(hint: name lm-eval tasks in eval.tasks, e.g. eval.tasks=[hk_rte], or set eval.at_end=false)")
    if data.template:
        return _custom_eval_task_problem(data)
    from hiddenkey_ds.data.templates import get_template

    template = get_template(data.task)
    path = data.path
    if path is None or path == template.hub_path or path.startswith("builtin:"):
        return None
    local = Path(path).expanduser()
    if local.is_dir():
        return None
    if local.is_file():
        return (f"eval.at_end: data.path={path!r} is a single file, and the local lm-eval task "
                f"(hk_{template.name}_local) reads a directory with train/dev files (hint: set "
                f"eval.tasks=[hk_{template.name}] to score the hub copy, point data.path at a directory holding "
                f"train.* and dev.*, or set eval.at_end=false and run `hiddenkey-ds eval RUN_DIR --tasks "
                f"hk_{template.name}_local --data-dir DIR`)")
    from hiddenkey_ds.data.loading import looks_local

    if looks_local(path):
        return None  # a missing local path: the data check reports it
    return (f"eval.at_end: data.path={path!r} is a hub dataset other than the task's ({template.hub_path}), so no "
            f"lm-eval task scores it (hint: name the tasks in eval.tasks, or set eval.at_end=false)")


def _custom_eval_task_problem(data: Any) -> str | None:
    """The lm-eval task of a recipe's own task (data.template) scores data.eval_path, else data.eval_split of
    data.path (hiddenkey_ds.evaluation.custom_task): say so now when neither exists, not after training."""
    if data.eval_path is not None:
        return None  # a missing file is reported by the data path check
    hint = ("set data.eval_path=FILE (a labelled file of the same columns), or set eval.at_end=false and train "
            "without a score")
    if data.eval_split is None:
        return (f"eval.at_end: data.eval_split is null and data.eval_path unset, so the lm-eval task of "
                f"data.task={data.task} has no labelled split to score (hint: {hint})")
    from hiddenkey_ds.data.loading import canonical_split, split_files

    local = Path(data.path).expanduser()
    if local.is_file():
        return (f"eval.at_end: data.path={data.path!r} is a single file (the training data), so the lm-eval task of "
                f"data.task={data.task} has no evaluation split to score (hint: {hint})")
    if local.is_dir():
        try:
            files = split_files(local)
        except ValueError:
            return None  # two files for one split: reported by the data loader
        split = canonical_split(data.eval_split)
        if split not in files:
            return (f"eval.at_end: {data.path} holds no file for data.eval_split={data.eval_split!r} (found "
                    f"{', '.join(sorted(files)) or 'none'}), which the lm-eval task of data.task={data.task} scores "
                    f"(hint: add {split}.jsonl (or dev.*) beside train.*, or {hint})")
    return None


def _ds_problems(recipe: Recipe, world_size: int | None) -> list[str]:
    from hiddenkey_ds.config.deepspeed import resolve_ds_config

    try:
        # the step count of an epochs recipe is unknown before the data is read; any value checks the JSON
        resolve_ds_config(recipe, world_size or 1, total_steps=recipe.train.max_steps or 1)
    except RecipeError as err:
        return err.problems
    return []


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), world_size: int | None = None,
    check_output_dir: bool = True,
) -> Recipe:
    """Read, override and validate a recipe. Raises one ``RecipeError`` listing every problem found.

    ``world_size`` (ranks of the run) enables the batch arithmetic check; ``check_output_dir`` checks the
    machine the run starts on: it refuses an output directory that holds a finished run unless
    ``run.resume=true`` or cannot be written, and local data paths that do not exist.
    """
    raw = _read_yaml(path)
    problems = apply_overrides(raw, list(overrides))
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems += format_validation_errors(err)
    sections = _valid_sections(raw)
    problems += _batch_problems(sections["train"], world_size)
    problems += _zero3_problems(sections["run"], sections["model"])
    problems += _output_dir_problems(sections["run"], check_finished=check_output_dir)
    if check_output_dir:  # the machine the run starts on: its data must be there (plan and launch.sh may not see it)
        problems += _data_path_problems(sections["data"])
    problems += _lm_head_problems(sections["lora"], sections["dropout"], sections["train"], sections["data"])
    problems += _eval_at_end_problems(sections["run"], sections["model"], sections["data"], sections["eval"])
    if recipe is not None and not any(p.startswith("train.global_batch_size") or p.startswith("run.deepspeed") for p in problems):
        problems += _ds_problems(recipe, world_size)
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), source=str(path))
    return recipe
