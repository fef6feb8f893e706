"""The layers docs/architecture.md draws, as the code's imports: each subpackage imports only the layers below
it, so there is no import cycle, and the method (the paper) imports nothing of the package but itself."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import hiddenkey_ds

PACKAGE = Path(hiddenkey_ds.__file__).resolve().parent

# layer -> the layers it may import (besides itself). Top-level modules: errors, resources, distributed, run_dir and
# provenance and run_lock are the foundation; cli and train are entry points. run_dir (the run directory's names)
# is open to every layer but the method, which does no I/O and imports nothing of the package; provenance (versions,
# commit, content hashes) is open to the data layer, which hashes the files it reads. run_lock (one writer per run
# directory) uses the two foundation modules below it: its refusal is a RecipeError, its names come from run_dir.
FOUNDATION = {"errors", "resources", "distributed", "run_dir", "provenance", "run_lock"}
ALLOWED = {
    **{name: set() for name in FOUNDATION},
    "run_lock": {"errors", "run_dir"},
    "method": set(),
    "data": {"errors", "run_dir", "provenance"},
    "config": {"errors", "resources", "run_dir", "method", "data"},
    "models": {"errors", "distributed", "run_dir", "data"},
    "training": FOUNDATION | {"method", "data", "config", "models"},
    "evaluation": FOUNDATION | {"data", "config", "models"},
    "planning": {"errors", "resources", "run_dir", "method", "config", "models"},
    "experiments": FOUNDATION | {"method", "data", "config", "models", "evaluation"},
    "train": {"errors", "distributed", "run_dir", "config", "models", "training", "evaluation"},
    "cli": {"distributed", "run_dir"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges() -> dict[str, dict[str, str]]:
    """layer -> {imported layer: one file that imports it}, from every import statement (also the lazy ones)."""
    edges: dict[str, dict[str, str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _layer(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("hiddenkey_ds.") and _layer(name) != src:
                    edges.setdefault(src, {}).setdefault(_layer(name), str(path.relative_to(PACKAGE.parent)))
    return edges


def test_every_module_belongs_to_a_known_layer():
    found = {_layer(m.name) for m in pkgutil.iter_modules(hiddenkey_ds.__path__, "hiddenkey_ds.")}
    assert found <= set(ALLOWED), f"new top-level module or subpackage {found - set(ALLOWED)}: add it to ALLOWED " \
                                  "and to docs/architecture.md"


def test_layers_import_only_the_layers_below_them():
    wrong = [f"{src} -> {dst} ({where})" for src, dsts in _edges().items() for dst, where in dsts.items()
             if dst not in ALLOWED.get(src, set())]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_allowed_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert state.get(node) != 1, f"cycle: {' -> '.join(stack + (node,))}"
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in ALLOWED[node]:
            visit(nxt, stack + (node,))
        state[node] = 2

    for layer in ALLOWED:
        visit(layer, ())


def test_every_module_imports_on_its_own():
    """Catches a module whose import raises: a name left behind by a move, a cycle that bites at import time."""
    for info in pkgutil.walk_packages(hiddenkey_ds.__path__, "hiddenkey_ds."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
