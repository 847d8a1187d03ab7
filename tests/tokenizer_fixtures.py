"""Tiny tokenizers trained inside tests and written as checkpoint folders for gtacore.models.tokenizer.Tokenizer.

Kinds, chosen to split the format tags differently:
- bytelevel: GPT-2 byte-level BPE; its regex keeps letters and punctuation apart, so tags
  split into pieces ("<", "guess", ">") but never merge with content.
- bytelevel-noregex: byte-level BPE without pre-tokenization: merges cross anything, giving
  tokens such as ">joy</" or "</guess><think>" that straddle tags and content.
- metaspace: SentencePiece-style ("▁" for spaces, a prefix space on the first piece, stripped
  again on decode), which also merges across punctuation.

Families give each tokenizer the special tokens, bos/eos/pad and stop ids of a real checkpoint
(tokenizer_config.json and generation_config.json of Qwen2.5-Instruct, Qwen3, Llama-3.2-Instruct)
and, by default, its real chat template from tests/data/chat_templates/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]
    eos: str
    stops: tuple[str, ...]  # generation_config.json's eos_token_id list
    bos: str | None = None
    pad: str | None = None
    added: tuple[str, ...] = ()  # non-special added tokens: skip_special_tokens keeps them
    template_file: str | None = None


_QWEN = dict(specials=tuple(SPECIALS), eos="<|im_end|>", stops=("<|im_end|>", "<|endoftext|>"))
FAMILIES = {
    "chatml": Family(**_QWEN),
    "qwen2.5": Family(**_QWEN, pad="<|endoftext|>", template_file="qwen2_5_instruct.jinja"),
    "qwen3": Family(**_QWEN, pad="<|endoftext|>", added=("<think>", "</think>"), template_file="qwen3.jinja"),
    "llama3.2": Family(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                        "<|eot_id|>"), eos="<|eot_id|>", stops=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                       bos="<|begin_of_text|>", template_file="llama3_2_instruct.jinja"),
}


def family_template(family: str) -> str:
    return (TEMPLATES / FAMILIES[family].template_file).read_text(encoding="utf-8")


def write_tokenizer(path: Path, corpus: list[str], vocab_size: int, kind: str = "bytelevel", template: str | None = None,
                    added_tokens: tuple[str, ...] = (), family: str = "chatml") -> Path:
    """Train a BPE tokenizer of `kind` on `corpus` and write tokenizer.json + tokenizer_config.json +
    generation_config.json for `family`; `template` defaults to the family's (CHATML for chatml)."""
    fam = FAMILIES[family]
    if template is None:
        template = family_template(family) if fam.template_file else CHATML
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials), initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(list(dict.fromkeys(fam.added + tuple(added_tokens))))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": fam.bos, "eos_token": fam.eos, "pad_token": fam.pad,
           "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(t) for t in fam.stops]}))
    return path
