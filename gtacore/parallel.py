"""Placing the model on devices: DDP gradient averaging, FSDP sharding, the whole-model copy for
rollouts, activation checkpointing; each applied to a finished model, which knows none of them.

DDP (the default): every rank holds the whole model; each backward's gradients are averaged
with one all-reduce (`average_gradients`), so every rank sees the same gradients.

FSDP (`--shard fsdp`): PyTorch's FSDP2 `fully_shard`, one unit per block.

With DDP every rank holds the whole model, its gradients and its AdamW state:
16 bytes per parameter in fp32 (weights 4, gradient 4, two moments 8), plus a
second gradient in gta mode (the SFT and RL gradients are kept apart until the
constraint combines them). FSDP2 keeps 1/W of each on each of W ranks and
all-gathers one block's weights just before it runs.

What each stage does with the shards:

- Training forward/backward: each block is an FSDP unit (gathered for its forward,
  freed after, gathered again for its backward); the root unit holds the
  embedding, final norm and LM head, which stay whole from the root's forward to
  its backward, so the fused LM-head loss reads `model.lm_head.weight` after the
  forward (gtacore/losses.py `head_weight`). Gradients arrive reduce-scattered
  (averaged over ranks) in each parameter's `.grad` as a sharded DTensor: no
  separate all-reduce. Under bf16-mixed, weights are gathered in bf16 and gradients
  reduced in fp32 (`MixedPrecisionPolicy`); AdamW's master weights and moments stay fp32.
- Gradient constraint: on the local shards, with one all-reduce of the per-tensor
  dots and norms for all parameters (gtacore/projection.py), so every rank takes
  the same decision.
- Rollout and evaluation: generation is a few hundred tiny forwards; gathering the
  blocks for each would cost hundreds of all-gathers per step. Instead the policy's
  weights are gathered once per step into a plain, unsharded `Decoder`
  (`WholeModel`, in bf16 under bf16-mixed), which generates with the KV cache like the DDP
  path. Cost: one gather per parameter tensor per step, of shards cast to bf16
  first (the bytes of one forward's gathers, in more, smaller collectives), and
  one whole copy of the weights in the rollout dtype per GPU, held for the run:
  for an 8B model in bf16, 16 GB. The sharded state keeps the rest small.
- Reference model: sharded the same way, frozen and in eval mode; its root unit is
  resharded after each use (no backward would free it).
- Checkpoints: the whole weights are gathered tensor by tensor to rank 0's CPU
  and written in the same HF layout as DDP runs; each rank writes its own shard of
  the optimizer state (gtacore/checkpointing.py), which resumes on any number of
  ranks.

Precision (`--precision`): the parameters, their gradients and AdamW's state are fp32 in
both recipes; bf16-mixed runs every forward (and so its backward) under bf16 autocast
(`compute_precision`). The KV cache and the LM-head loss take autocast's dtype from there.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from gtacore import models
from gtacore.models.decoder import Decoder

from .distributed import DistInfo

# Blocks return their (k, v) for shared-prefix training, and v is a transpose view.
# FSDP2 warns because an in-place op on such a view would skip its backward hook;
# nothing here modifies those tensors in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each decoder block keeps only its input for the backward and
    recomputes the rest there (about one more forward of compute).

    The blocks' `forward` is replaced on the instances, so parameter names, and with them the
    checkpoints, stay as they are. Apply before FSDP sharding: FSDP then gathers a block's
    weights for the recomputation as for its backward.
    """
    for block in model.model.layers:
        block.forward = partial(checkpoint, type(block).forward, block, use_reentrant=False)


def average_gradients(grads: list[torch.Tensor | None], info: DistInfo) -> None:
    """DDP: average gradients over ranks in place, one collective for all of them. FSDP's
    gradients arrive reduce-scattered (DTensors) and pass untouched."""
    present = [g for g in grads if g is not None and not isinstance(g, DTensor)]
    if not info.distributed or not present:
        return
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in present:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


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


def shard_model(model: Decoder, mixed_precision: bool) -> Decoder:
    """Shard `model` in place over the default process group: each block, then the rest."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank must call it); plain tensors pass through."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (shares its storage); plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this rank holds: FSDP2 splits dim 0 as `torch.chunk` does."""
    n = param.shape[0]
    if not isinstance(param, DTensor):
        return 0, n
    mesh = param.device_mesh
    size, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-n // size)  # ceil
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    if param.to_local().shape[0] != stop - start:
        raise RuntimeError(f"unexpected FSDP shard: rows {start}:{stop} of {n}, local shape {tuple(param.to_local().shape)}")
    return start, stop


def as_param_shard(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `param` from this rank's rows of it (a DTensor when param is one)."""
    if not isinstance(param, DTensor):
        return rows
    return DTensor.from_local(rows, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every unit (used after no-grad forwards of the reference model)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def full_state_dict(model: torch.nn.Module, on_this_rank: bool) -> dict[str, torch.Tensor]:
    """HF-named whole tensors on the CPU, gathered one at a time (every rank calls it;
    only `on_this_rank` keeps them, so peak extra GPU memory is one tensor)."""
    out = {}
    for name, t in model.state_dict().items():
        full = whole(t)
        if on_this_rank:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out


class WholeModel:
    """A plain `Decoder` holding the sharded policy's current weights, for generation."""

    def __init__(self, sharded: Decoder, dtype: torch.dtype, device: torch.device):
        with torch.device("meta"):
            self.model = Decoder(sharded.config)
        self.model.to_empty(device=device).to(dtype)
        if sharded.config.tie_word_embeddings:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        self.model.reset_rope()
        self.model.eval().requires_grad_(False)
        self.refresh(sharded)

    @torch.no_grad()
    def refresh(self, sharded: Decoder) -> Decoder:
        """Gather the sharded weights into the copy (a collective); returns the copy.

        Each shard is cast to the copy's dtype before the gather (bf16 on GPU: half
        the bytes of gathering the fp32 master shards)."""
        mine = dict(self.model.named_parameters())
        for name, p in sharded.named_parameters():
            target = mine[name]
            target.copy_(whole(p.detach().to(target.dtype)))
        return self.model


def compute_precision(precision: str, device: torch.device):
    """The context every forward runs in: bf16 autocast under bf16-mixed, else nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_models(cfg, model_path, resume_from, info: DistInfo):
    """(policy, reference or None, rollout_model) placed as `cfg.run` says: activation
    checkpointing, FSDP shards. rollout_model() returns the model that generates: the policy, or
    under FSDP its whole copy, refreshed (a collective). Each model is read whole, then sharded
    before the next one is read."""
    dtype = torch.float32  # master weights, under either recipe
    sharded, bf16 = cfg.run.shard == "fsdp", cfg.model.precision == "bf16-mixed"
    policy = models.load_pretrained(resume_from or model_path, dtype=dtype, device=info.device).train()
    if cfg.run.activation_checkpointing:
        checkpoint_blocks(policy)
    if sharded:
        shard_model(policy, mixed_precision=bf16)
    ref_model = None
    if cfg.loss.beta > 0 and cfg.loss.mode != "sft":
        ref_model = models.load_pretrained(model_path, dtype=dtype, device=info.device).eval().requires_grad_(False)
        if sharded:
            shard_model(ref_model, mixed_precision=bf16)
    if not sharded:
        return policy, ref_model, lambda: policy
    copy = WholeModel(policy, torch.bfloat16 if bf16 else dtype, info.device)
    return policy, ref_model, lambda: copy.refresh(policy)
