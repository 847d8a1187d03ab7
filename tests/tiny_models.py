"""Tiny random Hugging Face configs for each family we support, and a writer for them."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama3-untied": dict(
        BASE,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    "llama-tied": dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2-tied": dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-untied": dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1e6, tie_word_embeddings=False),
    "qwen3-tied": dict(BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1e6, head_dim=24, tie_word_embeddings=True),
}


def hf_model(family: str, seed: int = 0):
    """A transformers model with random weights (biases and norms randomised too)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**FAMILIES[family])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_hf_checkpoint(family: str, path: Path, seed: int = 0, **save_kwargs) -> Path:
    model = hf_model(family, seed)
    model.save_pretrained(path, **save_kwargs)
    return path
