"""Checkpoints a resume can trust, and the final PEFT adapter.

A checkpoint is RUN_DIR/checkpoints/step_N/: DeepSpeed's files for the trainable state (LoRA weights,
optimizer, scheduler), one RNG file per rank, and COMPLETE, written by rank 0 only after every rank has
finished writing. A directory without COMPLETE (a crash or kill mid-save) is never resumed from, so the
previous complete checkpoint is used. DeepSpeed's own `latest` pointer is not used for the same reason.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hiddenkey_ds.config.keys import flatten
from hiddenkey_ds.provenance import sha256_file
from hiddenkey_ds.run_dir import ADAPTER_META, ADAPTER_WEIGHTS, CHECKPOINT_COMPLETE as COMPLETE, CHECKPOINTS
from hiddenkey_ds.training.collective import run_collectively


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.name.removeprefix("step_").isdigit() and (p / COMPLETE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that no crash midway leaves it looking complete: the marker goes first."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(engine, run_dir: str | os.PathLike, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    A complete checkpoint of the same step is kept as it is: it can only be the one this run resumed from
    (no step ran since), and deleting it to write it again would leave a kill in between nothing newer than
    the previous checkpoint to resume from."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    path = root / tag
    rank = dist.get_rank()
    if (path / COMPLETE).is_file():
        dist.barrier()  # every rank sees the same marker before anyone moves on
        return path
    # every block below is collective (a failure on one rank ends the save on all, instead of a barrier that
    # waits for the distributed timeout): rank 0 removes an incomplete leftover of a crashed save at this step
    run_collectively(f"clearing {path}", lambda: shutil.rmtree(path) if path.exists() else None)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    # every rank's files are on disk before the marker says so
    run_collectively(f"saving {path}", lambda: torch.save(_rng_state(), path / f"rng_rank{rank}.pt"), every_rank=True)

    def mark_complete() -> None:
        _fsync_write(path / COMPLETE, json.dumps({"step": step}))
        for old in complete_checkpoints(run_dir)[:-keep]:
            _remove(old)

    run_collectively(f"completing {path}", mark_complete)
    return path


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Collective: restores engine state and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise RuntimeError(
            f"{rng_file} is missing: the checkpoint was written by a run with a different world size; resume with "
            "the same number of ranks"
        )
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def _gathered(params: list[torch.nn.Parameter]):
    """Full parameters on every rank (a no-op outside ZeRO-3)."""
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    from contextlib import nullcontext

    return nullcontext()


def save_adapter(peft_model, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Collective: write the PEFT adapter (gathered under ZeRO-3) atomically, reload it and check it equals
    the in-memory weights; `meta` and the weights file's sha256 go into ADAPTER_META inside it. Returns the saved
    state dict (rank 0) or {}."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def write() -> dict[str, torch.Tensor]:
        expected = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}
        if not expected or all(v.numel() == 0 for v in expected.values()):
            raise RuntimeError("the adapter state dict is empty: no LoRA weights to save")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp), state_dict=expected, safe_serialization=True)
        reloaded = load_file(str(tmp / ADAPTER_WEIGHTS))
        if reloaded.keys() != expected.keys():
            raise RuntimeError(f"saved adapter holds {sorted(reloaded)[:3]}..., expected {sorted(expected)[:3]}...")
        for key, value in expected.items():
            if value.shape != reloaded[key].shape or not torch.equal(value.to(reloaded[key].dtype), reloaded[key]):
                raise RuntimeError(f"the reloaded adapter differs from the trained weights at {key}")
        # the meta file is written last: a .tmp directory holding it is a complete adapter (see
        # recover_adapter_dir); its sha256 names the weights an evaluation scored
        record = {**(meta or {}), "sha256": sha256_file(tmp / ADAPTER_WEIGHTS)}
        _fsync_write(tmp / ADAPTER_META, json.dumps(record, indent=2))
        _swap_in(tmp, out_dir)
        return reloaded

    with _gathered(trainable):
        # rank 0 writes; every rank learns of a failure (an empty state dict, a reload mismatch, a full disk)
        saved = run_collectively(f"saving the adapter to {out_dir}", write)
    return saved or {}


def _aside(out_dir: Path) -> tuple[Path, Path]:
    return out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the complete tmp with renames only: at every instant out_dir is whole (old or new) or
    absent with a complete tmp beside it, never half deleted, so a kill leaves something recover_adapter_dir
    can finish."""
    _, old = _aside(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover_adapter_dir(out_dir: str | os.PathLike) -> None:
    """Finish or undo an adapter save a kill interrupted (rank 0, before anyone reads out_dir): a complete .tmp
    (its meta file is written last) is the newest adapter and replaces out_dir; an incomplete one is dropped;
    a leftover .old goes."""
    out_dir = Path(out_dir)
    tmp, old = _aside(out_dir)
    if (tmp / ADAPTER_META).is_file():
        _swap_in(tmp, out_dir)
    elif not out_dir.exists() and (old / ADAPTER_META).is_file():
        os.replace(old, out_dir)  # killed between the renames of a save whose .tmp is gone: keep the old one
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def read_adapter_meta(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The meta file of a complete adapter directory (None when absent or unreadable)."""
    path = Path(out_dir) / ADAPTER_META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# -- what a resume may change ------------------------------------------------------------------------------------

# Dotted recipe keys (a trailing ".*" covers a whole section) whose change cannot alter the trained weights or
# the validation metrics: logging and checkpoint cadence, the evaluation run after training, display names.
# Everything else, present or future (a new schema field is covered without being listed), must be equal.
SAFE_ON_RESUME = ("run.label", "train.log_every", "train.save_every", "train.keep_checkpoints", "eval.*")
# Not settings of the run at all: where it lives (found through it), the switch that asks for the resume and the
# one that accepts changed data files on it (checked against provenance.json instead).
IGNORED_ON_RESUME = ("run.output_dir", "run.resume", "run.accept_data_change")
_ABSENT = "<absent>"


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SAFE_ON_RESUME)


def _same_path(a: Any, b: Any) -> bool:
    """Two spellings of one existing local path (relative vs absolute, ./x vs x) are the same setting."""
    if not (isinstance(a, str) and isinstance(b, str)) or a.startswith("builtin:") or b.startswith("builtin:"):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(result-changing, safe) differences between two recipe dumps (``Recipe.model_dump(mode="json")``), each
    as (dotted key, old value, new value)."""
    a, b = flatten(old), flatten(new)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_ON_RESUME:
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va == vb or _same_path(va, vb):
            continue
        (safe if _safe(key) else unsafe).append((key, va, vb))
    return unsafe, safe
