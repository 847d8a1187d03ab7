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
  `cu_seqlens` [S+1]. flash-attn runs this without touching padding. Without it,
  on CUDA the sequences are scattered into a right-padded batch [S, L] and run as
  one causal SDPA call (pads after each sequence never reach its real tokens);
  on CPU each sequence is its own causal call (no compute on padding, one small
  call per sequence). Both equal the packed attention.

flash-attn is used only on CUDA tensors in fp16/bf16 and only for the causal and
varlen kinds; everything else uses SDPA. Both compute the same softmax attention.

Which SDPA kernel a call takes on a GPU (bf16): SDPA's flash kernel refuses explicit masks
and its memory-efficient kernel refuses grouped-query heads (enable_gqa), so a masked call
with Hkv < H would fall to the math kernel (fp32 upcast, K/V copied per head). Masked calls
(kinds mask and prefix) therefore fold each KV head's G query heads into the query axis,
q [B, H, T, Dh] -> [B, Hkv, G*T, Dh] with the mask tiled G times: no K/V copy, H = Hkv, and
the memory-efficient kernel takes it. Unmasked causal calls (kind causal, and varlen's padded
batch) keep enable_gqa and take the flash kernel.
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
        return masked_sdpa(q, k, v, spec.mask)
    if spec.kind == "varlen":
        return _varlen(q, k, v, spec, gqa)
    raise ValueError(f"unknown attention kind {spec.kind!r}")


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA with a boolean mask [B or 1, 1, Tq, Tk], grouped-query heads folded into the query
    axis (module docstring): query head h = j*G + g reads KV head j, as repeat_interleave would."""
    B, H, Tq, Dh = q.shape
    Hkv = k.shape[1]
    if H == Hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    G = H // Hkv
    folded = q.reshape(B, Hkv, G * Tq, Dh)  # row g*Tq + t is query head j*G + g at position t
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask.repeat(1, 1, G, 1))  # [B, Hkv, G*Tq, Dh]
    return out.reshape(B, H, Tq, Dh)


def _varlen(q, k, v, spec: AttnSpec, gqa: bool) -> torch.Tensor:
    assert q.shape[0] == 1, "varlen attention takes one packed row [1, H, N, Dh]"
    if _use_flash(q):
        # [1, H, N, Dh] -> [N, H, Dh], as flash-attn's varlen API wants.
        qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
        cu = spec.cu_seqlens.to(torch.int32)
        out = flash_attn_varlen_func(qt, kt, vt, cu, cu, spec.max_seqlen, spec.max_seqlen, causal=True)
        return out.transpose(0, 1).unsqueeze(0)  # [N, H, Dh] -> [1, H, N, Dh]
    lengths = spec.seq_lengths or spec.cu_seqlens.diff().tolist()
    if q.is_cuda:
        return _varlen_padded(q, k, v, lengths, gqa)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, enable_gqa=gqa))
        start += n
    if start < q.shape[2]:  # trailing padding after the last sequence: keep it finite
        outs.append(torch.zeros_like(q[:, :, start:]))
    return torch.cat(outs, dim=2)


def _varlen_padded(q, k, v, lengths: list[int], gqa: bool) -> torch.Tensor:
    """Packed [1, H, N, Dh] -> a right-padded batch [S, H, L, Dh], one causal SDPA call, back."""
    S, L, N = len(lengths), max(lengths), q.shape[2]
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))  # [n] on the host: lengths are host ints
    offset = torch.arange(len(seq)) - torch.tensor([0, *lengths]).cumsum(0)[seq]
    where = (seq * L + offset).to(q.device)  # [n]: each packed token's slot in the padded batch

    def pad(x):  # [1, h, N, Dh] -> [S, h, L, Dh]; slots past a sequence's end stay 0
        h = x.shape[1]
        flat = x[0, :, : len(seq)].transpose(0, 1)  # [n, h, Dh]
        return x.new_zeros(S * L, h, x.shape[3]).index_copy(0, where, flat).view(S, L, h, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, enable_gqa=gqa)  # [S, H, L, Dh]
    out = out.transpose(1, 2).reshape(S * L, q.shape[1], q.shape[3]).index_select(0, where)  # [n, H, Dh]
    out = out.transpose(0, 1)[None]  # [1, H, n, Dh]
    if len(seq) < N:  # trailing padding after the last sequence: keep it finite
        out = torch.cat((out, torch.zeros_like(q[:, :, len(seq):])), dim=2)
    return out


def _prefix(q, k, v, prefix_kv, spec: AttnSpec, gqa: bool) -> torch.Tensor:
    """Continuations [1, H, Nc, Dh] over their group's prompt keys + their own keys."""
    pk, pv = prefix_kv  # [1, Hkv, Np, Dh]
    outs = []
    for (qs, qe, ps, pe), mask in zip(spec.groups, spec.group_masks):
        kg = torch.cat((pk[:, :, ps:pe], k[:, :, qs:qe]), dim=2)  # [1, Hkv, np + nq, Dh]
        vg = torch.cat((pv[:, :, ps:pe], v[:, :, qs:qe]), dim=2)
        outs.append(masked_sdpa(q[:, :, qs:qe], kg, vg, mask))
    return torch.cat(outs, dim=2)
