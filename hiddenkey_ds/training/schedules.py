"""The recipe's LR schedule (train.scheduler, train.warmup) as transformers builds it.

transformers.get_scheduler gives linear / cosine / constant with linear warmup from 0, as LambdaLR over the
optimizer DeepSpeed builds; DeepSpeed steps it once per optimizer step and stores its state in checkpoints, so a
resumed run continues the same curve (tests/test_training.py: resume equals the uninterrupted run).
"""
from __future__ import annotations

from typing import Any

# recipe name -> transformers' name ("constant" with warmup is transformers' constant_with_warmup; with no warmup
# steps the two are the same schedule)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def lr_scheduler_factory(recipe: Any, total_steps: int):
    """For ``deepspeed.initialize(lr_scheduler=...)``: DeepSpeed calls it with the optimizer it built."""
    from transformers import get_scheduler

    train = recipe.train
    return lambda optimizer: get_scheduler(SCHEDULES[train.scheduler], optimizer,
                                           num_warmup_steps=train.warmup_steps(total_steps),
                                           num_training_steps=total_steps)
