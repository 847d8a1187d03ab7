"""Sharded data parallelism (`--shard fsdp`): PyTorch's FSDP2 `fully_shard`, one unit per block.

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
  forward (gtacore/policy.py `head_weight`). Gradients arrive reduce-scattered
  (averaged over ranks) in each parameter's `.grad` as a sharded DTensor: no
  separate all-reduce. On GPU, weights are gathered in bf16 and gradients reduced
  in fp32 (`MixedPrecisionPolicy`); AdamW's master weights and moments are in the
  parameters' dtype (fp32 unless --dtype says otherwise).
- Gradient constraint: on the local shards, with one all-reduce of the per-tensor
  dots and norms for all parameters (gtacore/projection.py, `shard_reduce`), so
  every rank takes the same decision.
- Rollout and evaluation: generation is a few hundred tiny forwards; gathering the
  blocks for each would cost hundreds of all-gathers per step. Instead the policy's
  weights are gathered once per step into a plain, unsharded `Decoder`
  (`WholeModel`, in bf16 on GPU), which generates with the KV cache like the DDP
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
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from models.decoder import Decoder

from .projection import ConstraintStats, constrain_gradients

# Blocks return their (k, v) for shared-prefix training, and v is a transpose view.
# FSDP2 warns because an in-place op on such a view would skip its backward hook;
# nothing here modifies those tensors in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


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


def constrain_sharded_gradients(params: list[torch.nn.Parameter], sft_grads: list, rl_grads: list, mode: str,
                                granularity: str) -> ConstraintStats:
    """`apply_gradient_constraint` for FSDP: combine the local shards with one all-reduce of
    the statistics, then set each `param.grad` to the combined sharded gradient."""
    rl_local = [local(g) for g in rl_grads]
    combined, stats = constrain_gradients([local(g) for g in sft_grads], rl_local, mode, granularity, shard_reduce=True)
    for p, g, r, r_local in zip(params, combined, rl_grads, rl_local):
        # Where an RL gradient exists it was overwritten in place (its DTensor now holds the result).
        p.grad = None if g is None else r if g is r_local else as_param_shard(p, g)
    return stats
