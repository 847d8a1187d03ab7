"""Shared-prefix training: each prompt runs through the model once for all its continuations.

A step's sequences are prompt_b + continuation_{b,g}: the G rollouts of prompt b
(and, in gta mode, its teacher-forced `<guess>y</guess>`). Running every sequence
in full recomputes prompt b G+1 times. Here:

    prompt pass:  all prompts packed in one row [1, Np] (causal per prompt), keeping
                  every layer's keys/values and the prompts' final hidden states
    branch pass:  the continuations of one kind (rollouts, or SFT targets) packed in
                  one row [1, Nc]; a continuation attends to its prompt's keys/values
                  and to its own earlier tokens (never to a sibling)

This is exactly the math of running each full sequence: the same attention
inputs reach every token, and the prompt's activations receive the sum of the
gradients of all their continuations (autograd adds them).

Separate SFT and RL gradients without a second forward: the branch passes start
from detached copies of the prompt pass's outputs (keys/values, hidden states).
Each kind's loss is backpropagated through its own branch, then the gradient that
reached those copies is pushed once through the prompt pass (kept alive for the
second kind). The prompt pass is computed once; its backward runs once per kind,
which is the least work that keeps the two gradients apart.

Attention: one SDPA call per prompt group with an explicit mask over [prompt keys;
group keys] (models/attention.py, kind "prefix"). On CPU this is as fast as any
alternative at these sizes; on GPU FlexAttention with a block mask would skip the
masked blocks (a later optimisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kernels import FusedGTALoss, RowCounts, fused_linear_logprobs
from models.attention import AttnSpec

from .batch import own_row_counts
from .config import LossArgs
from .policy import head_weight, loss_from_hidden


@dataclass
class PromptPack:
    input_ids: torch.Tensor  # [1, Np]
    positions: torch.Tensor  # [1, Np]
    spec: AttnSpec  # varlen over prompts
    starts: list[int]  # where prompt b begins in the row
    lengths: list[int]  # P_b


@dataclass
class BranchPack:
    input_ids: torch.Tensor  # [1, Nc]
    positions: torch.Tensor  # [1, Nc]: P_b + j
    spec: AttnSpec  # kind "prefix"
    loss_index: torch.Tensor  # [M] rows of cat(prompt hidden [Np], branch hidden [Nc])
    targets: torch.Tensor  # [M]
    seq_ids: torch.Tensor  # [M] continuation index
    row_kind: torch.Tensor  # [M] int8
    advantages: torch.Tensor  # [M] float32
    row_counts: RowCounts  # as PackedBatch.row_counts


def pack_prompts(prompts: Sequence[Sequence[int]], device) -> PromptPack:
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("pack_prompts: empty prompt")
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
    pos = torch.tensor([j for n in lengths for j in range(n)], dtype=torch.long, device=device)[None]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return PromptPack(ids, pos, AttnSpec("varlen", cu_seqlens=cu, max_seqlen=max(lengths), seq_lengths=lengths), starts, lengths)


def pack_branches(
    prompts: PromptPack,
    parent: Sequence[int],
    continuations: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]],
    row_kind: int,
    advantages: Sequence[float] | None,
    device,
) -> BranchPack:
    """Continuation c belongs to prompt parent[c]; continuations of one prompt must be adjacent."""
    Np = sum(prompts.lengths)
    ids, pos, loss_index, targets, seq_ids, adv = [], [], [], [], [], []
    groups, masks = [], []
    c = 0
    while c < len(continuations):
        b = parent[c]
        members = []
        while c < len(continuations) and parent[c] == b:
            members.append(c)
            c += 1
        P, q_start = prompts.lengths[b], len(ids)
        own: list[int] = []  # which member each group token belongs to
        for m, ci in enumerate(members):
            start = len(ids)
            for j, (tok, keep) in enumerate(zip(continuations[ci], loss_masks[ci])):
                if keep:
                    # token j is predicted by the prompt's last token (j = 0) or by token j - 1
                    loss_index.append(prompts.starts[b] + P - 1 if j == 0 else Np + start + j - 1)
                    targets.append(tok)
                    seq_ids.append(ci)
                    adv.append(0.0 if advantages is None else float(advantages[ci]))
            ids.extend(continuations[ci])
            pos.extend(range(P, P + len(continuations[ci])))
            own.extend([m] * len(continuations[ci]))
        nq = len(ids) - q_start
        member = torch.tensor(own)
        causal = torch.ones(nq, nq, dtype=torch.bool).tril() & (member[:, None] == member[None, :])
        mask = torch.cat((torch.ones(nq, P, dtype=torch.bool), causal), dim=1)  # [nq, P + nq]
        groups.append((q_start, len(ids), prompts.starts[b], prompts.starts[b] + P))
        masks.append(mask[None, None].to(device))

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype, device=device)

    return BranchPack(
        input_ids=t(ids, torch.long)[None],
        positions=t(pos, torch.long)[None],
        spec=AttnSpec("prefix", groups=groups, group_masks=masks),
        loss_index=t(loss_index, torch.long),
        targets=t(targets, torch.long),
        seq_ids=t(seq_ids, torch.long),
        row_kind=torch.full((len(targets),), row_kind, dtype=torch.int8, device=device),
        advantages=t(adv, torch.float32),
        row_counts=own_row_counts(row_kind, seq_ids),
    )


def prompt_pass(model, prompts: PromptPack):
    """Prompt hidden states [Np, D] and every layer's (k, v) [1, Hkv, Np, Dh]."""
    hidden, kv = model(prompts.input_ids, positions=prompts.positions, spec=prompts.spec, return_hidden=True, return_kv=True)
    return hidden[0], kv


def branch_hidden(model, branch: BranchPack, prompt_hidden: torch.Tensor, kv: list) -> torch.Tensor:
    """Hidden states [M, D] at the branch's loss rows."""
    hidden = model(branch.input_ids, positions=branch.positions, spec=branch.spec, return_hidden=True, prefix_kv=kv)
    return torch.cat((prompt_hidden, hidden[0])).index_select(0, branch.loss_index)


@torch.no_grad()
def prefix_logprobs(model, prompts: PromptPack, branch: BranchPack, temperature: float) -> torch.Tensor:
    """log p(target) under softmax(logits / T) at each loss row: [M] float32."""
    ph, kv = prompt_pass(model, prompts)
    hidden = branch_hidden(model, branch, ph, kv)
    return fused_linear_logprobs(hidden, head_weight(model).to(hidden.dtype), branch.targets, temperature)


def prefix_backward(
    model,
    params: list[torch.Tensor],
    prompts: PromptPack,
    branches: list[tuple[BranchPack, torch.Tensor | None, torch.Tensor | None, float | None, float]],
    args: LossArgs,
) -> list[tuple[list[torch.Tensor | None], FusedGTALoss]]:
    """One prompt pass, then per branch (batch, old, ref, normaliser, temperature): loss, backward, gradients.

    Returns each branch's parameter gradients (taken out of `p.grad`) and loss output.
    """
    ph, kv = prompt_pass(model, prompts)
    results = []
    for i, (branch, old, ref, normalizer, temperature) in enumerate(branches):
        ph_in = ph.detach().requires_grad_()
        kv_in = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kv]
        hidden = branch_hidden(model, branch, ph_in, kv_in)
        out = loss_from_hidden(hidden, head_weight(model), branch, old, ref, args, temperature, normalizer)
        out.loss.backward()
        # Push what reached the prompt pass's outputs through it (kept for the next branch).
        outs = [ph] + [t for pair in kv for t in pair]
        ins = [ph_in] + [t for pair in kv_in for t in pair]
        pairs = [(o, x.grad) for o, x in zip(outs, ins) if x.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=i < len(branches) - 1)
        results.append(([p.grad for p in params], out))
        for p in params:
            p.grad = None
    return results
