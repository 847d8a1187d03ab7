"""gtacore.kernels.fused_linear: chunked LM head + kernels against the unchunked float64 path."""

import importlib
import os

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GTACORE_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from gtacore.kernels import LossSettings, fused_linear_gta_loss, fused_linear_logprobs  # noqa: E402
from gtacore.kernels.fused_linear import (  # noqa: E402
    default_chunk_size,
    fused_linear_gta_loss_reference,
    fused_linear_logprobs_reference,
)

fused_linear_module = importlib.import_module("gtacore.kernels.fused_linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V, D = 37, 1531, 24
T = 0.7  # temperature of every call, and of the log-probs the old/ref ones are drawn around
AT_T = LossSettings(temperature=T)
VALUE_TOL = dict(atol=2e-5, rtol=1e-5)  # fp32 kernels and matmuls vs float64


def assert_grad_close(got, want):
    """fp32 gradient vs float64: rounding in the length-V and length-D sums grows with the gradient's
    size, so atol is relative to its largest entry (the plain fp32 matmul path is itself 2.7e-6 off at
    max |g| = 7.4 on some CPUs' matmul blocking). A wrong gradient is off by O(|g|)."""
    torch.testing.assert_close(got.double(), want, atol=1e-6 * max(1.0, want.abs().max().item()), rtol=1e-5)


def make_inputs(seed=0, dtype=torch.float32, shape=(N, V, D)):
    N, V, D = shape
    torch.manual_seed(seed)
    hidden = torch.randn(N, D, device=DEVICE, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, device=DEVICE) / D**0.5 * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    row_kind = torch.randint(0, 3, (N,), device=DEVICE)
    logp = fused_linear_logprobs_reference(hidden.detach().float(), weight.detach().float(), targets, T)
    old = logp + 0.5 * torch.randn(N, device=DEVICE)
    ref = logp + 0.3 * torch.randn(N, device=DEVICE)
    advantages = torch.randn(N, device=DEVICE)
    return hidden, weight, targets, row_kind, old, advantages, ref


def as_float64_leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("chunk_size", [1, 7, N, None])
def test_logprobs_match_unchunked(chunk_size):
    hidden, weight, targets, row_kind, *_ = make_inputs(1)
    mask, upstream = row_kind != 0, torch.randn(N, device=DEVICE)
    logprobs = fused_linear_logprobs(hidden, weight, targets, T, mask, chunk_size)
    grads = torch.autograd.grad(logprobs, (hidden, weight), upstream)
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    expected = fused_linear_logprobs_reference(hidden64, weight64, targets, T, mask)
    expected_grads = torch.autograd.grad(expected, (hidden64, weight64), upstream.double())
    torch.testing.assert_close(logprobs.double(), expected, **VALUE_TOL)
    assert torch.equal(logprobs[~mask], torch.zeros_like(logprobs[~mask]))
    for got, want in zip(grads, expected_grads):
        assert_grad_close(got, want)


@pytest.mark.parametrize("chunk_size", [1, 7, N, None])
@pytest.mark.parametrize("agg,beta", [("token_mean", 0.0), ("token_mean", 0.05), ("seq_mean", 0.05), ("constant", 0.0)])
def test_gta_loss_matches_unchunked(chunk_size, agg, beta):
    hidden, weight, targets, row_kind, old, advantages, ref = make_inputs(2)
    kwargs = dict(settings=LossSettings(lambda_sft=0.7, lambda_rl=1.3, eps_low=0.2, eps_high=0.28, beta=beta,
                                        temperature=T, agg=agg, loss_normalizer=40.0),
                  seq_ids=torch.arange(N, device=DEVICE) // 6)
    ref = ref if beta else None
    out = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, ref,
                                chunk_size=chunk_size, **kwargs)
    grads = torch.autograd.grad(3.0 * out.loss, (hidden, weight))  # a non-unit upstream grad
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    expected = fused_linear_gta_loss_reference(hidden64, weight64, targets, row_kind, old, advantages, ref, **kwargs)
    expected_grads = torch.autograd.grad(3.0 * expected.loss, (hidden64, weight64))
    for name in ("loss", "sft_loss", "rl_loss"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(expected, name), **VALUE_TOL, msg=name)
    assert not out.sft_loss.requires_grad and not out.rl_loss.requires_grad
    for name, value in out.stats.items():
        torch.testing.assert_close(value.double(), expected.stats[name].double(), **VALUE_TOL, msg=name)
    for got, want in zip(grads, expected_grads):
        assert_grad_close(got, want)


def test_tied_weights_get_both_gradients():
    """The LM head shares the embedding: the grad must reach the one shared tensor from both uses."""
    _, weight, targets, row_kind, _, advantages, _ = make_inputs(3)
    token_ids = torch.randint(0, V, (N,), device=DEVICE)
    mixer = torch.randn(D, D, device=DEVICE, requires_grad=True)

    def model(weight, mixer):
        return torch.tanh(weight[token_ids] @ mixer)  # [N, D]: a one-layer "model" on the embedding

    with torch.no_grad():
        logp = fused_linear_logprobs_reference(model(weight, mixer), weight, targets, T)
        old = logp + 0.3 * torch.randn(N, device=DEVICE)

    def total_loss(weight, mixer, loss_fn, **kwargs):
        return loss_fn(model(weight, mixer), weight, targets, row_kind, old, advantages, settings=AT_T, **kwargs).loss

    loss = total_loss(weight, mixer, fused_linear_gta_loss, chunk_size=7)
    grads = torch.autograd.grad(loss, (weight, mixer))
    weight64, mixer64 = as_float64_leaves(weight, mixer)
    expected = total_loss(weight64, mixer64, fused_linear_gta_loss_reference)
    expected_grads = torch.autograd.grad(expected, (weight64, mixer64))
    torch.testing.assert_close(loss.double(), expected, **VALUE_TOL)
    for got, want in zip(grads, expected_grads):
        assert_grad_close(got, want)


def test_frozen_weight_and_no_grad():
    hidden, weight, targets, row_kind, old, advantages, _ = make_inputs(4)
    weight = weight.detach()
    out = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, settings=AT_T, chunk_size=7)
    (grad,) = torch.autograd.grad(out.loss, hidden)
    hidden64 = hidden.detach().double().requires_grad_()
    expected = fused_linear_gta_loss_reference(hidden64, weight.double(), targets, row_kind, old, advantages,
                                               settings=AT_T)
    (expected_grad,) = torch.autograd.grad(expected.loss, hidden64)
    assert_grad_close(grad, expected_grad)
    with torch.no_grad():
        loss = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, settings=AT_T).loss
    torch.testing.assert_close(loss.double(), expected.loss.detach(), **VALUE_TOL)


def check_bf16_error_at_most_twice_pytorch(shape, chunk_size, fp32_grad_weight):
    """bf16 hidden and weight: within 2x of the plain bf16 PyTorch path's distance to float64."""
    hidden, weight, targets, row_kind, old, advantages, _ = make_inputs(5, torch.bfloat16, shape)
    out = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, settings=AT_T,
                                chunk_size=chunk_size, fp32_grad_weight=fp32_grad_weight)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    plain = fused_linear_gta_loss_reference(hidden, weight, targets, row_kind, old, advantages, settings=AT_T)
    plain_grads = torch.autograd.grad(plain.loss, (hidden, weight))
    hidden64, weight64 = as_float64_leaves(hidden, weight)
    expected = fused_linear_gta_loss_reference(hidden64, weight64, targets, row_kind, old, advantages, settings=AT_T)
    expected_grads = torch.autograd.grad(expected.loss, (hidden64, weight64))

    def error(a, b):  # relative Frobenius norm: every element counts, not just the largest
        return ((a.double() - b).norm() / b.norm()).item()

    assert error(out.loss, expected.loss) <= 2 * error(plain.loss, expected.loss) + 1e-7
    for got, torch_bf16, want in zip(grads, plain_grads, expected_grads):
        assert got.dtype == torch.bfloat16
        assert error(got, want) <= 2 * error(torch_bf16, want)


@pytest.mark.parametrize("fp32_grad_weight", [True, False])
def test_bf16_error_at_most_twice_pytorch(fp32_grad_weight):
    # Triton 3.7's interpreter converts fp32 -> bf16 by truncation where CUDA rounds to nearest
    # even; in relative norm that stays well inside the bound.
    check_bf16_error_at_most_twice_pytorch((N, V, D), 7, fp32_grad_weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("V_real", [49152, 128256, 151936])
def test_bf16_real_vocab_at_most_twice_pytorch(V_real):
    check_bf16_error_at_most_twice_pytorch((1024, V_real, 896), None, True)


def test_default_chunk_size():
    assert default_chunk_size(65536, 151936, 3584) == -(-65536 * 3584 // 151936)  # ~N*D/V rows
    assert default_chunk_size(4096, 151936, 576) == 256  # the minimum
    assert default_chunk_size(37, 1531, 24) == 37  # at most N


def test_reference_fallback(monkeypatch):
    hidden, weight, targets, row_kind, old, advantages, _ = make_inputs(6)
    fast = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, settings=AT_T)
    monkeypatch.setattr(fused_linear_module, "triton_runs_on", lambda tensor: False)
    slow = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, settings=AT_T)
    assert type(fast.loss.grad_fn).__name__ != type(slow.loss.grad_fn).__name__
    torch.testing.assert_close(fast.loss, slow.loss, **VALUE_TOL)
    torch.testing.assert_close(
        fused_linear_logprobs(hidden, weight, targets), fused_linear_logprobs_reference(hidden, weight, targets)
    )
