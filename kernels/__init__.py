"""Triton kernels for the GTA loss, each beside its plain-PyTorch reference."""

from kernels.fused_linear import FusedGTALoss, fused_linear_gta_loss, fused_linear_logprobs
from kernels.gta_loss import GTALoss, LossSettings, RowCounts, gta_loss, gta_token_objective
from kernels.selective_logprobs import LogProbs, selective_logprobs

__all__ = [
    "FusedGTALoss",
    "GTALoss",
    "LogProbs",
    "LossSettings",
    "RowCounts",
    "fused_linear_gta_loss",
    "fused_linear_logprobs",
    "gta_loss",
    "gta_token_objective",
    "selective_logprobs",
]
