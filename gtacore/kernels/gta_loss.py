"""The GTA loss in one call: SFT cross-entropy on guess rows, clipped policy objective on RL rows.

Each row i of a flattened batch (N tokens) has a kind: 0 ignore, 1 SFT (a gold guess token),
2 RL (a think/answer/other token of a rollout). With logp_i = log softmax(logits_i / T)[target_i]:

    L_SFT = mean_{SFT rows} -logp_i                                      (0 if there are none)
    rho_i = exp(logp_i - old_i)
    obj_i = min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i) - beta KL_i
    KL_i  = exp(ref_i - logp_i) - (ref_i - logp_i) - 1                     (k3 estimator)
    L_RL  = -agg(obj)     agg: token_mean = sum / #RL rows; seq_mean = mean over sequences of
                          the per-sequence token mean; constant = sum / loss_normalizer

Every aggregation is a weighted sum, L = sum_i w_i f(logp_i), with weights w_i fixed by the row
kinds (and sequence ids) alone (`gta_row_weights`). So dL/dlogp_i depends on row i only, which
is what lets `gtacore.kernels.fused_linear` compute the gradient during its forward pass; it uses the
closed form `gta_row_loss_grad`, since autograd is off inside a custom op:

    d obj_i / d logp_i = rho_i A_i (0 where clipped) + beta (exp(ref_i - logp_i) - 1)

Several ranks: the means are over the global batch when `row_counts` gives the denominators
(global counts / number of ranks): each rank's loss is then its share of the global mean, and
the mean over ranks of the losses (and gradients) is the global loss, whatever each rank's share
of the tokens. The per-sequence token count of seq_mean stays local: a sequence lives on one rank.

Implementation: `gtacore.kernels.selective_logprobs` over the rows with kind != 0 gives logp [N]; the
per-row math is plain PyTorch on [N] vectors (`gta_token_objective`, `gta_row_losses`, shared
with the reference and the fused-linear path). Autograd turns the losses into dL/dlogp [N] and
the logits-level backward kernel runs once per backward call. Memory traffic: each selected row
is read twice and written once; ignored rows get a zero gradient written and are never read.
This module has no kernels of its own.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from gtacore.kernels.selective_logprobs import LogProbs, selective_logprobs, selective_logprobs_reference

IGNORE, SFT, RL = 0, 1, 2  # row_kind codes
AGGREGATIONS = ("token_mean", "seq_mean", "constant")


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyper-parameters, in one piece from the command line (gtacore.config.LossArgs)
    to the kernels."""

    lambda_sft: float = 1.0  # fused loss only: weight of L_SFT in the differentiable total
    lambda_rl: float = 1.0  # fused loss only: weight of L_RL
    eps_low: float = 0.2  # ratio >= 1 - eps_low
    eps_high: float = 0.2  # ratio <= 1 + eps_high
    beta: float = 0.0  # k3 KL weight; needs ref_logprobs when nonzero
    temperature: float = 1.0  # logp = log softmax(logits / T)
    agg: str = "token_mean"  # RL aggregation: token_mean, seq_mean or constant
    loss_normalizer: float | None = None  # the denominator of agg="constant"


class RowCounts(NamedTuple):
    """Denominators of the loss means: counts over the global batch divided by the number of ranks."""

    sft_rows: float  # SFT rows (the SFT token mean)
    rl_rows: float  # RL rows (token_mean)
    rl_seqs: float  # sequences with at least one RL row (seq_mean)


class GTALoss(NamedTuple):
    sft_loss: torch.Tensor  # scalar, differentiable
    rl_loss: torch.Tensor  # scalar, differentiable
    stats: dict[str, torch.Tensor]  # [N] each, detached: ratio, clipped, kl, entropy, logprobs


class TokenObjective(NamedTuple):
    objective: torch.Tensor  # [N] per-token objective to maximise (clipped surrogate - beta KL)
    ratio: torch.Tensor  # [N] rho = exp(logp - old)
    clipped: torch.Tensor  # [N] bool: min() took the clipped term and it differs
    kl: torch.Tensor  # [N] k3 estimate of KL(pi || ref); 0 without ref_logprobs


def gta_token_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
) -> TokenObjective:
    """Per-token clipped policy objective minus beta * k3 KL. All tensors [N], same dtype out."""
    ratio = torch.exp(logprobs - old_logprobs.to(logprobs.dtype))
    advantages = advantages.to(logprobs.dtype)
    unclipped = ratio * advantages
    clipped_term = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped_term)
    if ref_logprobs is None:
        if beta != 0.0:
            raise ValueError("beta != 0 needs ref_logprobs")
        kl = torch.zeros_like(logprobs)
    else:
        log_ref_ratio = ref_logprobs.to(logprobs.dtype) - logprobs
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if beta != 0.0:  # skipped, not multiplied by 0, so an infinite KL cannot make a NaN
            objective = objective - beta * kl
    return TokenObjective(objective, ratio, clipped_term < unclipped, kl)


def gta_row_weights(
    row_kind: torch.Tensor,
    agg: str = "token_mean",
    seq_ids: torch.Tensor | None = None,
    loss_normalizer: float | None = None,
    row_counts: RowCounts | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights (sft_weight [N], rl_weight [N], fp32) with L = sum_i w_i f(logp_i).

    seq_ids [N] long, needed by "seq_mean", must lie in [0, N) on RL rows (e.g. the index of the
    row's sequence in the micro-batch); it is not checked, to avoid a host-device sync.
    row_counts: the means' denominators (module docstring); None counts these rows.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    sft, rl = row_kind == SFT, row_kind == RL
    sft_weight = sft.float() / (sft.sum().clamp(min=1) if row_counts is None else (row_counts.sft_rows or 1.0))
    if agg == "token_mean":
        rl_weight = rl.float() / (rl.sum().clamp(min=1) if row_counts is None else (row_counts.rl_rows or 1.0))
    elif agg == "seq_mean":
        if seq_ids is None:
            raise ValueError('agg="seq_mean" needs seq_ids')
        seq = torch.where(rl, seq_ids, 0)
        tokens_per_seq = torch.zeros(row_kind.shape[0], device=row_kind.device).index_add_(0, seq, rl.float())
        num_seqs = (tokens_per_seq > 0).sum().clamp(min=1) if row_counts is None else (row_counts.rl_seqs or 1.0)
        # gather, not tokens_per_seq[seq]: the same values, and it also runs on fake CUDA tensors
        # with a CPU-only torch build, where advanced indexing wants a CUDA device guard.
        rl_weight = torch.where(rl, 1.0 / (tokens_per_seq.gather(0, seq).clamp(min=1) * num_seqs), 0.0)
    else:
        if loss_normalizer is None or loss_normalizer <= 0:
            raise ValueError('agg="constant" needs a positive loss_normalizer')
        rl_weight = rl.float() / loss_normalizer
    return sft_weight, rl_weight


def gta_row_losses(
    logprobs: torch.Tensor,
    row_kind: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    sft_weight: torch.Tensor,
    rl_weight: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, TokenObjective]:
    """(sft_loss, rl_loss, per-token objective) summed over these rows (all rows or a chunk).

    Inputs of rows that are not RL may hold anything (NaN, inf): they are replaced before use,
    so they give ratio 1, kl 0, objective 0 and a finite zero gradient.
    """
    rl = row_kind == RL
    detached = logprobs.detach()
    token = gta_token_objective(
        logprobs,
        torch.where(rl, old_logprobs.to(detached.dtype), detached),
        torch.where(rl, advantages.to(detached.dtype), 0.0),
        None if ref_logprobs is None else torch.where(rl, ref_logprobs.to(detached.dtype), detached),
        eps_low, eps_high, beta,
    )
    sft_loss = -(sft_weight * torch.where(row_kind == SFT, logprobs, 0.0)).sum()
    rl_loss = -(rl_weight * token.objective).sum()
    return sft_loss, rl_loss, token


def gta_row_loss_grad(
    logprobs: torch.Tensor,
    row_kind: torch.Tensor,
    token: TokenObjective,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    sft_weight: torch.Tensor,
    rl_weight: torch.Tensor,
    beta: float,
    lambda_sft: float,
    lambda_rl: float,
) -> torch.Tensor:
    """d(lambda_sft * sft_loss + lambda_rl * rl_loss) / d logprobs [N] of `gta_row_losses`, in closed
    form, given its `token` output. For callers where autograd is off: a custom op's implementation
    runs below the autograd dispatch key (kernels.fused_linear). Equal to autograd's gradient,
    ties included: where rho is inside the clip range min() splits its gradient between two equal
    terms that both pass rho A. Rows that are not RL (resp. SFT) get exactly 0 from the RL (resp.
    SFT) term, whatever their inputs hold."""
    d_objective = torch.where(token.clipped, 0.0, token.ratio * advantages.to(logprobs.dtype))
    if beta != 0.0:  # objective -= beta * KL, d KL / d logp = 1 - exp(ref - logp)
        d_objective = d_objective + beta * (torch.exp(ref_logprobs.to(logprobs.dtype) - logprobs) - 1.0)
    d_sft_loss = torch.where(row_kind == SFT, -sft_weight, 0.0)
    d_rl_loss = torch.where(row_kind == RL, -rl_weight * d_objective, 0.0)
    return lambda_sft * d_sft_loss + lambda_rl * d_rl_loss


def _gta_loss_from_logprobs(lp: LogProbs, row_kind, old_logprobs, advantages, ref_logprobs, s: LossSettings,
                            seq_ids, row_counts) -> GTALoss:
    sft_weight, rl_weight = gta_row_weights(row_kind, s.agg, seq_ids, s.loss_normalizer, row_counts)
    sft_loss, rl_loss, token = gta_row_losses(
        lp.logprobs, row_kind, old_logprobs, advantages, ref_logprobs,
        sft_weight, rl_weight, s.eps_low, s.eps_high, s.beta,
    )
    stats = {
        "ratio": token.ratio.detach(),
        "clipped": token.clipped,
        "kl": token.kl.detach(),
        "entropy": lp.entropy,
        "logprobs": lp.logprobs.detach(),
    }
    return GTALoss(sft_loss, rl_loss, stats)


def gta_loss_reference(logits, targets, row_kind, old_logprobs, advantages, ref_logprobs=None,
                       settings: LossSettings = LossSettings(), *, seq_ids=None, row_counts=None) -> GTALoss:
    """Plain PyTorch over the full logits (fp32 log_softmax, fp64 for fp64 logits)."""
    lp = selective_logprobs_reference(logits, targets, settings.temperature, row_kind != IGNORE, with_entropy=True)
    return _gta_loss_from_logprobs(lp, row_kind, old_logprobs, advantages, ref_logprobs, settings, seq_ids, row_counts)


def gta_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_kind: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    settings: LossSettings = LossSettings(),
    *,
    seq_ids: torch.Tensor | None = None,
    row_counts: RowCounts | None = None,
) -> GTALoss:
    """SFT and RL losses of a batch of rows, each differentiable on its own.

    logits [N, V] (any float dtype, rows may be strided), targets [N] long, row_kind [N] int
    (0 ignore, 1 SFT, 2 RL), old_logprobs / advantages / ref_logprobs [N] (read on RL rows only;
    ref_logprobs may be None when beta == 0), seq_ids [N] long for agg="seq_mean" (in [0, N)),
    row_counts for means over a global batch. Returns GTALoss(sft_loss, rl_loss, stats) where
    stats holds detached [N] tensors: ratio (1 off RL rows), clipped (bool), kl (0 off RL rows
    or without ref), entropy and logprobs (0 on ignored rows). The lambdas are not applied.
    """
    lp = selective_logprobs(logits, targets, settings.temperature, row_kind != IGNORE, with_entropy=True)
    return _gta_loss_from_logprobs(lp, row_kind, old_logprobs, advantages, ref_logprobs, settings, seq_ids, row_counts)
