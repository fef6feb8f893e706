"""benchmarks/gpu_check.py in its CPU --smoke mode, so that the GPU check script never rots."""
import importlib.util
import json
import subprocess
import sys

import pytest

from train_runs import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_smoke_steps_and_kernel_sections(tmp_path, capsys):
    """In-process sections: the step-time configurations (plain LoRA, hiddenkey_nokl on both kernels, hiddenkey
    with both consistency gradients) against the planner, and the attention kernels with the fused path's
    agreement with the sdpa reference (forward only on CPU)."""
    gpu_check = _module()
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--only", "steps,kernel", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    configs = [r["config"] for r in rows]
    for name in ("plain LoRA", "hiddenkey_nokl (", "hiddenkey_nokl, sdpa kernel", "consistency grad one_branch",
                 "consistency grad both", "flash causal", "column DropKey, sdpa path", "fused == sdpa path"):
        assert any(c.startswith(name) or name in c for c in configs), (name, configs)
    assert all(r["status"] in ("ok", "info") for r in rows), rows
    assert all(r["plan_gib"] is not None for r in rows if r["section"] == "steps")
    table = capsys.readouterr().out
    assert "| check | configuration | result |" in table and "SMOKE MODE" in table


def test_report_flags_failures_and_misses():
    gpu_check = _module()
    report = gpu_check.Report()
    report.add(gpu_check.Row("kernel", "fused", "1.5x", status="MISS (target <= 1.3x)"))
    assert report.missed and not report.failed
    report.fail("zero", "zero3", RuntimeError("boom\nthe last line"))
    assert report.failed and "error: the last line" in report.table()


def test_unknown_section_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "stepz"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


@pytest.mark.slow  # ~45 s of 2 cores: the steps and kernel sections above keep the script in the default suite
@pytest.mark.distributed
def test_smoke_launched_runs(tmp_path):
    """The launched sections as a user runs them: QLoRA 4-bit through `python -m hiddenkey_ds.train` (finite
    loss, adapter saved) and ZeRO-2 / ZeRO-3 through the `deepspeed` launcher (equal losses)."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "qlora,zero", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["section"] for r in rows] == ["qlora", "zero", "zero", "zero"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert rows[0]["result"].startswith("loss ") and "ZeRO-2 vs ZeRO-3" in rows[-1]["config"]
