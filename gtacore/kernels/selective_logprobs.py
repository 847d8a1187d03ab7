"""Selective log-probs: log softmax(logits / T) at one target per row, without a [N, V] copy.

For each selected row i (mask[i] true), with x = logits[i] / T:

    lse[i]      = log sum_v exp(x_v)
    logprobs[i] = x[targets[i]] - lse[i]
    entropy[i]  = lse[i] - sum_v softmax(x)_v x_v          (a statistic: no gradient)
    d logprobs[i] / d logits[i, v] = (onehot(targets[i])_v - softmax(x)_v) / T

Rows with mask[i] false are never read: their outputs and gradient are 0.

Design. The forward kernel makes one pass over each selected row, keeping an online max m,
s = sum exp(x - m) and t = sum exp(x - m) (x - m) (so entropy = log s - t / s with no large
cancellation); it reads the target logit once more and saves lse [N]. The backward kernel reads
the row again and writes dlogits already scaled by the incoming dL/dlogprobs [N], so the upstream
gradient costs nothing extra. Memory traffic, with S selected rows and b bytes per logit:
forward S*V*b read, backward S*V*b read + N*V*b written (masked rows get zeros, unread): the
floor for a softmax gradient. Everything is accumulated in fp32; no fp32 [N, V] copy is made.
With inplace_backward=True the gradient overwrites the logits buffer (no second [N, V] buffer);
the caller must not use the logits afterwards.

Custom ops. The launchers run as PyTorch custom operators (torch.ops.gtacore.selective_logprobs_*,
registered in `gtacore.kernels.ops`), which the public function calls: torch.compile sees each
kernel as one opaque node and FakeTensorMode runs it.

Without Triton (no triton package, or CPU tensors without TRITON_INTERPRET=1) the public
function runs `selective_logprobs_reference` instead, plain PyTorch, no custom op.
"""

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS: only the plain-PyTorch references run
    from types import SimpleNamespace

    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, next_power_of_2=None)
    tl = SimpleNamespace(constexpr=None)

# triton.jit picks the interpreter when the kernels are defined, so read the switch once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class LogProbs(NamedTuple):
    logprobs: torch.Tensor  # [N] fp32, differentiable
    lse: torch.Tensor  # [N] fp32, log-sum-exp of logits / T
    entropy: torch.Tensor | None  # [N] fp32, entropy of softmax(logits / T); None unless asked


def selective_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> LogProbs:
    """Plain PyTorch: log_softmax in fp32 (fp64 for fp64 logits) and gather. Shapes as the kernel."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    # Masked rows may hold anything (inf, NaN, out-of-range targets): zero them before use.
    x = logits.to(compute_dtype).masked_fill(~keep[:, None], 0.0) / temperature  # [N, V]
    log_softmax = torch.log_softmax(x, dim=-1)  # [N, V]
    safe_targets = torch.where(keep, targets, 0)
    logprobs = log_softmax.gather(-1, safe_targets[:, None]).squeeze(-1)  # [N]
    lse = torch.logsumexp(x.detach(), dim=-1)
    entropy = None
    if with_entropy:
        entropy = torch.special.entr(log_softmax.detach().exp()).sum(-1)  # entr(0) = 0, no 0 * -inf
        entropy = torch.where(keep, entropy, 0.0)
    return LogProbs(torch.where(keep, logprobs, 0.0), torch.where(keep, lse, 0.0), entropy)


@triton.jit
def _selective_logprobs_fwd_kernel(
    logits_ptr, targets_ptr, mask_ptr, logprobs_ptr, lse_ptr, entropy_ptr,
    stride_row, V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    keep = True
    if mask_ptr is not None:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        row_ptr = logits_ptr + row * stride_row
        m = -float("inf")  # running max of x = logits / T
        s = 0.0  # sum exp(x - m)
        t = 0.0  # sum exp(x - m) * (x - m), for the entropy
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            if entropy_ptr is not None:
                # Re-centre t on m_new: sum e^(x-m)(x-m) -> alpha * (t + (m - m_new) s).
                # The where()s keep 0 * inf out: first block (m = -inf, s = 0), padded lanes.
                t = alpha * (t + tl.where(s > 0, m - m_new, 0.0) * s)
                t += tl.sum(e * tl.where(e > 0, x - m_new, 0.0), axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(targets_ptr + row)
        # An out-of-range target gives NaN rather than an out-of-bounds read.
        valid = (target >= 0) & (target < V)
        target_x = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32) * inv_temperature
        tl.store(logprobs_ptr + row, target_x - lse)
        tl.store(lse_ptr + row, lse)
        if entropy_ptr is not None:
            tl.store(entropy_ptr + row, tl.log(s) - t / s)
    else:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if entropy_ptr is not None:
            tl.store(entropy_ptr + row, 0.0)


@triton.jit
def _selective_logprobs_bwd_kernel(
    logits_ptr, targets_ptr, mask_ptr, lse_ptr, dlogprobs_ptr, dlogits_ptr,
    stride_row, stride_grad_row, V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    grad_row_ptr = dlogits_ptr + row * stride_grad_row
    keep = True
    if mask_ptr is not None:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        row_ptr = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        target = tl.load(targets_ptr + row)
        scale = tl.load(dlogprobs_ptr + row).to(tl.float32) * inv_temperature
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_temperature
            probs = tl.exp(x - lse)
            grad = (tl.where(cols == target, 1.0, 0.0) - probs) * scale
            tl.store(grad_row_ptr + cols, grad.to(dlogits_ptr.dtype.element_ty), mask=cols < V)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_V], dtype=tl.float32), mask=cols < V)


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor (else the references are used).

    A fake CUDA tensor (FakeTensorMode, torch.compile's tracing) counts as CUDA, so the custom ops
    are picked and their fake implementations run: `is_cuda` reads the tensor's device field and
    makes no CUDA call, so this works on a machine without CUDA.
    """
    return HAS_TRITON and (tensor.is_cuda or INTERPRET)


def _block_config(V: int, element_size: int) -> tuple[int, int]:
    """BLOCK_V and num_warps.

    CUDA: 4096 (2-byte logits) or 2048 (4-byte) columns per step with 8 warps, i.e. 16 or 8
    elements = 32 bytes per thread per load: wide enough for vector loads, small enough to keep
    registers low. Chosen for H100 without autotune (the interpreter cannot run multi-config).
    Interpreter: 1024, large for speed yet smaller than the test vocabularies (1000-3000), so the
    online max/sum-exp across several blocks and a ragged last block are exercised on CPU.
    """
    block = 1024 if INTERPRET else (4096 if element_size <= 2 else 2048)
    return min(block, triton.next_power_of_2(V)), 8


def _new_output(shape, dtype, device) -> torch.Tensor:
    # GTACORE_POISON_OUTPUTS=1 (the tests) fills outputs with NaN, so an element a kernel forgot
    # to write fails the comparison instead of passing by luck.
    if os.environ.get("GTACORE_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_forward(logits, targets, mask, temperature, with_entropy):
    """Launch the forward kernel. logits [N, V] with stride(1) == 1. Returns fp32 [N] tensors."""
    N, V = logits.shape
    logprobs = _new_output((N,), torch.float32, logits.device)
    lse = _new_output((N,), torch.float32, logits.device)
    entropy = _new_output((N,), torch.float32, logits.device) if with_entropy else None
    if N == 0:
        return logprobs, lse, entropy
    block_v, num_warps = _block_config(V, logits.element_size())
    _selective_logprobs_fwd_kernel[(N,)](
        logits, targets, mask, logprobs, lse, entropy,
        logits.stride(0), V, 1.0 / temperature,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return logprobs, lse, entropy


def _rows_backward(logits, targets, mask, lse, dlogprobs, temperature, dlogits):
    """Launch the backward kernel, writing dL/dlogits into `dlogits` (may be `logits` itself)."""
    N, V = logits.shape
    if N == 0:
        return dlogits
    block_v, num_warps = _block_config(V, logits.element_size())
    _selective_logprobs_bwd_kernel[(N,)](
        logits, targets, mask, lse, dlogprobs.contiguous(), dlogits,
        logits.stride(0), dlogits.stride(0), V, 1.0 / temperature,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return dlogits


def _prepare(logits, targets, mask):
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {logits.shape} and {targets.shape}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    mask = None if mask is None else mask.bool().contiguous()
    return logits, targets.contiguous(), mask


def selective_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    with_entropy: bool = False,
    inplace_backward: bool = False,
) -> LogProbs:
    """Log-prob of each row's target under softmax(logits / T), without an fp32 [N, V] copy.

    logits: [N, V] bf16/fp16/fp32 (fp64 works too), rows may be strided (stride(1) must be 1 or
        the tensor is made contiguous). targets: [N] long, in [0, V) on selected rows.
    mask: [N] bool/int, rows to compute (None = all); other rows are not read and give 0.
    Returns LogProbs(logprobs [N] fp32, lse [N] fp32, entropy [N] fp32 or None); only logprobs
    is differentiable. inplace_backward=True writes dL/dlogits into the logits buffer: the
    logits must not be used after the backward pass.
    """
    if not triton_runs_on(logits):
        return selective_logprobs_reference(logits, targets, temperature, mask, with_entropy)
    # Checks and layout before the op: the op saves its inputs for the backward, so a strided
    # logits is made contiguous once, here, and the backward reads the same copy.
    logits, targets, mask = _prepare(logits, targets, mask)
    logprobs, lse, entropy = torch.ops.gtacore.selective_logprobs_fwd(
        logits, targets, mask, float(temperature), with_entropy, inplace_backward
    )
    return LogProbs(logprobs, lse, entropy if with_entropy else None)
