"""Tiny tokenizers trained inside tests and written as checkpoint folders for models.tokenizer.Tokenizer.

Kinds, chosen to split the format tags differently:
- bytelevel: GPT-2 byte-level BPE; its regex keeps letters and punctuation apart, so tags
  split into pieces ("<", "guess", ">") but never merge with content.
- bytelevel-noregex: byte-level BPE without pre-tokenization: merges cross anything, giving
  tokens such as ">joy</" or "</guess><think>" that straddle tags and content.
- metaspace: SentencePiece-style ("▁" for spaces, a prefix space on the first piece, stripped
  again on decode), which also merges across punctuation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A generation prompt ending in a blank line (as Llama-3's does): GPT-2's whitespace rule then
# splits the prompt's trailing "\n\n" differently when text follows it.
CHATML_BLANK_LINE = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(path: Path, corpus: list[str], vocab_size: int, kind: str = "bytelevel", template: str = CHATML,
                    added_tokens: tuple[str, ...] = ()) -> Path:
    """Train a BPE tokenizer of `kind` on `corpus` and write tokenizer.json + tokenizer_config.json."""
    tok = HFTokenizer(tok_models.BPE())
    if kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = sorted(set("".join(corpus)) | {"▁"})
    elif kind in ("bytelevel", "bytelevel-noregex"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "bytelevel")
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(kind)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(list(added_tokens))  # non-special added tokens, as Qwen3's <think> and </think>
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": None, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    stops = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return path
