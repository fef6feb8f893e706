"""`python -m hiddenkey_ds.train` whose rank 0 fails inside the adapter save, as a full disk would (tests only).

    FAIL_SAVE_RANK=0      the rank whose PEFT save_pretrained raises OSError(ENOSPC) (default 0)
    FAIL_EXIT_DIR=DIR     every rank touches DIR/rankN when its main returns or raises; the failing rank then
    FAIL_LINGER_S=S       stays alive (its connections open) until every other rank has done so, or S seconds

The lingering stands in for NCCL, which does not notice that a peer has died: under gloo, the other ranks would
learn of rank 0's death from the closed connection within seconds, so a test could not tell a rank that was told
of the failure from one that merely lost its peer.
"""
import errno
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from peft import PeftModel

from hiddenkey_ds import train

VICTIM = int(os.environ.get("FAIL_SAVE_RANK", "0"))
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
EXIT_DIR, LINGER_S = os.environ.get("FAIL_EXIT_DIR"), float(os.environ.get("FAIL_LINGER_S", "0"))


def save_pretrained(self, save_directory, *args, **kwargs):
    if dist.get_rank() == VICTIM:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(save_directory))
    return _save_pretrained(self, save_directory, *args, **kwargs)


def main() -> int:
    try:
        return train.main()
    finally:
        if EXIT_DIR:
            Path(EXIT_DIR, f"rank{RANK}").touch()
            if RANK == VICTIM:
                others = [Path(EXIT_DIR, f"rank{r}") for r in range(WORLD) if r != VICTIM]
                deadline = time.monotonic() + LINGER_S
                while time.monotonic() < deadline and not all(p.exists() for p in others):
                    time.sleep(0.2)
                print(f"[fake] rank {RANK}: the other ranks had "
                      f"{'all' if all(p.exists() for p in others) else 'NOT'} exited when it left", flush=True)


_save_pretrained, PeftModel.save_pretrained = PeftModel.save_pretrained, save_pretrained
if __name__ == "__main__":
    sys.exit(main())
