"""Recipes: the typed schema, `key=value` overrides and start-up validation.

    from hiddenkey_ds.config import load_recipe, RecipeError
    recipe = load_recipe("recipes/tiny-hiddenkey.yaml", ["train.max_steps=5"], world_size=2)
"""
from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.config.reference import reference_markdown
from hiddenkey_ds.config.schema import (
    DataSection, EvalSection, LoraSection, ModelSection, Recipe, RunSection, TrainSection,
)
from hiddenkey_ds.config.validate import FINISHED_MARKER, load_recipe

__all__ = [
    "FINISHED_MARKER", "DataSection", "EvalSection", "LoraSection", "ModelSection", "Recipe", "RecipeError",
    "RunSection", "TrainSection", "load_recipe", "reference_markdown",
]
