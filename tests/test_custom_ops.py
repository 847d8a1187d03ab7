"""The kernels as torch.library custom ops (namespace gtacore): opcheck, torch.compile, FakeTensorMode.

- opcheck runs each op through torch.library.opcheck's default tests: test_schema (no undeclared
  mutation or aliasing), test_autograd_registration, test_faketensor (the fake implementation
  agrees with the real one on shapes, dtypes and strides) and test_aot_dispatch_dynamic (the op
  traced by AOTAutograd with dynamic shapes, its gradient included, equals eager).
- torch.compile(fullgraph=True) of a loss step over every public function equals eager: a graph
  break would raise.
- Under FakeTensorMode with fake CUDA tensors (no CUDA needed) each public function picks the op
  path and returns outputs of the right shapes and dtypes, fp32 and bf16.
"""

import os

import torch

# As in the other kernel tests: the Triton CPU interpreter where there is no GPU (chosen before
# triton is imported), and kernel outputs filled with NaN before the kernels write them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GTACORE_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402

from gtacore.kernels import (  # noqa: E402
    LossSettings,
    fused_linear_gta_loss,
    fused_linear_logprobs,
    gta_loss,
    selective_logprobs,
)
from gtacore.kernels.gta_loss import RL, gta_row_loss_grad, gta_row_losses, gta_row_weights  # noqa: E402
from gtacore.kernels.selective_logprobs import HAS_TRITON, triton_runs_on  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.gtacore
# The real implementations launch Triton kernels: on CPU only in the interpreter (CI sets it).
needs_kernels = pytest.mark.skipif(
    not triton_runs_on(torch.empty(0, device=DEVICE)),
    reason="the ops' kernels need CUDA or TRITON_INTERPRET=1 (which CI sets)",
)


def row_inputs(N, V, seed=0):
    """targets, row_kind (0 ignore, 1 SFT, 2 RL), old / ref log-probs and advantages [N]."""
    torch.manual_seed(seed)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    row_kind = torch.arange(N, device=DEVICE) % 3  # every kind present
    old = -4.0 + 0.5 * torch.randn(N, device=DEVICE)
    ref = -4.0 + 0.3 * torch.randn(N, device=DEVICE)
    advantages = torch.randn(N, device=DEVICE)
    return targets, row_kind, old, ref, advantages


# ----------------------------------------------------------------------------------------------
# opcheck: tiny shapes (N=6 rows, V=40, D=8), as the interpreter runs each kernel many times.

N, V, D = 6, 40, 8


def selective_fwd_args(dtype, mask_kind, with_entropy, inplace_backward):
    targets, row_kind, *_ = row_inputs(N, V)
    logits = torch.randn(N, V, device=DEVICE).to(dtype).requires_grad_()
    mask = {"none": None, "bool": row_kind != 0, "int": (row_kind != 0).int()}[mask_kind]
    return logits, targets, mask, 0.7, with_entropy, inplace_backward


def selective_bwd_args(mask_kind):
    logits, targets, mask, temperature, *_ = selective_fwd_args(torch.float32, mask_kind, False, False)
    lse = torch.logsumexp(logits.detach() / temperature, dim=-1)
    return torch.randn(N, device=DEVICE), logits.detach(), targets, mask, lse, temperature


def fused_inputs(dtype=torch.float32):
    hidden = torch.randn(N, D, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=DEVICE) / D**0.5).to(dtype).requires_grad_()
    return hidden, weight


def fused_logprobs_bwd_args(need_hidden, need_weight, fp32_grad_weight):
    hidden, weight = fused_inputs()
    targets, row_kind, *_ = row_inputs(N, V)
    lse = torch.logsumexp(hidden.detach() @ weight.detach().T / 0.7, dim=-1)
    return (torch.randn(N, device=DEVICE), hidden.detach(), weight.detach(), targets, row_kind != 0, lse, 0.7, 4,
            fp32_grad_weight, need_hidden, need_weight)


def fused_gta_args(with_ref, need, fp32_grad_weight):
    hidden, weight = fused_inputs()
    if not need:  # as under torch.no_grad(): the public function asks for no gradient
        hidden, weight = hidden.detach(), weight.detach()
    targets, row_kind, old, ref, advantages = row_inputs(N, V)
    sft_weight, rl_weight = gta_row_weights(row_kind)
    beta = 0.05 if with_ref else 0.0
    scalars = (0.2, 0.28, beta, 0.7, 0.7, 1.3)  # eps_low, eps_high, beta, temperature, lambda_sft, lambda_rl
    return (hidden, weight, targets, row_kind, old, advantages, ref if with_ref else None, sft_weight, rl_weight,
            *scalars, 4, fp32_grad_weight, need, need)


OPCHECK_CASES = {
    "selective_fwd": (ops.selective_logprobs_fwd, lambda: selective_fwd_args(torch.float32, "none", False, False)),
    "selective_fwd_bf16_mask_entropy": (
        ops.selective_logprobs_fwd, lambda: selective_fwd_args(torch.bfloat16, "bool", True, False)),
    "selective_fwd_int_mask_inplace": (
        ops.selective_logprobs_fwd, lambda: selective_fwd_args(torch.float32, "int", True, True)),
    "selective_bwd": (ops.selective_logprobs_bwd, lambda: selective_bwd_args("none")),
    "selective_bwd_mask": (ops.selective_logprobs_bwd, lambda: selective_bwd_args("bool")),
    "selective_bwd_inplace": (ops.selective_logprobs_bwd_inplace, lambda: selective_bwd_args("bool")),
    "fused_logprobs_fwd": (ops.fused_linear_logprobs_fwd, lambda: (*fused_inputs(), row_inputs(N, V)[0], None,
                                                                   0.7, 4, True)),
    "fused_logprobs_fwd_bf16_mask": (
        ops.fused_linear_logprobs_fwd,
        lambda: (*fused_inputs(torch.bfloat16), row_inputs(N, V)[0], row_inputs(N, V)[1] != 0, 0.7, 4, False)),
    "fused_logprobs_bwd": (ops.fused_linear_logprobs_bwd, lambda: fused_logprobs_bwd_args(True, True, True)),
    "fused_logprobs_bwd_hidden_only": (
        ops.fused_linear_logprobs_bwd, lambda: fused_logprobs_bwd_args(True, False, True)),
    "fused_logprobs_bwd_weight_only": (
        ops.fused_linear_logprobs_bwd, lambda: fused_logprobs_bwd_args(False, True, False)),
    "fused_gta_loss": (ops.fused_linear_gta_loss, lambda: fused_gta_args(True, True, True)),
    "fused_gta_loss_no_ref_weight_dtype_accumulator": (
        ops.fused_linear_gta_loss, lambda: fused_gta_args(False, True, False)),
    "fused_gta_loss_no_grads": (ops.fused_linear_gta_loss, lambda: fused_gta_args(True, False, True)),
}


@needs_kernels
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(op, make_args())  # the four default tests; raises on a failure


def test_closed_form_loss_grad_matches_autograd():
    """gta_row_loss_grad (what the fused op uses, as autograd is off inside an op) against autograd
    through gta_row_losses, in float64 with NaN in every input that a row's kind does not read."""
    torch.manual_seed(1)
    n = 600
    row_kind = torch.randint(0, 3, (n,))
    logp = (-3 * torch.rand(n, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(n, dtype=torch.float64)  # ratios on both sides of the clip
    ref = logp.detach() + 0.3 * torch.randn(n, dtype=torch.float64)
    advantages = torch.randn(n, dtype=torch.float64)
    advantages[::13] = 0.0
    not_rl = row_kind != RL
    old, ref, advantages = (torch.where(not_rl, float("nan"), t) for t in (old, ref, advantages))
    sft_weight, rl_weight = (w.double() for w in gta_row_weights(row_kind, "seq_mean", torch.arange(n) // 7))
    for beta, ref_logprobs in ((0.0, None), (0.0, ref), (0.05, ref)):
        sft_loss, rl_loss, token = gta_row_losses(logp, row_kind, old, advantages, ref_logprobs, sft_weight, rl_weight,
                                                  0.2, 0.28, beta)
        (expected,) = torch.autograd.grad(0.7 * sft_loss + 1.3 * rl_loss, logp)
        got = gta_row_loss_grad(logp.detach(), row_kind, token, advantages, ref_logprobs, sft_weight, rl_weight,
                                beta, 0.7, 1.3)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        assert token.clipped.any() and (~token.clipped & ~not_rl).any()


# ----------------------------------------------------------------------------------------------
# torch.compile: one graph for the whole loss step, forward and backward, equal to eager.


@needs_kernels
def test_compiled_loss_step_matches_eager():
    """fullgraph=True raises on any graph break. Backend: inductor (its CPU C++ compile takes ~20 s
    here from a cold cache, ~4 s warm: fine for one test). The backward is not inside the compiled function
    (a .backward() there is a graph break): AOTAutograd compiles the backward graph with the
    forward, and the .backward() below runs it, through the ops' registered backward formulas."""
    N, V, D = 12, 64, 8
    targets, row_kind, old, ref, advantages = row_inputs(N, V, seed=2)
    seq_ids = torch.arange(N, device=DEVICE) // 4
    settings = LossSettings(lambda_sft=0.7, lambda_rl=1.3, eps_high=0.28, beta=0.05, temperature=0.7, agg="seq_mean")
    upstream = torch.randn(N, device=DEVICE)

    def loss_step(hidden, weight, logits):
        fused = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, ref, settings,
                                      seq_ids=seq_ids, chunk_size=5)
        logprobs = fused_linear_logprobs(hidden, weight, targets, 0.7, row_kind != 0, chunk_size=5)
        unfused = gta_loss(logits, targets, row_kind, old, advantages, ref, settings, seq_ids=seq_ids)
        selected = selective_logprobs(logits, targets, 0.7, row_kind != 0, with_entropy=True)
        total = (fused.loss + (logprobs * upstream).sum() + unfused.sft_loss + unfused.rl_loss
                 + (selected.logprobs * upstream).sum())
        return total, fused.stats["ratio"], selected.entropy

    torch.manual_seed(3)
    leaves = (torch.randn(N, D, device=DEVICE), torch.randn(V, D, device=DEVICE) / D**0.5,
              torch.randn(N, V, device=DEVICE))  # hidden, weight, logits

    def outputs_and_grads(fn):
        inputs = [t.clone().requires_grad_() for t in leaves]
        outputs = fn(*inputs)
        outputs[0].backward()
        return [t.detach() for t in outputs] + [t.grad for t in inputs]

    eager = outputs_and_grads(loss_step)
    compiled = outputs_and_grads(torch.compile(loss_step, fullgraph=True, backend="inductor"))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# FakeTensorMode: shapes and dtypes without running a kernel, on fake CUDA tensors.


def fake_batch(device, dtype, requires_grad):
    """Inside a FakeTensorMode: a batch of fake tensors (N=10, V=50, D=8) on `device`."""
    N, V, D = 10, 50, 8
    logits, hidden, weight = (torch.empty(shape, device=device, dtype=dtype, requires_grad=requires_grad)
                              for shape in ((N, V), (N, D), (V, D)))
    targets = torch.zeros(N, dtype=torch.long, device=device)
    row_kind = torch.arange(N, device=device) % 3
    old, ref, advantages = (torch.zeros(N, device=device) for _ in range(3))
    seq_ids = torch.arange(N, device=device) // 5
    return logits, hidden, weight, targets, row_kind, old, ref, advantages, seq_ids


def check(tensor, shape, dtype, device):
    assert isinstance(tensor, FakeTensor)  # made by a fake implementation: no kernel ran
    assert tuple(tensor.shape) == shape and tensor.dtype == dtype and tensor.device.type == device


@pytest.mark.skipif(not HAS_TRITON, reason="without triton the public functions never pick the ops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_fake_cuda_tensors(dtype, agg):
    """Forward only: on a CPU-only torch build, autograd on a fake CUDA tensor (even x * 2) aborts
    the process, as the autograd engine wants a CUDA device guard; test_fake_autograd covers it."""
    settings = LossSettings(beta=0.05, agg=agg)
    N, V, D = 10, 50, 8
    f32 = torch.float32
    with FakeTensorMode(allow_non_fake_inputs=False):
        logits, hidden, weight, targets, row_kind, old, ref, advantages, seq_ids = fake_batch("cuda", dtype, False)
        out = selective_logprobs(logits, targets, 0.7, row_kind != 0, with_entropy=True)
        for tensor in out:
            check(tensor, (N,), f32, "cuda")
        assert selective_logprobs(logits, targets).entropy is None
        loss = gta_loss(logits, targets, row_kind, old, advantages, ref, settings, seq_ids=seq_ids)
        check(loss.sft_loss, (), f32, "cuda")
        check(loss.rl_loss, (), f32, "cuda")
        check(fused_linear_logprobs(hidden, weight, targets, 0.7, row_kind != 0), (N,), f32, "cuda")
        fused = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages, ref, settings,
                                      seq_ids=seq_ids)
        for tensor in fused[:3]:
            check(tensor, (), f32, "cuda")
        for name, tensor in (*loss.stats.items(), *fused.stats.items()):
            check(tensor, (N,), torch.bool if name == "clipped" else f32, "cuda")
        # The backward ops, called directly (no autograd), as the registered backwards call them.
        lse = out.lse
        check(ops.selective_logprobs_bwd(out.logprobs, logits, targets, None, lse, 0.7), (N, V), dtype, "cuda")
        grad_hidden, grad_weight = ops.fused_linear_logprobs_bwd(out.logprobs, hidden, weight, targets, None, lse,
                                                                 0.7, 4, True, True, True)
        check(grad_hidden, (N, D), dtype, "cuda")
        check(grad_weight, (V, D), dtype, "cuda")
        *_, grad_hidden, grad_weight = ops.fused_linear_gta_loss(
            hidden, weight, targets, row_kind, old, advantages, None, old, old, 0.2, 0.2, 0.0, 1.0, 1.0, 1.0, 4,
            True, True, True)
        check(grad_hidden, (N, D), dtype, "cuda")
        check(grad_weight, (V, D), f32, "cuda")  # the fp32 accumulator; the backward casts it


# Fake CUDA tensors with autograd need a CUDA build of torch; elsewhere fake CPU tensors, whose op
# path needs the interpreter, as the real kernels would.
FAKE_GRAD_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not (HAS_TRITON and (FAKE_GRAD_DEVICE == "cuda" or triton_runs_on(torch.empty(0)))),
                    reason="the ops are picked for CUDA tensors, or CPU ones with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_autograd(dtype):
    """Forward and backward of each public function through the registered backward formulas
    and the backward ops' fake implementations: gradients shaped and typed as their inputs."""
    device = FAKE_GRAD_DEVICE
    with FakeTensorMode(allow_non_fake_inputs=False):
        logits, hidden, weight, targets, row_kind, old, ref, advantages, seq_ids = fake_batch(device, dtype, True)
        selected = selective_logprobs(logits, targets, 0.7, row_kind != 0, with_entropy=True)
        assert selected.logprobs.requires_grad and not selected.lse.requires_grad
        assert not selected.entropy.requires_grad
        for inplace_backward in (False, True):
            logprobs = selective_logprobs(logits * 1, targets, 0.7, inplace_backward=inplace_backward).logprobs
            (grad,) = torch.autograd.grad(logprobs.sum(), logits)
            check(grad, tuple(logits.shape), dtype, device)
        unfused = gta_loss(logits, targets, row_kind, old, advantages, ref, LossSettings(beta=0.05))
        (grad,) = torch.autograd.grad(unfused.sft_loss + unfused.rl_loss, logits)
        check(grad, tuple(logits.shape), dtype, device)
        for loss in (fused_linear_logprobs(hidden, weight, targets).sum(),
                     fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages).loss):
            grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
            check(grad_hidden, tuple(hidden.shape), dtype, device)
            check(grad_weight, tuple(weight.shape), dtype, device)
        fused = fused_linear_gta_loss(hidden, weight, targets, row_kind, old, advantages)
        assert fused.loss.requires_grad and not fused.sft_loss.requires_grad
        assert not any(t.requires_grad for t in fused.stats.values())
