"""The gradient constraint between the SFT and RL gradients (docs/method.md, step 6, "Combine").

g_sft and g_rl are lists of gradients, one entry per parameter tensor, matching
shapes; None means the parameter got no gradient from that loss and counts as
zeros. With d = <g_sft, g_rl>, the modes are

    none:     g = g_sft + g_rl
    gate:     g = g_rl if d < 0 else g_sft + g_rl          (the paper)
    project:  g = g_sft' + g_rl, g_sft' = g_sft - min(d, 0) / ||g_rl||^2 * g_rl   (PCGrad)

`project` removes from g_sft only its component against g_rl: g_rl keeps
priority and is never changed, and g_sft' is orthogonal to g_rl where they
conflicted. Granularity `per_param` takes one decision per parameter tensor with
that tensor's d; `global` takes one for the whole model as one vector.
lambda_sft and lambda_rl are already inside the gradients (they scale the losses).

Every mode is g = alpha * g_sft + beta * g_rl with one (alpha, beta) pair per
tensor, computed as a [P] vector on the device:

    none: (1, 1)    gate: (d >= 0, 1)    project: (1, 1 + c), c = -d / ||g_rl||^2 where d < 0, else 0

so the constraint is a few per-tensor reductions, [P]-sized arithmetic, and one
or two fused passes to combine: `torch._foreach_*` ops (multi-tensor kernels on
CUDA), no `.item()`, no Python loop of per-tensor math. The dot has no foreach
op of its own, so it is read off two L1 norms of the product p = g_sft * g_rl:

    d = sum(p) = sum(max(p, 0)) - sum(max(-p, 0)) = 2 * ||max(p, 0)||_1 - ||p||_1

Both norms sum non-negative terms and accumulate in fp32 (fp64 for fp64
gradients), so the error is a small multiple of eps * sum|p_i|, the bound of a
plain dot product. The polarization identity (||a+b||^2 - ||a-b||^2) / 4 is not
used: its error scales with ||a||^2 + ||b||^2, which swamps d when the norms
differ by orders of magnitude. The products are rounded to the gradients' dtype
first (for bf16 gradients, bf16's own precision).

Cost, in passes over the gradients: 7 for the dots (read both, write p, read p,
clamp p in place, read p), 2 for the norms, 3 to combine (5 for `project`). The
product temporary is built in groups of at most `PRODUCT_CHUNK` elements (or one
tensor, if larger), so it stays bounded instead of being a third gradient-sized
buffer. On CPU, foreach ops run tensor by tensor; the fused kernels are CUDA's.

Distributed training: every rank must take the same decision or the replicas
drift apart. Two supported setups:

- Synchronized gradients (default, `shard_reduce=False`): the trainer averages
  g_sft and g_rl across ranks first (DDP does it during backward). all_reduce
  hands every rank the same bits and every op here is deterministic (no atomics),
  so every rank computes the same numbers with no extra collective. Running the
  constraint on local, un-averaged gradients is wrong, and summing local dots
  does not fix it: the dot of averages is not the sum of the local dots.
- Sharded gradients (`shard_reduce=True`, FSDP/ZeRO): each rank holds a disjoint
  shard of every parameter's synchronized gradient. Dots and squared norms are
  sums over elements, so the local [P] statistics of all ranks are packed into
  one tensor and summed with a single all_reduce: exact full-parameter values,
  identical on every rank. Each rank then rewrites only its own shards.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .parallel import as_param_shard, local

Mode = Literal["none", "gate", "project"]
Granularity = Literal["per_param", "global"]
MODES = ("none", "gate", "project")
GRANULARITIES = ("per_param", "global")

Grads = Sequence[torch.Tensor | None]

PRODUCT_CHUNK = 1 << 27  # elements of g_sft * g_rl alive at once: 512 MiB in fp32


class ConstraintStats(NamedTuple):
    """What the constraint saw, as device tensors (call `.item()` only when logging).

    All are 0-dim except `conflict` [P]. Norms and the cosine are over the whole
    model and measured before the constraint changes anything.
    """

    cosine: torch.Tensor  # cos(g_sft, g_rl); 0 when either gradient is zero
    conflict_fraction_params: torch.Tensor  # share of parameter tensors in conflict
    conflict_fraction_elements: torch.Tensor  # the same share, weighted by element count
    sft_norm: torch.Tensor  # ||g_sft||
    rl_norm: torch.Tensor  # ||g_rl||
    sft_norm_after: torch.Tensor  # ||g_sft'||: what is left of g_sft in the update
    conflict: torch.Tensor  # [P] bool: d < 0 at the chosen granularity (global: all equal)


def _per_tensor_norms(tensors: Grads, ord: float, zero: torch.Tensor) -> torch.Tensor:
    """[P] vector of the tensors' `ord`-norms from one foreach call; None entries give 0."""
    present = [i for i, t in enumerate(tensors) if t is not None]
    norms = [zero] * len(tensors)
    if present:
        for i, n in zip(present, torch._foreach_norm([tensors[i] for i in present], ord, dtype=zero.dtype)):
            norms[i] = n
    return torch.stack(norms)


def _chunks(index: list[int], grads: Grads, limit: int) -> list[list[int]]:
    """Split `index` into consecutive groups of at most `limit` elements (a larger tensor goes alone)."""
    groups, size = [[]], 0
    for i in index:
        n = grads[i].numel()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups if groups[0] else []


def gradient_statistics(sft_grads: Grads, rl_grads: Grads, dtype: torch.dtype) -> torch.Tensor:
    """[3, P] in `dtype`: rows <g_sft, g_rl>, ||g_sft||^2, ||g_rl||^2 per parameter tensor."""
    P = len(sft_grads)
    device = next((g.device for g in (*sft_grads, *rl_grads) if g is not None), torch.device("cpu"))
    zero = torch.zeros((), dtype=dtype, device=device)
    both = [i for i in range(P) if sft_grads[i] is not None and rl_grads[i] is not None]
    l1, l1_pos = [zero] * P, [zero] * P  # sum |p| and sum max(p, 0) per tensor
    for group in _chunks(both, sft_grads, PRODUCT_CHUNK):
        prods = torch._foreach_mul([sft_grads[i] for i in group], [rl_grads[i] for i in group])
        abs_sums = torch._foreach_norm(prods, 1, dtype=dtype)
        torch._foreach_clamp_min_(prods, 0.0)
        pos_sums = torch._foreach_norm(prods, 1, dtype=dtype)
        for i, a, b in zip(group, abs_sums, pos_sums):
            l1[i], l1_pos[i] = a, b
    dot = 2 * torch.stack(l1_pos) - torch.stack(l1)
    sq_sft = _per_tensor_norms(sft_grads, 2, zero).square()
    sq_rl = _per_tensor_norms(rl_grads, 2, zero).square()
    return torch.stack([dot, sq_sft, sq_rl])


def constraint_coefficients(
    dot: torch.Tensor, sq_sft: torch.Tensor, sq_rl: torch.Tensor, mode: Mode, granularity: Granularity
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor statistics [P] -> (alpha [P], beta [P], conflict [P] bool, ||g_sft'||^2 0-dim).

    The combined gradient of tensor i is alpha[i] * g_sft[i] + beta[i] * g_rl[i].
    """
    P = dot.shape[0]
    if granularity == "global":  # one decision from the whole-model sums
        dot, sq_sft, sq_rl = dot.sum(), sq_sft.sum(), sq_rl.sum()
    conflict = dot < 0
    alpha = torch.ones_like(dot)
    c = torch.zeros_like(dot)  # g_sft' = alpha * g_sft + c * g_rl
    if mode == "gate":
        alpha = (~conflict).to(dot.dtype)
    elif mode == "project":
        # ||g_rl|| = 0 makes every product 0, so d = 0 and nothing conflicts; the
        # clamp only keeps the branch that where() discards finite.
        c = torch.where(conflict, -dot / sq_rl.clamp_min(torch.finfo(dot.dtype).tiny), 0.0)
    # ||alpha g_sft + c g_rl||^2 expanded, so it costs no pass over the gradients.
    sft_sq_after = (alpha.square() * sq_sft + 2 * alpha * c * dot + c.square() * sq_rl).clamp_min(0).sum()
    return alpha.expand(P), (1 + c).expand(P), conflict.expand(P), sft_sq_after


def constrain_gradients(
    sft_grads: Grads,
    rl_grads: Grads,
    mode: Mode = "project",
    granularity: Granularity = "per_param",
    *,
    shard_reduce: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor | None], ConstraintStats]:
    """Combine two gradient lists of P entries; entry i of either has parameter i's shape or is None.

    Returns (combined, stats). combined[i] is rl_grads[i] itself, overwritten in
    place with the combined gradient; where rl_grads[i] is None it is a new tensor
    (alpha * sft_grads[i]); where both are None it is None. sft_grads is left as
    it is. With shard_reduce=True the entries are this rank's shards of the
    synchronized gradients (any split, the same P on every rank) and the
    statistics are summed over `process_group` with one all_reduce; see the
    module docstring.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    if len(sft_grads) != len(rl_grads) or not rl_grads:
        raise ValueError(f"need two equally long, non-empty lists, got {len(sft_grads)} and {len(rl_grads)}")
    numel = []
    for i, (s, r) in enumerate(zip(sft_grads, rl_grads)):
        if s is not None and r is not None and s.shape != r.shape:
            raise ValueError(f"gradient {i}: SFT shape {tuple(s.shape)} != RL shape {tuple(r.shape)}")
        numel.append(0 if s is None and r is None else (r if r is not None else s).numel())
    P = len(rl_grads)
    float64 = any(g is not None and g.dtype == torch.float64 for g in (*sft_grads, *rl_grads))
    dtype = torch.float64 if float64 else torch.float32

    stats = gradient_statistics(sft_grads, rl_grads, dtype)  # [3, P]
    # A blocking host->device copy would wait for the stream; this one does not.
    numel = torch.tensor(numel, dtype=dtype).to(stats.device, non_blocking=True)  # [P]
    if shard_reduce:
        packed = torch.cat([stats, numel[None]])  # [4, P]: one collective for everything
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        stats, numel = packed[:3], packed[3]
    dot, sq_sft, sq_rl = stats.unbind(0)
    alpha, beta, conflict, sft_sq_after = constraint_coefficients(dot, sq_sft, sq_rl, mode, granularity)

    # g = alpha * g_sft + beta * g_rl, written into g_rl. alpha is 1 except for
    # `gate` and beta is 1 except for `project`: skip the multiplies by 1.
    alphas, betas = alpha.unbind(0), beta.unbind(0)  # P 0-dim views, no copies
    has_rl = [i for i in range(P) if rl_grads[i] is not None]
    both = [i for i in has_rl if sft_grads[i] is not None]
    sft_only = [i for i in range(P) if sft_grads[i] is not None and rl_grads[i] is None]
    if mode == "project" and has_rl:
        torch._foreach_mul_([rl_grads[i] for i in has_rl], [betas[i] for i in has_rl])
    if mode == "gate" and both:
        torch._foreach_addcmul_([rl_grads[i] for i in both], [sft_grads[i] for i in both], [alphas[i] for i in both])
    elif both:
        torch._foreach_add_([rl_grads[i] for i in both], [sft_grads[i] for i in both])
    combined: list[torch.Tensor | None] = list(rl_grads)
    if sft_only:
        scaled = torch._foreach_mul([sft_grads[i] for i in sft_only], [alphas[i] for i in sft_only])
        for i, g in zip(sft_only, scaled):
            combined[i] = g

    sft_norm, rl_norm = sq_sft.sum().sqrt(), sq_rl.sum().sqrt()
    norms = sft_norm * rl_norm
    in_conflict = conflict.to(dtype)
    elements = numel.sum()
    return combined, ConstraintStats(
        cosine=torch.where(norms > 0, dot.sum() / norms.clamp_min(torch.finfo(dtype).tiny), 0.0),
        conflict_fraction_params=in_conflict.mean(),
        conflict_fraction_elements=(in_conflict * numel).sum() / elements.clamp_min(1),
        sft_norm=sft_norm,
        rl_norm=rl_norm,
        sft_norm_after=sft_sq_after.sqrt(),
        conflict=conflict.contiguous(),
    )


def apply_gradient_constraint(
    params: Sequence[torch.nn.Parameter],
    sft_grads: Grads,
    rl_grads: Grads,
    mode: Mode = "project",
    granularity: Granularity = "per_param",
) -> ConstraintStats:
    """Constrain and set each `param.grad` to its combined gradient (None where neither loss reached it).

    The one entry point, sharded or not: FSDP's gradients (DTensors) are constrained on their
    local shards with one all-reduce of the statistics (`shard_reduce`), so every rank decides
    alike. rl_grads are overwritten in place (see `constrain_gradients`); passing the params'
    own `.grad` tensors as rl_grads costs no copy.
    """
    if len(params) != len(rl_grads):
        raise ValueError(f"{len(params)} parameters but {len(rl_grads)} gradients")
    sharded = any(isinstance(g, DTensor) for g in (*sft_grads, *rl_grads))
    rl_local = [local(g) for g in rl_grads]
    combined, stats = constrain_gradients([local(g) for g in sft_grads], rl_local, mode, granularity, shard_reduce=sharded)
    for p, g, r, r_local in zip(params, combined, rl_grads, rl_local):
        # Where an RL gradient exists it was overwritten in place (a DTensor's local view included).
        p.grad = None if g is None else r if g is r_local else as_param_shard(p, g)
    return stats
