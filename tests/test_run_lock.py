"""One writer per run directory (hiddenkey_ds/run_lock.py), files written whole (run_dir.write_atomic), and no
hang when one rank fails inside a block the others wait for (hiddenkey_ds/training/collective.py)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hiddenkey_ds.run_dir import LOCK, LOCK_HOLDER, SUMMARY, write_atomic
from hiddenkey_ds.run_lock import RunDirLocked, RunLock
from train_runs import REPO, free_port, metrics, train_command, tree

HOST = socket.gethostname()


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _holder(run_dir: Path, die: bool = False) -> subprocess.Popen:
    """A process that takes run_dir's lock as a training would, then sleeps (or dies by SIGKILL, leaving it)."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from hiddenkey_ds.run_lock import RunLock
        lock = RunLock({str(run_dir)!r}, "hiddenkey-ds train")
        lock.acquire()
        print("held", flush=True)
        if {die}:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def live_holder(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    yield run, proc
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------------------------- write_atomic
def test_write_atomic_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the data must reach the disk before the rename
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "x" * 100_000)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]


WRITER = """
import sys
from pathlib import Path
from hiddenkey_ds.run_dir import write_atomic
path, char = Path(sys.argv[1]), sys.argv[2]
for _ in range(150):
    write_atomic(path, char * 200_000)
"""


def test_concurrent_write_atomic_never_shows_a_partial_file(tmp_path):
    """Two writers of one file (the old fixed temporary name made them rename each other's half-written file, or
    fail on a vanished one): a reader only ever sees one whole text, and no temporary file is left."""
    path = tmp_path / "config.yaml"
    write_atomic(path, "a" * 200_000)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), c], env=_env(), stderr=subprocess.PIPE,
                                text=True) for c in "ab"]
    seen = set()
    while any(w.poll() is None for w in writers):
        text = path.read_text()
        seen.add((text[0], len(text), len(set(text))))
    errors = [w.stderr.read() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert seen <= {("a", 200_000, 1), ("b", 200_000, 1)}, seen
    assert os.listdir(tmp_path) == ["config.yaml"]


# ---------------------------------------------------------------------------------------------- the lock
def test_a_second_writer_is_refused_with_the_holder_named_and_nothing_touched(live_holder):
    run, holder = live_holder
    before = tree(run)
    with pytest.raises(RunDirLocked) as err:
        RunLock(run, "hiddenkey-ds train").acquire()
    message = err.value.problems[0]
    assert f"being written by hiddenkey-ds train (pid {holder.pid} on host {HOST}, since " in message
    assert message.startswith(f"run.output_dir: {run} ") and "nothing was touched" in message
    assert tree(run) == before
    assert json.loads((run / LOCK_HOLDER).read_text())["pid"] == holder.pid


def test_a_stale_lock_of_a_dead_process_is_cleared(tmp_path):
    run = tmp_path / "run"
    dead = _holder(run, die=True)
    dead.wait()
    assert (run / LOCK).is_file()  # SIGKILL: its holder never released it
    lock = RunLock(run, "hiddenkey-ds train")
    lock.acquire()
    assert json.loads((run / LOCK_HOLDER).read_text())["pid"] == os.getpid() != dead.pid
    lock.release()
    assert sorted(os.listdir(run)) == []


def test_a_start_that_fails_after_the_lock_leaves_no_directory_behind(tmp_path):
    lock = RunLock(tmp_path / "runs" / "new" / "run", "hiddenkey-ds train")
    lock.acquire()  # a training that then fails its model check: the directories it created go again
    assert sorted(os.listdir(lock.run_dir)) == [LOCK, LOCK_HOLDER]
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_lock_held_on_another_host_is_kept_and_the_message_says_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("4242\nnode-elsewhere-17\n")  # filelock's marker: pid, host
    (run / LOCK_HOLDER).write_text(json.dumps({"what": "hiddenkey-ds train", "pid": 4242,
                                               "host": "node-elsewhere-17", "started": "2026-01-01 00:00:00 UTC"}))
    with pytest.raises(RunDirLocked) as err:
        RunLock(run, "hiddenkey-ds eval").acquire()
    message = err.value.problems[0]
    assert "hiddenkey-ds train (pid 4242 on host node-elsewhere-17, since 2026-01-01 00:00:00 UTC)" in message
    assert f"if that process no longer runs on node-elsewhere-17, delete {run / LOCK} and retry" in message
    assert (run / LOCK).read_text() == "4242\nnode-elsewhere-17\n"


def test_eval_is_refused_while_a_live_writer_holds_the_run(live_holder, tmp_path, capsys):
    from hiddenkey_ds.evaluation.harness import main

    run, holder = live_holder
    before = tree(run)
    for extra in ([], ["--out", str(tmp_path / "elsewhere")]):
        assert main([str(run), "--tasks", "hk_toy_sst2", *extra]) == 2
        err = capsys.readouterr().err
        assert f"hiddenkey-ds eval: error: eval {run}: {run} is being written by hiddenkey-ds train (pid " \
               f"{holder.pid} on host {HOST}" in err, err
    assert tree(run) == before and not (tmp_path / "elsewhere").exists()


def test_eval_holds_the_run_while_it_writes_and_a_training_is_refused(tmp_path, monkeypatch):
    from hiddenkey_ds.evaluation import harness

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")  # a run directory; run_eval is replaced below
    refusals = []

    def run_eval(target, *args, lock=None, **kwargs):
        lock.acquire()  # as run_eval does once its checks have passed
        with pytest.raises(RunDirLocked) as err:
            RunLock(run, "hiddenkey-ds train").acquire()
        refusals.append(err.value.problems[0])
        return []

    monkeypatch.setattr(harness, "run_eval", run_eval)
    assert harness.main([str(run), "--tasks", "hk_toy_sst2"]) == 0
    assert f"being written by hiddenkey-ds eval (pid {os.getpid()} on host {HOST}" in refusals[0]
    assert sorted(os.listdir(run)) == ["config.yaml"]  # released


# ---------------------------------------------------------------------------------------------- collective blocks
COLLECTIVE = """
import json, os, sys
import torch.distributed as dist
from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.training.collective import RankFailed, RankRefused, run_collectively
from deepspeed.accelerator import get_accelerator

# as deepspeed.init_distributed does in training: DeepSpeed's CPU accelerator first set up after the gloo group
# exists makes the process abort at exit ("terminate called without an active exception") about 1 run in 3
get_accelerator()
dist.init_process_group("gloo")
rank, out = dist.get_rank(), {}

def fail(exc):
    def block():
        raise exc
    return block

def outcome(block, **kw):
    try:
        return ["ok", run_collectively("testing", block, **kw)]
    except RankFailed as err:
        return ["RankFailed", err.rank, str(err)]
    except RankRefused as err:
        return ["RankRefused", err.problems]
    except Exception as err:
        return [type(err).__name__, str(err)]

out["ok"] = outcome(lambda: 7)
out["disk"] = outcome(fail(OSError(28, "No space left on device")))
out["recipe"] = outcome(fail(RecipeError(["run.output_dir: taken (hint: x)", "second line"])))
out["rank1"] = outcome(lambda: 1 / (1 - rank), every_rank=True)
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_a_failed_block_on_one_rank_raises_on_every_rank():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=port)) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    r0, r1 = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert r0["ok"] == ["ok", 7] and r1["ok"] == ["ok", None]
    assert r0["disk"] == ["OSError", "[Errno 28] No space left on device"]
    assert r1["disk"] == ["RankFailed", 0, "rank 0 failed while testing: OSError: [Errno 28] No space left on device"]
    assert r0["recipe"][0] == "RecipeError"
    assert r1["recipe"] == ["RankRefused", ["run.output_dir: taken (hint: x)", "second line"]]
    assert r0["rank1"] == ["RankFailed", 1, "rank 1 failed while testing: ZeroDivisionError: division by zero"]
    assert r1["rank1"] == ["ZeroDivisionError", "division by zero"]


# ---------------------------------------------------------------------------------------------- real trainings
def _ranks(cmd: list[str], env: dict, world: int = 2, timeout: float = 300) -> tuple[list[int], list[str]]:
    """`cmd` started once per rank with the launcher's variables set, as srun or a per-node launcher does: no
    torchrun agent that stops the other ranks when one exits. Returns each rank's exit status and output."""
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


RUN = ("train.max_steps=2", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
       "data.max_train_examples=32", "data.max_eval_examples=8")


@pytest.mark.slow  # ~15-25 s of 2 cores; the lock itself and a refusal on every rank are tested above
@pytest.mark.distributed
def test_two_concurrent_trainings_the_second_is_refused_on_every_rank_the_first_finishes(tmp_path):
    run, go = tmp_path / "run", tmp_path / "go"
    cmd, env = train_command("tiny-lora.yaml", run, *RUN, module="hkds_hold_train", env={"HOLD_UNTIL": str(go)})
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK_HOLDER).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / LOCK_HOLDER).is_file(), first.communicate()[0] if first.poll() is not None else "no lock"
        before = tree(run)
        started = time.monotonic()
        codes, outs = _ranks(*train_command("tiny-lora.yaml", run, *RUN, nproc=0))
        output = "".join(outs)
        assert codes == [2, 2], output[-3000:]  # every rank learnt of rank 0's refusal
        assert output.count("is being written by") == 1, output[-3000:]  # printed once
        assert f"hiddenkey-ds train: 1 problem:\n  - run.output_dir: {run} is being written by hiddenkey-ds train " \
               f"(pid {first.pid} on host {HOST}, since " in output, output[-3000:]
        assert "Loading weights" not in output and time.monotonic() - started < 120  # before the model loads
        assert tree(run) == before
        go.touch()
        out, _ = first.communicate(timeout=300)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2] and (run / SUMMARY).is_file()
    assert not (run / LOCK).exists() and not (run / LOCK_HOLDER).exists()  # released at the end


@pytest.mark.distributed  # 10-25 s of 2 cores: the one default-suite guard of the hang
def test_a_failed_adapter_save_on_rank_0_ends_every_rank_within_seconds(tmp_path):
    """Ranks started one by one (_ranks); rank 0's save_pretrained raises as on a full disk and rank 0 stays alive
    until the other rank has exited, as an NCCL peer would see it. Before the collective save, rank 1 sat in the barrier after the save
    until the distributed timeout."""
    run, exits, linger = tmp_path / "run", tmp_path / "exits", 240
    exits.mkdir()
    cmd, env = train_command("tiny-lora.yaml", run, *RUN, nproc=0, module="hkds_fail_save_train",
                             env={"FAIL_EXIT_DIR": str(exits), "FAIL_LINGER_S": str(linger)})
    started = time.monotonic()
    codes, (rank0, rank1) = _ranks(cmd, env, timeout=linger + 120)
    wall = time.monotonic() - started
    assert codes == [1, 1], codes
    assert "OSError: [Errno 28] No space left on device (injected)" in rank0, rank0[-3000:]
    assert "hiddenkey-ds train: rank 0 failed while saving the adapter to " in rank1, rank1[-3000:]
    assert "No space left on device (injected)" in rank1
    assert "[fake] rank 0: the other ranks had all exited when it left" in rank0, rank0[-3000:]
    assert wall < 150, wall  # far below the distributed timeout; the training itself takes most of it
    assert not (run / SUMMARY).exists() and not (run / LOCK).exists()
