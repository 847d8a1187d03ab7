"""LM head + selective log-probs / GTA loss in row chunks: hidden [N, D], weight [V, D], no [N, V].

Math: logits = hidden @ weight.T / T (no bias), then as `gtacore.kernels.selective_logprobs` and
`gtacore.kernels.gta_loss`. Rows are processed C at a time: the chunk's logits [C, V] are made by a torch
matmul in the hidden dtype, fed to the selective-logprobs kernels, and freed.

fused_linear_gta_loss: the loss is a scalar and, once the per-row weights (row counts per kind
and per sequence) are known, which they are before the loop, dL/dlogp_i depends on row i alone.
So the forward computes the gradient as it goes: per chunk, forward kernel -> logp_c -> losses
through the same `gta_row_losses` as the unfused loss, and dL/dlogp_c [C] from its closed form
`gta_row_loss_grad` (autograd is off inside a custom op) -> backward kernel writes dL/dlogits_c
over logits_c in place -> grad_hidden_c = dlogits_c @ W and grad_weight += dlogits_c^T @ hidden_c.
The backward only scales the saved grads by the scalar grad_output. Three matmuls of 2*C*V*D
FLOPs per chunk, like the unfused forward + backward; each chunk's logits are written once, read
twice and overwritten once.

fused_linear_logprobs: the output is a vector [N] and its grad_output, unknown in the forward, is
per row. The forward keeps only lse [N]; the backward recomputes each chunk's logits (a fourth
matmul) and runs the backward kernel with the incoming dL/dlogp.

Chunk size: C ~ N*D/V rows, so the transient chunk logits are about the size of hidden [N, D];
at least 256 rows, 2048 on CUDA (smaller matmuls underuse the tensor cores), and at most N;
`chunk_size` overrides it. Memory: grad_weight is accumulated in fp32 by default, 4*V*D bytes
held from the forward to the backward (2.2 GB for V=151936, D=3584). fp32_grad_weight=False
accumulates in the weight dtype instead (2*V*D bytes for bf16, rounded once per chunk). In fp32
mode on CUDA each chunk's bf16 product is accumulated straight into the fp32 sum by cuBLAS
(`addmm` with out_dtype=float32): no [V, D] temporary. Elsewhere (no CPU kernel for that) each
chunk's product is made in the weight dtype, a transient [V, D], and added to the fp32 sum, so
the rounding does not grow with the number of chunks. grad_hidden [N, D] is in the hidden dtype.

The chunk loops run as torch.library custom ops (`gtacore.kernels.ops`), which the public
functions call as torch.ops.gtacore.*: torch.compile keeps the loss in one graph and
FakeTensorMode runs it. The ops see hidden and weight in one dtype: the public functions cast
them (autocast's dtype, in the autograd graph) and call the op with autocast off, so its matmuls
run in that dtype.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from gtacore.kernels.gta_loss import (IGNORE, LossSettings, RowCounts, gta_loss_reference, gta_row_loss_grad,
                                      gta_row_losses, gta_row_weights)
from gtacore.kernels.selective_logprobs import (_new_output, _rows_backward, _rows_forward,
                                                selective_logprobs_reference, triton_runs_on)

MIN_CHUNK_ROWS = 256
MIN_CHUNK_ROWS_CUDA = 2048  # a [2048, D] x [D, V] matmul keeps an H100's tensor cores busy
STAT_NAMES = ("ratio", "clipped", "kl", "entropy", "logprobs")


class FusedGTALoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable: lambda_sft * sft_loss + lambda_rl * rl_loss
    sft_loss: torch.Tensor  # scalar, detached
    rl_loss: torch.Tensor  # scalar, detached
    stats: dict[str, torch.Tensor]  # [N] each, detached, as GTALoss.stats


def fused_linear_logprobs_reference(hidden, weight, targets, temperature=1.0, mask=None) -> torch.Tensor:
    """Plain matmul then `selective_logprobs_reference`; materialises [N, V]."""
    return selective_logprobs_reference(hidden @ weight.T, targets, temperature, mask).logprobs


def fused_linear_gta_loss_reference(hidden, weight, targets, row_kind, old_logprobs, advantages, ref_logprobs=None,
                                    settings: LossSettings = LossSettings(), **rows) -> FusedGTALoss:
    """Plain matmul then `gta_loss_reference`; materialises [N, V]. `rows`: seq_ids, row_counts."""
    sft_loss, rl_loss, stats = gta_loss_reference(
        hidden @ weight.T, targets, row_kind, old_logprobs, advantages, ref_logprobs, settings, **rows
    )
    loss = settings.lambda_sft * sft_loss + settings.lambda_rl * rl_loss
    return FusedGTALoss(loss, sft_loss.detach(), rl_loss.detach(), stats)


def default_chunk_size(N: int, V: int, D: int, min_rows: int = MIN_CHUNK_ROWS) -> int:
    """Rows per chunk: chunk logits [C, V] about as big as hidden [N, D], within [min_rows, N]."""
    return max(1, min(N, max(min_rows, -(-N * D // V))))


def _chunk_rows(hidden: torch.Tensor) -> int:
    return MIN_CHUNK_ROWS_CUDA if hidden.is_cuda else MIN_CHUNK_ROWS


def _new_grads(hidden, weight, need_hidden, need_weight, fp32_grad_weight):
    """(grad_hidden, grad_weight) buffers; None where not needed. grad_weight is accumulated."""
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = None
    if need_weight:
        dtype = _grad_weight_dtype(weight, fp32_grad_weight)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    return grad_hidden, grad_weight


def _grad_weight_dtype(weight, fp32_grad_weight):
    return torch.float32 if fp32_grad_weight else weight.dtype


def _or_empty(grad, like):
    """An op's output for a gradient: the tensor, or an empty one where it was not computed."""
    return like.new_empty(0) if grad is None else grad


def _accumulate_grads(dlogits, hidden_chunk, weight, grad_hidden_chunk, grad_weight):
    if grad_hidden_chunk is not None:
        torch.mm(dlogits, weight, out=grad_hidden_chunk)  # [C, V] @ [V, D]
    if grad_weight is not None:
        if grad_weight.dtype == dlogits.dtype:
            grad_weight.addmm_(dlogits.T, hidden_chunk)  # [V, C] @ [C, D]
        elif grad_weight.is_cuda and _fp32_out_addmm(grad_weight.device):  # fp32 sum fed by bf16 GEMMs
            torch.addmm(grad_weight, dlogits.T, hidden_chunk, out_dtype=torch.float32, out=grad_weight)
        else:
            grad_weight += dlogits.T @ hidden_chunk


_FP32_OUT_ADDMM: dict[torch.device, bool] = {}


def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether this torch has cuBLAS's bf16 x bf16 -> fp32 addmm in place (torch >= 2.8), checked
    once per device on a small product against the plain one."""
    if device not in _FP32_OUT_ADDMM:
        a, b = (torch.randn(64, 64, device=device).bfloat16() for _ in range(2))
        acc = torch.ones(64, 64, device=device)
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _FP32_OUT_ADDMM[device] = torch.allclose(acc, 1 + a.float() @ b.float(), atol=1e-3, rtol=1e-3)
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_ADDMM[device] = False
    return _FP32_OUT_ADDMM[device]


def _compute_inputs(hidden, weight):
    """(hidden, weight) in the dtype their matmul computes in: autocast's where it is on, as
    `hidden @ weight.T` would cast them. The casts stay in the autograd graph, so the gradients
    reach the fp32 leaves in their dtype; inside, autocast is off: the `out=` matmuls skip it."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def _check_shapes(hidden, weight, targets):
    N, D = hidden.shape if hidden.dim() == 2 else (-1, -1)
    if weight.dim() != 2 or weight.shape[1] != D or targets.shape != (N,):
        raise ValueError(f"expected hidden [N, D], weight [V, D], targets [N]; got {hidden.shape}, "
                         f"{weight.shape}, {targets.shape}")


# ----------------------------------------------------------------------------------------------
# The chunk loops: the bodies of the custom ops in gtacore.kernels.ops (autograd is off inside).


def logprobs_chunks(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None,
                    temperature: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """(logprobs, lse), fp32 [N] each, one chunk of logits [C, V] alive at a time."""
    N = hidden.shape[0]
    logprobs = _new_output((N,), torch.float32, hidden.device)
    lse = _new_output((N,), torch.float32, hidden.device)
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        logits = hidden[rows] @ weight.T  # [C, V]
        chunk_mask = None if mask is None else mask[rows]
        logprobs[rows], lse[rows], _ = _rows_forward(logits, targets[rows], chunk_mask, temperature, False)
        del logits  # before the next chunk's matmul: one chunk of logits alive at a time
    return logprobs, lse


def logprobs_grad_chunks(dlogprobs: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None,
                         lse: Tensor, temperature: float, chunk_size: int, fp32_grad_weight: bool,
                         need_grad_hidden: bool, need_grad_weight: bool) -> tuple[Tensor, Tensor]:
    """(grad_hidden [N, D] hidden dtype, grad_weight [V, D] weight dtype), each empty if not needed;
    each chunk's logits are recomputed."""
    grad_hidden, grad_weight = _new_grads(hidden, weight, need_grad_hidden, need_grad_weight, fp32_grad_weight)
    N = hidden.shape[0]
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        logits = hidden[rows] @ weight.T  # [C, V], recomputed
        chunk_mask = None if mask is None else mask[rows]
        _rows_backward(logits, targets[rows], chunk_mask, lse[rows], dlogprobs[rows], temperature, logits)
        _accumulate_grads(logits, hidden[rows], weight,
                          None if grad_hidden is None else grad_hidden[rows], grad_weight)
        del logits
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return _or_empty(grad_hidden, hidden), _or_empty(grad_weight, weight)


def gta_loss_chunks(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_kind: Tensor, old_logprobs: Tensor, advantages: Tensor,
    ref_logprobs: Tensor | None, sft_weight: Tensor, rl_weight: Tensor,
    eps_low: float, eps_high: float, beta: float, temperature: float, lambda_sft: float, lambda_rl: float,
    chunk_size: int, fp32_grad_weight: bool, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, ...]:
    """(loss, sft_loss, rl_loss, *stats in STAT_NAMES order, grad_hidden, grad_weight).

    Losses are fp32 scalars, stats [N] (fp32; clipped bool); grad_hidden [N, D] is in the hidden
    dtype, grad_weight [V, D] is the fp32 (fp32_grad_weight) or weight-dtype accumulator, unscaled:
    d loss / d hidden and d loss / d weight. Each is empty where not needed.
    """
    N, device = hidden.shape[0], hidden.device
    grad_hidden, grad_weight = _new_grads(hidden, weight, need_grad_hidden, need_grad_weight, fp32_grad_weight)
    mask = row_kind != IGNORE
    sft_loss, rl_loss = torch.zeros((), device=device), torch.zeros((), device=device)
    stats = {name: _new_output((N,), torch.float32, device) for name in STAT_NAMES if name != "clipped"}
    stats["clipped"] = torch.zeros(N, dtype=torch.bool, device=device)
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        logits = hidden[rows] @ weight.T  # [C, V]
        logprobs, lse, entropy = _rows_forward(logits, targets[rows], mask[rows], temperature, True)
        chunk_ref = None if ref_logprobs is None else ref_logprobs[rows]
        chunk_sft, chunk_rl, token = gta_row_losses(
            logprobs, row_kind[rows], old_logprobs[rows], advantages[rows], chunk_ref,
            sft_weight[rows], rl_weight[rows], eps_low, eps_high, beta,
        )
        sft_loss += chunk_sft
        rl_loss += chunk_rl
        for name, value in (("ratio", token.ratio), ("kl", token.kl), ("clipped", token.clipped),
                            ("entropy", entropy), ("logprobs", logprobs)):
            stats[name][rows] = value
        if grad_hidden is not None or grad_weight is not None:
            dlogprobs = gta_row_loss_grad(logprobs, row_kind[rows], token, advantages[rows], chunk_ref,
                                          sft_weight[rows], rl_weight[rows], beta, lambda_sft, lambda_rl)
            _rows_backward(logits, targets[rows], mask[rows], lse, dlogprobs, temperature, logits)
            _accumulate_grads(logits, hidden[rows], weight,
                              None if grad_hidden is None else grad_hidden[rows], grad_weight)
        del logits
    loss = lambda_sft * sft_loss + lambda_rl * rl_loss
    return (loss, sft_loss, rl_loss, *(stats[name] for name in STAT_NAMES),
            _or_empty(grad_hidden, hidden), _or_empty(grad_weight, weight))


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          mask: Tensor | None = None, chunk_size: int | None = None, *,
                          fp32_grad_weight: bool = True) -> Tensor:
    """log softmax(hidden @ weight.T / T)[targets] as a differentiable [N] fp32 tensor.

    hidden [N, D], weight [V, D] in the same dtype (tied or not: grads go to the tensor passed),
    targets [N] long, mask [N] bool (None = all rows; masked rows give 0 and zero gradient).
    The backward recomputes each chunk's logits (see the module docstring).
    """
    _check_shapes(hidden, weight, targets)
    if not triton_runs_on(hidden):
        return fused_linear_logprobs_reference(hidden, weight, targets, temperature, mask)
    N, D = hidden.shape
    chunk_size = chunk_size or default_chunk_size(N, weight.shape[0], D, _chunk_rows(hidden))
    mask = None if mask is None else mask.bool().contiguous()
    hidden, weight = _compute_inputs(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, _lse = torch.ops.gtacore.fused_linear_logprobs_fwd(
            hidden, weight, targets.contiguous(), mask, float(temperature), chunk_size, fp32_grad_weight)
    return logprobs


def fused_linear_gta_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_kind: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    settings: LossSettings = LossSettings(),
    *,
    seq_ids: torch.Tensor | None = None,
    row_counts: RowCounts | None = None,
    chunk_size: int | None = None,
    fp32_grad_weight: bool = True,
) -> FusedGTALoss:
    """lambda_sft * L_SFT + lambda_rl * L_RL from hidden [N, D] and weight [V, D], no [N, V].

    Per-row inputs and settings as `gtacore.kernels.gta_loss`. Returns FusedGTALoss(loss, sft_loss, rl_loss,
    stats): only `loss` is differentiable (to hidden and weight); the gradient is computed in the
    forward pass, so a backward through `loss` is cheap. To keep g_sft and g_rl apart, call this
    once per kind of rows.
    """
    _check_shapes(hidden, weight, targets)
    if not triton_runs_on(hidden):
        return fused_linear_gta_loss_reference(hidden, weight, targets, row_kind, old_logprobs, advantages,
                                               ref_logprobs, settings, seq_ids=seq_ids, row_counts=row_counts)
    s = settings
    if s.beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    N, D = hidden.shape
    chunk_size = chunk_size or default_chunk_size(N, weight.shape[0], D, _chunk_rows(hidden))
    sft_weight, rl_weight = gta_row_weights(row_kind, s.agg, seq_ids, s.loss_normalizer, row_counts)
    scalars = [float(x) for x in (s.eps_low, s.eps_high, s.beta, s.temperature, s.lambda_sft, s.lambda_rl)]
    hidden, weight = _compute_inputs(hidden, weight)
    # Gradients are made in the forward, so it must know which are wanted (the op's implementation
    # runs with grad mode off and cannot ask); under torch.no_grad() none are.
    need_hidden, need_weight = (torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
    with torch.autocast(hidden.device.type, enabled=False):
        loss, sft_loss, rl_loss, *stats, _grad_hidden, _grad_weight = torch.ops.gtacore.fused_linear_gta_loss(
            hidden, weight, targets.contiguous(), row_kind, old_logprobs, advantages, ref_logprobs,
            sft_weight, rl_weight, *scalars, chunk_size, fp32_grad_weight, need_hidden, need_weight,
        )
    return FusedGTALoss(loss, sft_loss, rl_loss, dict(zip(STAT_NAMES, stats)))
