"""Step time and loss-head memory of HiddenKey vs plain LoRA, measured side by side.

    python benchmarks/bench_hiddenkey.py            # hidden 512 at 4 and 16 layers, seq 256, batch 4, cls + sft
    python benchmarks/bench_hiddenkey.py --quick    # a smaller shape, for a smoke run

Step = forward + backward + AdamW on the LoRA parameters. Modes run interleaved (round-robin) so that
machine noise hits all of them alike; the table reports the median step time and its ratio to plain LoRA
with our head. Two supervision regimes: `cls` (one supervised answer token per sequence, classification as
generation) and `sft` (every token after the first half supervised). Two depths: the 4-layer shape, where the
vocabulary head is a large share of a step, and a deeper LLaMA-shaped one (16 layers) closer to real models.

Modes: `hiddenkey` is the paper's method as shipped (latter half of the layers, one-branch KL, the first half
computed once); `both` back-propagates the KL through both passes (R-Drop style), with the first half shared
or, for `all layers`, with dropout in every layer (nothing to share).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq, 2048), attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def make_batch(args, regime):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    if regime == "cls":
        labels[:, -1] = ids[:, -1]
    else:
        labels[:, args.seq // 2:] = ids[:, args.seq // 2:]
    return ids, torch.ones_like(ids), labels


def naive_dual_pass_loss(logits, labels, batch, alpha=1.0):
    """What a first implementation does: full logits of both passes (rows [x; x]), CE of each pass and the
    bidirectional KL over every position, then masked to the supervised ones."""
    logits = logits.float()[:, :-1]
    y, sup = labels[:, 1:], labels[:, 1:] != -100
    logp = F.log_softmax(logits, -1)
    ce = -(logp[:batch].gather(-1, y.clamp(min=0)[..., None])[..., 0][sup].mean()
           + logp[batch:].gather(-1, y.clamp(min=0)[..., None])[..., 0][sup].mean()) / 2
    p1, p2 = logp[:batch].exp(), logp[batch:].exp()
    kl = (0.5 * ((p1 - p2) * (logp[:batch] - logp[batch:])).sum(-1))[sup].mean()
    return ce + alpha * kl


def naive_kl_loss(model, ids, mask, labels, alpha=1.0):
    logits = model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask])).logits
    return naive_dual_pass_loss(logits, labels, ids.shape[0], alpha)


MODES = [  # (name, DropoutConfig overrides); preset none is the 1.00x reference
    ("plain LoRA (our head)", {"preset": "none"}),
    ("hiddenkey_nokl", {"preset": "hiddenkey_nokl"}),
    ("hiddenkey (one-branch KL, shared first half)", {"preset": "hiddenkey"}),
    ("hiddenkey, both-branch KL, shared first half", {"preset": "hiddenkey", "consistency_grad": "both"}),
    ("hiddenkey, both-branch KL, all layers", {"preset": "hiddenkey", "consistency_grad": "both", "layers": "all"}),
]
REFERENCE = MODES[0][0]
TARGETS = {"hiddenkey_nokl": 1.10, "hiddenkey (one-branch KL, shared first half)": 1.30,
           "hiddenkey, both-branch KL, shared first half": 1.6, "hiddenkey, both-branch KL, all layers": 2.1}


def make_steps(args, regime):
    from hiddenkey_ds.method import DropoutConfig
    from hiddenkey_ds.method.objective import HiddenKeyObjective

    ids, mask, labels = make_batch(args, regime)
    steps = {}

    def with_optimizer(model, loss_fn):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    stock = build_model(args).train()
    steps["plain LoRA (stock HF loss)"] = with_optimizer(
        stock, lambda: stock(input_ids=ids, attention_mask=mask, labels=labels).loss)
    for name, overrides in MODES:
        obj = HiddenKeyObjective(build_model(args), DropoutConfig(**overrides)).train()
        steps[name] = with_optimizer(obj, lambda obj=obj: obj(input_ids=ids, attention_mask=mask, labels=labels).loss)
    naive = HiddenKeyObjective(build_model(args), DropoutConfig(preset="hiddenkey_nokl", layers="all")).train()

    def naive_step():
        with naive.activated():  # the objective's dropout acts only inside its own calls
            return naive_kl_loss(naive.model, ids, mask, labels)

    steps["naive KL, full logits, all layers"] = with_optimizer(naive, naive_step)
    return steps


def time_steps(steps, rounds, warmup, clock=time.perf_counter):
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- loss-head peak memory: bytes the CPU allocator holds at its peak during forward + backward -------
def allocated_peak_bytes(fn) -> int:
    """Peak of (allocations - frees) while `fn` runs, from the profiler's memory events: exact and
    independent of allocator caching, unlike resident memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def head_memory(variant, batch, seq, hidden, vocab, supervised, chunk_tokens=1024):
    """Peak MiB of the loss head alone (dual pass: 2 x batch rows of hidden states as input)."""
    from torch.utils.checkpoint import checkpoint

    from hiddenkey_ds.method.objective import _head_chunk

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h = torch.randn(2 * batch, seq, hidden, requires_grad=True)
    labels = torch.full((batch, seq), -100)
    labels[:, -supervised:] = torch.randint(0, vocab, (batch, supervised))
    y, sup = labels[:, 1:], labels[:, 1:] != -100

    def chunked():
        h1, h2, t = h[:batch, :-1][sup], h[batch:, :-1][sup], y[sup]
        total = 0.0
        for start in range(0, t.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            ce, cons, _, _ = checkpoint(_head_chunk, lm_head, h1[part], h2[part], t[part], "kl", False,
                                     use_reentrant=True)
            total = total + ce + cons
        (total / t.numel()).backward()

    def naive():
        naive_dual_pass_loss(lm_head(h), labels, batch).backward()

    return allocated_peak_bytes(chunked if variant == "chunked" else naive) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", default="4,16", help="depths to measure, comma-separated")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--regimes", default="cls,sft")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (time.process_time), which other jobs on a shared machine "
                             "do not inflate; use it with --threads 1")
    parser.add_argument("--quick", action="store_true", help="small shape, few rounds")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.seq, args.rounds = 128, "4", 4000, 64, 3
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in str(args.layers).split(",")]
    print(f"# shape: hidden {args.hidden}, {'/'.join(map(str, depths))} layers, {args.heads} heads, vocab "
          f"{args.vocab}, seq {args.seq}, batch {args.batch}, LoRA r=8 on q,v, {args.threads} threads, "
          f"{args.clock} clock, torch {torch.__version__}")
    regimes = args.regimes.split(",")
    table = {}
    for depth in depths:
        args.layers = depth
        for regime in regimes:
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            medians = time_steps(make_steps(args, regime), rounds=args.rounds, warmup=1, clock=clock)
            table[(depth, regime)] = medians
    names = list(next(iter(table.values())))
    cols = list(table)
    print(f"\n## step time: x plain LoRA with our head, measured side by side (median of {args.rounds} "
          "interleaved rounds; seconds in parentheses)\n")
    print("| mode | " + " | ".join(f"{d} layers, `{r}`" for d, r in cols) + " | target (cls) |")
    print("|---|" + "---:|" * len(cols) + "---:|")
    for name in names:
        cells = [f"{table[c][name] / table[c][REFERENCE]:.2f}x ({table[c][name]:.3f} s)" for c in cols]
        target = f"<= {TARGETS[name]:.2f}x" if name in TARGETS else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {target} |")

    seq, vocab = (2048, 32000) if not args.quick else (512, 8000)
    print(f"\n## loss-head peak memory (forward + backward, allocator peak), dual pass (2 x {args.batch} "
          f"sequences), seq {seq}, vocab {vocab}\n")
    print("| supervised tokens / sequence | naive full logits + KL (MiB) | chunked supervised-only (MiB) | ratio |")
    print("|---:|---:|---:|---:|")
    for sup in (4, seq // 2):
        naive = head_memory("naive", args.batch, seq, args.hidden, vocab, sup)  # noqa: the head alone
        chunked = head_memory("chunked", args.batch, seq, args.hidden, vocab, sup)
        print(f"| {sup} | {naive:.1f} | {chunked:.1f} | {chunked / naive:.4f} |")


if __name__ == "__main__":
    main()
