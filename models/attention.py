"""Attention backends: flash-attn when importable, PyTorch SDPA otherwise.

Four ways a batch reaches attention, described by `AttnSpec`:

- causal: [B, T] sequences, right-padded or unpadded. Pads sit after every real
  token, so a causal mask alone keeps them out of real tokens' attention.
- mask: an explicit boolean mask [B, 1, Tq, Tk] (True = may attend): left-padded
  prompts in generation, and attention to a KV cache.
- prefix: continuations that share prompts (shared-prefix training). The
  prompts ran earlier and their keys/values arrive as `prefix_k/v` [1, Hkv, Np, Dh];
  the continuations of group g (packed in one row) attend to prompt g's keys and
  to their own earlier tokens, never to other continuations. One SDPA call per
  group with an explicit mask [nq, np + nq]; see gtacore/packing.py.
- varlen: several sequences packed into one row [1, N] with cumulative lengths
  `cu_seqlens` [S+1]. flash-attn runs this without touching padding. The SDPA
  fallback runs each sequence as its own causal call (a Python loop over
  sequences): no compute is spent on padding or on cross-sequence blocks, at the
  cost of one small kernel launch per sequence.

flash-attn is used only on CUDA tensors in fp16/bf16 and only for the causal and
varlen kinds; everything else uses SDPA. Both compute the same softmax attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional dependency; never required
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    HAS_FLASH_ATTN = False


@dataclass
class AttnSpec:
    kind: str = "causal"  # "causal" | "mask" | "prefix" | "varlen"
    mask: torch.Tensor | None = None  # [B, 1, Tq, Tk] bool, for kind "mask"
    cu_seqlens: torch.Tensor | None = None  # [S+1] int32, for kind "varlen"
    max_seqlen: int = 0
    seq_lengths: list[int] | None = None  # host copy of the lengths (SDPA varlen loop)
    groups: list[tuple[int, int, int, int]] | None = None  # prefix: (q_start, q_end, p_start, p_end)
    group_masks: list[torch.Tensor] | None = None  # prefix: [1, 1, nq, np + nq] bool per group


def _use_flash(q: torch.Tensor) -> bool:
    return HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, prefix_kv=None) -> torch.Tensor:
    """q [B, H, Tq, Dh], k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh]. GQA when Hkv < H."""
    gqa = k.shape[1] != q.shape[1]
    if spec.kind == "prefix":
        return _prefix(q, k, v, prefix_kv, spec, gqa)
    if spec.kind == "causal":
        if _use_flash(q):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)  # [B, T, H, Dh] -> [B, H, T, Dh]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if spec.kind == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=spec.mask, enable_gqa=gqa)
    if spec.kind == "varlen":
        return _varlen(q, k, v, spec, gqa)
    raise ValueError(f"unknown attention kind {spec.kind!r}")


def _varlen(q, k, v, spec: AttnSpec, gqa: bool) -> torch.Tensor:
    assert q.shape[0] == 1, "varlen attention takes one packed row [1, H, N, Dh]"
    if _use_flash(q):
        # [1, H, N, Dh] -> [N, H, Dh], as flash-attn's varlen API wants.
        qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
        cu = spec.cu_seqlens.to(torch.int32)
        out = flash_attn_varlen_func(qt, kt, vt, cu, cu, spec.max_seqlen, spec.max_seqlen, causal=True)
        return out.transpose(0, 1).unsqueeze(0)  # [N, H, Dh] -> [1, H, N, Dh]
    lengths = spec.seq_lengths or spec.cu_seqlens.diff().tolist()
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, enable_gqa=gqa))
        start += n
    if start < q.shape[2]:  # trailing padding after the last sequence: keep it finite
        outs.append(torch.zeros_like(q[:, :, start:]))
    return torch.cat(outs, dim=2)


def _prefix(q, k, v, prefix_kv, spec: AttnSpec, gqa: bool) -> torch.Tensor:
    """Continuations [1, H, Nc, Dh] over their group's prompt keys + their own keys."""
    pk, pv = prefix_kv  # [1, Hkv, Np, Dh]
    outs = []
    for (qs, qe, ps, pe), mask in zip(spec.groups, spec.group_masks):
        kg = torch.cat((pk[:, :, ps:pe], k[:, :, qs:qe]), dim=2)  # [1, Hkv, np + nq, Dh]
        vg = torch.cat((pv[:, :, ps:pe], v[:, :, qs:qe]), dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, qs:qe], kg, vg, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, dim=2)
