"""Fine-tune with LoRA / QLoRA and a point of the dropout framework, under DeepSpeed; then, with eval.at_end,
evaluate the adapter.

    python -m hiddenkey_ds.train RECIPE.yaml [key=value ...]                        # one process
    deepspeed --num_gpus 8 --module hiddenkey_ds.train RECIPE.yaml [key=value ...]  # the same, N ranks
    torchrun --nproc_per_node 8 -m hiddenkey_ds.train RECIPE.yaml ...
    hiddenkey-ds train RECIPE.yaml ...

Two steps, composed here and nowhere else: the loop (hiddenkey_ds.training.loop) ends at the adapter, and the
evaluation runs as its own single process (hiddenkey_ds.evaluation.command) after every rank has left the
distributed world.
"""
from __future__ import annotations

import sys

from hiddenkey_ds.distributed import is_rank_zero

USAGE = "usage: python -m hiddenkey_ds.train RECIPE.yaml [key=value ...]   (e.g. train.max_steps=10 run.output_dir=runs/x)"


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (recipe, model, data, run directory), reported without a traceback."""
    from hiddenkey_ds.config import RecipeError
    from hiddenkey_ds.models.builtin import BuiltinModelError
    from hiddenkey_ds.models.loading import ModelLoadError

    return (RecipeError, ModelLoadError, BuiltinModelError)


def evaluate_after_training(outcome) -> int:
    import gc

    import torch

    from hiddenkey_ds.evaluation.command import eval_command, run_eval_process

    # the loop has returned: its engine and model are garbage, their device memory can go to lm-eval
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ev = outcome.eval_section
    cmd = eval_command(outcome.run_dir, tasks=ev.tasks, limit=ev.limit, batch_size=ev.batch_size)
    return run_eval_process(cmd, "eval.at_end; the training run itself is finished")


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher adds --local_rank=N unless given --no_local_rank; LOCAL_RANK carries the same
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    from hiddenkey_ds.training.collective import RankFailed
    from hiddenkey_ds.training.loop import train

    try:
        outcome = train(argv[0], argv[1:])
    except user_errors() as err:
        if is_rank_zero():  # every rank found the same problem (or learnt rank 0's); one message is enough
            print(f"hiddenkey-ds train: {err}", file=sys.stderr)
        _leave_process_group()
        return 2
    except RankFailed as err:
        # the failing rank raised its own error (with its traceback); this one only learnt of it, in step
        print(f"hiddenkey-ds train: {err} (see that rank's output for the traceback)", file=sys.stderr)
        _leave_process_group()
        return 1
    return evaluate_after_training(outcome) if outcome.evaluate_at_end else 0


if __name__ == "__main__":
    sys.exit(main())
