"""Packing prompt + continuation sequences into one row for the training forwards.

Every training forward (policy, reference, old log-probs, SFT) runs on packed
sequences: all sequences of a batch concatenated into one row [1, N] with
`cu_seqlens`, so no compute goes to padding. The loss rows are the packed
positions whose next token is a loss token; only their hidden states reach the
LM head and the loss kernel.

    sequence s:  prompt_s (P_s tokens) + continuation_s (C_s tokens)
    token j of continuation_s is predicted at packed position start_s + P_s + j - 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kernels import RowCounts
from models.attention import AttnSpec

SFT_ROW, RL_ROW = 1, 2  # row kinds of kernels.gta_loss


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, N] long
    positions: torch.Tensor  # [1, N] long, restarting at 0 for each sequence
    spec: AttnSpec  # varlen: cu_seqlens [S+1]
    loss_index: torch.Tensor  # [M] long: packed positions whose logits predict a loss token
    targets: torch.Tensor  # [M] long: the loss tokens
    seq_ids: torch.Tensor  # [M] long: which sequence each loss row belongs to
    row_kind: torch.Tensor  # [M] int8: SFT_ROW or RL_ROW
    advantages: torch.Tensor  # [M] float32 (0 for SFT rows)
    row_counts: RowCounts  # the loss means' denominators: this batch's own counts until made global


def own_row_counts(row_kind: int, seq_ids: Sequence[int]) -> RowCounts:
    """The counts of a one-kind batch's loss rows, from the host-side lists (no device sync)."""
    rows, seqs = float(len(seq_ids)), float(len(set(seq_ids)))
    return RowCounts(rows, 0.0, 0.0) if row_kind == SFT_ROW else RowCounts(0.0, rows, seqs)


def pack(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]],
    row_kind: int,
    advantages: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack S sequences; loss_masks[s][j] says whether continuation token j is a loss row."""
    ids: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    loss_index: list[int] = []
    targets: list[int] = []
    seq_ids: list[int] = []
    adv: list[float] = []
    for s, (prompt, cont, mask) in enumerate(zip(prompts, continuations, loss_masks)):
        if len(prompt) == 0:
            raise ValueError("pack: a prompt needs at least one token (its last token predicts the first continuation token)")
        start = len(ids)
        seq = list(prompt) + list(cont)
        ids.extend(seq)
        positions.extend(range(len(seq)))
        lengths.append(len(seq))
        for j, (tok, keep) in enumerate(zip(cont, mask)):
            if keep:
                loss_index.append(start + len(prompt) + j - 1)
                targets.append(tok)
                seq_ids.append(s)
                adv.append(0.0 if advantages is None else float(advantages[s]))
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype, device=device)

    return PackedBatch(
        input_ids=t(ids, torch.long)[None],
        positions=t(positions, torch.long)[None],
        spec=AttnSpec("varlen", cu_seqlens=cu.to(device), max_seqlen=max(lengths), seq_lengths=lengths),
        loss_index=t(loss_index, torch.long),
        targets=t(targets, torch.long),
        seq_ids=t(seq_ids, torch.long),
        row_kind=torch.full((len(targets),), row_kind, dtype=torch.int8, device=device),
        advantages=t(adv, torch.float32),
        row_counts=own_row_counts(row_kind, seq_ids),
    )
