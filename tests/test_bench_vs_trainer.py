"""benchmarks/bench_vs_trainer.py --smoke: our loop and the HF Trainer (DeepSpeed ZeRO-2, PEFT) on 2 gloo ranks
run the same plain-LoRA job, and their loss sequences agree."""
import json
import subprocess
import sys

import pytest

from train_runs import REPO


@pytest.mark.slow          # two 2-rank launches, ~45 s of CPU: `pytest -m slow`
@pytest.mark.distributed
def test_trainer_comparison_smoke(tmp_path):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vs_trainer.py"), "--smoke",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["loss_agree"] and summary["loss_steps"] == 3
    assert summary["loss_max_rel_diff"] <= 1e-5
    for side in ("ours", "trainer"):
        assert summary[side]["step_s"] > 0 and summary[side]["peak_gib"] > 0
    assert "| hiddenkey-ds (`python -m hiddenkey_ds.train`) |" in proc.stdout
