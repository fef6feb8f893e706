"""The adapter of the best validation step, kept beside the final one (the paper's protocol: LoRA's setup, which
it follows, reports each run's best epoch).

"Best" is judged on the loop's validation split only, which should be carved from the training data
(`data.validation_from_train`) so that the split a table is scored on never picks the checkpoint: highest
answer accuracy, ties broken by the lower validation loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hiddenkey_ds.run_dir import ADAPTER_DIRS

BEST_DIR = ADAPTER_DIRS["best"]


def better(candidate: dict[str, float], best: dict[str, Any] | None) -> bool:
    if best is None:
        return True
    return (candidate["accuracy"], -candidate["loss"]) > (best["accuracy"], -best["loss"])


# the fields of the best-so-far record (summary.json's `best`, the checkpoint's client state)
RECORD_KEYS = ("step", "accuracy", "loss", "adapter")


class BestAdapter:
    """Tracks the best validation step and keeps its adapter in RUN_DIR/adapter_best.

    The record travels two ways: inside adapter_best/ (its meta file, written with the weights, last, and swapped
    in by renames), and in each checkpoint's client state. The adapter is saved at an evaluation step but a
    checkpoint only at the next save step, so after a kill the checkpoint's record can be older than the adapter
    on disk; `restore` therefore takes the record from adapter_best/ itself, which always describes the weights
    beside it. Every kill window: before the save (adapter_best/ and its record are the previous best), during it
    (recover_adapter_dir finishes or drops the half-done swap), after it and before the next checkpoint (the
    record of the newer adapter wins over the checkpoint's)."""

    def __init__(self, run_dir: str | Path, state: dict[str, Any] | None = None, enabled: bool = True):
        self.dir = Path(run_dir) / BEST_DIR
        self.best = state
        self.enabled = enabled

    def consider(self, model, step: int, metrics: dict[str, float]) -> bool:
        """Collective (every rank calls it with the same all-reduced metrics): save the adapter if this step is
        the best so far. Returns whether it was."""
        if not self.enabled or not better(metrics, self.best):
            return False
        from hiddenkey_ds.training.checkpoint import save_adapter

        self.best = {"step": step, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                     "adapter": str(self.dir)}
        save_adapter(model, self.dir, meta={"kind": "best", **self.best})
        return True

    def state(self) -> dict[str, Any] | None:
        return self.best

    def restore(self, checkpoint_best: dict[str, Any] | None) -> str | None:
        """Collective, on resume: the best-so-far record from adapter_best/ (finishing a save a kill interrupted),
        else none. Returns a line for the log when it differs from the checkpoint's record."""
        import torch.distributed as dist

        from hiddenkey_ds.training.checkpoint import read_adapter_meta, recover_adapter_dir

        if not self.enabled:
            self.best = checkpoint_best
            return None
        if dist.get_rank() == 0:
            recover_adapter_dir(self.dir)
        dist.barrier()
        meta = read_adapter_meta(self.dir)
        on_disk = {k: meta.get(k) for k in RECORD_KEYS} if meta is not None else None
        if on_disk is not None:
            on_disk["adapter"] = str(self.dir)
        self.best = on_disk
        if (on_disk or {}).get("step") == (checkpoint_best or {}).get("step"):
            return None
        if on_disk is None:
            return (f"{BEST_DIR}/ is missing although the checkpoint records a best step "
                    f"{checkpoint_best.get('step')}: the best is judged anew from the next evaluation")
        return (f"best so far: step {on_disk['step']} from {BEST_DIR}/ (written after the checkpoint, whose record "
                f"says step {(checkpoint_best or {}).get('step')})")
