"""torchrun worker for tests/test_updates.py (2 ranks, gloo): every update of a mu > 1 step
sees the mu = 1 gradient, under DDP and FSDP.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_update_worker.py OUT TRAIN_ARGS...

Runs train.run four times in one process group: {ddp, fsdp} x {mu 1, mu 4}, all with lr 0
and no clipping (the parameters never move, so every update must see the same gradient).
Rank 0 writes OUT/norms.json: the global L2 norm of each applied gradient, per run.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import train
from gtacore.config import parse_config
from gtacore.distributed import init_distributed, shutdown
from update_probe import record_updates

out, argv = Path(sys.argv[1]), sys.argv[2:]
info = init_distributed("cpu", 600.0, need_group=True)
norms = {}
for shard in ("ddp", "fsdp"):
    for mu in (1, 4):
        name = f"{shard}-mu{mu}"
        cfg = parse_config(argv + ["--shard", shard, "--num-iterations", str(mu), "--output-dir", str(out / name)])
        with record_updates() as applied:
            train.run(cfg, info)
        # DDP gradients are whole and equal on every rank; FSDP's are shards: sum the squares.
        sq = torch.stack([g.square().sum() for g in applied])
        if shard == "fsdp":
            dist.all_reduce(sq)
        norms[name] = sq.sqrt().tolist()
if info.is_main:
    (out / "norms.json").write_text(json.dumps(norms))
dist.barrier()  # gloo: a rank that leaves while its last send is in flight aborts the other
shutdown(info)
