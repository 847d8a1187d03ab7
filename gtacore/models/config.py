"""Model configuration, read from a checkpoint's Hugging Face `config.json`.

The config decides the architecture; we never infer it from a model name. Every
option we do not implement is rejected by name, so an unsupported checkpoint is
a clear error and never a silently wrong model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = (None, "default", "llama3")


class ConfigError(ValueError):
    """A config.json we cannot honour; the message names the file and key."""


@dataclass
class ModelConfig:
    model_type: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hkv
    head_dim: int  # Dh
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias also biases o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over Dh on each q and k head
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # written back on save

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key: str):
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return d[key]

        def reject(key: str, value: Any, why: str = "is not supported") -> None:
            raise ConfigError(f"{source}: {key}={value!r} {why}")

        # Strict types: int() would quietly turn a corrupt 3.5 into 3, and a string or
        # null would fail far from here with no key named.
        def integer(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                reject(key, value, "must be a positive integer")
            return value

        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                reject(key, value, "must be a positive number")
            return float(value)

        def table(key: str) -> dict | None:
            value = d.get(key)
            if value is not None and not isinstance(value, dict):
                reject(key, value, "must be a JSON object or null")
            return value

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            reject("model_type", model_type, f"is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            reject("hidden_act", act, "is not supported (only 'silu': SwiGLU)")
        if d.get("mlp_bias", False):
            reject("mlp_bias", d["mlp_bias"])
        if d.get("pretraining_tp", 1) not in (1, None):
            reject("pretraining_tp", d["pretraining_tp"])
        if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False):
            reject("use_sliding_window", True, "is not supported (full attention only)")
        rope_scaling = table("rope_scaling")
        rope_type = None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                reject("rope_scaling.rope_type", rope_type, "is not supported (supported: default, llama3)")
            if rope_type == "default":
                rope_scaling = None
        # transformers 5 moves rope_theta into rope_parameters; accept both.
        rope_params = table("rope_parameters") or {}
        if rope_params.get("rope_type") not in (None, "default", "llama3"):
            reject("rope_parameters.rope_type", rope_params.get("rope_type"))
        if rope_scaling is None and rope_params.get("rope_type") == "llama3":
            rope_scaling = rope_params
        if rope_scaling is not None:  # llama3 scaling: gtacore/models/rope.py reads these two
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rope_scaling:
                    raise ConfigError(f"{source}: llama3 rope scaling is missing required key {key!r}")
                number(f"rope_scaling.{key}", rope_scaling[key])
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            reject("partial_rotary_factor", d["partial_rotary_factor"])

        hidden = integer("hidden_size", need("hidden_size"))
        heads = integer("num_attention_heads", need("num_attention_heads"))
        kv_heads = integer("num_key_value_heads", d.get("num_key_value_heads") or heads)
        head_dim = integer("head_dim", d.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            reject("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
        if model_type == "llama":
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        elif model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=integer("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size", need("intermediate_size")),
            num_hidden_layers=integer("num_hidden_layers", need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=number("rope_theta", rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type != "llama")),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=integer("max_position_embeddings", d.get("max_position_embeddings", 4096)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
            raw=dict(d),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (a checkpoint folder needs one)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=str(path))

    def to_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json to write: the original keys, with our values on top."""
        d = dict(self.raw)
        d.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
        )
        d.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling
        if dtype is not None:
            d["torch_dtype"] = dtype
        return d


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
