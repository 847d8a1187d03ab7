"""The fused-kernel-friendly attention forms equal the plain ones.

masked_sdpa folds grouped-query heads into the query axis (no K/V copy, so SDPA's
memory-efficient kernel takes it on a GPU); the varlen fallback on CUDA runs one padded causal
call instead of one call per sequence. On CPU both are compared with the obvious forms: K/V
repeated per head, and each sequence alone. On a GPU the last test forces the kernels the
module docstring names (bench/gpu_check.py runs it there).
"""

import pytest
import torch
import torch.nn.functional as F

from gtacore.models.attention import _varlen_padded, masked_sdpa


def _qkv(B, H, Hkv, Tq, Tk, Dh=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, Dh, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hkv, Tk, Dh, generator=g).to(device, dtype) for _ in range(2))
    mask = torch.rand(B, 1, Tq, Tk, generator=g) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    return q, k, v, mask.to(device)


def repeated_kv(q, k, v, mask):
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)


@pytest.mark.parametrize("H, Hkv, Tq", [(8, 2, 5), (6, 3, 1), (4, 4, 7), (14, 2, 3)])
def test_folded_heads_equal_repeated_kv(H, Hkv, Tq):
    q, k, v, mask = _qkv(2, H, Hkv, Tq, 11)
    torch.testing.assert_close(masked_sdpa(q, k, v, mask), repeated_kv(q, k, v, mask), atol=1e-6, rtol=1e-5)
    # A batch-1 mask broadcasts over rows as before.
    torch.testing.assert_close(masked_sdpa(q, k, v, mask[:1]), repeated_kv(q, k, v, mask[:1]), atol=1e-6, rtol=1e-5)


def test_folded_heads_gradients_equal_repeated_kv():
    q, k, v, mask = _qkv(1, 8, 2, 4, 9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_ref = [t.clone().requires_grad_() for t in (q, k, v)]
    upstream = torch.randn(1, 8, 4, 16)
    got = torch.autograd.grad(masked_sdpa(*leaves, mask), leaves, upstream)
    want = torch.autograd.grad(repeated_kv(*leaves_ref, mask), leaves_ref, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lengths, trailing", [([5, 3, 7], 0), ([1, 4], 2), ([6], 0)])
def test_padded_varlen_equals_each_sequence_alone(lengths, trailing):
    N = sum(lengths) + trailing
    q, k, v, _ = _qkv(1, 8, 2, N, N)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _varlen_padded(*leaves, lengths, gqa=True)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, enable_gqa=True))
        start += n
    want = torch.cat(outs + [torch.zeros_like(q[:, :, start:])], dim=2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    out.sum().backward()  # gradients flow through the scatter and gather
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the SDPA kernel choice is a GPU matter")
def test_gpu_calls_take_the_fused_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, mask = _qkv(2, 12, 2, 64, 64, Dh=64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # raises if the kernel refuses the call
        got = masked_sdpa(q, k, v, mask)
    torch.testing.assert_close(got.float(), repeated_kv(q.float(), k.float(), v.float(), mask), atol=2e-2, rtol=2e-2)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        _varlen_padded(q[:1], k[:1], v[:1], [40, 24], gqa=True)
