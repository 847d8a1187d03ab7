"""The Triton launchers as PyTorch custom operators: torch.ops.gtacore.*.

Each op has a real implementation (a launcher, or a chunk loop of `gtacore.kernels.fused_linear`),
a fake one (`register_fake`: outputs of the right shape, dtype and device, reading no data and
launching nothing) and, where it is differentiable, a registered backward. torch.compile then
sees each kernel as one opaque node (no graph break), and FakeTensorMode (torch.compile's
tracing, meta-device shape checks) runs the fake implementation instead of a kernel. The public
functions (`selective_logprobs`, `fused_linear_logprobs`, `fused_linear_gta_loss`) call these
ops; importing `gtacore.kernels` registers them, once per process.

Each op takes and returns tensors and plain scalars only: no None outputs (an empty tensor ([0])
stands in for a missing entropy or a gradient not asked for), no NamedTuples.

    gtacore::selective_logprobs_fwd(Tensor logits, Tensor targets, Tensor? mask, float temperature,
        bool with_entropy, bool inplace_backward) -> (Tensor logprobs, Tensor lse, Tensor entropy)
    gtacore::selective_logprobs_bwd(Tensor dlogprobs, Tensor logits, Tensor targets, Tensor? mask,
        Tensor lse, float temperature) -> Tensor dlogits
    gtacore::selective_logprobs_bwd_inplace(Tensor dlogprobs, Tensor(a!) logits, Tensor targets,
        Tensor? mask, Tensor lse, float temperature) -> ()       (dlogits written over logits)

    gtacore::fused_linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? mask,
        float temperature, SymInt chunk_size, bool fp32_grad_weight) -> (Tensor logprobs, Tensor lse)
    gtacore::fused_linear_logprobs_bwd(Tensor dlogprobs, Tensor hidden, Tensor weight,
        Tensor targets, Tensor? mask, Tensor lse, float temperature, SymInt chunk_size,
        bool fp32_grad_weight, bool need_grad_hidden, bool need_grad_weight)
        -> (Tensor grad_hidden, Tensor grad_weight)
    gtacore::fused_linear_gta_loss(Tensor hidden, Tensor weight, Tensor targets, Tensor row_kind,
        Tensor old_logprobs, Tensor advantages, Tensor? ref_logprobs, Tensor sft_weight,
        Tensor rl_weight, float eps_low, float eps_high, float beta, float temperature,
        float lambda_sft, float lambda_rl, SymInt chunk_size, bool fp32_grad_weight,
        bool need_grad_hidden, bool need_grad_weight) -> (Tensor loss, Tensor sft_loss,
        Tensor rl_loss, Tensor ratio, Tensor clipped, Tensor kl, Tensor entropy, Tensor logprobs,
        Tensor grad_hidden, Tensor grad_weight)
"""

import torch
from torch import Tensor

from gtacore.kernels.fused_linear import (
    STAT_NAMES,
    _grad_weight_dtype,
    gta_loss_chunks,
    logprobs_chunks,
    logprobs_grad_chunks,
)
from gtacore.kernels.selective_logprobs import _new_output, _prepare, _rows_backward, _rows_forward


# ----------------------------------------------------------------------------------------------
# selective_logprobs: a forward and two backwards (one writes over the logits).


@torch.library.custom_op("gtacore::selective_logprobs_fwd", mutates_args=())
def selective_logprobs_fwd(
    logits: Tensor, targets: Tensor, mask: Tensor | None, temperature: float, with_entropy: bool,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, lse, entropy), fp32 [N] each; entropy is empty ([0]) unless with_entropy.
    inplace_backward does not change the forward: it is an input so that the registered backward
    (which sees only the op's inputs and outputs) knows which backward op to call."""
    logits, targets, mask = _prepare(logits, targets, mask)  # no-op for the public function's inputs
    logprobs, lse, entropy = _rows_forward(logits, targets, mask, temperature, with_entropy)
    return logprobs, lse, entropy if with_entropy else logits.new_empty(0, dtype=torch.float32)


@selective_logprobs_fwd.register_fake
def _(logits, targets, mask, temperature, with_entropy, inplace_backward):
    N = logits.shape[0]
    return (logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32),
            logits.new_empty(N if with_entropy else 0, dtype=torch.float32))


@torch.library.custom_op("gtacore::selective_logprobs_bwd", mutates_args=())
def selective_logprobs_bwd(
    dlogprobs: Tensor, logits: Tensor, targets: Tensor, mask: Tensor | None, lse: Tensor, temperature: float,
) -> Tensor:
    """dL/dlogits [N, V] in the logits dtype, from dL/dlogprobs [N] and the forward's lse."""
    logits, targets, mask = _prepare(logits, targets, mask)
    dlogits = _new_output(logits.shape, logits.dtype, logits.device)
    return _rows_backward(logits, targets, mask, lse, dlogprobs, temperature, dlogits)


@selective_logprobs_bwd.register_fake
def _(dlogprobs, logits, targets, mask, lse, temperature):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("gtacore::selective_logprobs_bwd_inplace", mutates_args=("logits",))
def selective_logprobs_bwd_inplace(
    dlogprobs: Tensor, logits: Tensor, targets: Tensor, mask: Tensor | None, lse: Tensor, temperature: float,
) -> None:
    """As selective_logprobs_bwd, but dL/dlogits overwrites `logits` (declared mutated: the op
    is not functional, and torch.compile treats it so). Needs logits.stride(1) == 1, as a
    contiguous copy would take the result instead of `logits`."""
    if logits.stride(1) != 1:
        raise ValueError("selective_logprobs_bwd_inplace needs logits with stride(1) == 1")
    _, targets, mask = _prepare(logits, targets, mask)
    _rows_backward(logits, targets, mask, lse, dlogprobs, temperature, logits)


@selective_logprobs_bwd_inplace.register_fake
def _(dlogprobs, logits, targets, mask, lse, temperature):
    return None


def _selective_logprobs_setup_context(ctx, inputs, output):
    logits, targets, mask, temperature, _with_entropy, inplace_backward = inputs
    _logprobs, lse, entropy = output
    ctx.save_for_backward(logits, targets, mask, lse)
    ctx.temperature, ctx.inplace_backward = temperature, inplace_backward
    ctx.mark_non_differentiable(lse, entropy)  # statistics: only logprobs has a gradient


def _selective_logprobs_backward(ctx, dlogprobs, _dlse, _dentropy):
    logits, targets, mask, lse = ctx.saved_tensors
    if ctx.inplace_backward:  # no second [N, V] buffer: the logits become their own gradient
        selective_logprobs_bwd_inplace(dlogprobs, logits, targets, mask, lse, ctx.temperature)
        dlogits = logits
    else:
        dlogits = selective_logprobs_bwd(dlogprobs, logits, targets, mask, lse, ctx.temperature)
    return dlogits, None, None, None, None, None


selective_logprobs_fwd.register_autograd(_selective_logprobs_backward, setup_context=_selective_logprobs_setup_context)


# ----------------------------------------------------------------------------------------------
# fused_linear_logprobs as two ops: the forward keeps lse [N]; the backward recomputes the logits.


@torch.library.custom_op("gtacore::fused_linear_logprobs_fwd", mutates_args=())
def fused_linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None, temperature: float, chunk_size: int,
    fp32_grad_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(logprobs, lse), fp32 [N] each. chunk_size and fp32_grad_weight are for the backward."""
    return logprobs_chunks(hidden, weight, targets, mask, temperature, chunk_size)


@fused_linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, mask, temperature, chunk_size, fp32_grad_weight):
    N = hidden.shape[0]
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("gtacore::fused_linear_logprobs_bwd", mutates_args=())
def fused_linear_logprobs_bwd(
    dlogprobs: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None, lse: Tensor,
    temperature: float, chunk_size: int, fp32_grad_weight: bool, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_hidden [N, D] hidden dtype, grad_weight [V, D] weight dtype), each empty if not needed."""
    return logprobs_grad_chunks(dlogprobs, hidden, weight, targets, mask, lse, temperature, chunk_size,
                                fp32_grad_weight, need_grad_hidden, need_grad_weight)


@fused_linear_logprobs_bwd.register_fake
def _(dlogprobs, hidden, weight, targets, mask, lse, temperature, chunk_size, fp32_grad_weight,
      need_grad_hidden, need_grad_weight):
    return (hidden.new_empty(hidden.shape if need_grad_hidden else 0),
            weight.new_empty(weight.shape if need_grad_weight else 0))


def _fused_linear_logprobs_setup_context(ctx, inputs, output):
    hidden, weight, targets, mask, temperature, chunk_size, fp32_grad_weight = inputs
    _logprobs, lse = output
    ctx.save_for_backward(hidden, weight, targets, mask, lse)
    ctx.temperature, ctx.chunk_size, ctx.fp32_grad_weight = temperature, chunk_size, fp32_grad_weight
    ctx.mark_non_differentiable(lse)


def _fused_linear_logprobs_backward(ctx, dlogprobs, _dlse):
    hidden, weight, targets, mask, lse = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    grad_hidden, grad_weight = fused_linear_logprobs_bwd(
        dlogprobs, hidden, weight, targets, mask, lse, ctx.temperature, ctx.chunk_size, ctx.fp32_grad_weight,
        need_hidden, need_weight,
    )
    return grad_hidden if need_hidden else None, grad_weight if need_weight else None, None, None, None, None, None


fused_linear_logprobs_fwd.register_autograd(
    _fused_linear_logprobs_backward, setup_context=_fused_linear_logprobs_setup_context
)


# ----------------------------------------------------------------------------------------------
# fused_linear_gta_loss as one op: its forward returns the gradients, its backward scales them.


@torch.library.custom_op("gtacore::fused_linear_gta_loss", mutates_args=())
def fused_linear_gta_loss_op(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_kind: Tensor, old_logprobs: Tensor, advantages: Tensor,
    ref_logprobs: Tensor | None, sft_weight: Tensor, rl_weight: Tensor,
    eps_low: float, eps_high: float, beta: float, temperature: float, lambda_sft: float, lambda_rl: float,
    chunk_size: int, fp32_grad_weight: bool, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """gta_loss_chunks: the loss, its parts, the per-row stats and the gradients (need_grad_* must be
    True for an input that requires grad, as the registered backward returns these gradients)."""
    return gta_loss_chunks(hidden, weight, targets, row_kind, old_logprobs, advantages, ref_logprobs, sft_weight,
                           rl_weight, eps_low, eps_high, beta, temperature, lambda_sft, lambda_rl, chunk_size,
                           fp32_grad_weight, need_grad_hidden, need_grad_weight)


@fused_linear_gta_loss_op.register_fake
def _(hidden, weight, targets, row_kind, old_logprobs, advantages, ref_logprobs, sft_weight, rl_weight,
      eps_low, eps_high, beta, temperature, lambda_sft, lambda_rl, chunk_size, fp32_grad_weight,
      need_grad_hidden, need_grad_weight):
    N = hidden.shape[0]
    losses = [hidden.new_empty((), dtype=torch.float32) for _ in range(3)]
    stats = [hidden.new_empty(N, dtype=torch.bool if name == "clipped" else torch.float32) for name in STAT_NAMES]
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else 0)
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else 0,
                                   dtype=_grad_weight_dtype(weight, fp32_grad_weight))
    return (*losses, *stats, grad_hidden, grad_weight)


def _fused_linear_gta_loss_setup_context(ctx, inputs, output):
    *_, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])  # only the loss has a gradient


def _fused_linear_gta_loss_backward(ctx, dloss, *_):
    """The gradients were computed in the forward: scale them by the incoming d/d loss."""
    grad_hidden, grad_weight = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    grad_hidden = grad_hidden * dloss if need_hidden else None
    grad_weight = (grad_weight * dloss).to(ctx.weight_dtype) if need_weight else None
    return (grad_hidden, grad_weight) + (None,) * 17


fused_linear_gta_loss_op.register_autograd(
    _fused_linear_gta_loss_backward, setup_context=_fused_linear_gta_loss_setup_context
)
