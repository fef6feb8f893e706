"""The data files the package needs besides its modules: DeepSpeed configs, recipes, lm-eval task YAMLs.

In a checkout (an editable install, or PYTHONPATH) they are the repository's own `ds_configs/`, `recipes/` and
`eval/tasks/`, the paths the README and the recipes name. A wheel (`pip install .`) has no repository around
it: pyproject.toml ships the same directories inside the package as `hiddenkey_ds/_shipped/<name>/`.

    from hiddenkey_ds.resources import resource_dir
    resource_dir("ds_configs") / "zero2.json"
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
# name -> its place in a checkout (pyproject.toml's [tool.setuptools.package-dir] maps each into _shipped/<name>)
LAYOUT = {"ds_configs": "ds_configs", "recipes": "recipes", "eval_tasks": "eval/tasks"}


def in_checkout() -> bool:
    """Running from the source tree (a wheel in site-packages has no pyproject.toml beside the package)."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / LAYOUT["ds_configs"]).is_dir()


def resource_dir(name: str) -> Path:
    if name not in LAYOUT:
        raise KeyError(f"unknown resource {name!r}; known: {', '.join(LAYOUT)}")
    path = CHECKOUT / LAYOUT[name] if in_checkout() else PACKAGE / "_shipped" / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing: this installation of hiddenkey_ds lacks its data files (hint: reinstall with "
            "`pip install .` from a checkout, or use an editable install: `pip install -e .`)")
    return path


def shipped_recipe(path: str | Path) -> Path | None:
    """A recipe path as the README writes it (`recipes/NAME.yaml`, `recipes/sweeps/NAME.yaml`) that does not exist
    relative to the working directory, found among the recipes the package ships; else None."""
    p = Path(path)
    if p.is_absolute() or p.exists() or len(p.parts) < 2 or p.parts[0] != "recipes":
        return None
    candidate = resource_dir("recipes").joinpath(*p.parts[1:])
    return candidate if candidate.is_file() else None
