"""One rank of the objective under DeepSpeed (launched by tests/test_objective_distributed.py via torchrun, or
as a single process). Every rank builds the same tiny LoRA model; the global micro-batch of 8 rows is split
over ranks x grad_accum, and each (rank, micro-batch) reseeds the mask RNG from its global micro-batch index,
so that any split of the same global batch sees the same dropout masks row for row. Writes the loss of every
step and the final LoRA weights (gathered) to OUT.json on rank 0.

    python tests/dist_objective_worker.py OUT STAGE GRAD_ACCUM CHECKPOINTING CONSISTENCY_GRAD
"""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import padded_batch, tiny_model  # noqa: E402

from hiddenkey_ds.method import DropoutConfig  # noqa: E402
from hiddenkey_ds.method.objective import HiddenKeyObjective  # noqa: E402

STEPS, GLOBAL_ROWS = 3, 8


def main(out, stage, accum, checkpointing, grad):
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29591"))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    import peft

    model = tiny_model(num_hidden_layers=4)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    cfg = DropoutConfig(preset="hiddenkey", key={"rate": 0.3}, hidden={"rate": 0.3}, consistency_grad=grad)
    objective = HiddenKeyObjective(model, cfg, chunk_tokens=5)
    zero = {"stage": stage}
    if stage == 3:  # partition every tensor, whatever its size
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=1000,
                    reduce_bucket_size=1000, stage3_max_live_parameters=1000)
    micro = GLOBAL_ROWS // (world * accum)
    engine, *_ = deepspeed.initialize(
        model=objective, model_parameters=[p for p in objective.parameters() if p.requires_grad],
        config={"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                "zero_optimization": zero, "gradient_clipping": 0.0,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                "zero_allow_untested_optimizer": True})
    engine.train()
    losses, consistency = [], []
    for step in range(STEPS):
        ids, mask = padded_batch("left", seed=step, batch=GLOBAL_ROWS, seq=14)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :6] = -100
        labels[1::3] = -100  # rows without supervised tokens: ranks hold different token counts
        normalizer = (labels[:, 1:] != -100).sum().item() / (world * accum)
        step_loss = torch.zeros(())
        for j in range(accum):
            index = rank * accum + j  # the global micro-batch: rows [index * micro, (index + 1) * micro)
            rows = slice(index * micro, (index + 1) * micro)
            torch.manual_seed(1000 * step + index)  # masks depend on the rows, not on how they are split
            res = engine(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], normalizer=normalizer)
            engine.backward(res.loss)
            engine.step()
            step_loss += res.loss.detach() * world  # DeepSpeed averages over ranks; undo for a global sum
            consistency.append(res.consistency.item())
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)
    params = [p for p in objective.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = {n: p.detach().flatten().tolist() for n, p in objective.named_parameters() if p.requires_grad}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "weights": weights, "consistency": consistency}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out, stage, accum, ckpt, grad = sys.argv[1:6]
    main(out, int(stage), int(accum), ckpt == "1", grad)
