"""A tiny random checkpoint with a real (tiny) tokenizer and a tiny dataset, for end-to-end runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tokenizer_fixtures import write_tokenizer

LABELS = ["joy", "anger", "fear"]
WORDS = {"joy": ["glad", "happy", "great"], "anger": ["furious", "mad", "annoyed"], "fear": ["scared", "afraid", "nervous"]}


def write_dataset(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = LABELS[i % len(LABELS)]
            f.write(json.dumps({"text": f"I feel {rng.choice(WORDS[label])} about item {i}.", "label": label}) + "\n")
    return path


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    import transformers

    corpus = [f"<guess>{lab}</guess><think>the text says {w}</think><answer>{lab}</answer>" for lab in LABELS for w in WORDS[lab]]
    corpus += [f"I feel {w} about item {i}." for i in range(30) for ws in WORDS.values() for w in ws]
    write_tokenizer(path, corpus * 3, vocab_size=300)
    vocab = json.loads((path / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True, bos_token_id=None, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path
