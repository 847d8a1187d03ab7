"""Distributed helpers: one process (`python train.py`) or many (`torchrun train.py`).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we then use NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 600.0, need_group: bool = False) -> DistInfo:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU). Without torchrun:
    one process, and a one-rank group only if `need_group` (FSDP needs one).

    `timeout_s` bounds how long a collective waits for a rank that is gone, so a
    multi-node job whose peer died fails instead of hanging. (On one node torchrun
    itself stops the other ranks as soon as one exits with an error.)
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ:
        info = DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
        if need_group and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return info
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev, timeout=timeout)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def global_row_counts_(batches: list, info: DistInfo) -> None:
    """Make each packed batch's loss means global: its `row_counts` become the mean over
    ranks of every rank's counts (global count / ranks; see kernels.gta_loss). Then each
    rank's loss is its share of the global-batch mean, and the rank mean of the gradients,
    which the data-parallel all-reduce takes, is the global batch's gradient. One small
    all-reduce and one host sync per step, before the updates."""
    if not info.distributed:
        return
    counts = torch.tensor([c for b in batches for c in b.row_counts], dtype=torch.float64, device=info.device)
    counts = all_reduce_mean(counts, info).view(len(batches), -1).tolist()
    for b, c in zip(batches, counts):
        b.row_counts = type(b.row_counts)(*c)


def all_reduce_grads_(grads: list[torch.Tensor | None], info: DistInfo) -> None:
    """Average gradients over ranks in place, one collective for all of them."""
    if not info.distributed:
        return
    present = [g for g in grads if g is not None]
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in present:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shutdown(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def assert_replicas_identical(params: list[torch.Tensor], info: DistInfo) -> None:
    """Raise if the ranks' parameters differ (a data-parallel bug, never expected)."""
    if not info.distributed:
        return
    fingerprint = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().norm() for p in params])
    gathered = [torch.empty_like(fingerprint) for _ in range(info.world_size)]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("data-parallel ranks hold different parameters")


def grad_norm_and_health(grads: list[torch.Tensor], losses: list[torch.Tensor], info: DistInfo,
                         sharded: bool) -> tuple[torch.Tensor, bool]:
    """(global L2 norm of the gradients, True if it and every rank's losses are finite).

    `grads` are this rank's tensors: whole synchronized gradients (DDP) or shards
    (FSDP). One small all-reduce carries [squared norm, non-finite count]: summed
    over ranks for shards, max for replicated gradients (every rank has the same
    norm, so max keeps it bit for bit). The boolean is the one host sync.
    """
    sq = torch.zeros((), dtype=torch.float32, device=info.device)
    if grads:
        sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
    # Counts of non-finite values travel as a separate entry: MAX may drop a NaN.
    bad = (~torch.isfinite(sq)).float() + sum(((~torch.isfinite(x.detach())).sum().float() for x in losses), sq.new_zeros(()))
    packed = torch.stack([sq, bad])
    if info.distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM if sharded else dist.ReduceOp.MAX)
    norm = packed[0].sqrt()
    return norm, bool(torch.isfinite(norm) & (packed[1] == 0))


def all_finite(tensors: list[torch.Tensor], info: DistInfo) -> bool:
    """True if every element of every rank's tensors is finite (a collective when distributed)."""
    bad = torch.zeros((), dtype=torch.float32, device=info.device)
    for t in tensors:
        bad += (~torch.isfinite(t.detach())).sum()
    if info.distributed:
        dist.all_reduce(bad)
    return bool(bad == 0)