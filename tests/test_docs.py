"""The README and docs/ pages against the tree: links resolve, and every path and module they name exists.

The package layout changes (files move between layers); a page that names a moved module keeps working as text
and silently sends its readers to nothing, so this checks the names, not the prose.
"""
from __future__ import annotations

import importlib
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", REPO / "eval" / "README.md", *(REPO / "docs").glob("*.md")])

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository path as the pages write it (relative to the repository root), not part of a longer path
REPO_PATH = re.compile(r"(?<![\w/.$-])((?:hiddenkey_ds|recipes|benchmarks|tests|ds_configs|eval/tasks|docs)/[\w./*{}<>,-]*[\w*}>])")
MODULE = re.compile(r"(?<![\w/.])(hiddenkey_ds(?:\.\w+)+)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = unicodedata.normalize("NFKC", heading.strip()).lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6}\s+(.+?)\s*$", text)}


def _ids(pages):
    return [str(p.relative_to(REPO)) for p in pages]


def test_the_pages_exist_and_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    missing = [str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md") if str(p.relative_to(REPO)) not in linked]
    assert missing == [], "docs pages the README's map does not link"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an external URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_repository_paths_exist(page):
    missing = []
    for path in REPO_PATH.findall(page.read_text()):
        if any(ch in path for ch in "*{<") or "..." in path or re.search(r"(^|/)[A-Z_]{3,}(/|\.|$)", path):
            continue  # a pattern or a placeholder (recipes/NAME.yaml), not a file
        if not (REPO / path).exists():
            missing.append(path)
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_modules_exist(page):
    """`hiddenkey_ds.a.b` (a module, or a module and one name defined in it) as commands and code name them."""
    missing = []
    for dotted in sorted(set(MODULE.findall(page.read_text()))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            where = REPO.joinpath(*parts[:cut])
            if where.with_suffix(".py").is_file() or (where / "__init__.py").is_file():
                break
        module, rest = ".".join(parts[:cut]), parts[cut:]
        if len(rest) > 1 or (rest and not hasattr(importlib.import_module(module), rest[0])):
            missing.append(dotted)
    assert missing == []


def test_readme_keeps_the_commands_ci_runs():
    """.ci/run sets up and tests exactly as the README tells a new user to."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("bash setup.sh", "python3 -m pytest"):
        assert re.search(rf"(?m)^{re.escape(command)}(\s|$)", ci), command
        assert re.search(rf"(?m)^{re.escape(command)}\s", readme), command
    assert re.search(r"(?m)^bash setup.sh && hiddenkey-ds demo$", readme)
