import os
import sys

import pytest
import torch

# tests import their shared helpers (tiny_models.py) as plain modules
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    """One builtin-model cache directory per session, set as HIDDENKEY_DS_CACHE for the module using it
    (test_models.py, test_data.py) and restored afterwards."""
    root = tmp_path_factory.getbasetemp() / "hiddenkey_ds_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIDDENKEY_DS_CACHE", str(root))
        yield root
