"""What a run tells the user and leaves on disk: rank-0 progress bar and log lines, metrics.jsonl, the
resolved config, summary.json (written last: its presence marks a finished run).

The methods every rank calls (start, truncate_after, train_line, eval_line) write on rank 0 collectively
(training/collective.py): a failed write (a full disk) ends every rank at once, not in the next all-reduce."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hiddenkey_ds import run_dir as layout
from hiddenkey_ds.training.collective import run_collectively


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process, or peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def all_reduce_cpu(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor through whatever backend the run uses (NCCL only takes device tensors)."""
    from deepspeed.accelerator import get_accelerator

    on_device = tensor.to(get_accelerator().current_device_name())
    dist.all_reduce(on_device, op=op)
    return on_device.cpu()


class MetricsWindow:
    """Sums of one logging window on this rank; `reduce` (collective) turns them into global means."""

    def __init__(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # ce_sum, consistency_sum, supervised tokens, input tokens
        self.start = time.perf_counter()

    def add(self, out, batch: dict, normalizer: float) -> None:
        n = out.n_tokens.item()
        # the objective divided this micro-batch's sums by `normalizer`; undo it to get sums
        self.sums += torch.tensor([out.ce.item() * normalizer, out.consistency.item() * normalizer, n,
                                   float(batch["attention_mask"].sum())], dtype=torch.float64)

    def reduce(self) -> dict[str, float]:
        ce, cons, tokens, inputs = all_reduce_cpu(self.sums).tolist()
        elapsed = time.perf_counter() - self.start
        peak = all_reduce_cpu(torch.tensor([peak_memory_gib()]), op=dist.ReduceOp.MAX)
        return {"ce": ce / max(tokens, 1), "consistency": cons / max(tokens, 1),
                "tokens_per_s": inputs / max(elapsed, 1e-9), "peak_mem_gib": peak.item()}


class RunLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, alpha: float) -> None:
        self.run_dir, self.rank, self.total_steps, self.alpha = Path(run_dir), rank, total_steps, alpha
        self.metrics_path = self.run_dir / layout.METRICS
        self.started = time.time()
        self.bar = None
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.monitor = None  # DeepSpeed's monitor (TensorBoard) when enabled in the DeepSpeed config

    def elapsed(self) -> float:
        return time.time() - self.started

    def resume_clock(self, elapsed: float | None) -> None:
        """A resumed run's clock continues from its checkpoint: summary.json's wall_time_s and the metrics' `time`
        count every segment (the work redone after an interruption included), not just the last one."""
        if elapsed:
            self.started = time.time() - elapsed

    def new_window(self) -> MetricsWindow:
        return MetricsWindow()

    def info(self, message: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(message)

    def start(self, recipe, ds_config: dict, data_report: Any, model) -> None:
        run_collectively("writing the run's start files", lambda: self._start(recipe, ds_config, data_report, model))

    def _start(self, recipe, ds_config: dict, data_report: Any, model) -> None:
        self.write_recipe(recipe)
        layout.write_atomic(self.run_dir / layout.DS_CONFIG, json.dumps(ds_config, indent=2))
        self.metrics_path.write_text("")
        # under ZeRO-3 a parameter's own numel is its (empty) local partition
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        self.info(f"run dir: {self.run_dir}")
        self.info(f"model: {recipe.model.name} | dropout: {recipe.dropout.describe()} | trainable params: {trainable:,}")
        layout.write_atomic(self.run_dir / layout.DATA_REPORT, json.dumps(data_report.to_dict(), indent=2))
        self.info(data_report.summary())
        self.info(f"DeepSpeed: ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}, "
                  f"global batch {ds_config['train_batch_size']}, {self.total_steps} steps")

    def write_recipe(self, recipe) -> None:
        """The resolved recipe, which evaluation and reports read as the settings the run used."""
        layout.write_atomic(self.run_dir / layout.CONFIG, recipe.to_yaml())

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric lines of steps the resumed run will redo."""
        run_collectively(f"truncating {layout.METRICS}", lambda: self._truncate_after(step))

    def _truncate_after(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        layout.write_atomic(self.metrics_path, "".join(line + "\n" for line in keep))
        if self.bar is not None:
            self.bar.update(step)

    def _record(self, row: dict[str, Any]) -> None:
        row["time"] = round(time.time() - self.started, 3)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.monitor is not None:
            self.monitor.write_events([(f"{row['split']}/{k}", v, row["step"]) for k, v in row.items()
                                       if isinstance(v, float) and k != "time"])

    def train_line(self, step: int, metrics: dict[str, float], lr: float) -> None:
        run_collectively(f"logging step {step}", lambda: self._train_line(step, metrics, lr))

    def _train_line(self, step: int, metrics: dict[str, float], lr: float) -> None:
        loss = metrics["ce"] + self.alpha * metrics["consistency"]
        row = {"step": step, "split": "train", "loss": loss, **metrics, "lr": lr}
        self._record(row)
        self.bar.update(step - self.bar.n)
        self.info(f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | ce {metrics['ce']:.4f} | "
                  f"consistency {metrics['consistency']:.4f} | lr {lr:.2e} | {metrics['tokens_per_s']:,.0f} tok/s | "
                  f"peak mem {metrics['peak_mem_gib']:.2f} GiB")

    def eval_line(self, step: int, metrics: dict[str, float]) -> None:
        run_collectively(f"logging the validation of step {step}", lambda: self._eval_line(step, metrics))

    def _eval_line(self, step: int, metrics: dict[str, float]) -> None:
        self._record({"step": step, "split": "validation", **metrics})
        self.info(f"eval @ {step:>6} | loss {metrics['loss']:.4f} | accuracy {metrics['accuracy']:.4f} "
                  f"({metrics['examples']} examples)")

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self, step: int, final_eval: dict[str, float] | None, best: dict[str, Any] | None = None) -> None:
        summary = {"steps": step, "wall_time_s": round(time.time() - self.started, 1),
                   "final_eval": final_eval, "adapter": str(self.run_dir / layout.ADAPTER_DIRS["final"]), "best": best}
        layout.write_atomic(self.run_dir / layout.SUMMARY, json.dumps(summary, indent=2))
        self.info(f"done: adapter in {self.run_dir / layout.ADAPTER_DIRS['final']}")
