"""torchrun worker for tests/test_projection.py (2 ranks, gloo): writes each rank's results to OUTDIR.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_projection_worker.py OUTDIR

sync_rank{r}.safetensors: every rank draws different local gradients, averages
them (as DDP does), then runs the constraint on the synchronized gradients.
shard_rank{r}.safetensors: every rank holds its half of each synchronized
gradient (flattened, `tensor_split`) and runs the constraint with shard_reduce.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from gtacore.projection import GRANULARITIES, MODES, constrain_gradients

SHAPES = [(7, 5), (), (1,), (3, 1, 4), (13,), (2, 3), (6, 2), (9,)]
SFT_NONE = 5  # this parameter gets no SFT gradient on any rank


def clone(grads):
    return [None if g is None else g.clone() for g in grads]


def record(out, prefix, combined, stats):
    for i, g in enumerate(combined):
        if g is not None:
            out[f"{prefix}.combined.{i}"] = g.contiguous()
    for name, value in stats._asdict().items():
        out[f"{prefix}.stat.{name}"] = value.contiguous()


def record_inputs(out, sft, rl):
    for i, (s, r) in enumerate(zip(sft, rl)):
        if s is not None:
            out[f"input.sft.{i}"] = s.contiguous()
        out[f"input.rl.{i}"] = r.contiguous()


def synchronized(rank, world, outdir):
    gen = torch.Generator().manual_seed(1000 + rank)  # different local gradients per rank
    sft = [None if i == SFT_NONE else torch.randn(s, generator=gen) for i, s in enumerate(SHAPES)]
    rl = [torch.randn(s, generator=gen) for s in SHAPES]
    out = {}
    _, local = constrain_gradients(sft, clone(rl), "project", "per_param")
    out["local.conflict"] = local.conflict  # what a rank-local decision would be
    for g in (*sft, *rl):  # average over ranks, as DDP leaves them
        if g is not None:
            dist.all_reduce(g)
            g /= world
    record_inputs(out, sft, rl)
    for mode in MODES:
        for granularity in GRANULARITIES:
            combined, stats = constrain_gradients(sft, clone(rl), mode, granularity)
            record(out, f"{mode}.{granularity}", combined, stats)
    save_file(out, Path(outdir) / f"sync_rank{rank}.safetensors")


def sharded(rank, world, outdir):
    gen = torch.Generator().manual_seed(2000)  # the same synchronized gradients on every rank
    sft = [None if i == SFT_NONE else torch.randn(s, generator=gen) for i, s in enumerate(SHAPES)]
    rl = [torch.randn(s, generator=gen) for s in SHAPES]
    # A parameter whose first half agrees and whose second half conflicts more: rank 0's
    # shard alone says "no conflict", the full parameter (and the model) says "conflict".
    rl.append(torch.full((10,), 10.0))
    sft.append(torch.cat([torch.full((5,), 10.0), torch.full((5,), -30.0)]))
    out = {}
    record_inputs(out, sft, rl)
    # The shard of a 1-element parameter on rank 1 is empty: an awkward case on purpose.
    shard = [None if g is None else g.reshape(-1).tensor_split(world)[rank].clone() for g in sft]
    rl_shard = [g.reshape(-1).tensor_split(world)[rank].clone() for g in rl]
    for granularity in GRANULARITIES:
        _, local = constrain_gradients(shard, clone(rl_shard), "project", granularity)
        out[f"local.{granularity}.conflict"] = local.conflict
        for mode in MODES:
            combined, stats = constrain_gradients(shard, clone(rl_shard), mode, granularity, shard_reduce=True)
            record(out, f"{mode}.{granularity}", combined, stats)
    save_file(out, Path(outdir) / f"shard_rank{rank}.safetensors")


def main(outdir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    synchronized(rank, world, outdir)
    sharded(rank, world, outdir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
