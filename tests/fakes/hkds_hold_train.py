"""`python -m hiddenkey_ds.train` that waits, right after taking the run directory's lock, until the file
HOLD_UNTIL exists (tests only): a training that is certainly running while a test starts a second writer."""
import os
import sys
import time
from pathlib import Path

import hiddenkey_ds.training.loop as loop
from hiddenkey_ds import train

_check_run_dir = loop.check_run_dir


def check_run_dir(recipe):
    go, deadline = Path(os.environ["HOLD_UNTIL"]), time.monotonic() + 300
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _check_run_dir(recipe)


loop.check_run_dir = check_run_dir
if __name__ == "__main__":
    sys.exit(train.main())
