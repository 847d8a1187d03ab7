"""GPU-only: the kernels at the sizes users run, where int32 offsets would overflow.

N x V past 2^31 elements (N = 16384 rows of V = 151936 bf16 logits, 5 GB): the last rows sit
past every 32-bit offset, so a kernel indexing with int32 reads the wrong memory there. Rows are
checked against the fp32 reference computed on those rows alone. bench/gpu_check.py runs this.
"""

import pytest
import torch

from gtacore.kernels import fused_linear_logprobs, selective_logprobs
from gtacore.kernels.fused_linear import fused_linear_logprobs_reference
from gtacore.kernels.selective_logprobs import selective_logprobs_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_rows_past_two_to_the_31_elements():
    N, V, T = 16384, 151936, 0.7
    assert N * V > 2**31
    torch.manual_seed(0)
    logits = (3 * torch.randn(N, V, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    out = selective_logprobs(logits, targets, T)
    upstream = torch.randn(N, device="cuda")
    (grad,) = torch.autograd.grad(out.logprobs, logits, upstream)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")  # the last ones lie past 2^31 elements
    picked = logits.detach()[rows].float().requires_grad_()
    ref = selective_logprobs_reference(picked, targets[rows], T).logprobs
    (ref_grad,) = torch.autograd.grad(ref, picked, upstream[rows])
    torch.testing.assert_close(out.logprobs[rows], ref, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(grad[rows].float(), ref_grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("D", [896, 3584])
def test_chunked_lm_head_at_full_vocabulary(D):
    N, V = 4096, 151936
    torch.manual_seed(D)
    hidden = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") / D**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    upstream = torch.randn(N, device="cuda")
    got = fused_linear_logprobs(hidden, weight, targets)
    grads = torch.autograd.grad(got, (hidden, weight), upstream)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    want = fused_linear_logprobs_reference(h32, w32, targets)
    want_grads = torch.autograd.grad(want, (h32, w32), upstream)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)  # bf16 logits vs fp32: rounding of |x| ~ 10
    for a, b in zip(grads, want_grads):
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2  # relative: bf16's 2^-8 over sums of D or N terms
