"""The memory planner's estimate next to the peak memory of a real training step, measured on CPU.

    python benchmarks/plan_vs_measured.py                  # tiny + SmolLM2-135M, ZeRO 0/2/3, LoRA vs HiddenKey
    python benchmarks/plan_vs_measured.py --models tiny --stages 0,3 --world 2 --json out.json

What is measured: every rank (gloo, one process per rank) builds the model from its config (random init,
no files), adds LoRA and the objective exactly as hiddenkey_ds.models.loading / train.py do (same recipe schema,
`lora_config`, gradient checkpointing helper, `HiddenKeyObjective`, `resolve_ds_config`,
`deepspeed.initialize`) and runs two optimizer steps. Peak = the process's resident-set high-water mark over
those steps (VmHWM, reset through /proc/self/clear_refs just before them) minus its resident set after the
imports and process-group set-up, before the model exists. glibc is told to serve every allocation above
64 KiB with mmap (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set at once and the
high-water mark tracks live tensors rather than allocator caching.

What that cannot check: device-only terms of the planner (CUDA context, caching-allocator fragmentation,
DeepSpeed's untouched bucket pages). The comparison therefore uses PlanConfig(device="cpu"), which leaves
exactly those out, and says so.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hiddenkey_ds.distributed import free_port  # noqa: E402
from hiddenkey_ds.models.shapes import BUILTIN_SHAPES, ModelShape  # noqa: E402,F401  (ModelShape: tests build probes)
from hiddenkey_ds.planning import MemoryPlan, PlanConfig, estimate  # noqa: E402

MIB = 1024**2
TINY_RECIPE = ROOT / "recipes" / "tiny-lora.yaml"
# builtin:tiny-llama's architecture (hiddenkey_ds.models.builtin.TINY_CONFIG, vocabulary 1024)
TINY_SHAPE = ModelShape("tiny-llama", layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2, vocab=1024,
                        tie_embeddings=False)
SHAPES = {"tiny": TINY_SHAPE, "smollm2": BUILTIN_SHAPES["smollm2-135m"]}
METHODS = {"lora": "none", "hiddenkey": "hiddenkey", "dropkey": "dropkey"}  # -> dropout.preset

# Acceptance: |estimate - measured| <= max(REL_TOL * measured, ABS_TOL). The floor covers allocator and
# Python-object noise of a few MiB that does not scale with the model; every validated configuration is
# sized so that the relative term dominates (peaks of 150 MiB and more).
REL_TOL = 0.20
ABS_TOL = 4 * MIB


@dataclass(frozen=True)
class Spec:
    model: str = "tiny"              # tiny | smollm2
    stage: int = 0                   # ZeRO stage (ds_configs/zero{stage}.json)
    method: str = "lora"             # lora | hiddenkey
    micro_batch: int = 8
    seq_len: int = 256
    supervised: int = 8              # supervised (label) tokens per sequence
    lora_r: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    checkpointing: bool = False
    chunk_tokens: int = 1024

    @property
    def label(self) -> str:
        ckpt = " +ckpt" if self.checkpointing else ""
        return f"{self.model} ZeRO-{self.stage} {self.method}{ckpt} b{self.micro_batch}xs{self.seq_len}"


def recipe_overrides(spec: Spec) -> list[str]:
    return [f"run.deepspeed=zero{spec.stage}", "model.dtype=fp32", f"lora.r={spec.lora_r}",
            f"lora.target_modules=[{','.join(spec.targets)}]", f"dropout.preset={METHODS[spec.method]}",
            f"train.micro_batch_size={spec.micro_batch}", "train.grad_accum=1", "train.max_steps=2",
            f"train.loss_chunk_tokens={spec.chunk_tokens}", f"model.gradient_checkpointing={str(spec.checkpointing).lower()}",
            f"data.max_length={spec.seq_len}", "train.torch_adam=true"]


def plan_config(spec: Spec, world: int) -> PlanConfig:
    """The planner's view of a Spec, from the same recipe + resolved DeepSpeed config the worker trains with."""
    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.config.deepspeed import resolve_ds_config
    from hiddenkey_ds.planning import config_from_recipe

    recipe = load_recipe(TINY_RECIPE, recipe_overrides(spec), world_size=world, check_output_dir=False)
    ds = resolve_ds_config(recipe, world, total_steps=2)
    return config_from_recipe(recipe, ds, nodes=1, gpus_per_node=world, gpu_mem_gib=1e6, shape=SHAPES[spec.model],
                              seq_len=spec.seq_len, supervised_tokens=spec.supervised, device="cpu")


def estimate_spec(spec: Spec, world: int) -> MemoryPlan:
    from dataclasses import replace

    return estimate(replace(plan_config(spec, world), padded=False), suggest=False)


# -- the worker (one process per rank) -----------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _trim_heap() -> None:
    """Hand free heap pages back to the kernel (glibc malloc_trim), so that a configuration cannot reuse an
    earlier one's freed small allocations without them showing in its resident set."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _measure_one(spec: Spec, world: int) -> dict:
    import deepspeed
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.config.deepspeed import resolve_ds_config
    from hiddenkey_ds.models.loading import _enable_gradient_checkpointing, lora_config
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    recipe = load_recipe(TINY_RECIPE, recipe_overrides(spec), world_size=world, check_output_dir=False)
    ds = resolve_ds_config(recipe, world, total_steps=2)
    shape = SHAPES[spec.model]
    # The first ZeRO-3 engine of a process swaps torch.nn.functional.linear for DeepSpeed's version for good
    # (it saves every linear input); a ZeRO-0/2 training process never has it: measure() runs the two apart
    if spec.stage != 3 and getattr(torch.nn.functional.linear, "__name__", "") == "zero3_linear_wrap":
        raise RuntimeError(f"{spec.label}: F.linear is ZeRO-3's from an earlier configuration of this process")
    gc.collect()
    _trim_heap()
    base = _status("VmRSS")

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=max(2048, spec.seq_len),
        attn_implementation=recipe.model.attn_implementation, use_cache=False)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.model.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model = get_peft_model(model, lora_config(recipe))
    model.train()
    objective = HiddenKeyObjective(model, recipe.dropout, chunk_tokens=recipe.train.loss_chunk_tokens)
    engine, *_ = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad], config=ds)
    engine.train()

    g = torch.Generator().manual_seed(1)
    b, s = spec.micro_batch, spec.seq_len
    input_ids = torch.randint(3, shape.vocab, (b, s), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, s - spec.supervised:] = input_ids[:, s - spec.supervised:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    gc.collect()
    _trim_heap()
    after_init = _status("VmRSS")
    _reset_peak()
    phases = {}
    t0 = time.perf_counter()
    for _ in range(2):
        out = engine(**batch)
        phases.setdefault("forward", _status("VmHWM"))
        engine.backward(out.loss)
        phases.setdefault("backward", _status("VmHWM"))
        engine.step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    loss = float(out.loss)

    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, objective, model, out
    gc.collect()
    return {"peak": peak - base, "after_init": after_init - base, "forward": phases["forward"] - base,
            "backward": phases["backward"] - base, "leftover": _status("VmRSS") - base, "seconds": seconds,
            "loss": loss}


def worker(specs: list[Spec]) -> None:
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    # one throw-away run first: lazy one-time allocations (kernel caches, thread pools, DeepSpeed's op loading)
    # would otherwise land in the first measured configuration
    _measure_one(Spec(model="tiny", stage=specs[0].stage, method="hiddenkey", micro_batch=1, seq_len=16), world)
    for spec in specs:
        t0 = time.perf_counter()
        result = _measure_one(spec, world)
        result["wall"] = time.perf_counter() - t0
        print("RESULT " + json.dumps({"spec": asdict(spec), "rank": int(os.environ["RANK"]), **result}), flush=True)


# -- what autograd saves (exact, one process, no DeepSpeed) -----------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """A decoder forward whose saved tensors are counted: the activation term of the planner, checked
    without allocator noise. `zero3_linear` swaps in DeepSpeed's ZeRO-3 F.linear as a ZeRO-3 run does."""

    shape: ModelShape = TINY_SHAPE
    preset: str = "none"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    micro_batch: int = 2
    seq_len: int = 64
    padded: bool = False
    checkpointing: bool = False
    zero3_linear: bool = False
    dtype: str = "fp32"
    key_pattern: str | None = None          # None: the preset's
    layers: str | None = None               # dropout.layers; None: the default (the latter half)
    consistency_grad: str | None = None     # None: the default (one_branch)
    attention_pattern: str | None = None
    rebuild_mask_bytes: int | None = None   # None: hiddenkey_ds.method's threshold (moved down to reach the
                                            # rebuilt-mask branch at probe sizes)


def probe_saved_bytes(probe: Probe) -> tuple[float, float]:
    """(bytes of distinct non-parameter storages autograd saves in the decoder forward, planner's estimate of
    the same: MemoryPlan.extras["decoder_saved"])."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiddenkey_ds.method import DropoutConfig
    from hiddenkey_ds.models.loading import _enable_gradient_checkpointing
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    s = probe.shape
    dtype = torch.bfloat16 if probe.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
        tie_word_embeddings=s.tie_embeddings, attn_implementation="sdpa", use_cache=False)).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if probe.checkpointing:
        _enable_gradient_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=probe.lora_dropout,
                                             target_modules=list(probe.targets)))
    model.train()
    for p in model.parameters():
        p.data = p.data.to(dtype)  # DeepSpeed's engine casts PEFT's fp32 adapters to the training dtype
    overrides = {}
    if probe.key_pattern:
        overrides["key"] = {"pattern": probe.key_pattern}
    if probe.attention_pattern:
        overrides["attention"] = {"pattern": probe.attention_pattern}
    if probe.layers:
        overrides["layers"] = probe.layers
    if probe.consistency_grad:
        overrides["consistency_grad"] = probe.consistency_grad
    cfg = DropoutConfig(preset=probe.preset, **overrides)
    # the objective's passes, as training runs them: a dual pass shares the layers before the first dropout layer,
    # then duplicates the rows (both) or replays without grad (one_branch)
    objective = HiddenKeyObjective(model, cfg).train()
    rows = probe.micro_batch
    ids = torch.randint(3, s.vocab, (rows, probe.seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if probe.padded:
        mask[0, : probe.seq_len // 4] = 0  # left padding in one row: a real (B, 1, S, S) mask
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    from hiddenkey_ds.method import attention as dropout_attention

    threshold = dropout_attention.REBUILD_MASK_BYTES
    if probe.rebuild_mask_bytes is not None:
        dropout_attention.REBUILD_MASK_BYTES = probe.rebuild_mask_bytes
    linear = torch.nn.functional.linear
    if probe.zero3_linear:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        torch.nn.functional.linear = zero3_linear_wrap
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), objective.activated():
            decoder = model.get_base_model().get_decoder()
            objective._passes(decoder, ids, mask if probe.padded else None)
    finally:
        torch.nn.functional.linear = linear
        dropout_attention.REBUILD_MASK_BYTES = threshold
    # rotary cos/sin are computed once and shared by every layer (not kept at all under checkpointing,
    # which passes them as keyword arguments); the planner leaves them out
    rotary = 0 if probe.checkpointing else 2 * probe.seq_len * s.dim_head * (2 if probe.dtype == "bf16" else 4)
    plan_cfg = PlanConfig(
        shape=s, dtype=probe.dtype, lora_r=8, lora_targets=probe.targets, lora_dropout=probe.lora_dropout,
        zero_stage=3 if probe.zero3_linear else 0, micro_batch=probe.micro_batch, seq_len=probe.seq_len,
        padded=probe.padded, gradient_checkpointing=probe.checkpointing, dual_pass=cfg.dual_pass,
        consistency_grad=cfg.consistency_grad,
        dropout_layers=tuple(cfg.layers) if isinstance(cfg.layers, list) else cfg.layers,
        key_dropout=cfg.key.rate > 0, key_pattern=cfg.key.pattern, attention_dropout=cfg.attention.rate > 0,
        attention_pattern=cfg.attention.pattern, hidden_dropout=cfg.hidden.rate > 0, hidden_pattern=cfg.hidden.pattern,
        gpus_per_node=1, device="cpu", **({"rebuild_mask_bytes": probe.rebuild_mask_bytes}
                                           if probe.rebuild_mask_bytes is not None else {}))
    return sum(saved.values()) - rotary, estimate(plan_cfg, suggest=False).extras["decoder_saved"]


# -- the driver --------------------------------------------------------------------------------------------------

def measure(specs: list[Spec], world: int = 2, timeout: int = 900) -> list[dict]:
    """Run `specs` in fresh sets of `world` rank processes, ZeRO-3 ones apart (see _measure_one), smaller
    models first; one dict per spec with every rank's numbers, in the order given."""
    results: list[dict | None] = [None] * len(specs)
    for zero3 in (False, True):
        group = sorted((i for i in range(len(specs)) if (specs[i].stage == 3) == zero3),
                       key=lambda i: SHAPES[specs[i].model].total_params)
        if group:
            for i, res in zip(group, _measure_group([specs[i] for i in group], world, timeout), strict=True):
                results[i] = res
    return results


def _measure_group(specs: list[Spec], world: int, timeout: int) -> list[dict]:
    port = str(free_port())
    payload = json.dumps([asdict(s) for s in specs])
    env_common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world),
                  "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
                  "MALLOC_ARENA_MAX": "2", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", payload],
        env={**env_common, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_SIZE": str(world)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"measurement rank exited with {p.returncode}:\n{err[-4000:]}")
        outputs.append([json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")])
    results = []
    for i, spec in enumerate(specs):
        ranks = [o[i] for o in outputs]
        results.append({"spec": spec, "world": world, "ranks": ranks, "measured": max(r["peak"] for r in ranks)})
    return results


@dataclass
class Comparison:
    spec: Spec
    world: int
    estimate: float
    measured: float
    plan: MemoryPlan = field(repr=False)
    ranks: list = field(default_factory=list, repr=False)

    @property
    def error(self) -> float:
        return (self.estimate - self.measured) / self.measured

    @property
    def tolerance(self) -> float:
        return max(REL_TOL * self.measured, ABS_TOL)

    @property
    def ok(self) -> bool:
        return abs(self.estimate - self.measured) <= self.tolerance


def compare(specs: list[Spec], world: int = 2) -> list[Comparison]:
    out = []
    for res in measure(specs, world):
        plan = estimate_spec(res["spec"], world)
        out.append(Comparison(res["spec"], world, plan.total_bytes, res["measured"], plan, res["ranks"]))
    return out


def table(rows: list[Comparison]) -> str:
    lines = ["| configuration | ranks | estimate (MiB) | measured peak (MiB) | error | within tolerance |",
             "|---|---:|---:|---:|---:|:---:|"]
    for c in rows:
        lines.append(f"| {c.spec.label} | {c.world} | {c.estimate / MIB:.0f} | {c.measured / MIB:.0f} | "
                     f"{c.error:+.1%} | {'yes' if c.ok else 'NO'} |")
    return "\n".join(lines)


def default_specs(models: list[str], stages: list[int], methods: list[str]) -> list[Spec]:
    specs = []
    for model in models:
        # sized so that activations and weights, not allocator noise, dominate the peak
        size = dict(micro_batch=8, seq_len=512) if model == "tiny" else dict(micro_batch=2, seq_len=128)
        for stage in stages:
            for method in methods:
                specs.append(Spec(model=model, stage=stage, method=method, **size))
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--methods", default="lora,hiddenkey")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="also measure with gradient checkpointing")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker([Spec(**{**d, "targets": tuple(d["targets"])}) for d in json.loads(args.worker)])
        return 0
    specs = default_specs(args.models.split(","), [int(s) for s in args.stages.split(",")], args.methods.split(","))
    if args.checkpointing:
        specs += [Spec(**{**asdict(s), "checkpointing": True}) for s in specs]
    rows = compare(specs, args.world)
    print(table(rows))
    print(f"\ntolerance: |estimate - measured| <= max({REL_TOL:.0%} of measured, {ABS_TOL / MIB:.0f} MiB); "
          "CPU peak RSS per rank (max over ranks) minus the process after imports")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"spec": asdict(c.spec), "world": c.world, "estimate": c.estimate, "measured": c.measured,
              "ranks": c.ranks, "rows": [asdict(r) for r in c.plan.rows]} for c in rows], indent=2))
    return 0 if all(c.ok for c in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
