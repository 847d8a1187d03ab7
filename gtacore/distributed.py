"""Distributed helpers: one process (`python train.py`) or many (`torchrun train.py`).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; we then use NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

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


def summed_over_ranks(info: DistInfo) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function that sums a small CPU tensor over the ranks (None in one process)."""
    if not info.distributed:
        return None

    def summed(t: torch.Tensor) -> torch.Tensor:
        t = t.to(info.device)
        dist.all_reduce(t)
        return t.cpu()

    return summed


def shutdown(info: DistInfo) -> None:
    if dist.is_initialized():
        # Free what still refers to the group (FSDP modules and their device mesh sit in reference
        # cycles) while it is alive: a gloo group destroyed later, at interpreter exit, can abort
        # the process ("terminate called without an active exception") after all work is saved.
        gc.collect()
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


def all_finite(tensors: list[torch.Tensor], info: DistInfo) -> bool:
    """True if every element of every rank's tensors is finite (a collective when distributed)."""
    bad = torch.zeros((), dtype=torch.float32, device=info.device)
    for t in tensors:
        bad += (~torch.isfinite(t.detach())).sum()
    if info.distributed:
        dist.all_reduce(bad)
    return bool(bad == 0)