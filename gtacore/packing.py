"""Loss rows: a step's training sequences packed for one forward each, with no padding.

A step's sequences are prompt_b + continuation_c: the G rollouts of prompt b, or (gta, sft) its
teacher-forced gold target. Two layouts compute the same thing:

    plain:   every sequence in full, all in one row [1, N] (varlen: positions restart per sequence)
    shared:  the prompts packed once (`PromptRows`) and run once; the continuations packed in one
             row [1, Nc], each attending to its prompt's keys/values and to its own earlier
             tokens, never to a sibling's (attention kind "prefix")

The loss rows are the positions whose next token is a loss token: token j of a continuation is
predicted by the position before it (the prompt's last token for j = 0). Only their hidden
states [M, D] reach the LM head. In the shared layout `loss_index` indexes
cat(prompt hidden [Np], continuation hidden [Nc]).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Sequence

import torch
import torch.distributed as dist

from gtacore.kernels import RowCounts
from gtacore.models.attention import AttnSpec

SFT_ROW, RL_ROW = 1, 2  # row kinds of gtacore.kernels.gta_loss


@dataclass
class PromptRows:
    """The step's prompts, packed once for the shared layout's prompt pass."""

    input_ids: torch.Tensor  # [1, Np]
    positions: torch.Tensor  # [1, Np]
    spec: AttnSpec  # varlen over prompts
    starts: list[int]  # where prompt b begins in the row
    lengths: list[int]  # P_b


@dataclass
class LossRows:
    input_ids: torch.Tensor  # [1, N] long
    positions: torch.Tensor  # [1, N] long
    spec: AttnSpec  # plain: varlen (cu_seqlens [S+1]); shared: prefix (a mask per prompt group)
    loss_index: torch.Tensor  # [M] long: the hidden states whose logits predict a loss token
    targets: torch.Tensor  # [M] long: the loss tokens
    seq_ids: torch.Tensor  # [M] long: which continuation each loss row belongs to, numbered 0.. over those with rows
    row_kind: torch.Tensor  # [M] int8: SFT_ROW or RL_ROW
    advantages: torch.Tensor  # [M] float32 (0 for SFT rows)
    row_counts: RowCounts  # the loss means' denominators: these rows' own counts until made global
    prompts: PromptRows | None = None  # shared layout: the prompt pass these rows continue


def pack_prompts(prompts: Sequence[Sequence[int]], device) -> PromptRows:
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("pack_prompts: empty prompt")
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
    pos = torch.tensor([j for n in lengths for j in range(n)], dtype=torch.long, device=device)[None]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return PromptRows(ids, pos, AttnSpec("varlen", cu_seqlens=cu, max_seqlen=max(lengths), seq_lengths=lengths), starts, lengths)


def pack_rows(
    prompts: Sequence[Sequence[int]] | PromptRows,
    parent: Sequence[int],
    continuations: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]],
    row_kind: int,
    advantages: Sequence[float] | None,
    device,
) -> LossRows:
    """Continuation c follows prompt parent[c]; loss_masks[c][j] says whether its token j is a loss row.

    `prompts` as token-id lists: the plain layout. As the step's `PromptRows`: the shared
    layout, where the continuations of one prompt must be adjacent.
    """
    shared = prompts if isinstance(prompts, PromptRows) else None
    lengths_of = shared.lengths if shared else [len(p) for p in prompts]
    if any(lengths_of[b] == 0 for b in parent):
        raise ValueError("pack_rows: a prompt needs at least one token (its last token predicts the first continuation token)")
    Np = sum(shared.lengths) if shared else 0
    ids, pos, loss_index, targets, seq_ids, adv = [], [], [], [], [], []
    dense: dict[int, int] = {}  # continuation -> sequence id, numbered over those with loss rows (seq_mean's index)
    lengths, groups, masks = [], [], []
    for b, members in groupby(range(len(continuations)), key=lambda c: parent[c]):
        P, group_start, owner = lengths_of[b], len(ids), []  # owner: which member each group token is
        for m, c in enumerate(members):
            cont = list(continuations[c])
            if shared is None:  # the whole sequence; token j is predicted at start + P + j - 1
                ids += list(prompts[b])
                pos += range(P)
                lengths.append(P + len(cont))
                at = [len(ids) + j - 1 for j in range(len(cont))]
            else:  # token 0 is predicted by the prompt pass's last token of prompt b
                at = [shared.starts[b] + P - 1] + [Np + len(ids) + j - 1 for j in range(1, len(cont))]
            for j, keep in enumerate(loss_masks[c]):
                if keep:
                    loss_index.append(at[j])
                    targets.append(cont[j])
                    seq_ids.append(dense.setdefault(c, len(dense)))
                    adv.append(0.0 if advantages is None else float(advantages[c]))
            ids += cont
            pos += range(P, P + len(cont))
            owner += [m] * len(cont)
        if shared is not None:
            nq, member = len(ids) - group_start, torch.tensor(owner)
            causal = torch.ones(nq, nq, dtype=torch.bool).tril() & (member[:, None] == member[None, :])
            masks.append(torch.cat((torch.ones(nq, P, dtype=torch.bool), causal), dim=1)[None, None].to(device))  # [1, 1, nq, P + nq]
            groups.append((group_start, len(ids), shared.starts[b], shared.starts[b] + P))

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype, device=device)

    if shared is None:
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        spec = AttnSpec("varlen", cu_seqlens=cu, max_seqlen=max(lengths), seq_lengths=lengths)
    else:
        spec = AttnSpec("prefix", groups=groups, group_masks=masks)
    rows, seqs = float(len(targets)), float(len(set(seq_ids)))
    return LossRows(
        input_ids=t(ids, torch.long)[None],
        positions=t(pos, torch.long)[None],
        spec=spec,
        loss_index=t(loss_index, torch.long),
        targets=t(targets, torch.long),
        seq_ids=t(seq_ids, torch.long),
        row_kind=torch.full((len(targets),), row_kind, dtype=torch.int8, device=device),
        advantages=t(adv, torch.float32),
        row_counts=RowCounts(rows, 0.0, 0.0) if row_kind == SFT_ROW else RowCounts(0.0, rows, seqs),
        prompts=shared,
    )


def global_row_counts_(batches: list[LossRows], info) -> None:
    """Make each packed batch's loss means global: its `row_counts` become the mean over
    ranks of every rank's counts (global count / ranks; see gtacore.kernels.gta_loss). Then each
    rank's loss is its share of the global-batch mean, and the rank mean of the gradients,
    which the data-parallel all-reduce takes, is the global batch's gradient. One small
    all-reduce and one host sync per step, before the updates."""
    if not info.distributed:
        return
    counts = torch.tensor([c for b in batches for c in b.row_counts], dtype=torch.float64, device=info.device)
    dist.all_reduce(counts)
    counts = (counts / info.world_size).view(len(batches), -1).tolist()
    for b, c in zip(batches, counts):
        b.row_counts = type(b.row_counts)(*c)
