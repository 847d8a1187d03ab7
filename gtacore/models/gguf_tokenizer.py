"""The tokenizer of a llama.cpp GGUF file, rebuilt with `tokenizers` as a Hugging Face
tokenizer.json (and the tokenizer_config.json fields) from the vocabulary, merges and token
types the file stores (gtacore/models/convert_gguf.py)."""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType values


class GGUFError(ValueError):
    """A GGUF file we cannot convert; the message names the key or tensor."""


def metadata_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in meta and default is None:
        raise GGUFError(f"missing metadata key {key!r}")
    return int(meta.get(key, default))



# Split regexes of the original tokenizer.json files (Llama 3 and Qwen2), the
# same ones llama.cpp implements for these `tokenizer.ggml.pre` values.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer, bool]:
    """(normalizer, pre-tokenizer, BPE ignore_merges) of the original tokenizer.json for `tokenizer.ggml.pre`."""
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex, then bytes
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt2", "default"):
        return None, gpt2_split, False
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split]), False
    if pre == "llama-bpe":  # Llama 3 takes a pre-token that is in the vocab whole, before merging
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return None, pre_tokenizers.Sequence([split, bytes_only]), True
    if pre == "qwen2":  # Qwen2 NFC-normalizes first
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return normalizers.NFC(), pre_tokenizers.Sequence([split, bytes_only]), False
    raise GGUFError(f"tokenizer.ggml.pre={pre!r} is not supported (supported: smollm, gpt2, default, llama-bpe, qwen2)")


def build_tokenizer(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) from the `tokenizer.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model={kind!r} is not supported (only 'gpt2': byte-level BPE)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("tokenizer.ggml.tokens has duplicate entries; ids would not round-trip")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    normalizer, pre_tokenizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # llama.cpp stores added tokens as raw text and matches them whole before BPE;
    # control ones are special (dropped by skip_special_tokens), user-defined ones are not.
    added = [i for i, kind in enumerate(types) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False) for i in added])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:

        def template(seq: str, type_id: int) -> list[str]:
            return [f"{bos}:{type_id}"] * add_bos + [f"${seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos

        specials = [t for t, add in ((bos, add_bos), (eos, add_eos)) if add]
        tok.post_processor = processors.TemplateProcessing(
            single=template("A", 0),
            pair=template("A", 0) + template("B", 1),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(specials)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": metadata_int(meta, "llama.context_length"),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tok.to_str(), tokenizer_config
