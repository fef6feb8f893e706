"""One command that checks the GPU path end to end and shows how fast it is.

    python benchmarks/gpu_check.py                  # one CUDA GPU: <= 8 min on an H100/H200, no downloads
    python benchmarks/gpu_check.py --smoke          # CPU, tiny shapes: what the test suite runs
    python benchmarks/gpu_check.py --only kernel,steps --json gpu_check.json

Every model is a randomly initialized LLaMA built from a config (LLaMA-2-7B-shaped layers at reduced depth
on a GPU; builtin:tiny-llama's shape in --smoke), so nothing is downloaded. Sections (`--only`):

  steps   bf16 step time and tokens/s of plain LoRA, hiddenkey_nokl and hiddenkey (both settings of the
          consistency gradient), measured side by side (round-robin) as ratios to plain LoRA; plain LoRA's
          MFU; each configuration's peak memory (one step alone) against `hiddenkey-ds plan`'s estimate
  kernel  the DropKey attention alone, forward + backward, fused FlexAttention path and sdpa path against
          flash causal attention at 2k and 8k tokens (target: fused column DropKey <= 1.3x flash causal),
          and the fused path's agreement with the sdpa reference (same keep-mask)
  qlora   QLoRA 4-bit (bitsandbytes) + HiddenKey through `python -m hiddenkey_ds.train`: one step runs, the
          loss is finite, the adapter is saved; peak memory against the plan
  zero    ZeRO-2 and ZeRO-3 through the `deepspeed` launcher on one device: a few HiddenKey steps each,
          equal losses; peak memory of each against the plan

It prints one table and exits 1 when a functional check fails (a performance target missed is reported as
MISS but only fails with --strict). In --smoke mode (CPU) the shapes are tiny, the timings mean nothing
and FlexAttention runs forward only (torch has no FlexAttention backward on CPU): the mode exists so that
the test suite runs every line of this script.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hiddenkey_ds.distributed import free_port  # noqa: E402  (after the checkout is on sys.path)

GIB = 2**30
SECTIONS = ("steps", "kernel", "qlora", "zero")
RECIPE = ROOT / "recipes" / "tiny-lora.yaml"   # every run and plan: this recipe + dropout.preset=... overrides
KERNEL_TARGET = 1.3        # fused column DropKey fwd+bwd / flash causal fwd+bwd
PLAN_TOLERANCE = 0.25      # |measured - plan| / plan above this is flagged (reported, not failed)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) for MFU; other devices: --peak-tflops
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "RTX 4090": 165.2, "B200": 2250.0}


@dataclass
class Shape:
    """A LLaMA decoder shape plus the batch the checks run."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    micro_batch: int
    seq: int
    supervised: int          # supervised (label) tokens per sequence, at its end
    kernel_seqs: tuple[int, ...]
    kernel_heads: int
    kernel_dim: int
    rounds: int
    train_layers: int        # depth of the model the qlora / zero runs train

    @property
    def label(self) -> str:
        return (f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads, vocab {self.vocab}; "
                f"batch {self.micro_batch} x {self.seq} tokens, {self.supervised} supervised per sequence")


# LLaMA-2-7B's layers (hidden 4096, MLP 11008, 32 heads, vocab 32000) at 4 layers: ~1.07B parameters
GPU_SHAPE = Shape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=4, vocab=32000, micro_batch=4,
                  seq=2048, supervised=1024, kernel_seqs=(2048, 8192), kernel_heads=32, kernel_dim=128, rounds=8,
                  train_layers=2)
SMOKE_SHAPE = Shape(hidden=64, intermediate=176, heads=4, kv_heads=2, layers=2, vocab=1024, micro_batch=2, seq=64,
                    supervised=16, kernel_seqs=(64,), kernel_heads=2, kernel_dim=16, rounds=1, train_layers=2)


@dataclass
class Row:
    section: str
    config: str
    result: str
    ratio: str = ""
    peak_gib: float | None = None
    plan_gib: float | None = None
    status: str = "ok"          # ok | FAIL... | MISS... (a performance target) | info...
    extra: dict = field(default_factory=dict)


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  [{row.section}] {row.config}: {row.result} {row.ratio} {row.status}", file=sys.stderr, flush=True)
        return row

    def fail(self, section: str, config: str, err: BaseException | str) -> None:
        msg = str(err).strip().splitlines()
        self.add(Row(section, config, f"error: {msg[-1] if msg else type(err).__name__}"[:300], status="FAIL"))

    def table(self) -> str:
        def gib(x):
            return "" if x is None else f"{x:.2f}"

        lines = ["| check | configuration | result | ratio | peak (GiB) | plan (GiB) | status |",
                 "|---|---|---|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r.section} | {r.config} | {r.result} | {r.ratio} | {gib(r.peak_gib)} | "
                         f"{gib(r.plan_gib)} | {r.status} |")
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(r.status.startswith("FAIL") for r in self.rows)

    @property
    def missed(self) -> bool:
        return any(r.status.startswith("MISS") for r in self.rows)


# -------------------------------------------------------------------------------------------- environment
class Env:
    def __init__(self, smoke: bool, peak_tflops: float | None) -> None:
        import torch

        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.dtype_name = "bf16" if self.cuda else "fp32"
        self.name = torch.cuda.get_device_name() if self.cuda else "CPU"
        self.total_gib = (torch.cuda.get_device_properties(0).total_memory / GIB if self.cuda else 1e6)
        self.peak_tflops = peak_tflops if peak_tflops else self._peak()

    def _peak(self) -> float | None:
        if not self.cuda:
            return None
        for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
            if key.lower() in self.name.lower():
                return PEAK_BF16_TFLOPS[key]
        return None

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def describe(self) -> str:
        import torch

        flex = "yes" if _flex_module() is not None else "no"
        cuda = f", CUDA {torch.version.cuda}" if self.cuda else ""
        return (f"device {self.name}{cuda}, torch {torch.__version__}, FlexAttention module: {flex}, "
                f"compute dtype {self.dtype_name}" + (" (SMOKE MODE: CPU, tiny shapes, timings meaningless)"
                                                       if self.smoke else ""))


def _flex_module():
    """hiddenkey_ds.method.flex, or None where this checkout has no fused path."""
    try:
        from hiddenkey_ds.method import flex
    except ImportError:
        return None
    return flex


# -------------------------------------------------------------------------------------------- plan
def plan_gib(env: Env, shape: Shape, overrides: list[str], layers: int | None = None, seq: int | None = None,
             supervised: int | None = None, config_json: Path | None = None) -> tuple[float, str]:
    """`hiddenkey-ds plan`'s estimate for recipes/tiny-lora.yaml + overrides on this one device, in the
    allocator's view (without the CUDA context and fragmentation allowance, which max_memory_allocated does
    not see): (GiB, the plan's own total line)."""
    from dataclasses import replace

    from hiddenkey_ds.config import load_recipe
    from hiddenkey_ds.config.deepspeed import resolve_ds_config
    from hiddenkey_ds.models.shapes import ModelShape, shape_from_config
    from hiddenkey_ds.planning import config_from_recipe, estimate

    recipe = load_recipe(RECIPE, overrides, world_size=1, check_output_dir=False)
    ds = resolve_ds_config(recipe, 1, total_steps=recipe.train.max_steps or 10)
    if config_json is not None:
        model_shape = shape_from_config(json.loads(config_json.read_text()), str(config_json))
    else:
        model_shape = ModelShape("gpu-check", layers=layers or shape.layers, hidden=shape.hidden,
                                 intermediate=shape.intermediate, heads=shape.heads, kv_heads=shape.kv_heads,
                                 vocab=shape.vocab, tie_embeddings=False)
    cfg = config_from_recipe(recipe, ds, nodes=1, gpus_per_node=1, gpu_mem_gib=env.total_gib, shape=model_shape,
                             seq_len=seq, supervised_tokens=supervised, device="gpu" if env.cuda else "cpu")
    plan = estimate(replace(cfg, padded=False) if seq else cfg, suggest=False)
    allocator = plan.total_bytes - plan.extras.get("context", 0.0) - plan.extras.get("fragmentation", 0.0)
    return allocator / GIB, f"plan total {plan.total_bytes / GIB:.2f} GiB incl. CUDA context + fragmentation"


def plan_status(peak: float | None, plan: float | None) -> str:
    if peak is None or plan is None or plan <= 0:
        return "info"
    return "ok" if abs(peak - plan) / plan <= PLAN_TOLERANCE else "info: plan off by " \
        f"{(plan - peak) / peak:+.0%}"


# -------------------------------------------------------------------------------------------- steps
def build_model(env: Env, shape: Shape, layers: int | None = None):
    """A randomly initialized LLaMA of `shape` on the device in the compute dtype, with LoRA r=8 on q, v."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=max(4096, shape.seq), tie_word_embeddings=False,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(config).to(env.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = model.to(env.dtype)  # as DeepSpeed's bf16 engine casts the adapters
    model.train()
    return model


def dropout_config(preset: str, **fields):
    """DropoutConfig(preset, **fields), leaving out fields this checkout's DropoutConfig does not have."""
    from hiddenkey_ds.method import DropoutConfig

    known = DropoutConfig.model_fields
    return DropoutConfig(preset=preset, **{k: v for k, v in fields.items() if k in known})


def step_configs(env: Env) -> dict[str, tuple[str, dict]]:
    """name -> (preset, extra DropoutConfig fields). The fused path is the default on CUDA (key_kernel auto);
    `hiddenkey_nokl, sdpa kernel` shows what it saves."""
    from hiddenkey_ds.method import DropoutConfig

    known = DropoutConfig.model_fields
    configs = {"plain LoRA": ("none", {}), "hiddenkey_nokl": ("hiddenkey_nokl", {})}
    if "key_kernel" in known:
        configs["hiddenkey_nokl, sdpa kernel"] = ("hiddenkey_nokl", {"key_kernel": "sdpa"})
    if "consistency_grad" in known:
        configs["hiddenkey, consistency grad one_branch"] = ("hiddenkey", {"consistency_grad": "one_branch"})
        configs["hiddenkey, consistency grad both"] = ("hiddenkey", {"consistency_grad": "both"})
    else:
        configs["hiddenkey"] = ("hiddenkey", {})
    return configs


def make_batch(env: Env, shape: Shape):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape.vocab, (shape.micro_batch, shape.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -shape.supervised:] = ids[:, -shape.supervised:]
    return {"input_ids": ids.to(env.device), "attention_mask": torch.ones_like(ids).to(env.device),
            "labels": labels.to(env.device)}


def lora_step_flops(shape: Shape, model) -> float:
    """Model FLOPs of one plain-LoRA step: forward 2 x (decoder linear params) per token, backward the same
    again (activation gradients only: the frozen base gets no weight gradient), LoRA's own matmuls (forward,
    input and weight gradients: 6 x its params per token), causal attention (QK^T and PV: 2 x 2 x S x d per
    token per layer forward for the full square, half of it causal, x3 with backward), and the LM head on the
    supervised tokens (4 x hidden x vocab per token: forward and input gradient; its checkpointed recomputation
    is not counted: MFU counts model FLOPs, not recomputation)."""
    tokens = shape.micro_batch * shape.seq
    dense = shape.layers * (shape.hidden * (shape.hidden * 2 + 2 * shape.hidden * shape.kv_heads // shape.heads)
                            + 3 * shape.hidden * shape.intermediate)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = shape.layers * 2 * 2 * shape.seq * shape.hidden / 2 * 3
    head = 4 * shape.hidden * shape.vocab * shape.supervised * shape.micro_batch
    return 4 * dense * tokens + 6 * lora * tokens + attention * tokens + head


def section_steps(env: Env, shape: Shape, report: Report) -> None:
    import torch

    from hiddenkey_ds.method.objective import HiddenKeyObjective

    batch = make_batch(env, shape)
    configs = step_configs(env)

    class Job:
        """One configuration: its own model (same seed: same weights), objective and optimizer. The objective's
        layer hooks belong to its model (one objective per model, as in training)."""

        def __init__(self, name: str) -> None:
            preset, extra = configs[name]
            self.name = name
            self.model = build_model(env, shape)
            self.objective = HiddenKeyObjective(self.model, dropout_config(preset, **extra)).train()
            self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5,
                                         fused=env.cuda)

        def step(self) -> None:
            out = self.objective(**batch)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss = out.loss.detach().item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss {loss}")

    # peak memory of each configuration alone (its first step also compiles the fused kernel)
    peaks, errors, prefix = {}, {}, {}
    for name in configs:
        try:
            job = Job(name)
            prefix[name] = job.objective.prefix
            job.step()
            env.sync()
            env.reset_peak()
            job.step()
            env.sync()
            peaks[name] = env.peak_gib()
        except Exception as err:  # noqa: BLE001 - reported in the table, the other configurations go on
            errors[name] = err
        job = None
        if env.cuda:
            torch.cuda.empty_cache()
    # step time: every configuration resident, one step each in turn (round-robin), median per configuration
    jobs = {name: Job(name) for name in configs if name not in errors}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job.step()  # warm-up
    for _ in range(shape.rounds):
        for name, job in jobs.items():
            env.sync()
            start = time.perf_counter()
            job.step()
            env.sync()
            times[name].append(time.perf_counter() - start)
    model = next(iter(jobs.values())).model if jobs else build_model(env, shape)

    tokens = shape.micro_batch * shape.seq
    ref = statistics.median(times["plain LoRA"]) if "plain LoRA" in times else None
    for name, (preset, extra) in configs.items():
        if name in errors:
            report.fail("steps", name, errors[name])
            continue
        t = statistics.median(times[name])
        overrides = [f"dropout.preset={preset}", *[f"dropout.{k}={v}" for k, v in extra.items()],
                     f"model.dtype={env.dtype_name}", f"train.micro_batch_size={shape.micro_batch}",
                     "run.deepspeed=zero0", "data.format=sft", f"data.max_length={shape.seq}"]
        try:
            plan, _ = plan_gib(env, shape, overrides, seq=shape.seq, supervised=shape.supervised)
        except Exception as err:  # noqa: BLE001
            plan = None
            print(f"  plan failed for {name}: {err}", file=sys.stderr)
        result = f"{t * 1e3:.1f} ms/step, {tokens / t:,.0f} tok/s"
        status = plan_status(peaks.get(name), plan)
        if name == "plain LoRA":
            flops = lora_step_flops(shape, model)
            mfu = flops / t / (env.peak_tflops * 1e12) if env.peak_tflops else None
            result += f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (unknown peak: --peak-tflops)"
        report.add(Row("steps", f"{name} ({dropout_config(preset, **extra).describe()})", result,
                       f"{t / ref:.2f}x" if ref else "", peaks.get(name), plan, status,
                       extra={"median_s": t, "tokens_per_s": tokens / t, "peak_gib": peaks.get(name),
                              "shared_prefix_layers": prefix.get(name)}))
    del jobs, model
    if env.cuda:
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- kernel
def _time(env: Env, fn, rounds: int) -> float:
    fn()  # warm-up (and compilation)
    env.sync()
    samples = []
    for _ in range(rounds):
        env.sync()
        start = time.perf_counter()
        fn()
        env.sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def section_kernel(env: Env, shape: Shape, report: Report) -> None:
    import torch
    import torch.nn.functional as F

    from hiddenkey_ds.method import attention
    from hiddenkey_ds.method.masks import attention_keep

    flex = _flex_module()
    b, h, d = 1, shape.kernel_heads, shape.kernel_dim
    for seq in shape.kernel_seqs:
        torch.manual_seed(seq)
        q, k, v = (torch.randn(b, h, seq, d, device=env.device, dtype=env.dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(b, h, seq, d, device=env.device, dtype=env.dtype)
        keep = attention_keep("column", 0.1, b, h, seq, seq, env.device)
        visible = attention._visible(None, seq, seq, env.device)

        def fwd_bwd(f):
            def run():
                for t in (q, k, v):
                    t.grad = None
                f().backward(grad)
            return run

        variants = {
            "flash causal (sdpa is_causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "column DropKey, sdpa path": lambda: attention._dropkey_attention(q, k, v, visible, keep, 0.0, None),
        }
        if flex is not None and env.cuda:
            variants["column DropKey, fused path"] = lambda: flex.dropkey_attention(q, k, v, None, keep, None)
            variants["causal, FlexAttention (no DropKey)"] = lambda: flex.dropkey_attention(q, k, v, None, None, None)
        rounds = max(3, shape.rounds * 2)
        times = {}
        for name, f in variants.items():
            try:
                times[name] = _time(env, fwd_bwd(f), rounds)
            except Exception as err:  # noqa: BLE001
                report.fail("kernel", f"{name}, {seq} tokens", err)
        ref = times.get("flash causal (sdpa is_causal)")
        for name, t in times.items():
            ratio = t / ref if ref else float("nan")
            status = "ok"
            if name == "column DropKey, fused path":
                status = "ok" if ratio <= KERNEL_TARGET else f"MISS (target <= {KERNEL_TARGET}x)"
            report.add(Row("kernel", f"{name}, {b}x{h} heads x {seq} tokens x d{d}, fwd+bwd",
                           f"{t * 1e3:.2f} ms", f"{ratio:.2f}x", status=status, extra={"median_s": t}))
        if flex is not None:
            _kernel_agreement(env, report, flex, q, k, v, grad, keep, visible, seq)
        del q, k, v, grad, keep, visible


def _kernel_agreement(env, report, flex, q, k, v, grad, keep, visible, seq) -> None:
    """The fused path against the sdpa reference on the same keep-mask: outputs (and gradients where
    FlexAttention has a backward) to the compute dtype's tolerance."""
    import torch

    from hiddenkey_ds.method import attention

    tol = 2e-2 if env.dtype == torch.bfloat16 else 1e-4
    try:
        grads_too = env.cuda  # torch has no FlexAttention backward on CPU: forward only there
        if not grads_too:
            q, k, v = q.detach(), k.detach(), v.detach()
        with contextlib.nullcontext() if grads_too else torch.no_grad():
            ref = attention._dropkey_attention(q, k, v, visible, keep, 0.0, None)
            ours = flex.dropkey_attention(q, k, v, None, keep, None, compile=env.cuda)
        errs = {"out": (ours.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)}
        if grads_too:
            g_ref = torch.autograd.grad(ref, (q, k, v), grad)
            g_ours = torch.autograd.grad(ours, (q, k, v), grad)
            for name, a, c in zip("qkv", g_ours, g_ref):
                errs[f"d{name}"] = (a.float() - c.float()).abs().max().item() / max(c.float().abs().max().item(), 1e-6)
        worst = max(errs.values())
        report.add(Row("kernel", f"fused == sdpa path, {seq} tokens" + ("" if grads_too else " (forward only)"),
                       "max rel. err " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()), "",
                       status="ok" if worst <= tol else f"FAIL (tolerance {tol:g})"))
    except Exception as err:  # noqa: BLE001
        report.fail("kernel", f"fused == sdpa path, {seq} tokens", err)


# -------------------------------------------------------------------------------------------- launched runs
def model_dir(env: Env, shape: Shape, root: Path) -> Path:
    """A HF model directory for the launched runs: a random LLaMA of `shape`'s layers (7B-shaped on a GPU,
    builtin:tiny-llama's in --smoke) at `shape.train_layers` depth, with tiny-llama's tokenizer (vocabulary
    1024) and its special-token ids. Built the same way in both modes, so --smoke exercises this code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiddenkey_ds.models.builtin import builtin_path

    tiny = builtin_path("builtin:tiny-llama")
    ids = LlamaConfig.from_pretrained(tiny)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.train_layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                         vocab_size=ids.vocab_size, bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id,
                         pad_token_id=ids.pad_token_id, max_position_embeddings=4096, tie_word_embeddings=False)
    out = root / f"llama-{shape.hidden}x{shape.train_layers}"
    torch.manual_seed(0)
    with torch.device(env.device):
        model = LlamaForCausalLM(config).to(env.dtype)
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    del model
    if env.cuda:
        torch.cuda.empty_cache()
    return out


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1" if not _cuda_visible() else "4"
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"error: timed out after {timeout:.0f} s (--timeout)")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r["split"] == "train"]


def run_overrides(env: Env, mdir: Path, out: Path, steps: int) -> list[str]:
    return [f"run.output_dir={out}", f"model.name={mdir}", f"model.dtype={env.dtype_name}",
            f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
            "eval.at_end=false", "data.eval_split=null", "data.max_train_examples=64", "train.micro_batch_size=4",
            "train.warmup=0", "data.max_length=64", "dropout.preset=hiddenkey"]


def _tail(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1]


def _log_tail(proc: subprocess.CompletedProcess, lines: int = 60) -> dict:
    """The end of a failed launched run's output for the JSON: on a lent GPU machine it is all there is to read."""
    return {"log_tail": (proc.stdout + "\n" + proc.stderr).splitlines()[-lines:]}


def section_qlora(env: Env, shape: Shape, report: Report, mdir: Path, tmp: Path, timeout: float) -> None:
    out = tmp / "qlora"
    overrides = [*run_overrides(env, mdir, out, steps=1), "model.quantization=4bit"]
    proc = _run([sys.executable, "-m", "hiddenkey_ds.train", str(RECIPE),
                 *overrides], timeout)
    rows = _metrics(out)
    adapter = out / "adapter" / "adapter_model.safetensors"
    checks = {"exit 0": proc.returncode == 0, "one step logged": len(rows) == 1,
              "loss finite": bool(rows) and math.isfinite(rows[-1]["loss"]), "adapter saved": adapter.is_file()}
    peak = rows[-1]["peak_mem_gib"] if rows else None
    plan = None
    with contextlib.suppress(Exception):
        plan, _ = plan_gib(env, shape, [o for o in overrides if not o.startswith("run.output_dir")],
                           config_json=mdir / "config.json")
    ok = all(checks.values())
    result = (f"loss {rows[-1]['loss']:.4f}, adapter {adapter.stat().st_size / 2**20:.1f} MiB" if ok else
              "failed: " + ", ".join(k for k, v in checks.items() if not v) + f" ({_tail(proc)})")
    report.add(Row("qlora", "4-bit NF4 + hiddenkey, 1 step, ZeRO-2, `python -m hiddenkey_ds.train`", result[:300], "",
                   peak if env.cuda else None, plan if env.cuda else None,
                   (plan_status(peak, plan) if env.cuda else "ok") if ok else "FAIL", {} if ok else _log_tail(proc)))


def section_zero(env: Env, shape: Shape, report: Report, mdir: Path, tmp: Path, timeout: float) -> None:
    steps = 2 if env.smoke else 3
    losses, peaks = {}, {}
    for stage in ("zero2", "zero3"):
        out = tmp / stage
        overrides = [*run_overrides(env, mdir, out, steps), f"run.deepspeed={stage}"]
        cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "--module", "hiddenkey_ds.train",
               str(RECIPE), *overrides]
        if shutil.which("deepspeed") is None:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
        proc = _run(cmd, timeout)
        rows = _metrics(out)
        if proc.returncode != 0 or len(rows) != steps:
            report.add(Row("zero", f"{stage}: {steps} hiddenkey steps, `deepspeed --num_gpus 1`",
                           f"failed ({proc.returncode}): {_tail(proc)}"[:300], status="FAIL", extra=_log_tail(proc)))
            continue
        losses[stage] = [r["loss"] for r in rows]
        peaks[stage] = rows[-1]["peak_mem_gib"]
        plan = None
        with contextlib.suppress(Exception):
            plan, _ = plan_gib(env, shape, [o for o in overrides if not o.startswith("run.output_dir")],
                               config_json=mdir / "config.json")
        report.add(Row("zero", f"{stage}: {steps} hiddenkey steps, `deepspeed --num_gpus 1`",
                       "losses " + ", ".join(f"{x:.4f}" for x in losses[stage]), "",
                       peaks[stage] if env.cuda else None, plan if env.cuda else None,
                       plan_status(peaks[stage], plan) if env.cuda else "ok"))
    if len(losses) == 2:
        # fp32 (smoke): the same arithmetic up to reduction order; bf16: ZeRO-3's gathered weights are the same
        # bf16 values, the updates differ by bf16 rounding of the gradient reduction
        tol = 1e-5 if env.dtype_name == "fp32" else 1e-2
        worst = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(losses["zero2"], losses["zero3"]))
        report.add(Row("zero", "ZeRO-2 vs ZeRO-3 losses", f"max rel. diff {worst:.1e} (tolerance {tol:g})", "",
                       status="ok" if worst <= tol else "FAIL"))


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that every line runs")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this device for MFU (default: a table)")
    p.add_argument("--strict", action="store_true", help="a missed performance target fails too")
    p.add_argument("--json", help="write every row here")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launched training run (default 900)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke for the CPU self-test", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: more threads only spin against each other
    env = Env(args.smoke, args.peak_tflops)
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    report = Report()
    started = time.perf_counter()
    timings = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        mdir = None
        for section in sections:
            t0 = time.perf_counter()
            print(f"# {section} ...", file=sys.stderr, flush=True)
            try:
                if section == "steps":
                    section_steps(env, shape, report)
                elif section == "kernel":
                    section_kernel(env, shape, report)
                else:
                    if mdir is None:
                        mdir = model_dir(env, shape, tmp)
                    run = section_qlora if section == "qlora" else section_zero
                    run(env, shape, report, mdir, tmp, args.timeout)
            except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
                report.fail(section, "section", err)
            timings[section] = time.perf_counter() - t0

    print(f"\n# gpu_check: {env.describe()}")
    print(f"# model: LLaMA, {shape.label}; LoRA r=8 on q_proj,v_proj")
    print(f"# {', '.join(f'{s} {t:.0f} s' for s, t in timings.items())}; total {time.perf_counter() - started:.0f} s\n")
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env.describe(), "shape": asdict(shape), "timings_s": timings,
                                               "rows": [asdict(r) for r in report.rows]}, indent=2))
    if report.failed:
        print("\nFAILED: see the rows marked FAIL", file=sys.stderr)
        return 1
    if report.missed:
        print("\nperformance target missed: see the rows marked MISS", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
