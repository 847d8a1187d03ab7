"""A minimal decoder-only transformer for the Llama, Qwen2 and Qwen3 families.

    x = embed(ids)
    for each block:  x = x + o_proj(attn(rope(q(norm(x))), rope(k(norm(x))), v(norm(x))))
                     x = x + down(silu(gate(norm(x))) * up(norm(x)))
    logits = lm_head(norm(x))

Family differences, all read from config.json: Qwen2 adds q/k/v biases; Qwen3
adds an RMSNorm over each q and k head (before RoPE) and states `head_dim`;
Llama-3 scales RoPE frequencies ("llama3"). Grouped-query attention everywhere
(Hkv <= H). Module and parameter names match Hugging Face's, so a checkpoint's
state dict loads with no renaming.

Single-device code: no distributed logic lives here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttnSpec, attention
from .config import ModelConfig
from .rope import apply_rope, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, then cast back before the weight, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer: k, v [L, B, Hkv, S, Dh].

    `slots` [Tq] (long) says where the current tokens' k/v go; attention then reads
    the first `kv_len` slots. Both are set by the caller before each forward so the
    per-step decode allocates nothing (a prerequisite for CUDA-graph capture).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        self.kv_len = max_len

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, Hkv, Tq, Dh] at `slots`; return all cached k/v [B, Hkv, kv_len, Dh]."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[layer, :, :, : self.kv_len], self.v[layer, :, :, : self.kv_len]

    def repeat_rows(self, repeats: int) -> "KVCache":
        """A cache whose row b*repeats + g is a copy of row b (G samples per prompt)."""
        out = KVCache.__new__(KVCache)
        out.k = self.k.repeat_interleave(repeats, dim=1)
        out.v = self.v.repeat_interleave(repeats, dim=1)
        out.slots, out.kv_len = self.slots, self.kv_len
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.H, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.H * self.Dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.Hkv * self.Dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.Hkv * self.Dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.Dh, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, spec: AttnSpec, cache: KVCache | None = None, prefix_kv=None):
        """x [B, T, D] -> (out [B, T, D], this call's rotated (k, v) [B, Hkv, T, Dh]).

        `prefix_kv`: the prompts' (k, v) for spec kind "prefix" (shared-prefix training).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.Dh)
        k = self.k_proj(x).view(B, T, self.Hkv, self.Dh)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # [B, T, H, Dh] -> [B, H, T, Dh]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # v is in the compute dtype (autocast's, else the weights'); RoPE and Qwen3's norms in fp32
        # would leave q, k in fp32 beside it.
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        new_kv = (k, v)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attention(q, k, v, spec, prefix_kv)  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.Dh)), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, spec: AttnSpec, cache: KVCache | None = None, prefix_kv=None):
        """-> (x, (k, v)). Keys/values are returned, not appended to an argument: FSDP's
        hooks may copy a block's arguments (casting them), so outputs must be outputs."""
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, spec, cache, prefix_kv)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Backbone(nn.Module):
    """Named `model` inside `Decoder` so parameter names match Hugging Face's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE buffer (needed after building on the meta device)."""
        cfg = self.config
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(self.lm_head.weight.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        spec: AttnSpec | None = None,
        cache: KVCache | None = None,
        prefix_kv: list | None = None,
        return_kv: bool = False,
    ):
        """input_ids [B, T] (long) -> final-norm hidden states [B, T, D].

        positions [B, T] default to 0..T-1 per row; `spec` defaults to causal.
        Shared-prefix training: with `return_kv` also return each layer's (k, v)
        [B, Hkv, T, Dh] as a list; `prefix_kv` (such a list) gives the prompts'
        keys/values to a forward of continuations with spec kind "prefix".
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # [B, T, Dh]
        spec = spec or AttnSpec()
        kvs = []
        for i, block in enumerate(self.model.layers):
            x, kv = block(x, cos, sin, spec, cache, prefix_kv[i] if prefix_kv is not None else None)
            if return_kv:
                kvs.append(kv)
        x = self.model.norm(x)
        return (x, kvs) if return_kv else x

    def forward(self, input_ids: torch.Tensor, return_hidden: bool = False, return_kv: bool = False, **kwargs):
        """input_ids [B, T] -> logits [B, T, V], or hidden states [B, T, D] with return_hidden;
        with return_kv, a pair (that, [(k, v) per layer]).

        The training path takes hidden states so the loss kernel can fuse the LM head
        (it goes through `forward` so that DDP's and FSDP's hooks see it).
        """
        out = self.hidden_states(input_ids, return_kv=return_kv, **kwargs)
        hidden, kvs = out if return_kv else (out, None)
        out = hidden if return_hidden else self.lm_head(hidden)
        return (out, kvs) if return_kv else out
