"""Resume and evaluation edge cases, seeds and provenance (issue 16):

- adapter_best/ and the best-so-far record agree in every kill window (a real kill between an improving evaluation
  and the next checkpoint; the interrupted swap of adapter_best/ recovered);
- a results file records the adapter it scored (kind, step, sha256), and a mismatch with the finished run's
  adapter is stale: the sweep evaluates it again, the report refuses it;
- every (seed, rank) pair has its own random streams, and torch, random and numpy are all seeded;
- provenance.json (versions, git commit, device, data hashes) in every run directory, a resume refusing changed
  data unless run.accept_data_change, and reports showing the versions and warning where they differ.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hiddenkey_ds import provenance
from hiddenkey_ds.experiments import report as report_mod
from hiddenkey_ds.experiments import sweep as sweep_mod
from hiddenkey_ds.evaluation import harness
from hiddenkey_ds.training.checkpoint import recover_adapter_dir
from test_sweep import fabricate_run
from train_runs import REPO, metrics, train


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- seeds -------------------------------------------------------------------------------------------------------

def _draws(seed: int, rank: int) -> tuple[list[float], float, float]:
    from hiddenkey_ds.training.loop import seed_rank

    seed_rank(seed, rank)
    return torch.rand(4).tolist(), random.random(), float(np.random.random())


def test_every_seed_rank_pair_has_its_own_streams_and_every_generator_is_seeded():
    # seed + rank made (0, 1) and (1, 0) the same stream: the paper sweep's seed 0 on rank 1 drew seed 1's masks
    pairs = [(s, r) for s in range(5) for r in range(4)]
    draws = {pair: _draws(*pair) for pair in pairs}
    assert len({tuple(d[0]) for d in draws.values()}) == len(pairs)
    assert draws[(0, 1)][0] != draws[(1, 0)][0]
    # random and numpy are seeded too: the same pair draws the same numbers again, other pairs others
    assert _draws(3, 2) == draws[(3, 2)]
    assert len({d[1] for d in draws.values()}) == len(pairs) and len({d[2] for d in draws.values()}) == len(pairs)


# -- provenance records ------------------------------------------------------------------------------------------

def test_provenance_names_versions_commit_device_and_world_size(tmp_path):
    from importlib import metadata

    record = provenance.collect(world_size=4)
    assert record["package_version"] == metadata.version("hiddenkey-ds")
    for lib in ("torch", "transformers", "peft", "deepspeed", "lm_eval", "bitsandbytes"):
        assert record["versions"][lib] == metadata.version(lib)
    assert record["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert record["world_size"] == 4
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    # a copy of the package outside any checkout (an installed wheel): no commit, no dirty flag
    copy = tmp_path / "site" / "hiddenkey_ds"
    copy.mkdir(parents=True)
    assert provenance.git_state(copy) == {"git_commit": None, "git_dirty": None}


def test_load_splits_records_the_sha256_of_every_file_read(tmp_path):
    from hiddenkey_ds.config.schema import DataSection
    from hiddenkey_ds.data.loading import load_splits

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n')
    (data / "dev.jsonl").write_text('{"sentence": "fine", "label": 1}\n')
    sources: list[dict] = []
    load_splits(DataSection(format="classification", task="sst2", path=str(data)), sources)
    assert sources == [
        {"split": "train", "path": str((data / "train.jsonl").resolve()), "sha256": _sha(data / "train.jsonl"),
         "bytes": (data / "train.jsonl").stat().st_size},
        {"split": "validation", "path": str((data / "dev.jsonl").resolve()), "sha256": _sha(data / "dev.jsonl"),
         "bytes": (data / "dev.jsonl").stat().st_size}]
    changed = [{**sources[0], "sha256": "0" * 64}, sources[1]]
    assert provenance.data_changes(sources, sources) == []
    [line] = provenance.data_changes(sources, changed)
    assert str(data / "train.jsonl") in line and "sha256" in line
    moved = [sources[0], {**sources[1], "path": "/elsewhere/dev.jsonl"}]
    assert "/elsewhere/dev.jsonl" in provenance.data_changes(sources, moved)[0]
    hub = [{"split": "train", "hub": "glue", "name": "rte", "revision": None, "fingerprint": "a"}]
    assert provenance.data_changes(hub, [{**hub[0], "fingerprint": "b"}])


# -- adapter_best/ in every kill window --------------------------------------------------------------------------

def _weights(step: int) -> bytes:
    """A real (tiny) safetensors file per step: the harness reads the weights' header before it scores them."""
    from safetensors.torch import save

    return save({"lora_A": torch.full((2, 2), float(step))})


def _adapter(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(_weights(step))
    (path / "hiddenkey_ds.json").write_text(json.dumps({"kind": "best", "step": step,
                                                        "sha256": _sha(path / "adapter_model.safetensors")}))
    return path


def _step(path: Path) -> int:
    return json.loads((path / "hiddenkey_ds.json").read_text())["step"]


@pytest.mark.parametrize("window", ["tmp_partial", "tmp_complete", "between_renames", "old_left_over",
                                    "renamed_aside_only"])
def test_an_interrupted_adapter_best_save_is_finished_or_undone(tmp_path, window):
    best, tmp, old = tmp_path / "adapter_best", tmp_path / "adapter_best.tmp", tmp_path / "adapter_best.old"
    expected = {"tmp_partial": 2, "tmp_complete": 3, "between_renames": 3, "old_left_over": 3,
                "renamed_aside_only": 2}[window]
    if window == "tmp_partial":           # killed while writing the new adapter: the old one stays
        _adapter(best, 2)
        _adapter(tmp, 3)
        (tmp / "hiddenkey_ds.json").unlink()
    elif window == "tmp_complete":        # killed after the new one was complete, before the swap
        _adapter(best, 2)
        _adapter(tmp, 3)
    elif window == "between_renames":     # the old one renamed aside, the new one not yet in place
        _adapter(old, 2)
        _adapter(tmp, 3)
    elif window == "old_left_over":       # swapped, the old one not yet deleted
        _adapter(best, 3)
        _adapter(old, 2)
    else:                                 # the old one aside and no complete new one: put the old one back
        _adapter(old, 2)
    recover_adapter_dir(best)
    assert _step(best) == expected
    assert _sha(best / "adapter_model.safetensors") == json.loads((best / "hiddenkey_ds.json").read_text())["sha256"]
    assert not tmp.exists() and not old.exists()


KILL_RUN = ("train.max_steps=4", "train.eval_every=1", "train.save_every=2", "train.log_every=1", "train.warmup=1",
            "data.max_train_examples=64", "data.max_eval_examples=16", "eval.at_end=false")


def _kill_after_best_then_resume(tmp_path: Path, point: str) -> tuple[Path, str, str]:
    """tiny-lora on one rank: every evaluation improves, checkpoint at step 2; killed after adapter_best/ of step 3
    was written (or in the middle of writing it), then resumed from step 2 with replayed evaluations that come out
    worse than the killed run's (as a GPU's replay may): the replay never rewrites adapter_best/."""
    out = tmp_path / "run"
    died = train("tiny-lora.yaml", out, *KILL_RUN, check=False, module="hkds_crash_train",
                 env={"CRASH_STEP": "3", "CRASH_POINT": point})
    assert died.returncode != 0 and not (out / "summary.json").exists()
    written = [r for r in metrics(out, "validation")]
    assert [r["step"] for r in written] == [1, 2, 3] and written[2]["loss"] < written[1]["loss"] < written[0]["loss"]
    weights = (out / "adapter_best.tmp" if point == "mid_best" else out / "adapter_best") / "adapter_model.safetensors"
    killed_step3 = _sha(weights)
    resumed = train("tiny-lora.yaml", out, *KILL_RUN, "run.resume=true", module="hkds_crash_train",
                    env={"CRASH_STEP": "0", "CRASH_POINT": "none", "SHIFT_VALIDATION_LOSS": "1.0"})
    return out, resumed.stdout + resumed.stderr, killed_step3


def _assert_best_consistent(out: Path, killed_step3: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "adapter_best" / "hiddenkey_ds.json").read_text())
    assert summary["best"]["step"] == meta["step"] == 3
    assert summary["best"]["loss"] == meta["loss"] and summary["best"]["accuracy"] == meta["accuracy"]
    assert meta["sha256"] == _sha(out / "adapter_best" / "adapter_model.safetensors") == killed_step3
    assert not (out / "adapter_best.tmp").exists() and not (out / "adapter_best.old").exists()


def test_kill_between_improving_evaluation_and_next_checkpoint_keeps_best_consistent(tmp_path):
    out, log, killed_step3 = _kill_after_best_then_resume(tmp_path, "after_best")
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in log
    _assert_best_consistent(out, killed_step3)
    assert "best so far: step 3 from adapter_best/" in log


@pytest.mark.slow  # ~35 s; the same windows are covered in-process by the recovery test above
def test_kill_in_the_middle_of_the_adapter_best_swap_keeps_best_consistent(tmp_path):
    out, log, killed_step3 = _kill_after_best_then_resume(tmp_path, "mid_best")
    _assert_best_consistent(out, killed_step3)
    assert "best so far: step 3 from adapter_best/" in log


# -- stale evaluations -------------------------------------------------------------------------------------------

def _finished_with_adapters(run_dir: Path, best_step: int = 3, scored_step: int = 3, seed: int = 0) -> Path:
    """A fabricated finished run whose adapter dirs hold weights and meta; results_best.json scored the adapter_best
    of `scored_step` (another step than the run's own: an evaluation made while the run was still training)."""
    fabricate_run(run_dir, f"run.seed={seed}", final=0.6, best=0.7, best_validation=(best_step, 0.7, 0.5))
    for kind, step in (("adapter", 8), ("adapter_best", best_step)):
        _adapter(run_dir / kind, step)
    for stem, kind, step in (("results", "final", 8), ("results_best", "best", scored_step)):
        path = run_dir / "eval" / f"{stem}.json"
        results = json.loads(path.read_text())
        results["hiddenkey_ds"].update(step=step, adapter_sha256=hashlib.sha256(_weights(step)).hexdigest())
        path.write_text(json.dumps(results))
    return run_dir


def test_a_results_file_of_another_adapter_is_stale_for_sweep_and_report(tmp_path):
    fresh = _finished_with_adapters(tmp_path / "fresh")
    assert harness.stale_reason(fresh, json.loads((fresh / "eval" / "results_best.json").read_text())) is None
    assert sweep_mod.missing_evaluations(fresh, None) is None

    stale = _finished_with_adapters(tmp_path / "stale", best_step=5, scored_step=3, seed=1)
    said: list[str] = []
    assert sweep_mod.missing_evaluations(stale, None, said.append) == "best"  # the sweep evaluates it again
    assert "adapter of step 3" in said[0] and "now the one of step 5" in said[0]
    with pytest.raises(report_mod.ReportError, match="stale lm-eval scores") as err:
        report_mod.write_report([fresh, stale], tmp_path / "report")
    assert str(stale / "eval" / "results_best.json") in str(err.value) and "--adapter best" in str(err.value)
    assert not (tmp_path / "report").exists()


def test_results_file_records_the_adapter_it_scored_and_its_provenance(tmp_path):
    """The adapter record as the harness reads it (before lm-eval loads the adapter) and the fields it writes."""
    run_dir = _finished_with_adapters(tmp_path / "run", best_step=4)
    record = harness.adapter_record(run_dir / "adapter_best")
    assert record == {"kind": "best", "step": 4, "sha256": _sha(run_dir / "adapter_best" / "adapter_model.safetensors")}
    target = harness.resolve_target(str(run_dir), adapter="best")
    job = harness.Job("results_best.json", "best", {"pretrained": "x", "peft": str(run_dir / "adapter_best")})
    block = harness._provenance(target, job, ["t"], {}, None, 8, "cpu", None, record)
    assert block["step"] == 4 and block["adapter_sha256"] == record["sha256"] and block["adapter_kind"] == "best"


# -- data changes on resume, and reports --------------------------------------------------------------------------

def _local_data(directory: Path) -> Path:
    from hiddenkey_ds.data.toy import toy_sst2_rows

    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sst2_rows("train")[:64]))
    (directory / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_sst2_rows("validation")[:16]))
    return directory


@pytest.mark.slow  # ~40 s: a run killed after its first checkpoint, a refused resume, an accepted one
def test_resume_refuses_a_changed_data_file_unless_accepted(tmp_path):
    data = _local_data(tmp_path / "data")
    out = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=2", "train.eval_every=null", "eval.at_end=false",
            f"data.path={data}", "data.max_train_examples=null", "data.max_eval_examples=null")
    died = train("tiny-lora.yaml", out, *args, check=False, module="hkds_crash_train",
                 env={"CRASH_STEP": "2", "CRASH_POINT": "after_save"})
    assert died.returncode != 0
    record = json.loads((out / "provenance.json").read_text())
    assert {s["split"]: s["sha256"] for s in record["data"]} == {"train": _sha(data / "train.jsonl"),
                                                                  "validation": _sha(data / "dev.jsonl")}
    assert record["world_size"] == 1 and record["device"] == "cpu" and record["resumes"] == []

    with open(data / "dev.jsonl", "a") as f:
        f.write(json.dumps({"sentence": "an added row", "label": 1}) + "\n")
    refused = train("tiny-lora.yaml", out, *args, "run.resume=true", check=False)
    assert refused.returncode == 2 and refused.stderr.count(str((data / "dev.jsonl").resolve())) == 1
    assert "run.accept_data_change=true" in refused.stderr and "Traceback" not in refused.stderr

    accepted = train("tiny-lora.yaml", out, *args, "run.resume=true", "run.accept_data_change=true")
    assert "resumed on changed data (run.accept_data_change)" in accepted.stdout + accepted.stderr
    record = json.loads((out / "provenance.json").read_text())
    [resume] = record["resumes"]
    assert resume["data_changes"] and resume["data"][1]["sha256"] == _sha(data / "dev.jsonl")
    assert (out / "summary.json").is_file()


def test_resume_data_check_refuses_and_the_override_accepts(tmp_path):
    """The check the loop runs on resume before any process group exists, on a recorded provenance.json."""
    from hiddenkey_ds.config import RecipeError, load_recipe
    from hiddenkey_ds.data.stats import DataReport
    from hiddenkey_ds.training.loop import check_data_unchanged

    data = _local_data(tmp_path / "data")
    source = {"split": "validation", "path": str((data / "dev.jsonl").resolve()), "sha256": _sha(data / "dev.jsonl")}
    (tmp_path / "provenance.json").write_text(json.dumps({"data": [source]}))
    now = DataReport("x", "classification", "sst2", 64, sources=[{**source, "sha256": "f" * 64}])
    recipe = load_recipe(REPO / "recipes" / "tiny-lora.yaml", [f"run.output_dir={tmp_path / 'o'}"])
    with pytest.raises(RecipeError) as err:
        check_data_unchanged(recipe, tmp_path, now)
    assert source["path"] in str(err.value) and "run.accept_data_change=true" in str(err.value)
    accepting = load_recipe(REPO / "recipes" / "tiny-lora.yaml",
                            [f"run.output_dir={tmp_path / 'o'}", "run.accept_data_change=true"])
    assert check_data_unchanged(accepting, tmp_path, now) == [f"{source['path']} (split 'validation'): sha256 "
                                                              f"{source['sha256'][:16]} when the run started, "
                                                              f"{'f' * 16} now"]
    same = DataReport("x", "classification", "sst2", 64, sources=[source])
    assert check_data_unchanged(recipe, tmp_path, same) == []
    # once a resume accepted the change, the next resume compares with the data that segment read
    (tmp_path / "provenance.json").write_text(json.dumps({"data": [source], "resumes": [{"data": now.sources}]}))
    assert check_data_unchanged(recipe, tmp_path, now) == []
    with pytest.raises(RecipeError):
        check_data_unchanged(recipe, tmp_path, same)
    # the override is not a setting of the run: resuming with it is no recipe change
    from hiddenkey_ds.training.checkpoint import recipe_changes

    assert recipe_changes(recipe.model_dump(mode="json"), accepting.model_dump(mode="json")) == ([], [])


def test_provenance_json_is_written_at_start_and_a_resume_with_other_code_says_so(tmp_path):
    from hiddenkey_ds.data.stats import DataReport
    from hiddenkey_ds.training.loop import record_provenance

    said: list[str] = []
    log = SimpleNamespace(info=said.append)
    sources = [{"split": "train", "path": "/d/train.jsonl", "sha256": "a" * 64}]
    report = DataReport("x", "classification", "sst2", 64, sources=sources)
    record_provenance(tmp_path, report, "cpu", log, None, rank=0, world_size=2)
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["world_size"] == 2 and record["data"] == sources and record["resumes"] == []
    assert record["versions"] == provenance.collect(1)["versions"] and said == []

    record_provenance(tmp_path, report, "cpu", log, [], rank=0, world_size=2)  # same code: nothing said
    assert said == [] and len(json.loads((tmp_path / "provenance.json").read_text())["resumes"]) == 1
    record["git_commit"], record["versions"]["torch"] = "0" * 40, "1.0.0"
    (tmp_path / "provenance.json").write_text(json.dumps({**record, "resumes": []}))
    record_provenance(tmp_path, report, "cpu", log, [], rank=0, world_size=2)
    [line] = said
    assert line.startswith("resumed with other code than the last segment ran: git_commit '0000000000")
    assert f"torch '1.0.0' -> {torch.__version__!r}" in line
    [resume] = json.loads((tmp_path / "provenance.json").read_text())["resumes"]
    assert resume["code_changes"] == line.split(": ", 1)[1].split(", ")
    record_provenance(tmp_path / "nothing", report, "cpu", log, None, rank=1, world_size=2)  # rank 1 writes nothing
    assert not (tmp_path / "nothing").exists()


def test_report_shows_each_runs_versions_and_warns_where_they_differ(tmp_path):
    runs = []
    for seed, torch_version in ((0, "2.13.0"), (1, "2.12.1")):
        run_dir = fabricate_run(tmp_path / f"run{seed}", f"run.seed={seed}", final=0.6 + seed / 10)
        record = {"package_version": "0.1.0", "git_commit": "abcdef0123456789", "git_dirty": seed == 1,
                  "versions": {"torch": torch_version, "transformers": "5.23.0", "peft": "0.21.2",
                               "deepspeed": "0.19.8", "bitsandbytes": "0.50.2", "python": "3.11.7"},
                  "device": "NVIDIA H200", "world_size": 4, "resumes": []}
        (run_dir / "provenance.json").write_text(json.dumps(record))
        runs.append(run_dir)
    runs.append(fabricate_run(tmp_path / "old", "run.seed=2", final=0.5))  # trained before provenance.json
    report = report_mod.write_report(runs, tmp_path / "report")
    table = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {Path(r["path"]).name: r for r in table["provenance"]["runs"]}
    assert rows["run0"]["torch"] == "2.13.0" and rows["run1"]["torch"] == "2.12.1" and rows["old"]["torch"] is None
    assert rows["run0"]["git commit"] == "abcdef0123" and rows["run1"]["git commit"] == "abcdef0123+dirty"
    assert rows["run0"]["device"] == "NVIDIA H200" and rows["run0"]["world size"] == 4
    warnings = table["provenance"]["warnings"]
    assert any(w.startswith("the runs differ in torch: 2.13.0 (1 run") and "2.12.1" in w for w in warnings)
    assert any(w.startswith("the runs differ in git commit") for w in warnings)
    assert not any("transformers" in w for w in warnings)  # equal versions: no warning
    assert any("1 run(s) record no provenance.json" in w for w in warnings)
    text = report.read_text()
    assert "## Provenance" in text and "| 2.12.1 |" in text and "Warning: the runs differ in torch" in text
    # a run still training: its adapter scores are shown with a warning, not refused
    (runs[2] / "summary.json").unlink()
    report_mod.write_report(runs, tmp_path / "report2")
    assert any(str(runs[2]) in w and "has not finished" in w
               for w in json.loads((tmp_path / "report2" / "report.json").read_text())["warnings"])
