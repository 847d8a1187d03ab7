"""Triton kernels for the GTA loss, each beside its plain-PyTorch reference.

Importing the package registers the kernels as torch.library custom ops (torch.ops.gtacore.*,
listed in `gtacore.kernels.ops`), which the public functions call: torch.compile traces them
without graph breaks and FakeTensorMode runs them.
"""

from gtacore.kernels import ops  # noqa: F401  (registers torch.ops.gtacore.*)
from gtacore.kernels.fused_linear import FusedGTALoss, fused_linear_gta_loss, fused_linear_logprobs
from gtacore.kernels.gta_loss import GTALoss, LossSettings, RowCounts, gta_loss, gta_token_objective
from gtacore.kernels.selective_logprobs import LogProbs, selective_logprobs

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
