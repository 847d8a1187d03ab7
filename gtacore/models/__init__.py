"""The decoder, its checkpoints and its tokenizer. Nothing about training lives here.

    model = load_pretrained("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                      # [B, T, V]
    save_pretrained(model, "out/", tokenizer_dir="path/to/checkpoint")
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_tensors, write_checkpoint
from .config import ConfigError, ModelConfig
from .decoder import Decoder, KVCache

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (choose from {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def load_pretrained(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Decoder:
    """Load an HF-layout safetensors checkpoint folder into a `Decoder`.

    dtype None keeps the checkpoint's `torch_dtype` (float32 if it names none).
    The model is built on the meta device; each tensor is read once, straight to
    `device`, in `dtype`.
    """
    path = Path(path)
    cfg = ModelConfig.from_file(path)
    dtype = parse_dtype(dtype, default=_DTYPES.get(cfg.torch_dtype or "", torch.float32))
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {name: (p.shape, dtype) for name, p in model.state_dict().items()}
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    state = dict(read_tensors(path, expected, optional=optional, dtype=dtype, device=device))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    return model.eval()


def save_pretrained(
    model: Decoder,
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    write_extra=None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as an HF-layout checkpoint that `transformers` and vLLM load.

    Tied embeddings are stored once (no `lm_head.weight`), as Hugging Face does.
    The folder appears complete or not at all. `state_dict` replaces the model's
    own tensors (e.g. whole tensors gathered from a sharded model).
    """
    tensors = dict(model.state_dict() if state_dict is None else state_dict)
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    dtype = next(iter(tensors.values())).dtype
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype, "float32")
    return write_checkpoint(path, tensors, model.config.to_dict(dtype=dtype_name), tokenizer_dir, max_shard_bytes=max_shard_bytes, write_extra=write_extra)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "load_pretrained",
    "save_pretrained",
    "parse_dtype",
]
