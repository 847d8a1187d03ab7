"""Triton kernels for the GTA loss, each beside its plain-PyTorch reference.

Importing the package registers the kernels as torch.library custom ops (torch.ops.gtacore.*,
listed in the docstrings of kernels.selective_logprobs and kernels.fused_linear), which the public
functions call: torch.compile traces them without graph breaks and FakeTensorMode runs them.
"""

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
