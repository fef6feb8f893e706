"""Blocks that one rank runs while the others wait for it (rank 0 saving the adapter, writing the summary, the
metrics, the checkpoint marker), made collective: every rank learns of a failure at once and raises it.

Without this, rank 0 dies with its error and the other ranks sit in the next barrier until the distributed
timeout (an hour): NCCL does not notice a peer that is gone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from hiddenkey_ds.errors import RecipeError

T = TypeVar("T")
MESSAGE_BYTES = 4000  # of each failing rank's message; enough for a RecipeError's lines and a path or two


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail: another rank's block failed with `message`."""

    def __init__(self, rank: int, what: str, message: str) -> None:
        self.rank, self.what, self.message = rank, what, message
        super().__init__(f"rank {rank} failed while {what}: {message}")


class RankRefused(RecipeError):
    """Raised on the ranks that did not fail when another rank's block raised a RecipeError (bad input): an entry
    point exits 2 on every rank and prints the message once (on the failing rank, rank 0)."""


def run_collectively(what: str, block: Callable[[], T], *, every_rank: bool = False) -> T | None:
    """Run `block` on rank 0 (every rank with `every_rank`) and then share whether it failed: every rank calls
    this at the same point, like a barrier. A rank whose block raised re-raises its own exception (with its
    traceback); the others raise RankFailed (RankRefused for a RecipeError) with the lowest failing rank's
    message. Returns the block's result on the ranks that ran it, None elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    result, error = None, None
    if every_rank or rank == 0:
        try:
            result = block()
        except Exception as err:  # shared below, then re-raised; KeyboardInterrupt and the like just propagate
            error = err
    failed = _share_flag(error is not None)
    if not failed:
        return result
    messages = _share_messages(rank, world, error)
    if error is not None:
        raise error
    first = min(messages)
    refused, message = messages[first]
    if refused:
        raise RankRefused(message.split("\n"))
    raise RankFailed(first, what, message)


def _share_flag(failed: bool) -> bool:
    from hiddenkey_ds.training.run_log import all_reduce_cpu

    return bool(all_reduce_cpu(torch.tensor([float(failed)]), op=dist.ReduceOp.MAX).item())


def _share_messages(rank: int, world: int, error: Exception | None) -> dict[int, tuple[bool, str]]:
    """Every failing rank's (was it a RecipeError, message), through one all-reduce of a byte table (no pickled
    objects: those need a device per rank under NCCL before DeepSpeed has set one)."""
    from hiddenkey_ds.training.run_log import all_reduce_cpu

    table = torch.zeros(world, MESSAGE_BYTES + 1, dtype=torch.uint8)
    if error is not None:
        text = ("\n".join(error.problems) if isinstance(error, RecipeError) else f"{type(error).__name__}: {error}")
        data = text.encode("utf-8", errors="replace").replace(b"\0", b" ")[:MESSAGE_BYTES] or b"?"
        table[rank, 0] = 2 if isinstance(error, RecipeError) else 1
        table[rank, 1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    table = all_reduce_cpu(table)
    return {r: (int(row[0]) == 2, bytes(row[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace"))
            for r, row in enumerate(table) if int(row[0]) != 0}
