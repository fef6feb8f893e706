"""Packaging: what a wheel ships, and a non-editable `pip install .` into a fresh virtual environment that trains
a shipped recipe and finds the lm-eval tasks from outside any checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from hiddenkey_ds.resources import LAYOUT, resource_dir, shipped_recipe

REPO = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_and_data_directory_is_shipped():
    from setuptools import find_packages

    config = _setuptools_config()
    listed = set(config["packages"])
    assert set(find_packages(str(REPO), include=["hiddenkey_ds*"])) <= listed, (
        "a new hiddenkey_ds subpackage is missing from pyproject.toml's [tool.setuptools] packages")
    for name, where in LAYOUT.items():
        package = f"hiddenkey_ds._shipped.{name}"
        assert package in listed and config["package-dir"][package] == where
        assert resource_dir(name) == REPO / where
    patterns = config["package-data"]
    shipped = {name: {p for pattern in patterns[f"hiddenkey_ds._shipped.{name}"] for p in (REPO / where).glob(pattern)}
               for name, where in LAYOUT.items()}
    tracked = subprocess.run(["git", "ls-files", *LAYOUT.values()], cwd=REPO, capture_output=True, text=True)
    files = {REPO / f for f in tracked.stdout.split() if not f.endswith("README.md")} if tracked.returncode == 0 else set()
    assert files <= set().union(*shipped.values()), sorted(map(str, files - set().union(*shipped.values())))


def test_readme_recipe_paths_resolve_to_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here
    assert shipped_recipe("recipes/tiny-lora.yaml") == REPO / "recipes" / "tiny-lora.yaml"
    assert shipped_recipe("recipes/sweeps/smollm2-rte-cpu.yaml") == REPO / "recipes" / "sweeps" / "smollm2-rte-cpu.yaml"
    assert shipped_recipe("recipes/nope.yaml") is None and shipped_recipe("tiny-lora.yaml") is None
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny-lora.yaml").write_text("run: {}\n")
    assert shipped_recipe("recipes/tiny-lora.yaml") is None  # a recipe of the working directory wins


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv (seeing this interpreter's packages for the dependencies) with hiddenkey_ds installed from a
    copy of the tracked files, non-editable, and an empty working directory outside the checkout."""
    root = tmp_path_factory.mktemp("wheel-install")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HIDDENKEY_DS_CACHE=str(root / "cache"))
    # pip of this interpreter, pointed at the venv: --no-build-isolation builds with the setuptools at hand
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-build-isolation", "--quiet", str(src)], env=env, check=True, capture_output=True, text=True)
    work = root / "work"
    work.mkdir()
    return python, env, work


def _run(installed, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    python, env, work = installed
    return subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_install_trains_a_shipped_recipe(installed):
    where = _run(installed, "-c", "import hiddenkey_ds, hiddenkey_ds.resources as r; "
                 "print(hiddenkey_ds.__file__); print(r.in_checkout()); print(r.resource_dir('ds_configs'))")
    assert where.returncode == 0, where.stderr
    module, in_checkout, ds_dir = where.stdout.split()
    assert "site-packages" in module and in_checkout == "False" and ds_dir.endswith("_shipped/ds_configs")
    run = _run(installed, "-m", "hiddenkey_ds.cli", "train", "recipes/tiny-lora.yaml", "run.output_dir=out",
               "train.max_steps=2", "train.eval_every=null", "train.save_every=null", "data.max_train_examples=32",
               "data.max_eval_examples=8", "run.deepspeed=zero3")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (installed[2] / "out" / "summary.json").is_file()
    assert (installed[2] / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_wheel_install_finds_the_lm_eval_tasks(installed):
    found = _run(installed, "-c", "from lm_eval.tasks import TaskManager; from hiddenkey_ds.resources import "
                 "resource_dir; m = TaskManager(include_path=str(resource_dir('eval_tasks'))); "
                 "print(sorted(n for n in m.all_tasks if n.startswith('hk_')))")
    assert found.returncode == 0, found.stderr[-3000:]
    assert "'hk_toy_sst2'" in found.stdout and "'hk_rte_local'" in found.stdout


@pytest.mark.slow
def test_wheel_install_evaluate_uses_the_shipped_tasks(installed):
    check = _run(installed, "-c", "from hiddenkey_ds.evaluation import harness; assert harness.TASKS_DIR.is_dir(), "
                 "harness.TASKS_DIR")
    assert check.returncode == 0, check.stderr[-2000:]
