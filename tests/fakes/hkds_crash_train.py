"""`python -m hiddenkey_ds.train` that SIGKILLs itself at a chosen point of a checkpoint save (tests only).

    CRASH_STEP=N CRASH_POINT=mid_save CRASH_RANK=1   rank 1 dies inside the save of step N: DeepSpeed's files of
                                                      that step are written, its RNG file and COMPLETE are not
    CRASH_STEP=N CRASH_POINT=after_save              every rank dies right after the save of step N completed

A real `kill -9`, at a point a timing-based kill from outside cannot hit reliably on a model this small.
"""
import os
import signal
import sys

import torch.distributed as dist

import hiddenkey_ds.training.checkpoint as checkpoint
from hiddenkey_ds import train

STEP, POINT, VICTIM = int(os.environ["CRASH_STEP"]), os.environ["CRASH_POINT"], int(os.environ.get("CRASH_RANK", "0"))
_save, _rng_state = checkpoint.save_checkpoint, checkpoint._rng_state


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


checkpoint.save_checkpoint = save_checkpoint
if __name__ == "__main__":
    sys.exit(train.main())
