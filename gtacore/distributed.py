"""Distributed helpers: one process (`python train.py`) or many (`torchrun train.py`).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we then use NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def init_distributed(device: str | None = None) -> DistInfo:
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


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
    if info.distributed and dist.is_initialized():
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
