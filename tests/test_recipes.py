"""Every shipped recipe validates, matches the command it opens with, and resolves a DeepSpeed config.

Nothing here downloads: validation never touches the model or the data, so the 7B/70B recipes check offline.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hiddenkey_ds.config import load_recipe
from hiddenkey_ds.config.deepspeed import BUILTIN_DS_CONFIGS, DS_CONFIG_DIR, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
REQUIRED = {
    "tiny-lora.yaml", "tiny-hiddenkey.yaml", "smollm2-rte-lora.yaml", "smollm2-rte-hiddenkey.yaml",
    "llama2-7b-lora.yaml", "llama2-7b-hiddenkey.yaml", "llama2-7b-qlora-hiddenkey.yaml", "llama3-8b-hiddenkey.yaml",
    "llama2-70b-qlora-hiddenkey-zero3.yaml",
}
COMMAND = re.compile(
    r"(?:python -m|deepspeed(?: --num_gpus (?P<gpus>\d+))?(?: --\S+)* (?:-m|--module)|"
    r"torchrun --nproc_per_node (?P<procs>\d+) -m) hiddenkey_ds\.train (?P<path>recipes/\S+\.yaml)"
)


def _opening_comment(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _command_world_size(path: Path) -> int:
    """The world size of the command the recipe's opening comment gives for itself."""
    for line in _opening_comment(path.read_text()):
        match = COMMAND.search(line)
        if match and match["path"] == f"recipes/{path.name}":
            return int(match["gpus"] or match["procs"] or 1)
    raise AssertionError(f"{path.name}: the opening comment must give the exact command that runs this recipe")


def test_required_recipes_exist():
    assert REQUIRED <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)
    world_size = _command_world_size(path)
    assert len(_opening_comment(path.read_text())) >= 4, "explain the recipe's trade-offs in its opening comment"
    # the world size of its own command satisfies the batch arithmetic
    recipe = load_recipe(path, world_size=world_size, check_output_dir=False)
    total = recipe.train.max_steps or recipe.train.total_steps(num_train_examples=2490, world_size=world_size)
    ds = resolve_ds_config(recipe, world_size, total_steps=total)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == recipe.train.global_batch(world_size)
    assert ds["bf16"]["enabled"] == (recipe.model.dtype == "bf16")
    if recipe.model.quantization != "none" or recipe.model.name.startswith("meta-llama/Llama-2-70b"):
        assert recipe.model.gradient_checkpointing
    if "hiddenkey" in path.stem:
        assert recipe.dropout.dual_pass and recipe.dropout.key.pattern == "column"
    else:
        assert not recipe.dropout.active


def test_first_line_is_the_command_for_the_training_recipes():
    for name in REQUIRED:
        first = (REPO / "recipes" / name).read_text().splitlines()[0]
        assert first.startswith("# ") and COMMAND.search(first)["path"] == f"recipes/{name}", first


def test_recipes_never_share_an_output_dir(monkeypatch):
    monkeypatch.chdir(REPO)
    dirs = [load_recipe(p, check_output_dir=False).run.output_dir for p in RECIPES]
    assert len(dirs) == len(set(dirs))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_resolved_config_is_accepted_by_deepspeed(path, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.chdir(REPO)
    recipe = load_recipe(path, check_output_dir=False)
    # without torch.distributed DeepSpeed assumes one rank, so check the one-rank resolution
    parsed = DeepSpeedConfig(resolve_ds_config(recipe, 1, total_steps=100))
    assert parsed.train_batch_size == recipe.train.micro_batch_size * recipe.train.grad_accum
    assert parsed.zero_optimization_stage == json.loads((DS_CONFIG_DIR / f"{recipe.run.deepspeed}.json").read_text())[
        "zero_optimization"]["stage"]
    assert parsed.optimizer_name == "adamw"


@pytest.mark.parametrize(
    "lora, hiddenkey", [("tiny-lora.yaml", "tiny-hiddenkey.yaml"), ("smollm2-rte-lora.yaml", "smollm2-rte-hiddenkey.yaml")]
)
def test_paired_recipes_differ_only_in_dropout(lora, hiddenkey, monkeypatch):
    monkeypatch.chdir(REPO)
    a = load_recipe(REPO / "recipes" / lora, check_output_dir=False).model_dump()
    b = load_recipe(REPO / "recipes" / hiddenkey, check_output_dir=False).model_dump()
    for dump in (a, b):
        dump.pop("dropout")
        dump["run"].pop("output_dir")
    assert a == b


@pytest.mark.parametrize("name", BUILTIN_DS_CONFIGS)
def test_builtin_ds_configs_resolve(name):
    recipe = load_recipe(REPO / "recipes" / "tiny-lora.yaml", [f"run.deepspeed={name}"], check_output_dir=False)
    ds = resolve_ds_config(recipe, 2)
    stage = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}[name]
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_param" in ds["zero_optimization"]) == (name == "zero3_offload")
    assert ds["train_batch_size"] == 16 and "auto" not in json.dumps(ds)
