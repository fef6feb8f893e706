"""The launcher's environment, read one way by every entry point: world size and rank before a process group
exists, a free port for a new launch, and the environment of a child that must not join the parent's world.

Light on purpose (no torch import): `hiddenkey-ds plan` and the error path of every subcommand use it.
"""
from __future__ import annotations

import os
import re
import socket
import sys

# Variables a launcher sets for a rank. A single-process child (the evaluation after training) must not see them:
# lm-eval (through accelerate) would join a distributed world of ranks that have already exited and wait forever.
DISTRIBUTED_ENV = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "CROSS_RANK", "CROSS_SIZE",
})
DISTRIBUTED_ENV_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMI_")


def launcher_world_size() -> int:
    """The world size the launcher announces, known before torch.distributed starts (1 for a plain process)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def is_rank_zero() -> bool:
    """Rank 0 of the process group if one is up, else of the launcher's announcement (a plain process is rank 0)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0"


def free_port() -> int:
    """A TCP port free on this host now: the launchers' default 29500 collides with any other job on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in DISTRIBUTED_ENV and not k.startswith(DISTRIBUTED_ENV_PREFIXES)}


# An arch-specific CUDA target ("9.0a", "10.0f": PyTorch >= 2.11 accepts them, NVIDIA's images set them) that
# DeepSpeed <= 0.19's JIT op builder parses with int() and dies on ("invalid literal for int() with base 10: '0a'",
# deepspeedai/DeepSpeed#7589, fix open as #8619) when it compiles FusedAdam at deepspeed.initialize.
_ARCH_VARIANT = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")


def deepspeed_safe_arch_list(environ: dict[str, str] | None = None) -> str | None:
    """Rewrite TORCH_CUDA_ARCH_LIST's variant targets to their base arch ("9.0a" -> "9.0") in ``environ``
    (default: this process's environment) so that DeepSpeed's op builder can parse the list; return a line for
    the log when something was rewritten. The ops DeepSpeed JIT-builds here (FusedAdam) use no arch-specific
    instruction, so the base target loses nothing."""
    environ = os.environ if environ is None else environ
    before = environ.get("TORCH_CUDA_ARCH_LIST", "")
    tokens = before.replace(";", " ").split()
    after = []
    for token in tokens:
        match = _ARCH_VARIANT.match(token)
        token = f"{match.group(1)}{match.group(2) or ''}" if match else token
        if token not in after:
            after.append(token)
    if not tokens or after == tokens:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = ";".join(after)
    return (f"TORCH_CUDA_ARCH_LIST={before!r} -> {environ['TORCH_CUDA_ARCH_LIST']!r} for this run: DeepSpeed's "
            f"op builder cannot parse arch variants such as 9.0a (deepspeedai/DeepSpeed#7589)")
