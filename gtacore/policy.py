"""Log-probs and losses of packed sequences, through the fused LM-head kernels.

The decoder returns hidden states; only the loss rows' hidden states [M, D] meet
the LM head, inside `kernels.fused_linear_*`, so the [tokens, vocab] logits are
never materialised on the fast path.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from kernels import FusedGTALoss, fused_linear_gta_loss, fused_linear_logprobs

from .batch import PackedBatch
from .config import LossArgs


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each decoder block keeps only its input for the
    backward and recomputes the rest there (about one more forward of compute).

    The blocks' `forward` is replaced on the instances, so parameter names, and with
    them the checkpoints, stay as they are. Apply before FSDP sharding: FSDP then
    gathers a block's weights for the recomputation as for its backward.
    """
    for block in model.model.layers:
        block.forward = partial(checkpoint, type(block).forward, block, use_reentrant=False)


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The LM head [V, D]. Read it after the model's forward: under FSDP the root
    module's parameters are whole tensors only between its forward and backward."""
    return model.lm_head.weight


def loss_row_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Hidden states [M, D] at the loss rows of a packed batch."""
    hidden = model(batch.input_ids, positions=batch.positions, spec=batch.spec, return_hidden=True)  # [1, N, D]
    return hidden[0].index_select(0, batch.loss_index)


@torch.no_grad()
def packed_logprobs(model: torch.nn.Module, batch: PackedBatch, temperature: float) -> torch.Tensor:
    """log p(target) under softmax(logits / T) for each loss row: [M] float32."""
    hidden = loss_row_hidden(model, batch)
    return fused_linear_logprobs(hidden, head_weight(model).to(hidden.dtype), batch.targets, temperature)


def loss_from_hidden(
    hidden: torch.Tensor,
    head: torch.Tensor,
    batch,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    args: LossArgs,
    temperature: float,
    loss_normalizer: float | None = None,
) -> FusedGTALoss:
    """The loss of a batch's loss rows (`hidden` [M, D]); its row kinds decide SFT or RL.

    `batch` is a PackedBatch or a prefix BranchPack (targets, row_kind, advantages,
    seq_ids, row_counts). old_logprobs None means "the current policy" (mu = 1): ratios are
    exactly 1.
    """
    weight = head.to(hidden.dtype)
    if old_logprobs is None:
        with torch.no_grad():
            old_logprobs = fused_linear_logprobs(hidden.detach(), weight.detach(), batch.targets, temperature)
    return fused_linear_gta_loss(
        hidden,
        weight,
        batch.targets,
        batch.row_kind,
        old_logprobs,
        batch.advantages,
        ref_logprobs,
        lambda_sft=args.lambda_sft,
        lambda_rl=args.lambda_rl,
        eps_low=args.eps_low,
        eps_high=args.eps_high,
        beta=args.beta if ref_logprobs is not None else 0.0,  # SFT rows have no KL term
        temperature=temperature,
        agg=args.agg,
        seq_ids=batch.seq_ids,
        loss_normalizer=loss_normalizer,
        row_counts=batch.row_counts,
    )


def packed_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    args: LossArgs,
    temperature: float,
    loss_normalizer: float | None = None,
) -> FusedGTALoss:
    """Forward a packed batch and return its loss (differentiable)."""
    hidden = loss_row_hidden(model, batch)
    return loss_from_hidden(hidden, head_weight(model), batch, old_logprobs, ref_logprobs, args, temperature, loss_normalizer)


def plain_backward(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    batches: list[tuple[PackedBatch, torch.Tensor | None, torch.Tensor | None, float | None, float]],
    args: LossArgs,
) -> list[tuple[list[torch.Tensor | None], FusedGTALoss]]:
    """Per packed batch (batch, old, ref, normaliser, temperature): forward, loss, backward, gradients.

    The plain counterpart of `gtacore.prefix.prefix_backward` (every sequence runs in full).
    """
    results = []
    for batch, old, ref, normalizer, temperature in batches:
        out = packed_loss(model, batch, old, ref, args, temperature, normalizer)
        out.loss.backward()
        results.append(([p.grad for p in params], out))
        for p in params:
            p.grad = None
    return results
