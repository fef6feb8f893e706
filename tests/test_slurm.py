"""launch.sh under a real SLURM: `sbatch launch.sh RECIPE` on the two-node cluster of tests/slurm/cluster.sh
(slurmctld + two slurmd on this host, nodes n1 and n2 whose names do not resolve).

Marked `slurm` (deselected by the default run; `pytest -m slurm` runs them, .ci/run does after the default suite).
They use the cluster named by $SLURM_CONF when it answers, else start one (root and Debian's slurmctld, slurmd and
munge needed: `bash tests/slurm/cluster.sh install`), and skip, saying why, when neither is possible.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_runs import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
LAUNCH = REPO / "launch.sh"
TINY = REPO / "recipes" / "tiny-lora.yaml"
STEPS = 8
TRAIN_ARGS = [f"train.max_steps={STEPS}", "eval.at_end=false", "train.save_every=4"]


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment of a shell on a running two-node cluster (SLURM_CONF set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["OMP_NUM_THREADS"] = "1"
    if env.get("SLURM_CONF") and _answers(env):
        yield env
        return
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"no SLURM here: {', '.join(missing)} not installed (bash tests/slurm/cluster.sh install)")
    if os.geteuid() != 0:
        pytest.skip("the one-host test cluster runs its daemons as root; this is not root")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(CLUSTER), "up", str(cluster_dir)], capture_output=True, text=True, timeout=180)
    if up.returncode != 0:
        pytest.skip(f"the test cluster did not start: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
    env["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(cluster_dir)], capture_output=True, timeout=120)


def _sbatch(env: dict[str, str], run_dir: Path, nodes: int, ranks_per_node: int) -> subprocess.CompletedProcess:
    job_env = {**env, "HKDS_CPU_RANKS": str(ranks_per_node), "HKDS_PYTHON": sys.executable}
    out = run_dir.parent / f"{run_dir.name}.slurm.out"
    # the script's #SBATCH defaults ask for 8 GPUs and 32 CPUs per node: a CPU cluster overrides them
    cmd = ["sbatch", "--wait", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=2",
           "--time=10", f"--output={out}", str(LAUNCH), str(TINY), f"run.output_dir={run_dir}", *TRAIN_ARGS]
    proc = subprocess.run(cmd, env=job_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    proc.stdout += out.read_text() if out.exists() else ""
    return proc


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training without SLURM: launch.sh's local mode, 2 CPU ranks (the world size of both jobs)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(HKDS_CPU_RANKS="2", HKDS_PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(LAUNCH), str(TINY), f"run.output_dir={run_dir}", *TRAIN_ARGS], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return _adapter(run_dir)


@pytest.mark.parametrize("nodes,ranks_per_node", [(1, 2), (2, 1)], ids=["one-node-2-ranks", "two-nodes-1-rank-each"])
def test_sbatch_launch_sh_trains_like_the_local_run(slurm, reference, tmp_path, nodes, ranks_per_node):
    run_dir = tmp_path / "run"
    proc = _sbatch(slurm, run_dir, nodes, ranks_per_node)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()
    logs = run_dir / "logs"
    # docs/cluster.md: node<R>.log per node, rank<N>.log per rank, the hostfile launch.sh wrote for the job
    assert sorted(p.name for p in logs.glob("node*.log")) == [f"node{r}.log" for r in range(nodes)]
    assert sorted(p.name for p in logs.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    hosts = [line.split()[0] for line in (logs / "hostfile").read_text().splitlines()]
    assert hosts == (["n1"] if nodes == 1 else ["n1", "n2"])
    assert f"step {STEPS}" in (logs / "rank0.log").read_text() or "done: adapter" in (logs / "rank0.log").read_text()
    adapter = _adapter(run_dir)
    assert adapter.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
