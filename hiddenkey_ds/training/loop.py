"""The training loop: LoRA / QLoRA and a point of the dropout framework, under DeepSpeed, from a recipe to a PEFT
adapter. Run it through `python -m hiddenkey_ds.train` (hiddenkey_ds/train.py), which also owns eval.at_end:
this loop ends at the adapter and imports nothing from evaluation.

Every rank runs `train()` top to bottom; rank 0 alone prints and writes run-level files.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hiddenkey_ds.config import RecipeError, load_recipe
from hiddenkey_ds.distributed import deepspeed_safe_arch_list, free_port, is_rank_zero, launcher_world_size
from hiddenkey_ds.run_dir import ADAPTER_DIRS, DS_CONFIG, FINISHED_MARKER, PROVENANCE, write_atomic
from hiddenkey_ds.run_lock import RunLock
from hiddenkey_ds.training.collective import run_collectively
from hiddenkey_ds.training.preflight import check_model, check_run_dir
from hiddenkey_ds.training.run_log import RunLogger, all_reduce_cpu

# Deprecations inside DeepSpeed / PEFT that a user cannot act on; one per rank per step otherwise.
for _pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`is_gradient_checkpointing` is deprecated"):
    warnings.filterwarnings("ignore", message=_pattern, category=FutureWarning)
# bitsandbytes (imported by PEFT) warns on every CPU rank that an optional AVX512 kernel package is missing; the
# fallback it uses instead is the tested path, and the warning would bury a start-up error message.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------- setup
def init_distributed() -> None:
    """One code path for `python`, `deepspeed` and `torchrun`: a single process gets a world of one."""
    import deepspeed

    if dist.is_initialized():  # a multi-rank launch started it early, to share the run directory's lock
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    deepspeed.init_distributed(dist_init_required=True, verbose=False)
    from deepspeed.accelerator import get_accelerator

    # the device deepspeed.initialize picks too; set now because the lock and start-up collectives come before it
    # (NCCL refuses two ranks of a node on one device)
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def enable_tensorboard(ds_config: dict, run_dir: Path) -> None:
    """Metrics also go to TensorBoard (through DeepSpeed's monitor) when it is installed, unless the DeepSpeed
    JSON configures the monitor itself."""
    import importlib.util

    if "tensorboard" not in ds_config and importlib.util.find_spec("tensorboard") is not None:
        ds_config["tensorboard"] = {"enabled": True, "output_path": str(run_dir / "tensorboard"), "job_name": "."}


def check_ds_config_unchanged(run_dir: Path, ds_config: dict) -> None:
    """On resume: the DeepSpeed JSON a run name points at may have been edited since the run started."""
    import json

    saved = run_dir / DS_CONFIG
    if not saved.is_file():
        return
    before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "tensorboard"}
    now = {k: v for k, v in ds_config.items() if k != "tensorboard"}
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise RecipeError([
            f"run.resume: the resolved DeepSpeed config differs from the run's {saved} in {', '.join(changed)} "
            "(hint: restore the DeepSpeed JSON the run was started with, or start a new run)"
        ])


def rank_seeds(seed: int, rank: int) -> tuple[int, int, int]:
    """(torch, random, numpy) seeds of one (run.seed, rank): drawn from numpy's SeedSequence over the pair, so no two
    pairs share a stream (seed + rank gave seed s on rank 1 the masks of seed s + 1 on rank 0)."""
    import numpy as np

    torch_seed, python_seed, numpy_seed = np.random.SeedSequence([seed, rank]).generate_state(3, dtype=np.uint32)
    return int(torch_seed), int(python_seed), int(numpy_seed)


def seed_rank(seed: int, rank: int) -> None:
    """Seed every generator a step may draw from (masks: torch; anything else: random, numpy) for this rank."""
    import random

    import numpy as np

    torch_seed, python_seed, numpy_seed = rank_seeds(seed, rank)
    torch.manual_seed(torch_seed)  # also every CUDA device
    random.seed(python_seed)
    np.random.seed(numpy_seed)


def check_data_unchanged(recipe, run_dir: Path, data_report) -> list[str]:
    """On resume: the data files' content against the run's provenance.json. Raises RecipeError when one changed,
    unless run.accept_data_change; returns the accepted changes."""
    import json

    from hiddenkey_ds.provenance import data_changes

    saved = run_dir / PROVENANCE
    if not saved.is_file():
        return []  # a run started before provenance was recorded: nothing to compare with
    record = json.loads(saved.read_text())
    # the data the last segment read: a change accepted on an earlier resume is not refused again
    last = (record.get("resumes") or [record])[-1]
    changed = data_changes(last.get("data") or record.get("data") or [], data_report.sources)
    if changed and not recipe.run.accept_data_change:
        raise RecipeError([
            f"run.resume: the data changed since the run started (recorded in {saved}): " + "; ".join(changed)
            + " (hint: restore the data the run was started with, or pass run.accept_data_change=true to "
            "continue on the changed data; nothing was touched)"])
    return changed


def record_provenance(run_dir: Path, data_report, device, log, accepted: list[str] | None = None, rank: int = 0,
                      world_size: int = 1) -> None:
    """Rank 0: provenance.json on a fresh start; on resume one more entry in its `resumes`, and the log says when
    the code or the libraries changed since the last segment."""
    import json
    import time

    from hiddenkey_ds.provenance import code_changes, collect

    if rank != 0:
        return
    now = {**collect(world_size, device, data_report.sources), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = run_dir / PROVENANCE
    if accepted is None or not path.is_file():
        write_atomic(path, json.dumps({**now, "resumes": []}, indent=2))
        return
    record = json.loads(path.read_text())
    last = (record.get("resumes") or [record])[-1]
    changed = code_changes(last, now)
    if changed:
        log.info("resumed with other code than the last segment ran: " + ", ".join(changed))
    if accepted:
        log.info("resumed on changed data (run.accept_data_change): " + "; ".join(accepted))
    record.setdefault("resumes", []).append({**now, "code_changes": changed, "data_changes": accepted})
    write_atomic(path, json.dumps(record, indent=2))


def zero3_partition_line(model) -> str | None:
    """How many parameter tensors ZeRO-3 really partitions: tensors at or below
    stage3_param_persistence_threshold elements stay whole on every rank."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return None
    whole = sum(bool(getattr(p, "ds_persist", False)) for p in params)
    return (f"ZeRO-3: {len(params) - whole} of {len(params)} parameter tensors partitioned over "
            f"{dist.get_world_size()} ranks ({whole} below stage3_param_persistence_threshold stay whole)")


# ---------------------------------------------------------------------------------------------- data
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


# ---------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validation_metrics(engine, eval_ds, collate, micro_batch_size: int, choice_ids=None) -> dict[str, float]:
    """Validation loss and answer accuracy over the whole split, sharded over ranks, all-reduced.

    accuracy: every answer token is the argmax over the vocabulary (the built-in tasks); with `choice_ids` (a task of
    the user's own: the first token of each answer) it is the verbalizer's choice, the argmax among those tokens at
    the answer's first position, and the whole-answer accuracy is reported as answer_accuracy.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively): ranks whose shard
    runs out repeat an example with no supervised token, which counts for nothing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = list(range(rank, len(eval_ds), world))
    n_batches = -(-((len(eval_ds) + world - 1) // world) // micro_batch_size)
    sums = torch.zeros(6, dtype=torch.float64)  # ce_sum, tokens, token_correct, seq_correct, seqs, choice_correct
    if choice_ids is not None:
        choice_ids = torch.as_tensor(choice_ids, dtype=torch.long, device=engine.device)
    engine.eval()
    for i in range(n_batches):
        rows = shard[i * micro_batch_size:(i + 1) * micro_batch_size]
        batch = collate([eval_ds[j] for j in rows] if rows else [eval_ds[0]])
        if not rows:
            batch["labels"].fill_(-100)
        out = engine(**to_device(batch, engine.device), **({} if choice_ids is None else {"choice_ids": choice_ids}))
        n = out.n_tokens.item()
        chosen = out.choice_correct.item() if out.choice_correct is not None else 0
        sums += torch.tensor([out.ce.item() * n, n, out.token_correct.item(), out.seq_correct.item(),
                              out.n_seqs.item(), chosen], dtype=torch.float64)
    engine.train()
    ce_sum, tokens, token_correct, seq_correct, seqs, choice_correct = all_reduce_cpu(sums).tolist()
    metrics = {"loss": ce_sum / max(tokens, 1), "accuracy": seq_correct / max(seqs, 1),
               "token_accuracy": token_correct / max(tokens, 1), "examples": int(seqs)}
    if choice_ids is not None:
        metrics["answer_accuracy"], metrics["accuracy"] = metrics["accuracy"], choice_correct / max(seqs, 1)
    return metrics


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Outcome:
    run_dir: Path
    evaluate_at_end: bool  # eval.at_end on rank 0: the entry point evaluates once this process has left distributed
    eval_section: object = None


@dataclass
class Session:
    """One training run between start-up and the final adapter: what every step reads and a checkpoint stores."""
    recipe: Any
    run_dir: Path
    engine: Any
    model: Any
    batches: Any  # MicroBatchStream: this rank's micro-batches with a checkpointable position
    collate: Any
    eval_ds: Any
    total_steps: int
    log: RunLogger
    best: Any  # BestAdapter
    step: int = 0  # optimizer steps done
    choice_ids: Any = None  # a task of the user's own: its answers' first tokens (validation_metrics)

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "data": self.batches.state_dict(), "best": self.best.state(),
                "elapsed_s": self.log.elapsed()}


def train(recipe_path: str, overrides: list[str]) -> Outcome:
    # Everything that can be checked without torch.distributed, DeepSpeed, the weights or the data comes first:
    # a bad recipe, model or run directory then fails in seconds, before any file exists (and, in a single
    # process, before any process group: a multi-rank launch starts one first, to share a refusal).
    recipe = load_recipe(recipe_path, overrides, world_size=launcher_world_size())
    lock = RunLock(recipe.run.output_dir, "hiddenkey-ds train")
    try:
        return train_locked(recipe, recipe_path, overrides, lock)
    finally:
        lock.release()  # also when the run failed: the next writer is not refused


def on_rank_zero_shared(what: str, block) -> None:
    """`block` on rank 0, its refusal raised on every rank. A multi-rank launch starts its process group for this
    at the first call (seconds; a rank failing a later check alone would otherwise leave the others waiting in
    it); a single process needs none."""
    if launcher_world_size() == 1:
        block()
        return
    init_distributed()
    run_collectively(what, block)


def train_locked(recipe, recipe_path: str, overrides: list[str], lock: RunLock) -> Outcome:
    run_dir = Path(recipe.run.output_dir)
    # One writer per run directory: a live one (another training, a sweep, an evaluation) is named first, without
    # touching anything; rank 0 takes the lock once the start-up checks have passed, before the data and the
    # model, and holds it until the run ends.
    on_rank_zero_shared(f"checking the lock of {run_dir}", lock.check)
    state = check_run_dir(recipe)
    if state.finished:
        if is_rank_zero():
            print(f"{run_dir} holds a finished run ({FINISHED_MARKER}); nothing to do")
        return Outcome(run_dir, evaluate_at_end=False)
    check_model(recipe)
    on_rank_zero_shared(f"locking {run_dir}", lock.acquire)

    from hiddenkey_ds.data import build_datasets
    from hiddenkey_ds.models.loading import load_tokenizer

    # the data needs no process group either: its problems (columns, empty rows, splits) come before one exists
    tokenizer = load_tokenizer(recipe)
    train_ds, eval_ds, data_report = build_datasets(recipe, tokenizer)
    accepted = check_data_unchanged(recipe, run_dir, data_report) if state.resume_from is not None else None

    init_distributed()
    if dist.get_world_size() != launcher_world_size():  # a launcher that announced no world size: check it now
        recipe = load_recipe(recipe_path, overrides, world_size=dist.get_world_size())
    rank = dist.get_rank()  # finish() leaves the process group
    session = start_session(recipe, state, tokenizer, train_ds, eval_ds, data_report)
    record_provenance(run_dir, data_report, session.engine.device, session.log, accepted, rank, dist.get_world_size())
    run_steps(session)
    finish(session)
    return Outcome(run_dir, evaluate_at_end=recipe.eval.at_end and rank == 0, eval_section=recipe.eval)


def start_session(recipe, state, tokenizer, train_ds, eval_ds, data_report) -> Session:
    """The DeepSpeed engine over the method's objective, this rank's data stream, the run log; resumed from the
    run directory's last complete checkpoint when there is one."""
    import deepspeed

    from hiddenkey_ds.config.deepspeed import resolve_ds_config
    from hiddenkey_ds.data import make_collator, make_sampler
    from hiddenkey_ds.data.batching import MicroBatchStream
    from hiddenkey_ds.method.objective import HiddenKeyObjective
    from hiddenkey_ds.models.loading import load_model
    from hiddenkey_ds.training.best_adapter import BestAdapter
    from hiddenkey_ds.training.schedules import lr_scheduler_factory

    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir, t = Path(recipe.run.output_dir), recipe.train
    collate = make_collator(tokenizer)
    sampler = make_sampler(train_ds, world, rank, recipe.run.seed, recipe.data.shuffle)
    if steps_per_epoch(sampler, t.micro_batch_size, t.grad_accum) == 0:
        raise RecipeError([f"data: {len(train_ds)} training examples make no optimizer step of "
                           f"{t.global_batch(world)} examples (hint: lower train.micro_batch_size or train.grad_accum)"])
    total_steps = t.total_steps(len(train_ds), world)
    ds_config = resolve_ds_config(recipe, world, total_steps)
    enable_tensorboard(ds_config, run_dir)
    if state.resume_from is not None:
        check_ds_config_unchanged(run_dir, ds_config)

    model, _ = load_model(recipe, ds_config)
    objective = HiddenKeyObjective(model, recipe.dropout, chunk_tokens=t.loss_chunk_tokens)
    arch_note = deepspeed_safe_arch_list()  # before DeepSpeed JIT-builds its fused Adam
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lr_scheduler_factory(recipe, total_steps))

    seed_rank(recipe.run.seed, rank)  # masks: independent across ranks and seeds, repeatable across runs
    log = RunLogger(run_dir, rank, total_steps, alpha=recipe.dropout.alpha)
    log.monitor = engine.monitor if getattr(engine.monitor, "enabled", False) else None
    session = Session(recipe, run_dir, engine, model, MicroBatchStream(train_ds, sampler, collate, t.micro_batch_size),
                      collate, eval_ds, total_steps, log, BestAdapter(run_dir, enabled=t.keep_best and eval_ds is not None),
                      choice_ids=data_report.choice_first_tokens)
    if state.resume_from is not None:
        resume(session, state)
    else:
        log.start(recipe, ds_config, data_report, model)
    if arch_note:
        log.info(arch_note)
    partitioned = zero3_partition_line(model)
    if partitioned:
        log.info(partitioned)
    return session


def resume(s: Session, state) -> None:
    from hiddenkey_ds.training.checkpoint import load_checkpoint

    client = load_checkpoint(s.engine, state.resume_from)
    s.step = client["step"]
    # checkpoints before MicroBatchStream stored (epoch, consumed) instead of the stream's own position
    s.batches.load_state_dict(client.get("data") or {"epoch": client["epoch"], "index": client["consumed"]})
    best_note = s.best.restore(client.get("best"))
    if best_note:
        s.log.info(best_note)
    s.log.resume_clock(client.get("elapsed_s"))
    s.log.truncate_after(s.step)
    if state.safe_changes:
        # evaluation and reports read the settings in use now
        run_collectively("writing the resumed recipe", lambda: s.log.write_recipe(s.recipe))
        s.log.info("resumed with changed settings: " + ", ".join(
            f"{key} {old!r} -> {new!r}" for key, old, new in state.safe_changes))
    s.log.info(f"resumed from {state.resume_from} at step {s.step}")


def run_steps(s: Session) -> None:
    from hiddenkey_ds.training.checkpoint import save_checkpoint

    t, world, engine = s.recipe.train, dist.get_world_size(), s.engine
    engine.train()
    window = s.log.new_window()
    while s.step < s.total_steps:
        group = [next(s.batches) for _ in range(t.grad_accum)]
        normalizer = global_token_normalizer(group, world)
        lr = engine.get_lr()[0]  # the lr this optimizer step uses (the scheduler advances after it)
        for batch in group:
            out = engine(**to_device(batch, engine.device), normalizer=normalizer)
            engine.backward(out.loss)
            engine.step()
            window.add(out, batch, normalizer)
        s.step += 1

        last = s.step == s.total_steps
        if s.step % t.log_every == 0 or last:
            s.log.train_line(s.step, window.reduce(), lr)
            window = s.log.new_window()
        if s.eval_ds is not None and t.eval_every and s.step % t.eval_every == 0 and not last:
            metrics = validation_metrics(engine, s.eval_ds, s.collate, t.micro_batch_size, s.choice_ids)
            s.log.eval_line(s.step, metrics)
            s.best.consider(s.model, s.step, metrics)
        if t.save_every and s.step % t.save_every == 0 and not last:
            save_checkpoint(engine, s.run_dir, s.step, s.checkpoint_state(), t.keep_checkpoints)
    s.log.close_progress()


def finish(s: Session) -> None:
    """Final validation, the last checkpoint, the PEFT adapter, then the summary (FINISHED_MARKER, written last: a
    run with it is finished and never overwritten)."""
    from hiddenkey_ds.training.checkpoint import save_adapter, save_checkpoint

    t = s.recipe.train
    final_eval = None
    if s.eval_ds is not None:
        final_eval = validation_metrics(s.engine, s.eval_ds, s.collate, t.micro_batch_size, s.choice_ids)
        s.log.eval_line(s.step, final_eval)
        s.best.consider(s.model, s.step, final_eval)
    save_checkpoint(s.engine, s.run_dir, s.step, s.checkpoint_state(), t.keep_checkpoints)
    save_adapter(s.model, s.run_dir / ADAPTER_DIRS["final"], meta={"kind": "final", "step": s.step})
    run_collectively("writing the summary", lambda: s.log.finish(s.step, final_eval, s.best.state()))
    dist.destroy_process_group()
