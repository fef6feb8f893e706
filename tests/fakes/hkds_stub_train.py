"""A stand-in for `python -m hiddenkey_ds.train` in launch.sh's tests (HKDS_TRAIN_MODULE=hkds_stub_train).

It does what the launcher must make possible and nothing else: join the gloo process group from the
environment the launcher set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), all-reduce once, write what it
received to STUB_OUT/rank<RANK>.json, and exit with STUB_EXIT_CODE on rank STUB_FAIL_RANK (0 otherwise).
"""
import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> int:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    record = {
        "argv": sys.argv[1:],
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": dist.get_world_size(),
        "allreduce": total.item(),
        "host": socket.gethostname(),
        "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DEEPSPEED_TIMEOUT",
                                                "GLOO_SOCKET_IFNAME", "CROSS_RANK", "LOCAL_SIZE", "STUB_MARK",
                                                "CUDA_VISIBLE_DEVICES")},
    }
    out = os.environ["STUB_OUT"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    print(f"stub rank {rank} of {record['world_size']}: allreduce={record['allreduce']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("STUB_FAIL_RANK") == str(rank):
        print(f"stub rank {rank} failing with {os.environ.get('STUB_EXIT_CODE', '3')}", file=sys.stderr, flush=True)
        return int(os.environ.get("STUB_EXIT_CODE", "3"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
