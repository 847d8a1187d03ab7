"""Log-probs, losses and gradients of loss rows, through the fused LM-head kernels.

The decoder returns hidden states; only the loss rows' [M, D] meet the LM head, inside
`gtacore.kernels.fused_linear_*`, so the [tokens, vocab] logits never exist in full.

A step has up to two branches, each one backward: the SFT rows (prompt + gold target) and the
RL rows (the rollouts). Their gradients stay apart for the gradient constraint:

    plain layout:   each branch is its own forward and backward.
    shared layout:  the prompt pass runs once (gtacore/packing.py). Each branch starts from
                    detached copies of its outputs (keys/values, hidden states); after the
                    branch's backward, the gradient that reached those copies is pushed once
                    through the prompt pass, which is kept alive for the next branch. The prompt
                    pass is computed once and backpropagated once per branch: the least work
                    that keeps the two gradients apart, and exactly the math of running every
                    sequence in full (autograd sums the continuations' gradients at the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtacore.kernels import FusedGTALoss, LossSettings, fused_linear_gta_loss, fused_linear_logprobs

from .packing import LossRows


@dataclass
class Branch:
    """One backward's rows and what its loss needs."""

    rows: LossRows
    settings: LossSettings
    old_logprobs: torch.Tensor | None = None  # [M]; None: the current policy (mu = 1), ratios exactly 1
    ref_logprobs: torch.Tensor | None = None  # [M]; needed when settings.beta > 0


@dataclass
class BranchResult:
    grads: list[torch.Tensor | None]  # one per parameter, taken out of p.grad
    loss: FusedGTALoss


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The LM head [V, D]. Read it after the model's forward: under FSDP the root module's
    parameters are whole tensors only between its forward and backward."""
    return model.lm_head.weight


def prompt_pass(model, rows: LossRows) -> tuple[torch.Tensor, list]:
    """The shared layout's prompt hidden states [Np, D] and every layer's (k, v) [1, Hkv, Np, Dh]."""
    p = rows.prompts
    hidden, kv = model(p.input_ids, positions=p.positions, spec=p.spec, return_hidden=True, return_kv=True)
    return hidden[0], kv


def loss_row_hidden(model, rows: LossRows, prompt_out: tuple[torch.Tensor, list] | None = None) -> torch.Tensor:
    """Hidden states [M, D] at the loss rows; `prompt_out` is the shared layout's prompt pass."""
    if prompt_out is None:
        hidden = model(rows.input_ids, positions=rows.positions, spec=rows.spec, return_hidden=True)[0]  # [N, D]
    else:
        prompt_hidden, kv = prompt_out
        hidden = model(rows.input_ids, positions=rows.positions, spec=rows.spec, return_hidden=True, prefix_kv=kv)[0]
        hidden = torch.cat((prompt_hidden, hidden))  # [Np + Nc, D]: loss_index counts the prompt rows first
    return hidden.index_select(0, rows.loss_index)


@torch.no_grad()
def logprobs(model, rows: LossRows, temperature: float) -> torch.Tensor:
    """log p(target) under softmax(logits / T) at each loss row: [M] float32."""
    hidden = loss_row_hidden(model, rows, prompt_pass(model, rows) if rows.prompts is not None else None)
    return fused_linear_logprobs(hidden, head_weight(model).to(hidden.dtype), rows.targets, temperature)


def branch_loss(hidden: torch.Tensor, head: torch.Tensor, branch: Branch) -> FusedGTALoss:
    """The loss of a branch from its loss rows' hidden states [M, D]."""
    rows, weight, old = branch.rows, head.to(hidden.dtype), branch.old_logprobs
    if old is None:
        with torch.no_grad():
            old = fused_linear_logprobs(hidden.detach(), weight.detach(), rows.targets, branch.settings.temperature)
    return fused_linear_gta_loss(hidden, weight, rows.targets, rows.row_kind, old, rows.advantages, branch.ref_logprobs,
                                 branch.settings, seq_ids=rows.seq_ids, row_counts=rows.row_counts)


def forward_backward(model, params: list[torch.Tensor], branches: list[Branch]) -> list[BranchResult]:
    """Forward, loss and backward of each branch; each branch's gradients apart (module docstring)."""
    shared = branches[0].rows.prompts
    prompt_out = prompt_pass(model, branches[0].rows) if shared is not None else None
    results = []
    for i, branch in enumerate(branches):
        if prompt_out is None:
            out = branch_loss(loss_row_hidden(model, branch.rows), head_weight(model), branch)
            out.loss.backward()
        else:
            ph, kv = prompt_out
            ph_in = ph.detach().requires_grad_()
            kv_in = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kv]
            out = branch_loss(loss_row_hidden(model, branch.rows, (ph_in, kv_in)), head_weight(model), branch)
            out.loss.backward()
            outs = [ph] + [t for pair in kv for t in pair]
            ins = [ph_in] + [t for pair in kv_in for t in pair]
            pairs = [(o, x.grad) for o, x in zip(outs, ins) if x.grad is not None]
            if pairs:  # push what reached the prompt pass's outputs through it
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=i < len(branches) - 1)
        results.append(BranchResult([p.grad for p in params], out))
        for p in params:
            p.grad = None
    return results
