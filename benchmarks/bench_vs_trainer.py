"""Our training loop against what users run today: transformers' Trainer + DeepSpeed + PEFT LoRA.

    python benchmarks/bench_vs_trainer.py                           # SmolLM2-135M, ZeRO-2, 2 CPU ranks, 20 steps
    python benchmarks/bench_vs_trainer.py --model builtin:tiny-llama --steps 10 --repeats 1
    python benchmarks/bench_vs_trainer.py --smoke                   # tiny model, 3 steps: what the test runs

Both sides run the same plain-LoRA job on the same ranks (torchrun, gloo on CPU, NCCL on GPUs):

- **ours**: `hiddenkey_ds.train.main` on recipes/tiny-lora.yaml with overrides, exactly what
  `python -m hiddenkey_ds.train` runs, logging every step; a clock on the run logger (just before step 1, and
  at each step's log line) gives wall and CPU seconds per step.
- **Trainer**: `Trainer` + `TrainingArguments(deepspeed=<dict>)` + `peft.get_peft_model(LoraConfig(...))` on
  the model loaded with `AutoModelForCausalLM.from_pretrained`, given the DeepSpeed dict our loop resolves
  (`hiddenkey_ds.config.deepspeed.resolve_ds_config`: ZeRO-2, AdamW, clipping), the same learning rate, warmup and
  linear decay, the same LoRA settings and LoRA initialisation (same seed right before `get_peft_model`), the
  same tokenized examples in the same per-rank batch order (our sampler and collator through an overridden
  `get_train_dataloader`), logging every step; a callback's `on_step_end` clock gives wall and CPU seconds.
Both sides therefore do the same arithmetic: the Trainer's loss with `average_tokens_across_devices` is the
global token mean, as ours is. What differs is how: we run the LM head on supervised positions only (in
chunks), the stock model computes logits for every position; the loops' own overheads differ too.

The table: median seconds per step over the steps after `--warmup` (per launch, then the median over
`--repeats` launches; the two sides alternate A B B A ... so drift hits both alike), the ratio ours/Trainer,
the same for rank 0's process CPU time per step (robust to other jobs on a shared machine, which stretch wall
time but not the CPU time a step needs), peak memory per rank (resident set high-water mark on CPU, max over
ranks, whole process including model loading; `torch.cuda.max_memory_allocated` on GPU) and the largest loss
difference over all steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hiddenkey_ds.distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny-lora.yaml"

# Loss agreement: max over steps of |ours - Trainer| / |Trainer|. Both sides compute the same function of the same
# data with the same initial weights, but in different orders (our head: supervised positions only, in chunks;
# the stock head: every position, then a masked mean), so in fp32 they differ by rounding: measured 7.7e-8
# (tiny, 40 steps, across an epoch boundary) and 1.1e-7 (SmolLM2-135M, 20 steps). 1e-5 is 100x that and still far below any real
# difference (one token more or less in a step's mean, a schedule one step off, another clipping: 1e-3 and up).
# bf16 rounds every matmul to 8 bits of mantissa: 2e-2 there.
LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}


def recipe_overrides(args, out_dir: Path) -> list[str]:
    """The job, as recipe overrides of recipes/tiny-lora.yaml; the Trainer side reads the same recipe."""
    return [
        f"run.output_dir={out_dir}", f"model.name={args.model}", f"model.dtype={args.dtype}",
        f"data.max_length={args.max_length}", f"data.max_train_examples={args.examples}", "data.eval_split=null",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1", f"train.max_steps={args.steps}",
        "train.log_every=1", "train.eval_every=null", "train.save_every=null", "eval.at_end=false",
        f"run.deepspeed={args.zero}", f"lora.target_modules=[{args.targets}]",
    ]


# -------------------------------------------------------------------------------------------- the Trainer side
def trainer_worker(payload: dict) -> None:
    """One rank of the Trainer side (run under torchrun)."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.data import build_datasets, make_collator, make_sampler
    from hiddenkey_ds.config.deepspeed import resolve_ds_config
    from hiddenkey_ds.models.loading import DTYPES, load_tokenizer, resolve_model_path

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out_dir = Path(payload["out_dir"])
    recipe = load_recipe(RECIPE, payload["overrides"], world_size=world)
    t = recipe.train
    total = t.max_steps
    tokenizer = load_tokenizer(recipe)
    train_ds, _, _ = build_datasets(recipe, tokenizer)
    collate = make_collator(tokenizer)
    sampler = make_sampler(train_ds, world, rank, recipe.run.seed, recipe.data.shuffle)
    ds_config = resolve_ds_config(recipe, world, total)

    # what a user writes: stock loading, PEFT, the Trainer (LoRA init seeded as our loader seeds it)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(recipe.model.name), dtype=getattr(torch, DTYPES[recipe.model.dtype]),
        attn_implementation=recipe.model.attn_implementation)
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(recipe.run.seed)
    lora = recipe.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, bias=lora.bias,
                                             task_type="CAUSAL_LM"))
    accelerator_config = None
    if not torch.cuda.is_available():
        # accelerate's DeepSpeed set-up knows no CPU backend: it initializes DeepSpeed's process group but then
        # counts one process (HF's train_batch_size check fails). Configure its state for gloo first and tell
        # TrainingArguments to use it; on GPUs the stock path (NCCL) needs nothing of this.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}
    args = TrainingArguments(
        accelerator_config=accelerator_config,
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.eps, max_grad_norm=t.clipping,
        lr_scheduler_type=t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=t.warmup_steps(total), max_steps=total, logging_steps=1, save_strategy="no",
        report_to=[], deepspeed=ds_config, bf16=recipe.model.dtype == "bf16", disable_tqdm=True,
        seed=recipe.run.seed, dataloader_num_workers=0, remove_unused_columns=False,
    )

    class EpochLoader(DataLoader):
        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at every epoch: reshuffle as our loop does
            sampler.set_epoch(epoch)

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            # this rank's shard in our order; not prepared by accelerate, which would re-shard it
            return EpochLoader(train_ds, batch_size=t.micro_batch_size, sampler=sampler, collate_fn=collate,
                               drop_last=True)

    record: dict = {"step_end": [], "cpu_end": [], "loss": {}}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            record["begin"], record["cpu_begin"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **k):
            record["step_end"].append(time.perf_counter())
            record["cpu_end"].append(time.process_time())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                record["loss"][state.global_step] = float(logs["loss"])

    trainer = SameBatches(model=model, args=args, train_dataset=train_ds, callbacks=[Clock()])
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    ends = [record["begin"], *record["step_end"]]
    cpu = [record["cpu_begin"], *record["cpu_end"]]
    result = {"rank": rank, "step_s": [b - a for a, b in zip(ends, ends[1:])],
              "cpu_s": [b - a for a, b in zip(cpu, cpu[1:])], "peak_gib": peak,
              "loss": {int(k): v for k, v in record["loss"].items()}}
    (out_dir / f"trainer_rank{rank}.json").write_text(json.dumps(result))


# -------------------------------------------------------------------------------------------- our side
def ours_worker(argv: list[str]) -> int:
    """One rank of our side: `hiddenkey_ds.train.main(argv)` as `python -m hiddenkey_ds.train` runs it, with a
    clock on the run logger: the first `new_window()` (just before step 1) and every `train_line()` (the end of
    a logged step, after its collective metric reduction, on every rank) record wall and process CPU time."""
    from hiddenkey_ds import train
    from hiddenkey_ds.training import run_log

    clock: dict = {"begin": None, "ends": []}
    new_window, train_line = run_log.RunLogger.new_window, run_log.RunLogger.train_line

    def timed_new_window(self):
        if clock["begin"] is None:
            clock["begin"] = (time.perf_counter(), time.process_time())
        return new_window(self)

    def timed_train_line(self, step, metrics, lr):
        clock["ends"].append((time.perf_counter(), time.process_time()))
        return train_line(self, step, metrics, lr)

    run_log.RunLogger.new_window, run_log.RunLogger.train_line = timed_new_window, timed_train_line
    rc = train.main(argv)
    out_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("run.output_dir=")))
    points = [clock["begin"], *clock["ends"]]
    (out_dir / f"ours_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
        "step_s": [b[0] - a[0] for a, b in zip(points, points[1:])],
        "cpu_s": [b[1] - a[1] for a, b in zip(points, points[1:])]}))
    return rc


# -------------------------------------------------------------------------------------------- the driver
def _launch(cmd_tail: list[str], ranks: int, timeout: float) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
           f"--master_port={free_port()}", *cmd_tail]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd_tail[:3])} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")


def run_ours(args, out_dir: Path) -> dict:
    _launch([str(Path(__file__).resolve()), "--ours-worker", str(RECIPE), *recipe_overrides(args, out_dir)],
            args.ranks, args.timeout)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "train"]
    clock = json.loads((out_dir / "ours_rank0.json").read_text())
    return {"step_s": clock["step_s"], "cpu_s": clock["cpu_s"], "loss": {r["step"]: r["loss"] for r in rows},
            "peak_gib": max(r["peak_mem_gib"] for r in rows)}


def run_trainer(args, out_dir: Path) -> dict:
    payload = {"out_dir": str(out_dir), "overrides": recipe_overrides(args, out_dir)}
    _launch([str(Path(__file__).resolve()), "--trainer-worker", json.dumps(payload)], args.ranks, args.timeout)
    ranks = [json.loads((out_dir / f"trainer_rank{r}.json").read_text()) for r in range(args.ranks)]
    # a step ends on every rank at once (the optimizer step is collective): rank 0's clock is the step time
    return {"step_s": ranks[0]["step_s"], "cpu_s": ranks[0]["cpu_s"],
            "loss": {int(k): v for k, v in ranks[0]["loss"].items()},
            "peak_gib": max(r["peak_gib"] for r in ranks)}


def compare(args) -> dict:
    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    sides = {"ours": run_ours, "trainer": run_trainer}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trainer_") as tmp:
        for i in range(args.repeats):
            order = ("ours", "trainer") if i % 2 == 0 else ("trainer", "ours")
            for side in order:
                out_dir = Path(tmp) / f"{side}{i}"
                out_dir.mkdir()
                start = time.perf_counter()
                res = sides[side](args, out_dir)
                res["wall_s"] = time.perf_counter() - start
                runs[side].append(res)
                print(f"# {side} launch {i + 1}/{args.repeats}: {res['wall_s']:.0f} s wall, "
                      f"median step {statistics.median(res['step_s'][args.warmup:]):.3f} s", file=sys.stderr)
    summary = {}
    for side, results in runs.items():
        launches = [statistics.median(r["step_s"][args.warmup:]) for r in results]
        summary[side] = {
            "step_s": statistics.median(launches),
            "launch_step_s": launches,
            "cpu_s": statistics.median(statistics.median(r["cpu_s"][args.warmup:]) for r in results),
            "peak_gib": max(r["peak_gib"] for r in results),
            "loss": results[0]["loss"],
        }
    ours, theirs = summary["ours"]["loss"], summary["trainer"]["loss"]
    steps = sorted(set(ours) & set(theirs))
    rel = [abs(ours[s] - theirs[s]) / max(abs(theirs[s]), 1e-12) for s in steps]
    summary["loss_steps"] = len(steps)
    summary["loss_max_rel_diff"] = max(rel) if rel else float("nan")
    summary["loss_agree"] = bool(steps) and len(steps) == args.steps and max(rel) <= LOSS_RTOL[args.dtype]
    summary["ratio"] = summary["ours"]["step_s"] / summary["trainer"]["step_s"]
    summary["cpu_ratio"] = summary["ours"]["cpu_s"] / summary["trainer"]["cpu_s"]
    return summary


def table(args, s: dict) -> str:
    def spread(side: str) -> str:
        return ", ".join(f"{x:.3f}" for x in s[side]["launch_step_s"])

    lines = [
        f"# {args.model}, {args.dtype}, LoRA r=8 on {args.targets}, ZeRO-{args.zero[-1]} on {args.ranks} ranks, "
        f"micro-batch {args.micro_batch} x <= {args.max_length} tokens, {args.steps} steps "
        f"(median step after {args.warmup}, {args.repeats} launch(es) per side)",
        "",
        "| loop | s / step (wall) | per launch | x Trainer | CPU s / step (rank 0) | x Trainer | "
        "peak memory / rank (GiB) | losses |",
        "|---|---:|---|---:|---:|---:|---:|---|",
        f"| transformers Trainer + DeepSpeed + PEFT | {s['trainer']['step_s']:.3f} | {spread('trainer')} | 1.00x | "
        f"{s['trainer']['cpu_s']:.3f} | 1.00x | {s['trainer']['peak_gib']:.2f} | reference |",
        f"| hiddenkey-ds (`python -m hiddenkey_ds.train`) | {s['ours']['step_s']:.3f} | {spread('ours')} | "
        f"{s['ratio']:.2f}x | {s['ours']['cpu_s']:.3f} | {s['cpu_ratio']:.2f}x | {s['ours']['peak_gib']:.2f} | "
        f"{'agree' if s['loss_agree'] else 'DIFFER'}: max rel. diff "
        f"{s['loss_max_rel_diff']:.1e} over {s['loss_steps']} steps (tolerance {LOSS_RTOL[args.dtype]:g}) |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--zero", default="zero2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median (first-step allocations)")
    p.add_argument("--repeats", type=int, default=2, help="launches per side, alternating")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--smoke", action="store_true", help="builtin:tiny-llama, 3 steps, one launch per side")
    p.add_argument("--trainer-worker", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--ours-worker"]:
        return ours_worker([a for a in argv[1:] if not a.startswith("--local_rank")])
    args = p.parse_args(argv)
    if args.trainer_worker:
        trainer_worker(json.loads(args.trainer_worker))
        return 0
    if args.smoke:
        args.model, args.steps, args.warmup, args.repeats, args.examples = "builtin:tiny-llama", 3, 1, 1, 64
    summary = compare(args)
    print(table(args, summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    return 0 if summary["loss_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
