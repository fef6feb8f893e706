"""Fine-tune with LoRA / QLoRA and a point of the dropout framework, under DeepSpeed.

    python -m hiddenkey_ds.train RECIPE.yaml [key=value ...]                 # one process
    deepspeed --num_gpus 8 --module hiddenkey_ds.train RECIPE.yaml [key=value ...]  # the same, N ranks
    torchrun --nproc_per_node 8 -m hiddenkey_ds.train RECIPE.yaml ...

Every rank runs this file top to bottom; rank 0 alone prints and writes run-level files.
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from hiddenkey_ds.config import RecipeError, load_recipe
from hiddenkey_ds.run_log import RunLogger, all_reduce_cpu

# Deprecations inside DeepSpeed / PEFT that a user cannot act on; one per rank per step otherwise.
for _pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
    warnings.filterwarnings("ignore", message=_pattern, category=FutureWarning)

USAGE = "usage: python -m hiddenkey_ds.train RECIPE.yaml [key=value ...]   (e.g. train.max_steps=10 run.output_dir=runs/x)"


# ---------------------------------------------------------------------------------------------- setup
def init_distributed() -> None:
    """One code path for `python`, `deepspeed` and `torchrun`: a single process gets a world of one."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    deepspeed.init_distributed(dist_init_required=True, verbose=False)


def refuse_unfinished_run_without_resume(recipe) -> None:
    from hiddenkey_ds.checkpoint import checkpoint_root

    root = checkpoint_root(recipe.run.output_dir)
    if not recipe.run.resume and root.is_dir() and any(root.iterdir()):
        raise RecipeError([
            f"run.output_dir: {recipe.run.output_dir} holds checkpoints of an unfinished run (hint: pass "
            "run.resume=true to continue it, or choose another run.output_dir; nothing was touched)"
        ])


def enable_tensorboard(ds_config: dict, run_dir: Path) -> None:
    """Metrics also go to TensorBoard (through DeepSpeed's monitor) when it is installed, unless the DeepSpeed
    JSON configures the monitor itself."""
    import importlib.util

    if "tensorboard" not in ds_config and importlib.util.find_spec("tensorboard") is not None:
        ds_config["tensorboard"] = {"enabled": True, "output_path": str(run_dir / "tensorboard"), "job_name": "."}


# ---------------------------------------------------------------------------------------------- data
def micro_batches(dataset, sampler, collate, micro_batch_size: int, epoch: int, skip: int):
    """Micro-batches of this rank for `epoch`, after skipping the first `skip` (resume)."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    usable = len(indices) - len(indices) % micro_batch_size  # a partial last batch would unbalance ranks
    for i, start in enumerate(range(0, usable, micro_batch_size)):
        if i >= skip:
            yield collate([dataset[j] for j in indices[start:start + micro_batch_size]])


def steps_per_epoch(sampler, micro_batch_size: int, grad_accum: int) -> int:
    return (len(sampler) // micro_batch_size) // grad_accum


def global_token_normalizer(batches, world_size: int) -> float:
    """Supervised tokens of the whole optimizer step, over all ranks, divided by world_size x grad_accum:
    DeepSpeed averages gradients over ranks and micro-batches, so dividing each micro-batch's loss sum by this
    gives the exact token mean of the global batch, independent of how it is split across ranks."""
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = all_reduce_cpu(torch.tensor(float(local), dtype=torch.float64))
    return max(total.item(), 1.0) / (world_size * len(batches))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, eval_ds, collate, micro_batch_size: int) -> dict[str, float]:
    """Validation loss and answer accuracy over the whole split, sharded over ranks, all-reduced.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively): ranks whose shard
    runs out repeat an example with no supervised token, which counts for nothing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = list(range(rank, len(eval_ds), world))
    n_batches = -(-((len(eval_ds) + world - 1) // world) // micro_batch_size)
    sums = torch.zeros(5, dtype=torch.float64)  # ce_sum, tokens, token_correct, seq_correct, seqs
    engine.eval()
    for i in range(n_batches):
        rows = shard[i * micro_batch_size:(i + 1) * micro_batch_size]
        batch = collate([eval_ds[j] for j in rows] if rows else [eval_ds[0]])
        if not rows:
            batch["labels"].fill_(-100)
        out = engine(**to_device(batch, engine.device))
        n = out.n_tokens.item()
        sums += torch.tensor([out.ce.item() * n, n, out.token_correct.item(), out.seq_correct.item(),
                              out.n_seqs.item()], dtype=torch.float64)
    engine.train()
    ce_sum, tokens, token_correct, seq_correct, seqs = all_reduce_cpu(sums).tolist()
    return {"loss": ce_sum / max(tokens, 1), "accuracy": seq_correct / max(seqs, 1),
            "token_accuracy": token_correct / max(tokens, 1), "examples": int(seqs)}


# ---------------------------------------------------------------------------------------------- the run
def train(recipe_path: str, overrides: list[str]) -> int:
    import deepspeed

    from hiddenkey_ds.best_adapter import BestAdapter
    from hiddenkey_ds.checkpoint import latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
    from hiddenkey_ds.data import build_datasets, make_collator, make_sampler
    from hiddenkey_ds.ds_config import lr_scheduler_factory, resolve_ds_config
    from hiddenkey_ds.models import load_model, load_tokenizer
    from hiddenkey_ds.objective import HiddenKeyObjective

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(recipe_path, overrides, world_size=world)
    run_dir = Path(recipe.run.output_dir)
    if (run_dir / "summary.json").exists():
        if rank == 0:
            print(f"{run_dir} holds a finished run (summary.json); nothing to do")
        return 0
    refuse_unfinished_run_without_resume(recipe)

    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds, data_report = build_datasets(recipe, tokenizer)
    collate = make_collator(tokenizer)
    sampler = make_sampler(train_ds, world, rank, recipe.run.seed, recipe.data.shuffle)
    t = recipe.train
    per_epoch = steps_per_epoch(sampler, t.micro_batch_size, t.grad_accum)
    if per_epoch == 0:
        raise RecipeError([f"data: {len(train_ds)} training examples make no optimizer step of "
                           f"{t.global_batch(world)} examples (hint: lower train.micro_batch_size or train.grad_accum)"])
    total_steps = t.total_steps(len(train_ds), world)
    ds_config = resolve_ds_config(recipe, world, total_steps)
    enable_tensorboard(ds_config, run_dir)

    model, _ = load_model(recipe, ds_config)
    objective = HiddenKeyObjective(model, recipe.dropout, chunk_tokens=t.loss_chunk_tokens)
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lr_scheduler_factory(recipe, total_steps))

    torch.manual_seed(recipe.run.seed + rank)  # masks: independent across ranks, repeatable across runs
    log = RunLogger(run_dir, rank, total_steps, alpha=recipe.dropout.alpha)
    log.monitor = engine.monitor if getattr(engine.monitor, "enabled", False) else None
    step, epoch, consumed = 0, 0, 0  # optimizer steps done; epoch; micro-batches consumed in it
    best = BestAdapter(run_dir, enabled=t.keep_best and eval_ds is not None)
    resume_from = latest_checkpoint(run_dir) if recipe.run.resume else None
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        best.best = state.get("best")
        log.truncate_after(step)
        log.info(f"resumed from {resume_from} at step {step}")
    else:
        log.start(recipe, ds_config, data_report, model)

    engine.train()
    batches = micro_batches(train_ds, sampler, collate, t.micro_batch_size, epoch, consumed)
    window = log.new_window()
    while step < total_steps:
        group = []
        while len(group) < t.grad_accum:
            batch = next(batches, None)
            if batch is None:  # epoch boundary: reshuffle with the next epoch's seed
                epoch, consumed = epoch + 1, 0
                batches = micro_batches(train_ds, sampler, collate, t.micro_batch_size, epoch, 0)
                continue
            group.append(batch)
        normalizer = global_token_normalizer(group, world)
        lr = engine.get_lr()[0]  # the lr this optimizer step uses (the scheduler advances after it)
        for batch in group:
            out = engine(**to_device(batch, engine.device), normalizer=normalizer)
            engine.backward(out.loss)
            engine.step()
            window.add(out, batch, normalizer)
        step, consumed = step + 1, consumed + len(group)

        if step % t.log_every == 0 or step == total_steps:
            log.train_line(step, window.reduce(), lr)
            window = log.new_window()
        if eval_ds is not None and t.eval_every and step % t.eval_every == 0 and step < total_steps:
            metrics = evaluate(engine, eval_ds, collate, t.micro_batch_size)
            log.eval_line(step, metrics)
            best.consider(model, step, metrics)
        if t.save_every and step % t.save_every == 0 and step < total_steps:
            save_checkpoint(engine, run_dir, step, {"step": step, "epoch": epoch, "consumed": consumed,
                                                    "best": best.state()}, t.keep_checkpoints)
    log.close_progress()

    final_eval = evaluate(engine, eval_ds, collate, t.micro_batch_size) if eval_ds is not None else None
    if final_eval is not None:
        log.eval_line(step, final_eval)
        best.consider(model, step, final_eval)
    save_checkpoint(engine, run_dir, step, {"step": step, "epoch": epoch, "consumed": consumed,
                                            "best": best.state()}, t.keep_checkpoints)
    save_adapter(model, run_dir / "adapter", meta={"kind": "final", "step": step})
    if rank == 0:
        log.finish(step, final_eval, best.state())
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and recipe.eval.at_end:
        from hiddenkey_ds.evaluate import run_eval

        run_eval(run_dir, tasks=recipe.eval.tasks or None, limit=recipe.eval.limit, batch_size=recipe.eval.batch_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher adds --local_rank=N unless given --no_local_rank; LOCAL_RANK carries the same
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    recipe_path, overrides = argv[0], argv[1:]
    try:
        return train(recipe_path, overrides)
    except RecipeError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hiddenkey-ds train: {err}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2


if __name__ == "__main__":
    sys.exit(main())
