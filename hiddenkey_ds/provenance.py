"""What produced a run or a score: the package version and git commit, the library versions, python, the device,
the world size and the data read. The loop writes it to RUN_DIR/provenance.json (hiddenkey_ds.run_dir.PROVENANCE),
evaluation into every results file, and reports compare it across runs.

A foundation module: it imports nothing of the package (the loop turns what `data_changes` finds into a
RecipeError), so training, evaluation and experiments all use the same record.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# distribution name -> the key it is recorded under
LIBRARIES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "deepspeed": "deepspeed",
             "lm_eval": "lm_eval", "bitsandbytes": "bitsandbytes"}
# what makes the code that ran: a change in any of these between two segments of one run is said in its log
CODE_KEYS = ("package_version", "git_commit", "git_dirty")
# the checkout's directories whose edits make the code differ from its commit (run outputs under runs/ do not)
_CODE_PATHS = ("hiddenkey_ds", "eval", "ds_configs")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The package's and its libraries' installed versions (None: not installed)."""
    return {"hiddenkey_ds": _version("hiddenkey-ds"), **{key: _version(dist) for dist, key in LIBRARIES.items()},
            "python": platform.python_version()}


def git_state(package_dir: str | Path | None = None) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout the package is imported from; both None outside one (an
    installed wheel). Dirty: tracked or new files under the package, eval/ or ds_configs/ differ from the commit."""
    root = Path(package_dir or Path(__file__).resolve().parent).parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # a wheel inside some other repository (a venv in a project) is not a checkout of this package
    if top is None or Path(top).resolve() != root.resolve():
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--", *_CODE_PATHS)
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def device_name(device: Any = None) -> str:
    """The CUDA device's name (e.g. "NVIDIA H200"), else "cpu"."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def collect(world_size: int, device: Any = None, data: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The provenance record: package version, git commit + dirty flag, library versions, python, device,
    world size and (when given) the data sources read with their content hashes."""
    found = versions()
    record = {"package_version": found.pop("hiddenkey_ds"), **git_state(), "versions": found,
              "device": device_name(device), "world_size": world_size}
    if data is not None:
        record["data"] = data
    return record


def code_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key old -> new' for each of CODE_KEYS and library versions that differ between two records."""
    out = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in CODE_KEYS if old.get(key) != new.get(key)]
    a, b = old.get("versions") or {}, new.get("versions") or {}
    out += [f"{key} {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return out


def _source_id(source: dict[str, Any]) -> str:
    return str(source.get("path") or source.get("hub") or source.get("builtin"))


def data_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    """One line per data source whose content differs between two records (the same split read from another file,
    a file's sha256, a hub dataset's fingerprint or revision)."""
    before = {s.get("split"): s for s in old}
    out = []
    for source in new:
        split, was = source.get("split"), before.get(source.get("split"))
        if was is None:
            continue  # a split the run did not read before: a recipe change, which the recipe check judges
        if _source_id(was) != _source_id(source):
            out.append(f"split {split!r} is read from {_source_id(source)}, the run read {_source_id(was)}")
            continue
        for key in ("sha256", "fingerprint", "revision"):
            if was.get(key) != source.get(key):
                out.append(f"{_source_id(source)} (split {split!r}): {key} {str(was.get(key))[:16]} when the run "
                           f"started, {str(source.get(key))[:16]} now")
                break
    return out
