"""Real training runs on CPU with gloo ranks: ZeRO equivalence, QLoRA, kill + resume, the saved adapter."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_runs import REPO, RECIPES, free_port, losses, metrics, train

pytestmark = pytest.mark.distributed

SHORT = ("train.max_steps=4", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
         "eval.at_end=false", "data.max_train_examples=64", "data.max_eval_examples=16", "train.warmup=2")
TOL = 1e-5  # fp32; the same global batch split over ranks only reorders reductions


def _assert_same(a: dict, b: dict, tol=TOL):
    assert a.keys() == b.keys() and len(a) >= 4
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])


def test_two_ranks_zero2_and_zero3_equal_one_rank(tmp_path):
    one = tmp_path / "one"
    train("tiny-lora.yaml", one, *SHORT, "train.micro_batch_size=8", "run.deepspeed=zero0")
    reference = losses(one)
    for stage in ("zero2", "zero3"):
        out = tmp_path / stage
        train("tiny-lora.yaml", out, *SHORT, "train.micro_batch_size=4", f"run.deepspeed={stage}", nproc=2)
        _assert_same(reference, losses(out))


def test_hiddenkey_under_zero3_equals_zero2(tmp_path):
    """Same ranks, same seeds -> same masks: ZeRO-3 (with gradient checkpointing) must not change the
    dual-pass computation."""
    runs = {}
    for stage, checkpointing in (("zero2", "false"), ("zero3", "true")):
        # gradient checkpointing on one side: its recomputation must replay the same masks
        out = tmp_path / stage
        train("tiny-hiddenkey.yaml", out, *SHORT, "train.micro_batch_size=4", f"run.deepspeed={stage}",
              f"model.gradient_checkpointing={checkpointing}", nproc=2)
        runs[stage] = metrics(out)
    _assert_same({r["step"]: r["loss"] for r in runs["zero2"]}, {r["step"]: r["loss"] for r in runs["zero3"]})
    assert all(r["consistency"] > 0 for r in runs["zero3"])


def test_qlora_4bit_zero3_matches_zero2(tmp_path):
    """4-bit NF4 base on CPU. Evaluation in between (eval mode, no grad) is what used to corrupt ZeRO-3: see
    models._disable_cpu_weight_repacking."""
    runs = {}
    for stage in ("zero2", "zero3"):
        out = tmp_path / stage
        train("tiny-lora.yaml", out, *SHORT, "model.quantization=4bit", "train.eval_every=1",
              "train.micro_batch_size=8", f"run.deepspeed={stage}")
        runs[stage] = out
    _assert_same(losses(runs["zero2"]), losses(runs["zero3"]), tol=1e-4)
    ev2 = [r["loss"] for r in metrics(runs["zero2"], "validation")]
    ev3 = [r["loss"] for r in metrics(runs["zero3"], "validation")]
    assert len(ev2) >= 4 and max(abs(a - b) for a, b in zip(ev2, ev3)) <= 1e-4


def _kill_after_checkpoint(cmd_out, min_step):
    """Start a 2-rank run and SIGKILL its whole process group once a complete checkpoint >= min_step exists."""
    out = cmd_out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "hiddenkey_ds.train", str(RECIPES / "tiny-hiddenkey.yaml"), f"run.output_dir={out}", *LONG]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [int(p.parent.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*/COMPLETE")]
            if done and max(done) >= min_step:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        # torchrun starts its workers in sessions of their own: kill the whole tree, workers first
        import psutil

        tree = psutil.Process(proc.pid).children(recursive=True)
        for child in tree:
            child.kill()
        psutil.wait_procs(tree, timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists()


LONG = ("train.max_steps=150", "train.log_every=1", "train.eval_every=null", "train.save_every=3",
        "eval.at_end=false", "data.max_train_examples=256", "data.max_eval_examples=16", "train.micro_batch_size=4")


def test_kill_then_resume_equals_uninterrupted_and_skips_partial_save(tmp_path):
    full = tmp_path / "full"
    train("tiny-hiddenkey.yaml", full, *LONG, nproc=2)
    reference = losses(full)

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, min_step=6)
    done = sorted(int(p.parent.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*/COMPLETE"))
    last = done[-1]

    # without run.resume the half-finished run is refused and left exactly as it was
    before = sorted((str(p), p.stat().st_mtime_ns) for p in killed.rglob("*"))
    refused = train("tiny-hiddenkey.yaml", killed, *LONG, nproc=1, check=False)
    assert refused.returncode == 2 and "run.resume=true" in refused.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in killed.rglob("*")) == before

    # a save that died midway: newer step directory, truncated files, no COMPLETE
    partial = killed / "checkpoints" / f"step_{last + 3}"
    partial.mkdir(exist_ok=True)
    for f in (killed / "checkpoints" / f"step_{last}").iterdir():
        if f.name != "COMPLETE":
            (partial / f.name).write_bytes(f.read_bytes()[:100])

    resumed = train("tiny-hiddenkey.yaml", killed, *LONG, "run.resume=true", nproc=2)
    assert f"resumed from {killed / 'checkpoints' / f'step_{last}'} at step {last}" in resumed.stderr + resumed.stdout
    after = losses(killed)
    assert sorted(after) == sorted(reference)  # metrics.jsonl: no duplicated or missing steps
    for step in range(last + 1, 151):
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step
    assert (killed / "summary.json").exists()


def test_adapter_reloads_with_peft_and_reproduces_validation(tmp_path):
    """The saved adapter, loaded the ecosystem's way, gives the trained model's validation loss and accuracy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.data import build_datasets, make_collator
    from hiddenkey_ds.dropout import DropoutConfig
    from hiddenkey_ds.models import load_tokenizer, resolve_model_path
    from hiddenkey_ds.objective import HiddenKeyObjective

    out = tmp_path / "run"
    train("tiny-hiddenkey.yaml", out, *SHORT, "train.micro_batch_size=8", "train.max_steps=6")
    final = metrics(out, "validation")[-1]
    recipe = load_recipe(out / "config.yaml", check_output_dir=False)
    tokenizer = load_tokenizer(recipe)
    _, eval_ds, _ = build_datasets(recipe, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.name), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained, not zeros
    objective = HiddenKeyObjective(model, DropoutConfig(preset="none")).eval()
    collate = make_collator(tokenizer)
    ce, n, correct, seqs = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(eval_ds), 8):
            batch = collate([eval_ds[i] for i in range(start, min(start + 8, len(eval_ds)))])
            o = objective(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            ce += o.ce.item() * o.n_tokens.item()
            n += o.n_tokens.item()
            correct += o.seq_correct.item()
            seqs += o.n_seqs.item()
    assert ce / n == pytest.approx(final["loss"], abs=1e-5)
    assert correct / seqs == final["accuracy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    if __import__("importlib").util.find_spec("tensorboard") is not None:  # DeepSpeed's monitor got the metrics
        assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    train("tiny-lora.yaml", out, *SHORT)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    again = train("tiny-lora.yaml", out, *SHORT, check=False)
    assert again.returncode == 2 and "finished run" in again.stderr
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
