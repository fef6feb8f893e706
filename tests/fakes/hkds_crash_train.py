"""`python -m hiddenkey_ds.train` that SIGKILLs itself at a chosen point of a checkpoint save (tests only).

    CRASH_STEP=N CRASH_POINT=mid_save CRASH_RANK=1   rank 1 dies inside the save of step N: DeepSpeed's files of
                                                      that step are written, its RNG file and COMPLETE are not
    CRASH_STEP=N CRASH_POINT=after_save              every rank dies right after the save of step N completed
    CRASH_STEP=N CRASH_POINT=after_best              every rank dies right after adapter_best/ of step N was
                                                      written (before any later checkpoint)
    CRASH_STEP=N CRASH_POINT=mid_best                rank 0 dies in the middle of that write: the old
                                                      adapter_best/ renamed aside, the complete new one not yet
                                                      in its place
    SHIFT_VALIDATION_LOSS=X                          adds X to every validation loss: a resumed run whose replayed
                                                      evaluations do not reproduce the killed run's (as GPU kernels
                                                      do not, bit for bit)

A real `kill -9`, at a point a timing-based kill from outside cannot hit reliably on a model this small.
"""
import os
import signal
import sys

import torch.distributed as dist

import hiddenkey_ds.training.best_adapter as best_adapter
import hiddenkey_ds.training.checkpoint as checkpoint
import hiddenkey_ds.training.loop as loop
from hiddenkey_ds import train

STEP, POINT, VICTIM = int(os.environ["CRASH_STEP"]), os.environ["CRASH_POINT"], int(os.environ.get("CRASH_RANK", "0"))
SHIFT = float(os.environ.get("SHIFT_VALIDATION_LOSS", "0"))
_save, _rng_state = checkpoint.save_checkpoint, checkpoint._rng_state
_consider, _swap_in, _validation = best_adapter.BestAdapter.consider, checkpoint._swap_in, loop.validation_metrics
_considering = {"step": None}


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _rng_state_or_die():
    if dist.get_rank() == VICTIM:
        _die()
    return _rng_state()


def save_checkpoint(engine, run_dir, step, client_state, keep):
    if step == STEP and POINT == "mid_save":
        checkpoint._rng_state = _rng_state_or_die
    path = _save(engine, run_dir, step, client_state, keep)
    if step == STEP and POINT == "after_save":
        _die()
    return path


def consider(self, model, step, metrics):
    _considering["step"] = step
    saved = _consider(self, model, step, metrics)
    if saved and step == STEP and POINT == "after_best":
        _die()
    return saved


def swap_in(tmp, out_dir):
    if POINT == "mid_best" and _considering["step"] == STEP and out_dir.name == best_adapter.BEST_DIR:
        os.replace(out_dir, out_dir.with_name(out_dir.name + ".old"))  # the first of the swap's two renames
        _die()
    _swap_in(tmp, out_dir)


def validation_metrics(*args, **kwargs):
    metrics = _validation(*args, **kwargs)
    return {**metrics, "loss": metrics["loss"] + SHIFT}


checkpoint.save_checkpoint = save_checkpoint
best_adapter.BestAdapter.consider = consider
checkpoint._swap_in = swap_in
loop.validation_metrics = validation_metrics
if __name__ == "__main__":
    sys.exit(train.main())
