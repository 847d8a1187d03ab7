"""gtacore.kernels.selective_logprobs against its float64 PyTorch reference."""

import importlib
import os

import torch

# Without CUDA the kernels run in Triton's CPU interpreter, which must be chosen before the kernels
# are defined; the poison flag fills kernel outputs with NaN so an unwritten element fails.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GTACORE_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from gtacore.kernels import selective_logprobs  # noqa: E402
from gtacore.kernels.selective_logprobs import selective_logprobs_reference  # noqa: E402

# The module, not the function of the same name that gtacore/kernels/__init__ exports.
selective_logprobs_module = importlib.import_module("gtacore.kernels.selective_logprobs")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per logits dtype. Values are computed in fp32 from the exact input values, so they
# share the fp32 bound; gradients are stored in the logits dtype and carry its rounding.
TOLERANCE = {
    torch.float32: {"value": (2e-5, 1e-5), "grad": (1e-6, 1e-5)},
    torch.float16: {"value": (2e-5, 1e-5), "grad": (2e-3, 2e-3)},
    torch.bfloat16: {"value": (2e-5, 1e-5), "grad": (1.5e-2, 1e-2)},
}


def make_mask(kind: str, N: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(N, device=DEVICE) < 0.6
    mask = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    if kind == "single":
        mask[N // 2] = True
    return mask  # "all_masked"


def check_against_reference(logits, targets, temperature, mask, tol=None):
    """Forward (logprobs, lse, entropy) and d logprobs / d logits vs float64, masked rows exactly 0."""
    tol = tol or TOLERANCE[logits.dtype]
    out = selective_logprobs(logits, targets, temperature, mask, with_entropy=True)
    upstream = torch.randn(logits.shape[0], device=logits.device)
    (grad,) = torch.autograd.grad(out.logprobs, logits, upstream)

    logits64 = logits.detach().double().requires_grad_()
    ref = selective_logprobs_reference(logits64, targets, temperature, mask, with_entropy=True)
    (ref_grad,) = torch.autograd.grad(ref.logprobs, logits64, upstream.double())

    atol, rtol = tol["value"]
    for name in ("logprobs", "lse", "entropy"):
        got = getattr(out, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), getattr(ref, name), atol=atol, rtol=rtol, msg=name)
    atol, rtol = tol["grad"]
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=rtol)
    if mask is not None:
        off = ~mask.bool()
        for name in ("logprobs", "lse", "entropy"):
            assert torch.equal(getattr(out, name)[off], torch.zeros_like(getattr(out, name)[off])), name
        assert torch.equal(grad[off], torch.zeros_like(grad[off]))
    return out, grad


@pytest.mark.parametrize("N,V", [(1, 1000), (37, 1531), (64, 2500)])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked", "single"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_fp32(N, V, mask_kind, temperature):
    torch.manual_seed(N * V)
    logits = (3 * torch.randn(N, V, device=DEVICE)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    check_against_reference(logits, targets, temperature, make_mask(mask_kind, N))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype):
    torch.manual_seed(1)
    N, V = 37, 1531
    logits = (3 * torch.randn(N, V, device=DEVICE)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    out, grad = check_against_reference(logits, targets, 0.7, make_mask("random", N))
    assert grad.dtype == dtype


@pytest.mark.parametrize("layout", ["column_slice", "every_other_row", "transposed"])
def test_strided_logits(layout):
    torch.manual_seed(2)
    N, V = 37, 1531
    view = {  # the [N, V] logits as a view of a bigger leaf tensor
        "column_slice": (lambda big: big[:, :V], (N, V + 77)),  # stride(0) = V + 77
        "every_other_row": (lambda big: big[::2], (2 * N, V)),  # stride(0) = 2V
        "transposed": (lambda big: big.T, (V, N)),  # stride(1) != 1: made contiguous
    }
    take, shape = view[layout]
    base = (3 * torch.randn(shape, device=DEVICE)).requires_grad_()
    logits = take(base)
    assert logits.shape == (N, V) and (logits.stride(0) != V or logits.stride(1) != 1)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    mask, upstream = make_mask("random", N), torch.randn(N, device=DEVICE)
    out = selective_logprobs(logits, targets, 1.0, mask, with_entropy=True)
    (grad,) = torch.autograd.grad(out.logprobs, base, upstream)
    ref_base = base.detach().double().requires_grad_()
    ref = selective_logprobs_reference(take(ref_base), targets, 1.0, mask, with_entropy=True)
    (ref_grad,) = torch.autograd.grad(ref.logprobs, ref_base, upstream.double())
    torch.testing.assert_close(out.logprobs.double(), ref.logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


def test_masked_rows_are_not_read():
    torch.manual_seed(3)
    N, V = 9, 1000
    logits = (3 * torch.randn(N, V, device=DEVICE)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1], device=DEVICE)  # int mask
    poisoned = logits.detach().clone()
    poisoned[mask == 0] = float("nan")
    poisoned[1, 5] = float("inf")
    poisoned = poisoned.requires_grad_()
    bad_targets = torch.where(mask.bool(), targets, -100)
    clean = selective_logprobs(logits, targets, 1.0, mask, with_entropy=True)
    dirty = selective_logprobs(poisoned, bad_targets, 1.0, mask, with_entropy=True)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    (grad,) = torch.autograd.grad(dirty.logprobs.sum(), poisoned)
    assert torch.isfinite(grad).all() and torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))


def test_inplace_backward():
    torch.manual_seed(4)
    N, V = 37, 1531
    logits = (3 * torch.randn(N, V, device=DEVICE)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    mask, upstream = make_mask("random", N), torch.randn(N, device=DEVICE)
    (expected,) = torch.autograd.grad(selective_logprobs(logits, targets, 0.7, mask).logprobs, logits, upstream)
    buffer = logits.detach().clone().requires_grad_()
    out = selective_logprobs(buffer, targets, 0.7, mask, inplace_backward=True)
    (grad,) = torch.autograd.grad(out.logprobs, buffer, upstream)
    assert grad.data_ptr() == buffer.data_ptr()  # written over the logits, no second [N, V] buffer
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)
    torch.testing.assert_close(buffer.detach(), expected, atol=0, rtol=0)


def test_extreme_logits():
    """Large magnitudes and -inf entries (a banned token) stay finite and match the reference."""
    torch.manual_seed(5)
    N, V = 8, 2500
    logits = 200 * torch.randn(N, V, device=DEVICE)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    logits[:, 7] = float("-inf")
    targets[targets == 7] = 8
    logits[0] = 0.0  # a uniform row: entropy log V
    logits.requires_grad_()
    # fp32 x - lse loses about log2|x| bits: at |x| ~ 800 absolute errors reach ~1e-4.
    out, grad = check_against_reference(logits, targets, 1.0, None, {"value": (1e-4, 1e-5), "grad": (1e-4, 1e-4)})
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.entropy[0].item(), torch.tensor(V).log().item(), atol=1e-5, rtol=0)


def test_out_of_range_target_gives_nan_only_there():
    N, V = 4, 1000
    logits = torch.randn(N, V, device=DEVICE)
    targets = torch.tensor([1, V, 3, -1], device=DEVICE)
    out = selective_logprobs(logits, targets)
    assert out.logprobs[[1, 3]].isnan().all() and out.logprobs[[0, 2]].isfinite().all()


def test_only_logprobs_is_differentiable():
    logits = torch.randn(5, 1000, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 1000, (5,), device=DEVICE)
    out = selective_logprobs(logits, targets, with_entropy=True)
    assert out.logprobs.requires_grad and not out.lse.requires_grad and not out.entropy.requires_grad
    assert selective_logprobs(logits, targets).entropy is None


def test_outputs_are_poisoned_before_the_kernel_writes():
    assert torch.isnan(selective_logprobs_module._new_output((3,), torch.float32, DEVICE)).all()


def test_reference_fallback(monkeypatch):
    torch.manual_seed(6)
    logits = torch.randn(6, 1000, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 1000, (6,), device=DEVICE)
    mask = make_mask("random", 6)
    fast = selective_logprobs(logits, targets, 0.7, mask, with_entropy=True)
    monkeypatch.setattr(selective_logprobs_module, "triton_runs_on", lambda tensor: False)
    slow = selective_logprobs(logits, targets, 0.7, mask, with_entropy=True)
    assert slow.logprobs.grad_fn is not None and fast.logprobs.grad_fn is not None
    assert type(slow.logprobs.grad_fn).__name__ != type(fast.logprobs.grad_fn).__name__
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("V", [49152, 128256, 151936])
def test_bf16_error_at_most_twice_pytorch(V):
    """Kernel vs fp32 reference, at most ~2x as far as PyTorch's own bf16 computation."""
    torch.manual_seed(V)
    N, T = 512, 0.7
    logits = (3 * torch.randn(N, V, device="cuda")).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    upstream = torch.randn(N, device="cuda")
    mask = torch.rand(N, device="cuda") < 0.8

    ours = selective_logprobs(logits, targets, T, mask).logprobs
    (ours_grad,) = torch.autograd.grad(ours, logits, upstream)
    torch_bf16 = torch.log_softmax(logits / T, -1).gather(-1, targets[:, None]).squeeze(-1) * mask
    (torch_grad,) = torch.autograd.grad(torch_bf16, logits, upstream.bfloat16())
    logits32 = logits.detach().float().requires_grad_()
    ref = selective_logprobs_reference(logits32, targets, T, mask).logprobs
    (ref_grad,) = torch.autograd.grad(ref, logits32, upstream)

    def error(a, b):  # relative Frobenius norm: every element counts, not just the largest
        return ((a.float() - b).norm() / b.norm()).item()

    assert error(ours, ref) <= 2 * error(torch_bf16, ref)
    assert error(ours_grad, ref_grad) <= 2 * error(torch_grad, ref_grad)
