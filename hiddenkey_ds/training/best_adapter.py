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


class BestAdapter:
    """Tracks the best validation step and keeps its adapter in RUN_DIR/adapter_best. Its state travels in the
    checkpoint's client state, so a resumed run keeps judging against the same best."""

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
