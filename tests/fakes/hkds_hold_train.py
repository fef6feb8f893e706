"""`python -m hiddenkey_ds.train` that waits, right after taking the run directory's lock (before the data and the
model), until the file HOLD_UNTIL exists (tests only): a training that is certainly running while a test starts
a second writer."""
import os
import sys
import time
from pathlib import Path

import hiddenkey_ds.models.loading as loading
from hiddenkey_ds import train

_load_tokenizer = loading.load_tokenizer


def load_tokenizer(recipe):
    go, deadline = Path(os.environ["HOLD_UNTIL"]), time.monotonic() + 300
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _load_tokenizer(recipe)


loading.load_tokenizer = load_tokenizer  # the loop imports it from there right after taking the lock
if __name__ == "__main__":
    sys.exit(train.main())
